"""Frozen-feature protocols on synthetic features whose answer is known."""

import numpy as np
import pytest

from pretrain.eval import METRICS, evaluate_features, fewshot_top1, kmeans_scores, knn_top1, linear_top1
from pretrain.eval.fewshot import sample_support


def _blobs(n_per_class: int, n_classes: int = 10, dim: int = 32, noise: float = 0.1, seed: int = 0):
    """Well-separated Gaussian blobs: features (n_per_class * n_classes, dim), labels in [0, n_classes)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per_class)
    return centers[y] + noise * rng.normal(size=(y.size, dim)), y


@pytest.fixture(scope="module")
def blobs():
    train_x, train_y = _blobs(30, seed=0)
    test_x, test_y = _blobs(10, seed=0)  # same centres (same seed), fresh noise below
    test_x = test_x + 0.1 * np.random.default_rng(1).normal(size=test_x.shape)
    return train_x, train_y, test_x, test_y


@pytest.fixture(scope="module")
def noise():
    rng = np.random.default_rng(0)
    return rng.normal(size=(600, 32)), rng.integers(0, 10, 600), rng.normal(size=(500, 32)), rng.integers(0, 10, 500)


def test_separable_features_score_near_one(blobs):
    """Clearly separable blobs: every accuracy protocol and NMI/ARI are (almost) perfect."""
    scores = evaluate_features(*blobs)
    assert list(scores) == list(METRICS)
    for key, value in scores.items():
        assert value > 0.95, key


def test_random_features_score_near_chance(noise):
    """Features independent of the labels: accuracies near 1/10, NMI and ARI near 0."""
    scores = evaluate_features(*noise)
    for key in ("knn_top1", "linear_top1", "fewshot_1", "fewshot_5"):
        assert 0.03 < scores[key] < 0.2, (key, scores[key])
    assert scores["kmeans_nmi"] < 0.1
    assert abs(scores["kmeans_ari"]) < 0.05


def test_knn_votes_are_weighted_by_similarity():
    """One very close neighbour outvotes two far ones at T=0.07, but not when the weights are flattened (T large)."""
    train_x = np.array([[1.0, 0.0], [0.5, 0.866], [0.5, -0.866]])  # cosine to the query: 1, 0.5, 0.5
    train_y = np.array([0, 1, 1])
    test_x, test_y = np.array([[1.0, 0.0]]), np.array([0])
    assert knn_top1(train_x, train_y, test_x, test_y, k=3, temperature=0.07) == 1.0
    assert knn_top1(train_x, train_y, test_x, test_y, k=3, temperature=100.0) == 0.0


def test_knn_uses_cosine_not_euclidean():
    """A far-away point in the right direction beats a near point in another direction."""
    train_x = np.array([[100.0, 0.0], [0.1, 0.2]])
    train_y = np.array([7, 3])
    assert knn_top1(train_x, train_y, np.array([[1.0, 0.1]]), np.array([7]), k=1) == 1.0


def test_knn_keeps_arbitrary_label_values(blobs):
    """Labels need not be 0..C-1: shifting and scaling them changes nothing."""
    train_x, train_y, test_x, test_y = blobs
    assert knn_top1(train_x, train_y * 3 + 100, test_x, test_y * 3 + 100) == knn_top1(*blobs)


def test_sample_support_picks_exactly_shots_per_class():
    """Every class gets exactly `shots` distinct indices."""
    labels = np.repeat(np.arange(10), 7)
    idx = sample_support(labels, 5, np.random.default_rng(0))
    assert idx.size == 50 and np.unique(idx).size == 50
    assert np.array_equal(np.bincount(labels[idx]), np.full(10, 5))


def test_sample_support_draws_differ_across_seeds():
    """Different generators give different support sets (the 10 draws are not one draw repeated)."""
    labels = np.repeat(np.arange(10), 30)
    a = sample_support(labels, 1, np.random.default_rng(0))
    b = sample_support(labels, 1, np.random.default_rng(1))
    assert not np.array_equal(a, b)


def test_sample_support_rejects_too_few_examples():
    """A class with fewer than `shots` examples is a ValueError naming the class."""
    labels = np.array([0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="class 1"):
        sample_support(labels, 3, np.random.default_rng(0))


def test_fewshot_is_deterministic_and_seed_dependent(noise):
    """Same seed, same score; the score averages over draws so another seed moves it."""
    a = fewshot_top1(*noise, shots=1, seed=0)
    assert a == fewshot_top1(*noise, shots=1, seed=0)
    assert a != fewshot_top1(*noise, shots=1, seed=100)


def test_one_shot_with_one_example_per_class_is_cosine_1nn():
    """With exactly one training example per class the support set is fixed: cosine 1-NN by hand."""
    rng = np.random.default_rng(0)
    train_x, train_y = rng.normal(size=(4, 8)), np.arange(4)
    test_x, test_y = rng.normal(size=(50, 8)), rng.integers(0, 4, 50)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    expected = np.mean((unit(test_x) @ unit(train_x).T).argmax(1) == test_y)
    assert fewshot_top1(train_x, train_y, test_x, test_y, shots=1, draws=3) == pytest.approx(expected)


def test_linear_probe_is_deterministic(blobs):
    """Two fits on the same data give the same score."""
    noisy = (blobs[0] + np.random.default_rng(2).normal(scale=2.0, size=blobs[0].shape),) + blobs[1:]
    assert linear_top1(*noisy) == linear_top1(*noisy)


def test_kmeans_on_blobs_recovers_clusters(blobs):
    """KMeans on well separated blobs: NMI and ARI near 1."""
    nmi, ari = kmeans_scores(blobs[0], blobs[1])
    assert nmi > 0.95 and ari > 0.95


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.zeros((5, 3)), np.zeros(4), np.zeros((2, 3)), np.zeros(2)), "train_y"),
        ((np.zeros((5, 3)), np.zeros(5), np.zeros((2, 4)), np.zeros(2)), "features"),
        ((np.zeros(5), np.zeros(5), np.zeros((2, 3)), np.zeros(2)), "train_x"),
        ((np.full((5, 3), np.nan), np.zeros(5), np.zeros((2, 3)), np.zeros(2)), "NaN"),
    ],
)
def test_bad_inputs_raise_value_error(args, match):
    """Mismatched or malformed features/labels fail with a ValueError naming the problem."""
    with pytest.raises(ValueError, match=match):
        knn_top1(*args)


def test_bad_hyperparameters_raise_value_error(blobs):
    """k < 1, non-positive temperature and shots < 1 are rejected."""
    with pytest.raises(ValueError, match="k must be"):
        knn_top1(*blobs, k=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_top1(*blobs, temperature=0.0)
    with pytest.raises(ValueError, match="shots"):
        fewshot_top1(*blobs, shots=0)
