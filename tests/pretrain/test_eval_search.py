"""Search (cosine top-k), retrieval precision@k and MAP@R, and one-class-out kNN anomaly AUROC: closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.eval.anomaly import anomaly_auroc, knn_anomaly_scores
from pretrain.eval.search import retrieval_scores, search


def _angles(*degrees: float) -> np.ndarray:
    """Unit 2-D vectors at these angles (scaled by 1..n: cosine ignores the norm)."""
    rad = np.deg2rad(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1) * np.arange(1, len(degrees) + 1)[:, None]


def test_search_ranks_by_cosine_and_breaks_ties_by_index():
    gallery = _angles(0, 90, 10, 180, 10)
    idx, sims = search(gallery, _angles(0), 4)
    assert idx.tolist() == [[0, 2, 4, 1]]  # 2 and 4 tie at 10 degrees: the smaller index first
    np.testing.assert_allclose(sims, [[1.0, np.cos(np.deg2rad(10)), np.cos(np.deg2rad(10)), 0.0]], atol=1e-12)
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\]"):
        search(gallery, _angles(0), 6)
    with pytest.raises(ValueError, match="gallery has 2 features but queries have 3"):
        search(gallery, np.ones((1, 3)), 1)


def test_top_k_is_the_stable_sorts_head_ties_included():
    """The partition-based top-k gives what a stable sort of the whole row gives, on rows with many ties (values
    rounded to 0-2 decimals), for k from 1 to the row's length (small k: the partition path; large: the sort)."""
    from pretrain.eval.search import _top_k

    rng = np.random.default_rng(0)
    paths = set()
    for _ in range(200):
        b, n = int(rng.integers(1, 20)), int(rng.integers(1, 300))
        k = int(rng.integers(1, n + 1))
        sim = np.round(rng.normal(size=(b, n)), int(rng.integers(0, 3)))
        np.testing.assert_array_equal(_top_k(sim, k), np.argsort(-sim, axis=1, kind="stable")[:, :k])
        paths.add(4 * k >= n)
    assert paths == {True, False}
    collapsed = np.ones((3, 500))  # every similarity ties: the first k columns, by index
    np.testing.assert_array_equal(_top_k(collapsed, 5), np.tile(np.arange(5), (3, 1)))


def test_retrieval_precision_and_map_at_r():
    # gallery: class 0 at 0 and 40 degrees, class 1 at 20 and 90; the query (class 0, at 0 degrees) ranks them
    # 0 (hit), 20 (miss), 40 (hit), 90 (miss). R = 2: AP@R = (1/1 + 0) / 2 = 0.5; precision@2 = 0.5, @1 = 1.
    gallery, labels = _angles(0, 40, 20, 90), np.array([0, 0, 1, 1])
    assert retrieval_scores(gallery, labels, _angles(0), np.array([0]), k=2) == pytest.approx((0.5, 0.5))
    assert retrieval_scores(gallery, labels, _angles(0), np.array([0]), k=1)[0] == pytest.approx(1.0)
    # two tight, far apart clusters: everything retrieved is relevant
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal([10, 0], 0.1, (30, 2)), rng.normal([0, 10], 0.1, (30, 2))])
    y = np.repeat([0, 1], 30)
    assert retrieval_scores(x[::2], y[::2], x[1::2], y[1::2], k=10) == pytest.approx((1.0, 1.0))
    # features that say nothing: precision near the class share (0.5)
    noise = rng.normal(size=(400, 16))
    p10, map_r = retrieval_scores(noise[:200], np.arange(200) % 2, noise[200:], np.arange(200) % 2, k=10)
    assert 0.4 < p10 < 0.6 and 0.15 < map_r < 0.4  # random order: about half of the first R are hits, half as high


def test_knn_anomaly_score_is_mean_cosine_distance():
    normal = _angles(0, 90, 180)
    scores = knn_anomaly_scores(normal, _angles(0, 45), k=2)
    # 0 deg: nearest 0 and 90 -> distances 0 and 1; 45 deg: 0 and 90 -> 1 - cos 45 each
    np.testing.assert_allclose(scores, [0.5, 1 - np.cos(np.deg2rad(45))], atol=1e-12)
    # k beyond the normal data: all of it; features that do not match: refused by name
    np.testing.assert_allclose(knn_anomaly_scores(normal, _angles(0), k=9), [1.0], atol=1e-12)
    with pytest.raises(ValueError, match="normal has 2 features but queries have 3"):
        knn_anomaly_scores(normal, np.ones((1, 3)))


