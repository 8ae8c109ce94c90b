"""Weighted k-nearest-neighbour classification on frozen features (DINO's ``eval_knn``)."""

from __future__ import annotations

import numpy as np

from pretrain.eval.common import check_split, l2_normalize


def knn_predict(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *, k: int, temperature: float, chunk: int = 1024
) -> np.ndarray:
    """Labels ``(M,)`` for ``test_x: (M, F)`` from ``train_x: (N, F)``, ``train_y: (N,)``.

    Cosine similarity on L2-normalised features; each of the ``k`` nearest neighbours votes for its class with weight
    ``exp(sim / temperature)``, as in DINO. Ties go to the smallest class label.
    """
    classes, train_idx = np.unique(train_y, return_inverse=True)
    train_n = l2_normalize(train_x)
    test_n = l2_normalize(test_x)
    k = min(k, train_n.shape[0])
    preds = np.empty(test_n.shape[0], dtype=np.int64)
    for start in range(0, test_n.shape[0], chunk):  # bounds the (chunk, N) similarity matrix
        sim = test_n[start : start + chunk] @ train_n.T
        nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        nn_sim = np.take_along_axis(sim, nn, axis=1)
        # subtracting the row max keeps exp() finite at small temperatures; it scales every vote of a row equally
        weights = np.exp((nn_sim - nn_sim.max(axis=1, keepdims=True)) / temperature)
        votes = np.zeros((sim.shape[0], classes.size))
        np.add.at(votes, (np.arange(sim.shape[0])[:, None], train_idx[nn]), weights)
        preds[start : start + chunk] = votes.argmax(axis=1)
    return classes[preds]


def knn_top1(train_x: np.ndarray, train_y, test_x, test_y, *, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy of the weighted kNN classifier; features ``(N, F)`` / ``(M, F)``, labels ``(N,)`` / ``(M,)``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    train_x, train_y, test_x, test_y = check_split(train_x, train_y, test_x, test_y)
    preds = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature)
    return float(np.mean(preds == test_y))
