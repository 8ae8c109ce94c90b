"""Frozen-feature evaluation: kNN, linear probe, few-shot, clustering; the digits eval set; reports."""

from pretrain.eval.cluster import kmeans_scores
from pretrain.eval.digits import digits_eval_set, split_indices
from pretrain.eval.fewshot import fewshot_top1
from pretrain.eval.knn import knn_top1
from pretrain.eval.linear import linear_top1
from pretrain.eval.protocols import METRICS, evaluate_features
from pretrain.eval.report import evaluate_encoder, extract_features, format_report, write_report

__all__ = [
    "METRICS",
    "digits_eval_set",
    "evaluate_encoder",
    "evaluate_features",
    "extract_features",
    "fewshot_top1",
    "format_report",
    "kmeans_scores",
    "knn_top1",
    "linear_top1",
    "split_indices",
    "write_report",
]
