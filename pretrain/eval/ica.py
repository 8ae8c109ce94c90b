"""Independent component analysis of frozen features: do the classes line up with single axes?

FastICA (scikit-learn) unmixes the (whitened) features into statistically independent components; in good
embeddings these tend to be interpretable, one semantic attribute each (Yamagiwa et al., 2023, "Discovering universal
geometry in embeddings with ICA"). ``ica_components`` gives the unmixing for inspection (the top samples of a
component); ``ica_class_auroc`` scores the alignment: for each class, the best AUROC any single component reaches in
telling that class from the rest (a component may point either way), averaged over classes. It is fit on the training
features and scored on the test ones; 0.5 = no axis knows the class, 1.0 = some axis separates it perfectly.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.decomposition import FastICA
from sklearn.exceptions import ConvergenceWarning

from pretrain.eval.common import as_features, auroc, check_split


def ica_components(x, n_components: int, *, seed: int = 0, rank: int | None = None) -> FastICA:
    """FastICA (unit-variance whitening, ``n_components`` at most the rank of the centered ``x: (N, F)``) fit on
    ``x``; its ``transform`` gives the sources (N, n). More components than the rank would whiten directions of zero
    variance (features of flat images, rank 1: the whitening overflowed and FastICA failed on infinities).
    ``rank``: ``centered_rank(x)``, where the caller has it already."""
    x = as_features(x, "x")
    n = max(1, min(n_components, centered_rank(x) if rank is None else rank))
    ica = FastICA(n_components=n, whiten="unit-variance", max_iter=500, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a near-converged unmixing is still a fair one
        ica.fit(x)
    return ica


def centered_rank(x: np.ndarray) -> int:
    """The rank of ``x: (N, F)`` less its column means: the eigenvalues of its smaller Gram matrix (in float64) above
    1e-8 of the largest (1e-4 of the largest singular value)."""
    xc = np.asarray(x, dtype=np.float64)
    xc = xc - xc.mean(axis=0)
    eig = np.linalg.eigvalsh(xc @ xc.T if xc.shape[0] < xc.shape[1] else xc.T @ xc)
    return int((eig > eig.max() * 1e-8).sum()) if eig.max() > 0 else 0


def ica_class_auroc(train_x, train_y, test_x, test_y, *, n_components: int = 32, seed: int = 0) -> float:
    """Mean over classes of the best single-component AUROC (either sign) on the test features (see the module)."""
    train_x, train_y, test_x, test_y = check_split(train_x, train_y, test_x, test_y)
    classes = np.unique(test_y)
    if classes.size < 2:
        raise ValueError("ica_class_auroc needs at least two classes in test_y")
    # features constant on the training set carry nothing; FastICA's whitening would divide by their zero variance
    keep = train_x.std(axis=0) > 1e-12
    rank = centered_rank(train_x[:, keep]) if keep.any() else 0
    if rank == 0:
        return 0.5
    ica = ica_components(train_x[:, keep], n_components, seed=seed, rank=rank)
    sources = ica.transform(test_x[:, keep])
    best = []
    for c in classes:
        auc = auroc(test_y == c, sources)  # every component at once
        best.append(float(np.max(np.maximum(auc, 1.0 - auc))))
    return float(np.mean(best))
