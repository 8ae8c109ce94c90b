"""Colorization: Lab conversion, chroma bins, the lightness-only encoder, the loss, the built-in colour source, and a
short training on real colour crops that must beat predicting the most common chroma bin everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.loader import make_train_stream
from data_pipeline.shards import ensure_builtin_shards, read_classes, read_manifest
from pretrain.config import load_config
from pretrain.methods.colorization import PRIOR_DECAY, ab_bins, rebalance_weights, rgb_to_lab
from pretrain.trainer import build_method
from tests.util import config_error, train_steps

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "colorization_samples.yaml"


def test_rgb_to_lab_reference_colours():
    """CIE Lab (D65) of sRGB primaries and greys, as published (e.g. colormine / Bruce Lindbloom's calculator)."""
    rgb = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 1.0], [0, 0, 0], [0.5, 0.5, 0.5]])
    lab = rgb_to_lab(rgb.view(6, 3, 1, 1)).view(6, 3)
    expected = torch.tensor([[53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793], [32.2970, 79.1875, -107.8602],
                             [100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.3890, 0.0, 0.0]])
    torch.testing.assert_close(lab, expected, atol=2e-3, rtol=0)
    # under bf16 autocast (zero.precision: bf16) the conversion stays fp32
    x = torch.rand(2, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = rgb_to_lab(x)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, rgb_to_lab(x), atol=0, rtol=0)


def test_ab_bins_grid():
    ab = torch.tensor([[-110.0, -110.0], [109.9, 109.9], [0.0, 0.0], [-1.0, 30.0], [500.0, -500.0]]).view(5, 2, 1, 1)
    # 10 bins of 22 over [-110, 110]: 0 -> bin 5, -1 -> 4, 30 -> 6; out of range clamps
    assert ab_bins(ab, 10).flatten().tolist() == [0, 99, 55, 46, 90]


def _method(*overrides: str):
    return build_method(load_config(RECIPE, ["model.backbone_kwargs={width: 0.25}", "model.proj_hidden_dim=32",
                                             *overrides]), distributed=False)


def test_encoder_reads_lightness_only_and_loss_is_cross_entropy_of_cell_bins():
    method = _method().eval()
    enc = method.backbone
    assert enc.net.features[0].in_channels == 1
    x = torch.randn(4, 3, 32, 32)
    rgb = x * enc.std + enc.mean
    lab = rgb_to_lab(rgb)
    luma = (lab[:, :1] / 100 - 0.5) / 0.25
    with torch.no_grad():
        torch.testing.assert_close(enc(x), enc.net(luma))  # the network sees L alone: colour never reaches it
        out = method({"views": [x]})
        logits = method.head(enc.net.forward_dense(luma))
    target = ab_bins(F.adaptive_avg_pool2d(lab[:, 1:], logits.shape[-2:]), 10)
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, target))
    assert logits.shape == (4, 100, 8, 8)


def test_config_errors():
    assert "data.channels: colorization needs colour images" in config_error(
        RECIPE, ["data.channels=1", "data.aug.mean=[0.5]", "data.aug.std=[0.25]"])
    assert "data.num_views: colorization predicts the colours of one view" in config_error(RECIPE,
                                                                                            ["data.num_views=2"])
    assert "method.color_bins: must be >= 2" in config_error(RECIPE, ["method.color_bins=1"])
    assert "method.color_rebalance: must be in (0, 1] or null" in config_error(RECIPE, ["method.color_rebalance=0"])


def test_rebalance_weights_favour_rare_bins_with_mean_one():
    prior = torch.tensor([0.7, 0.2, 0.1, 0.0])
    w = rebalance_weights(prior, 0.5)
    raw = 1 / (0.5 * prior + 0.5 / 4)
    torch.testing.assert_close(w, raw / (prior * raw).sum())
    assert (prior * w).sum().item() == pytest.approx(1.0) and w[0] < w[1] < w[2] < w[3]
    torch.testing.assert_close(rebalance_weights(prior, 1.0), torch.ones(4))  # lambda 1: plain cross-entropy


def test_rebalanced_loss_weighs_cells_by_the_running_bin_frequencies():
    """The loss is the mean of each cell's cross-entropy times its bin's weight; after a training step the running
    frequencies move from uniform toward that step's bins; an evaluation forward leaves them alone."""
    method = _method("method.color_rebalance=0.5")
    method.bin_prior.copy_(torch.distributions.Dirichlet(torch.ones(100)).sample())
    prior = method.bin_prior.clone()
    x = torch.randn(4, 3, 32, 32)
    method.eval()
    with torch.no_grad():
        out = method({"views": [x]})
        lab = method.backbone.lab(x)
        logits = method.head(method.backbone.net.forward_dense(method.backbone.luma(lab)))
    target = ab_bins(F.adaptive_avg_pool2d(lab[:, 1:], logits.shape[-2:]), 10)
    expected = (rebalance_weights(prior, 0.5)[target] * F.cross_entropy(logits, target, reduction="none")).mean()
    torch.testing.assert_close(out["loss"], expected)
    method.on_step_end(1, 10)
    assert torch.equal(method.bin_prior, prior)  # eval forwards do not count
    method.train()
    method({"views": [x]})
    method.on_step_end(1, 10)
    freq = torch.bincount(target.flatten(), minlength=100).float() / target.numel()
    torch.testing.assert_close(method.bin_prior, PRIOR_DECAY * prior + (1 - PRIOR_DECAY) * freq)


@pytest.fixture(scope="module")
def sample_shards(tmp_path_factory) -> list[str]:
    return ensure_builtin_shards(tmp_path_factory.mktemp("cache"), "samples")


def test_samples_source_is_colour_crops_of_two_photos(sample_shards):
    data_dir = Path(sample_shards[0]).parent
    assert read_classes(data_dir) == ["china", "flower"]
    labels = read_manifest(data_dir).column("label").to_pylist()
    assert len(labels) == 456 and sorted(set(labels)) == [0, 1]


def test_short_training_beats_the_most_common_bin(sample_shards):
    """60 AdamW steps on real colour crops (DALI views): the chroma-bin accuracy on fresh batches (BatchNorm in
    training mode, as the logged accuracy) beats always answering the batches' most common bin (near grey: 0.37 of
    the cells when written) by a margin."""
    cfg = load_config(RECIPE, ["model.backbone_kwargs={width: 0.5}"])
    method = build_method(cfg, distributed=False)
    d = cfg.data
    with make_train_stream(sample_shards, batch_size=64, aug=d.aug, image_size=d.image_size, channels=3, rank=0,
                           world_size=1, num_workers=1, num_views=1) as stream:
        batches = iter(stream)
        train_steps(method, batches, 60, cfg.optim.lr)
        accs, counts = [], torch.zeros(100)
        with torch.no_grad():
            for _ in range(3):
                batch = next(batches)
                accs.append(method(batch)["accuracy"].item())
                lab = method.backbone.lab(batch["views"][0])
                counts += torch.bincount(ab_bins(F.adaptive_avg_pool2d(lab[:, 1:], (8, 8)), 10).flatten(),
                                         minlength=100)
    majority = (counts.max() / counts.sum()).item()
    assert sum(accs) / 3 > majority + 0.08, (accs, majority)  # 0.51 vs 0.36 when written