def test_auroc_of_every_column_is_sklearns_ties_included():
    """The rank form scores all columns at once and gives scikit-learn's roc_auc_score for each, ties (scores rounded
    to one decimal) counting a half; one class only is refused."""
    from sklearn.metrics import roc_auc_score

    from pretrain.eval.common import auroc

    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=(300, 6)), 1)
    scores[:, 5] = 0.0  # all tied: 0.5
    positive = rng.random(300) < 0.3
    scores[positive, 2] += 0.5  # one column that knows the class
    got = auroc(positive, scores)
    np.testing.assert_allclose(got, [roc_auc_score(positive, c) for c in scores.T], rtol=0, atol=1e-12)
    assert got[5] == 0.5 and got[2] > 0.6
    assert auroc(positive, scores[:, 2]) == pytest.approx(got[2], abs=1e-12)
    with pytest.raises(ValueError, match="AUROC needs both classes: 0 positive and 300 negative samples"):
        auroc(np.zeros(300, bool), scores)


def test_anomaly_auroc_one_class_out():
    rng = np.random.default_rng(0)
    centers = np.eye(3) * 10
    y = np.repeat([0, 1, 2], 40)
    x = centers[y] + rng.normal(0, 0.1, (120, 3))
    assert anomaly_auroc(x[::2], y[::2], x[1::2], y[1::2]) == pytest.approx(1.0)
    noise = rng.normal(size=(600, 8))
    y6 = np.arange(600) % 3
    assert abs(anomaly_auroc(noise[:300], y6[:300], noise[300:], y6[300:]) - 0.5) < 0.08
    # each (query, class) score against its definition, however the queries are chunked and whether a query's
    # candidates (its most similar train rows) hold k rows outside the class or it takes the exact partition instead
    from pretrain.eval.anomaly import _one_class_out_scores
    from pretrain.eval.common import l2_normalize

    train, train_y, test = noise[:300], y6[:300], noise[300:]
    sims = l2_normalize(test) @ l2_normalize(train).T
    expected = np.stack([1 - np.sort(sims[:, train_y != c], axis=1)[:, -5:].mean(axis=1) for c in (0, 1, 2)], 1)
    for chunk, candidates in ((1024, 64), (7, 64), (1024, 2), (7, 6)):
        got = _one_class_out_scores(train, train_y, test, [0, 1, 2], 5, chunk=chunk, candidates=candidates)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12, err_msg=f"chunk {chunk}, {candidates}")
    with pytest.raises(ValueError, match="at least two classes"):
        anomaly_auroc(x[:5], np.zeros(5), x[5:10], np.zeros(5))


def test_ica_finds_the_class_axis_behind_a_mixing():
    """Independent sources, one of which carries the class, mixed by a random matrix: ICA unmixes the class axis
    (AUROC near 1); features that carry no class stay near the max-of-32-components level of noise."""
    from pretrain.eval.ica import ica_class_auroc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 800)
    sources = rng.laplace(size=(800, 8))
    sources[:, 3] = np.where(y == 1, 1.0, -1.0) + 0.2 * rng.laplace(size=800)
    x = sources @ rng.normal(size=(8, 8))
    assert ica_class_auroc(x[:400], y[:400], x[400:], y[400:], n_components=8) > 0.97
    noise = rng.normal(size=(800, 16))
    assert ica_class_auroc(noise[:400], y[:400], noise[400:], y[400:], n_components=16) < 0.7
    with pytest.raises(ValueError, match="at least two classes"):
        ica_class_auroc(x[:10], y[:10], x[10:20], np.zeros(10))


