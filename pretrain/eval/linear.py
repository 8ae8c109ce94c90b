"""Linear probe: multinomial logistic regression on standardised frozen features."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pretrain.eval.common import check_split

MAX_ITER = 1000


def linear_top1(train_x, train_y, test_x, test_y) -> float:
    """Top-1 accuracy of L-BFGS logistic regression (C=1) fit on ``train_x: (N, F)``, scored on ``test_x: (M, F)``.

    Deterministic (L-BFGS has no randomness). A probe that stops at ``MAX_ITER`` is still a fair probe, so the
    convergence warning is silenced rather than surfaced on every evaluation.
    """
    train_x, train_y, test_x, test_y = check_split(train_x, train_y, test_x, test_y)
    if np.unique(train_y).size < 2:
        raise ValueError("train_y must contain at least 2 classes for a linear probe")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=MAX_ITER))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(train_x, train_y)
    return float(np.mean(probe.predict(test_x) == test_y))
