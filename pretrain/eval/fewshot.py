"""Few-shot classification: cosine 1-NN against a small labelled support set, averaged over random draws."""

from __future__ import annotations

import numpy as np

from pretrain.eval.common import check_split, l2_normalize


def sample_support(labels: np.ndarray, shots: int, rng: np.random.Generator) -> np.ndarray:
    """Indices into ``labels: (N,)`` holding exactly ``shots`` distinct examples of every class, sorted."""
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < shots:
        worst = classes[counts.argmin()].item()
        raise ValueError(f"class {worst!r} has {counts.min()} training examples, fewer than shots={shots}")
    picked = [rng.choice(np.flatnonzero(labels == c), size=shots, replace=False) for c in classes]
    return np.sort(np.concatenate(picked))


def fewshot_top1(train_x, train_y, test_x, test_y, *, shots: int, draws: int = 10, seed: int = 0) -> float:
    """Mean top-1 accuracy over ``draws`` support sets of ``shots`` examples per class, drawn from the training split.

    Each test sample ``test_x: (M, F)`` takes the label of its most cosine-similar support point. Draw ``d`` uses
    ``numpy.random.default_rng(seed + d)``, so results are reproducible and draws are independent of each other.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    train_x, train_y, test_x, test_y = check_split(train_x, train_y, test_x, test_y)
    train_n, test_n = l2_normalize(train_x), l2_normalize(test_x)
    accs = []
    for d in range(draws):
        support = sample_support(train_y, shots, np.random.default_rng(seed + d))
        nearest = (test_n @ train_n[support].T).argmax(axis=1)
        accs.append(np.mean(train_y[support][nearest] == test_y))
    return float(np.mean(accs))
