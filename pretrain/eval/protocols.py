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
KNN_K = 20
"""The training images that vote in knn_top1 (weighted, DINO's protocol)."""
RETRIEVAL_K = 10
"""retrieval_p10's k."""


def evaluate_features(train_x, train_y, test_x, test_y, *, seed: int = 0) -> dict[str, float]:
    """kNN, linear probe, 1-/5-shot, KMeans (on the test features), search (test queries against the train gallery:
    precision@10, MAP@R), one-class-out kNN anomaly AUROC and ICA class-axis AUROC for ``train_x: (N, F)``,
    ``test_x: (M, F)``."""
    train_x, train_y, test_x, test_y = check_split(train_x, train_y, test_x, test_y)
    nmi, ari = kmeans_scores(test_x, test_y, n_clusters=len(set(test_y.tolist())), seed=seed)
    p10, map_r = retrieval_scores(train_x, train_y, test_x, test_y, k=RETRIEVAL_K)
    return {
        "knn_top1": knn_top1(train_x, train_y, test_x, test_y, k=KNN_K),
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


def small_class_notes(train_y, test_y) -> list[str]:
    """Lines saying which scores cannot reach 1 however well the features separate the classes, where classes have
    fewer training images than a protocol reads: retrieval_p10's ceiling (each test query's class's training images
    over RETRIEVAL_K, averaged), and knn_top1's KNN_K voters drawn partly from other classes."""
    import numpy as np

    classes, counts = np.unique(np.asarray(train_y), return_counts=True)
    per_class = dict(zip(classes.tolist(), counts.tolist(), strict=True))
    notes = []
    if (few := sum(c < RETRIEVAL_K for c in counts)) and len(test_y):
        ceiling = float(np.mean([min(per_class.get(y, 0), RETRIEVAL_K) / RETRIEVAL_K for y in np.asarray(test_y)
                                 .tolist()]))
        notes.append(f"retrieval_p10 is at most {ceiling:.4f} here: {few} of {len(classes)} classes have fewer than "
                     f"{RETRIEVAL_K} training images to find")
    if few := sum(c < KNN_K for c in counts):
        notes.append(f"knn_top1 can stay below 1 for features that separate the classes: {few} of {len(classes)} "
                     f"classes have fewer training images than the {KNN_K} that vote (fewest: {int(counts.min())})")
    return notes
