"""Semantic search on frozen features: cosine nearest neighbours, and how well they retrieve the same class.

``search`` is the tool (a query's top-k items of a gallery); ``retrieval_scores`` scores it with the labels as the
ground truth of relevance: precision@k (the share of the k nearest gallery items that share the query's class) and
MAP@R (Musgrave et al., 2020, "A metric learning reality check": average precision over the first R results, R = the
number of gallery items of the query's class), which rewards putting all of a class first, not only a few.
"""

from __future__ import annotations

import numpy as np

from pretrain.eval.common import as_features, check_split, l2_normalize


def search(gallery: np.ndarray, queries: np.ndarray, k: int, *, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery rows per query by cosine similarity -> ``(indices (M, k) int64, similarities (M, k))``, each
    row in decreasing similarity (ties: the smaller index first). gallery: (N, F), queries: (M, F)."""
    gallery, queries = as_features(gallery, "gallery"), as_features(queries, "queries")
    if gallery.shape[1] != queries.shape[1]:
        raise ValueError(f"gallery has {gallery.shape[1]} features but queries have {queries.shape[1]}")
    if not 1 <= k <= gallery.shape[0]:
        raise ValueError(f"k must be in [1, {gallery.shape[0]}] (the gallery size), got {k}")
    g, q = l2_normalize(gallery), l2_normalize(queries)
    idx = np.empty((q.shape[0], k), dtype=np.int64)
    sims = np.empty((q.shape[0], k))
    for start in range(0, q.shape[0], chunk):  # bounds the (chunk, N) similarity matrix
        sim = q[start : start + chunk] @ g.T
        order = _top_k(sim, k)
        idx[start : start + chunk] = order
        sims[start : start + chunk] = np.take_along_axis(sim, order, axis=1)
    return idx, sims


def _top_k(sim: np.ndarray, k: int) -> np.ndarray:
    """Column indices ``(B, k)`` of each row's ``k`` largest values of ``sim: (B, N)``, in decreasing order, ties by
    the smaller index: what a stable sort of the whole row gives, from a partition (each row's k-th largest value)
    and a sort of the entries at or above it only."""
    b, n = sim.shape
    if 4 * k >= n:  # most of the row: the whole sort costs about as much
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]
    kth = np.partition(sim, n - k, axis=1)[:, n - k]
    at_least = sim >= kth[:, None]  # k per row, more where values tie the k-th
    if at_least.sum() > 4 * k * b:  # ties everywhere (a collapsed encoder's features): the sort holds less
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]
    rows, cols = np.nonzero(at_least)
    order = np.lexsort((cols, -sim[rows, cols], rows))  # by row, then value down, then index up
    rows, cols = rows[order], cols[order]
    rank = np.arange(rows.size) - np.searchsorted(rows, rows)  # place within the row
    return cols[rank < k].reshape(b, k)


def retrieval_scores(train_x, train_y, test_x, test_y, *, k: int = 10) -> tuple[float, float]:
    """``(precision@k, MAP@R)`` of the test features as queries against the train features as the gallery."""
    train_x, train_y, test_x, test_y = check_split(train_x, train_y, test_x, test_y)
    classes, counts = np.unique(train_y, return_counts=True)
    r_of = dict(zip(classes.tolist(), counts.tolist()))
    r_max = max(r_of.get(y, 0) for y in test_y.tolist())
    if r_max == 0:
        raise ValueError("no test label occurs in the train labels: nothing is relevant to any query")
    idx, _ = search(train_x, test_x, max(k, r_max))
    hits = train_y[idx] == test_y[:, None]  # (M, max(k, R_max))
    precision_at_k = float(hits[:, :k].mean())
    aps = []
    for row, y in zip(hits, test_y.tolist()):
        r = r_of.get(y, 0)
        if r == 0:
            aps.append(0.0)
            continue
        top = row[:r]
        # precision at each rank where a relevant item sits, summed, over R (a miss at rank i adds 0)
        aps.append(float((np.cumsum(top) / np.arange(1, r + 1))[top].sum() / r))
    return precision_at_k, float(np.mean(aps))
