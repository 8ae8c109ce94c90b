"""Input checks and normalisation shared by the evaluation protocols."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def as_features(x, name: str) -> np.ndarray:
    """``x`` as a finite float64 ``(N, F)`` array; ValueError naming ``name`` otherwise."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (N, F) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def as_labels(y, n: int, name: str) -> np.ndarray:
    """``y`` as a 1-D array of length ``n``; ValueError naming ``name`` otherwise."""
    arr = np.asarray(y)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries (one per feature row), got shape {arr.shape}")
    return arr


def check_split(train_x, train_y, test_x, test_y) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate a train/test split of features ``(N, F)`` and labels ``(N,)``; returns them as arrays."""
    train_x = as_features(train_x, "train_x")
    test_x = as_features(test_x, "test_x")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train_x has {train_x.shape[1]} features but test_x has {test_x.shape[1]}")
    train_y = as_labels(train_y, train_x.shape[0], "train_y")
    test_y = as_labels(test_y, test_x.shape[0], "test_y")
    return train_x, train_y, test_x, test_y


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x: (N, F)`` scaled to unit L2 norm (all-zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def auroc(is_positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of each column of ``scores: (M,)`` or ``(M, C)`` at telling the rows where ``is_positive: (M,)`` is set
    from the rest, higher scores meaning positive -> a float (1-D scores) or ``(C,)``. The Mann-Whitney form on ranks
    (ties count a half), the same number as sklearn's ``roc_auc_score`` for every column in one ranking."""
    is_positive = np.asarray(is_positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(is_positive.sum())
    n_neg = is_positive.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes: {n_pos} positive and {n_neg} negative samples")
    ranks = rankdata(scores, axis=0)  # average ranks of tied scores
    return (ranks[is_positive].sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
