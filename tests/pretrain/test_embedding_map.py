"""The embedding map (pretrain.eval.embedding_map): t-SNE of features, drawn per panel and coloured by class. The 2-D
points keep what the features know about the classes (real digits: their pixels do, noise does not), stay the rows
of their labels through a stratified draw, and come out the same for the same seed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from pretrain.eval.digits import split_indices
from pretrain.eval.embedding_map import LEGEND_WIDTH, MAP_POINTS, embed_2d, embedding_map, map_indices

CLASSES = [str(d) for d in range(10)]


def _knn_2d(xy: np.ndarray, labels: np.ndarray) -> float:
    """5-fold accuracy of a 5-NN classifier on the 2-D points: how far the map keeps the classes apart."""
    return float(cross_val_score(KNeighborsClassifier(5), xy, labels, cv=5).mean())


def test_the_map_keeps_the_classes_the_features_know(tmp_path):
    """Digits' pixels in 2-D keep the digits apart (a 2-D 5-NN is right ~90% of the time); Gaussian noise of the same
    count is at chance; the PNG holds one panel per encoder plus the legend, at the figure's size."""
    x, y = load_digits(return_X_y=True)
    test = split_indices(y, seed=0)[1]
    noise = np.random.default_rng(0).standard_normal((len(test), 512))
    coords = embedding_map({"pixels": x[test], "noise": noise}, y[test], CLASSES, tmp_path / "map.png", title="t")
    assert (coords["indices"] == np.arange(len(test))).all()  # 450 test digits: all drawn
    assert coords["pixels"].shape == coords["noise"].shape == (len(test), 2)
    assert _knn_2d(coords["pixels"], y[test]) > 0.85
    assert _knn_2d(coords["noise"], y[test]) < 0.3
    with Image.open(tmp_path / "map.png") as png:
        assert png.format == "PNG" and png.size == (round((4.2 * 2 + LEGEND_WIDTH) * 100), 460)


def test_a_stratified_draw_keeps_rows_and_labels_together(tmp_path):
    """All 1797 digits are more than MAP_POINTS: a draw of MAP_POINTS, every class in proportion, and the returned
    indices name the rows drawn: a 2-D 5-NN on their labels is as right as on the whole test split (misaligned rows
    would score at chance)."""
    x, y = load_digits(return_X_y=True)
    keep = map_indices(y, seed=0)
    assert len(keep) == MAP_POINTS and len(set(keep.tolist())) == MAP_POINTS and (np.diff(keep) > 0).all()
    share = np.bincount(y[keep], minlength=10) / MAP_POINTS
    assert np.abs(share - np.bincount(y, minlength=10) / len(y)).max() < 0.002
    coords = embedding_map({"pixels": x}, y, CLASSES, tmp_path / "map.png", title="all digits")
    assert (coords["indices"] == keep).all()
    assert _knn_2d(coords["pixels"], y[keep]) > 0.85


def test_same_seed_same_map_and_small_sets():
    """t-SNE is seeded: the same features give the same points; a handful of points (perplexity below 30) and
    features narrower than PCA's 50 dims embed too; rows without length (all zeros) do not break it, nor a collapsed
    encoder's features (all the same direction)."""
    x, y = load_digits(return_X_y=True)
    first, again = embed_2d(x[:200], seed=3), embed_2d(x[:200], seed=3)
    assert (first == again).all()
    small = np.concatenate([x[:6], np.zeros((2, 64))])
    assert embed_2d(small).shape == (8, 2) and np.isfinite(embed_2d(small)).all()
    collapsed = np.tile(np.random.default_rng(0).standard_normal(128), (40, 1)) * np.arange(1, 41)[:, None]
    assert (embed_2d(collapsed) == 0).all()  # one direction for every image: one point (t-SNE's PCA init would crash)


def test_many_classes_share_a_colour_map(tmp_path):
    """Over 20 classes: no legend (the figure is the panels' width alone), still one colour per class."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(25), 8)
    feats = rng.standard_normal((25, 32))[labels] * 5 + rng.standard_normal((200, 32))
    coords = embedding_map({"blobs": feats}, labels, [f"c{i}" for i in range(25)], tmp_path / "m.png", title="25")
    assert _knn_2d(coords["blobs"], labels) > 0.9
    with Image.open(tmp_path / "m.png") as png:
        assert png.size == (420, 460)


def test_bad_input_is_one_line(tmp_path):
    """Too few points, non-finite features, rows that do not match the labels, no panels: a ValueError naming it."""
    with pytest.raises(ValueError, match=r"^features must be \(N, F\) with N >= 4 to embed in 2-D, got \(3, 5\)$"):
        embed_2d(np.ones((3, 5)))
    with pytest.raises(ValueError, match=r"^features hold NaN or inf"):
        embed_2d(np.full((10, 5), np.nan))
    with pytest.raises(ValueError, match=r"^panel 'a': 9 feature rows for 10 labels$"):
        embedding_map({"a": np.ones((9, 4))}, np.arange(10) % 2, ["x", "y"], tmp_path / "m.png", title="t")
    with pytest.raises(ValueError, match=r"^an embedding map needs at least one panel$"):
        embedding_map({}, np.arange(10) % 2, ["x", "y"], tmp_path / "m.png", title="t")
    assert not (tmp_path / "m.png").exists()
