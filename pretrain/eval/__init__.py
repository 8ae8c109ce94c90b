"""Evaluation of encoders: frozen-feature protocols (kNN, linear probe, few-shot, clustering, search, anomaly
detection, ICA), fine-tuning, zero-shot classification; the digits eval set; reports."""

from pretrain.eval.anomaly import anomaly_auroc, knn_anomaly_scores
from pretrain.eval.cluster import kmeans_scores
from pretrain.eval.digits import digits_eval_set, split_indices
from pretrain.eval.fewshot import fewshot_top1
from pretrain.eval.finetune import finetune_top1
from pretrain.eval.ica import ica_class_auroc, ica_components
from pretrain.eval.knn import knn_top1
from pretrain.eval.linear import linear_top1
from pretrain.eval.protocols import METRICS, evaluate_features
from pretrain.eval.report import evaluate_encoder, extract_features, format_report, write_report
from pretrain.eval.search import retrieval_scores, search
from pretrain.eval.zeroshot import class_embeddings, zeroshot_top1

__all__ = [
    "METRICS",
    "anomaly_auroc",
    "class_embeddings",
    "digits_eval_set",
    "evaluate_encoder",
    "evaluate_features",
    "extract_features",
    "fewshot_top1",
    "finetune_top1",
    "format_report",
    "ica_class_auroc",
    "ica_components",
    "kmeans_scores",
    "knn_anomaly_scores",
    "knn_top1",
    "linear_top1",
    "retrieval_scores",
    "search",
    "split_indices",
    "write_report",
    "zeroshot_top1",
]