def test_ica_of_flat_images_is_scored_within_the_features_rank():
    """Raw pixels of flat images (one value per image, as 1x1 px images resized): 256 features of rank 1 after
    centering. FastICA had been asked for 15 components, its whitening overflowed and the whole evaluation ended in
    "array must not contain infs or NaNs"; now it takes as many components as the rank, and scores."""
    import warnings

    from pretrain.eval.ica import centered_rank, ica_class_auroc

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 10)
    x = np.outer(rng.choice([0.0, 0.5, 1.0, -1.2], size=20), np.ones(256)).astype(np.float32)
    assert centered_rank(x) == 1 and centered_rank(np.ones((5, 3))) == 0
    assert centered_rank(rng.normal(size=(40, 8))) == 8 and centered_rank(rng.normal(size=(6, 50))) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (an overflow in the whitening warned first)
        score = ica_class_auroc(x[:15], y[:15], x[15:], y[15:])
    assert 0.5 <= score <= 1


def test_finetune_trains_a_copy_and_is_seeded():
    """Fine-tuning a random-init ConvNet for 3 epochs on the digits split classifies the test digits well (0.86 when
    written; chance is 0.1); the
    encoder passed in and the caller's RNG are untouched; the same call gives the same accuracy."""
    import torch

    from pretrain.eval.digits import digits_eval_set, split_indices
    from pretrain.eval.finetune import finetune_top1
    from pretrain.models import build_backbone

    images, labels = digits_eval_set(image_size=16, channels=1, mean=[0.3], std=[0.38])
    train, test = split_indices(labels)
    torch.manual_seed(0)
    encoder = build_backbone("convnet", image_size=16, in_chans=1, width=0.25)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    state = torch.get_rng_state()
    args = (encoder, images[train], labels[train], images[test], labels[test])
    acc = finetune_top1(*args, epochs=3, lr=3e-3)
    assert acc > 0.75
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert torch.equal(torch.get_rng_state(), state)
    assert finetune_top1(*args, epochs=3, lr=3e-3) == acc
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        finetune_top1(*args, epochs=0)


def test_finetune_scores_the_fine_tuned_weights_whatever_batchnorm_statistics_the_encoder_came_with():
    """An encoder whose BatchNorm running statistics are those of other data (a pretraining's: here set far off), fine-
    tuned briefly on 300 images (25 steps): the score is the one of the same encoder with fresh statistics (the
    statistics are computed again over the training images with the final weights), not chance (0.10 when the
    running averages were used as they were left: one class predicted for every image)."""
    import torch

    from pretrain.eval.digits import digits_eval_set, split_indices
    from pretrain.eval.finetune import finetune_top1
    from pretrain.models import build_backbone

    images, labels = digits_eval_set(image_size=16, channels=1, mean=[0.3], std=[0.38])
    train, test = split_indices(labels)
    train = train[:300]
    scores = []
    for stale in (False, True):
        torch.manual_seed(0)
        encoder = build_backbone("convnet", image_size=16, in_chans=1, width=0.25)
        for m in encoder.modules():
            if stale and isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(50.0)
                m.running_var.fill_(1e4)
        scores.append(finetune_top1(encoder, images[train], labels[train], images[test], labels[test], epochs=5))
    assert scores[1] == scores[0] > 0.4


def test_finetune_with_layer_decay_trains_a_vits_layers_at_their_rates():
    """Fine-tuning a ViT with layer-wise lr decay (MAE's protocol) learns the digits from a random init (0.41 when
    written; chance is 0.1) and differs from the flat rate (the rates per layer:
    tests/pretrain/test_engine.py::test_param_groups_by_layer); a rate outside (0, 1] is refused."""
    import torch

    from pretrain.eval.digits import digits_eval_set, split_indices
    from pretrain.eval.finetune import finetune_top1
    from pretrain.models import build_backbone

    images, labels = digits_eval_set(image_size=16, channels=1, mean=[0.3], std=[0.38])
    train, test = split_indices(labels)
    torch.manual_seed(0)
    encoder = build_backbone("vit_tiny", image_size=16, in_chans=1, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                             global_pool="mean")
    args = (encoder, images[train], labels[train], images[test], labels[test])
    decayed = finetune_top1(*args, epochs=5, lr=3e-3, layer_decay=0.5)
    assert decayed > 0.25 and decayed != finetune_top1(*args, epochs=5, lr=3e-3)
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\], got 1.5"):
        finetune_top1(*args, epochs=1, layer_decay=1.5)
