"""A picture of the frozen features: the test split embedded in 2-D by t-SNE, one panel per encoder (trained, random
init, raw pixels), each point coloured by its class. What the kNN row of the report says in numbers, seen."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAP_POINTS = 1000
"""At most this many points per panel (a stratified draw): t-SNE's cost grows with them (~1 s for 450 on one core)."""
PCA_DIMS = 50
"""Features wider than this are reduced by PCA before t-SNE (the usual practice: less noise, faster neighbours)."""
LEGEND_CLASSES = 20
"""Up to this many classes get distinct colours and a legend; more share a continuous colour map, unlabelled."""
LEGEND_WIDTH = 1.0
"""Inches of the figure's width the legend takes, right of the panels."""


def map_indices(labels, *, limit: int = MAP_POINTS, seed: int = 0) -> np.ndarray:
    """Sorted indices into ``labels: (N,)``: all of them, or a stratified draw of ``limit`` (every class keeps its
    share, at least one point each)."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    if labels.shape[0] <= limit:
        return np.arange(labels.shape[0])
    keep, _ = train_test_split(np.arange(labels.shape[0]), train_size=limit, stratify=labels, random_state=seed)
    return np.sort(keep)


def embed_2d(features, *, seed: int = 0) -> np.ndarray:
    """``features: (N, F)`` -> ``(N, 2)`` t-SNE coordinates. Rows are L2-normalised first (neighbours by cosine, as
    the kNN of the report finds them), reduced to PCA_DIMS by PCA when wider; perplexity 30, or less for few points.
    Deterministic for a given ``seed``. Features that are all the same (a collapsed encoder) are all one point, (0, 0).
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 4:
        raise ValueError(f"features must be (N, F) with N >= 4 to embed in 2-D, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features hold NaN or inf; they cannot be embedded")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if np.ptp(x, axis=0).max() < 1e-12:  # one feature for every image (a collapsed encoder): one point, as it is;
        return np.zeros((x.shape[0], 2), np.float32)  # t-SNE's PCA init would divide by zero (and crash sklearn)
    if x.shape[1] > PCA_DIMS:
        x = PCA(min(PCA_DIMS, x.shape[0]), random_state=seed).fit_transform(x)
    perplexity = min(30.0, (x.shape[0] - 1) / 3)  # t-SNE needs perplexity < N; the usual 30 for N >= 91
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(x).astype(np.float32)


def embedding_map(panels: Mapping[str, np.ndarray], labels, classes: Sequence[str], path, *, title: str,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Embed each of ``panels`` (``{panel title: (N, F) features}``, rows matching ``labels: (N,)``, indices into
    ``classes``) in 2-D (:func:`embed_2d`) on the same :func:`map_indices` draw, and draw them side by side to the PNG
    ``path``. Returns ``{panel title: (M, 2) coordinates}`` of the drawn rows, ``"indices"``: which rows they are."""
    labels = np.asarray(labels)
    if not panels:
        raise ValueError("an embedding map needs at least one panel")
    for name, feats in panels.items():
        if np.asarray(feats).shape[0] != labels.shape[0]:
            raise ValueError(f"panel {name!r}: {np.asarray(feats).shape[0]} feature rows for {labels.shape[0]} labels")
    keep = map_indices(labels, seed=seed)
    coords = {name: embed_2d(np.asarray(feats)[keep], seed=seed) for name, feats in panels.items()}
    drawn = f" ({len(keep)} of them drawn, stratified)" if len(keep) < labels.shape[0] else ""
    plot_embedding_map(coords, labels[keep], classes, path, title=title + drawn)
    return {**coords, "indices": keep}


def plot_embedding_map(coords: Mapping[str, np.ndarray], labels, classes: Sequence[str], path, *,
                       title: str) -> Path:
    """Write a PNG of the 2-D ``coords`` (``{panel title: (N, 2)}``) in a row of panels, each point coloured by
    ``classes[labels[i]]``; a legend of the class names when there are at most LEGEND_CLASSES."""
    from matplotlib import colormaps

    labels = np.asarray(labels)
    n_classes = len(classes)
    if n_classes <= 10:
        colours = colormaps["tab10"](np.arange(n_classes))
    elif n_classes <= LEGEND_CLASSES:
        colours = colormaps["tab20"](np.arange(n_classes))
    else:
        colours = colormaps["turbo"](np.linspace(0, 1, n_classes))
    fig = Figure(figsize=(4.2 * len(coords) + (LEGEND_WIDTH if n_classes <= LEGEND_CLASSES else 0), 4.6), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, xy) in enumerate(coords.items()):
        ax = fig.add_subplot(1, len(coords), i + 1)
        for c in range(n_classes):
            at = labels == c
            ax.scatter(xy[at, 0], xy[at, 1], s=8, color=colours[c], alpha=0.8, linewidths=0, label=classes[c])
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if n_classes <= LEGEND_CLASSES:
        handles, names = fig.axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="center right", fontsize=8, markerscale=2.5, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - (LEGEND_WIDTH / fig.get_figwidth() if n_classes <= LEGEND_CLASSES else 0), 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
