"""All frozen-feature protocols in one call; the trainer's eval hook and ``pretrain eval`` use this."""

from __future__ import annotations

from pretrain.eval.anomaly import anomaly_auroc
from pretrain.eval.cluster import kmeans_scores
from pretrain.eval.common import check_split
from pretrain.eval.fewshot import fewshot_top1
from pretrain.eval.ica import ica_class_auroc
from pretrain.eval.knn import knn_top1
from pretrain.eval.linear import linear_top1
from pretrain.eval.search import retrieval_scores

METRICS = ("knn_top1", "linear_top1", "fewshot_1", "fewshot_5", "kmeans_nmi", "kmeans_ari", "retrieval_p10",
           "retrieval_map_r", "anomaly_auroc", "ica_class_auroc")
"""Keys of :func:`evaluate_features`, in report order."""


def evaluate_features(train_x, train_y, test_x, test_y, *, seed: int = 0) -> dict[str, float]:
    """kNN, linear probe, 1-/5-shot, KMeans (on the test features), search (test queries against the train gallery:
    precision@10, MAP@R), one-class-out kNN anomaly AUROC and ICA class-axis AUROC for ``train_x: (N, F)``,
    ``test_x: (M, F)``."""
    train_x, train_y, test_x, test_y = check_split(train_x, train_y, test_x, test_y)
    nmi, ari = kmeans_scores(test_x, test_y, n_clusters=len(set(test_y.tolist())), seed=seed)
    p10, map_r = retrieval_scores(train_x, train_y, test_x, test_y, k=10)
    return {
        "knn_top1": knn_top1(train_x, train_y, test_x, test_y),
        "linear_top1": linear_top1(train_x, train_y, test_x, test_y),
        "fewshot_1": fewshot_top1(train_x, train_y, test_x, test_y, shots=1, seed=seed),
        "fewshot_5": fewshot_top1(train_x, train_y, test_x, test_y, shots=5, seed=seed),
        "kmeans_nmi": nmi,
        "kmeans_ari": ari,
        "retrieval_p10": p10,
        "retrieval_map_r": map_r,
        "anomaly_auroc": anomaly_auroc(train_x, train_y, test_x, test_y),
        "ica_class_auroc": ica_class_auroc(train_x, train_y, test_x, test_y, seed=seed),
    }
