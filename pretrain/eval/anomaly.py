"""Anomaly detection on frozen features: how far a sample lies from its nearest normal training samples.

The score of a sample is its mean cosine distance to its ``k`` nearest neighbours among the normal training features
(the kNN detector that works well on pretrained features, e.g. Reiss et al., 2021, "PANDA"). ``anomaly_auroc`` runs
the one-class-out protocol: each class in turn is the anomaly, the other classes' training features are the normal
data, and the AUROC of telling the held-out class's test samples from the others' is averaged over classes.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from pretrain.eval.common import as_features, check_split
from pretrain.eval.search import search


def knn_anomaly_scores(normal: np.ndarray, queries: np.ndarray, *, k: int = 5) -> np.ndarray:
    """(M,) mean cosine distance of each query (M, F) to its ``k`` nearest rows of ``normal`` (N, F); higher = more
    anomalous."""
    normal = as_features(normal, "normal")
    k = min(k, normal.shape[0])
    _, sims = search(normal, queries, k)
    return 1.0 - sims.mean(axis=1)


def anomaly_auroc(train_x, train_y, test_x, test_y, *, k: int = 5) -> float:
    """Mean over classes of the AUROC of detecting that class as the anomaly (one class out, see the module)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    train_x, train_y, test_x, test_y = check_split(train_x, train_y, test_x, test_y)
    aurocs = []
    for c in np.unique(test_y):
        normal = train_x[train_y != c]
        is_anomaly = test_y == c
        if normal.shape[0] == 0 or is_anomaly.all():
            continue  # a protocol needs both normal data and both kinds of test sample
        aurocs.append(roc_auc_score(is_anomaly, knn_anomaly_scores(normal, test_x, k=k)))
    if not aurocs:
        raise ValueError("anomaly_auroc needs at least two classes")
    return float(np.mean(aurocs))
