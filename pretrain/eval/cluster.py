"""Clustering quality of frozen features: KMeans on L2-normalised features against the true labels."""

from __future__ import annotations

from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from pretrain.eval.common import as_features, as_labels, l2_normalize


def kmeans_scores(x, y, *, n_clusters: int = 10, seed: int = 0) -> tuple[float, float]:
    """``(nmi, ari)`` of ``KMeans(n_clusters, n_init=10, random_state=seed)`` on ``x: (N, F)`` vs labels ``y: (N,)``."""
    x = as_features(x, "x")
    y = as_labels(y, x.shape[0], "y")
    if not 2 <= n_clusters <= x.shape[0]:
        raise ValueError(f"n_clusters must be in [2, {x.shape[0]}] (the number of samples), got {n_clusters}")
    pred = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(l2_normalize(x))
    return float(normalized_mutual_info_score(y, pred)), float(adjusted_rand_score(y, pred))
