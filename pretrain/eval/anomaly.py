"""Anomaly detection on frozen features: how far a sample lies from its nearest normal training samples.

The score of a sample is its mean cosine distance to its ``k`` nearest neighbours among the normal training features
(the kNN detector that works well on pretrained features, e.g. Reiss et al., 2021, "PANDA"). ``anomaly_auroc`` runs
the one-class-out protocol: each class in turn is the anomaly, the other classes' training features are the normal
data, and the AUROC of telling the held-out class's test samples from the others' is averaged over classes.
"""

from __future__ import annotations

import numpy as np

from pretrain.eval.common import as_features, auroc, check_split, l2_normalize


def knn_anomaly_scores(normal: np.ndarray, queries: np.ndarray, *, k: int = 5) -> np.ndarray:
    """(M,) mean cosine distance of each query (M, F) to its ``k`` nearest rows of ``normal`` (N, F); higher = more
    anomalous."""
    normal, queries = as_features(normal, "normal"), as_features(queries, "queries")
    if normal.shape[1] != queries.shape[1]:
        raise ValueError(f"normal has {normal.shape[1]} features but queries have {queries.shape[1]}")
    return _one_class_out_scores(normal, np.zeros(normal.shape[0]), queries, np.ones(1), k)[:, 0]


def _one_class_out_scores(train_x, train_y, test_x, classes, k: int, *, chunk: int = 1024,
                          candidates: int = 64) -> np.ndarray:
    """``(M, len(classes))``: column j is each test row's mean cosine distance to its ``k`` nearest train rows whose
    label is not ``classes[j]``. One similarity product for all the classes, ``chunk`` queries at a time (bounds the
    (chunk, N) matrix). A row's ``candidates`` most similar train rows, sorted, serve every class that leaves ``k`` of
    them: the k largest similarities outside a class are then the first k of its candidates, since every row past
    them is no more similar. The other (row, class) pairs, mostly a class's own rows, whose nearest rows are of that
    class, take a partition of the row's similarities to the rest: about one similarity row per test row in all,
    where a partition per class would take one per class."""
    g, q = l2_normalize(train_x), l2_normalize(test_x)
    n = g.shape[0]
    t = min(n, max(candidates, k))
    scores = np.empty((q.shape[0], len(classes)))
    for start in range(0, q.shape[0], chunk):
        sim = q[start : start + chunk] @ g.T
        top = np.argpartition(sim, n - t, axis=1)[:, n - t :]  # the t most similar, unordered
        top_sim = np.take_along_axis(sim, top, axis=1)
        order = np.argsort(-top_sim, axis=1)
        top, top_sim = np.take_along_axis(top, order, axis=1), np.take_along_axis(top_sim, order, axis=1)
        top_y = train_y[top]
        for j, c in enumerate(classes):
            outside = top_y != c
            kk = min(k, n - int((train_y == c).sum()))
            first = outside & (np.cumsum(outside, axis=1) <= kk)  # the first kk candidates outside class c
            found = first.sum(axis=1) == kk
            nearest = np.empty((sim.shape[0], kk))  # each row's kk largest, in decreasing order: one sum order
            nearest[found] = top_sim[found][first[found]].reshape(-1, kk)
            if not found.all():
                rows = np.flatnonzero(~found)
                rest = sim[np.ix_(rows, np.flatnonzero(train_y != c))]
                nearest[rows] = -np.sort(-np.partition(rest, rest.shape[1] - kk, axis=1)[:, -kk:], axis=1)
            scores[start : start + chunk, j] = 1.0 - nearest.mean(axis=1)
    return scores


def anomaly_auroc(train_x, train_y, test_x, test_y, *, k: int = 5) -> float:
    """Mean over classes of the AUROC of detecting that class as the anomaly (one class out, see the module)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    train_x, train_y, test_x, test_y = check_split(train_x, train_y, test_x, test_y)
    # a protocol needs both normal data and both kinds of test sample
    classes = [c for c in np.unique(test_y) if (train_y != c).any() and not (test_y == c).all()]
    if not classes:
        raise ValueError("anomaly_auroc needs at least two classes")
    scores = _one_class_out_scores(train_x, train_y, test_x, classes, k)
    return float(np.mean([auroc(test_y == c, scores[:, j]) for j, c in enumerate(classes)]))
