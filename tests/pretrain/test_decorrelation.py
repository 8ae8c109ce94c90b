"""Barlow Twins and VICReg (pretrain.methods.decorrelation): their losses at closed forms, on 2 gloo ranks the whole
batch's loss and gradients (embeddings gathered, BatchNorm over both ranks), and a short training on real DALI views
of the digits."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from data_pipeline.loader import make_train_stream
from pretrain.config import load_config
from pretrain.methods.decorrelation import barlow_twins_loss, vicreg_terms
from pretrain.trainer import build_method
from tests.util import assert_ranks_grads_close, config_error, spawn_ranks, train_steps

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {"barlow_twins": ROOT / "configs" / "barlow_twins_digits.yaml",
           "vicreg": ROOT / "configs" / "vicreg_digits.yaml"}
SMALL = ["model.proj_hidden_dim=32", "model.proj_out_dim=24", "model.backbone_kwargs={width: 0.25}"]


def _whitened(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """(n, d) with zero-mean columns, each of (biased) variance 1, uncorrelated: sqrt(n) x orthonormal columns that
    are orthogonal to the all-ones vector."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.cat([torch.ones(n, 1), torch.randn(n, d, generator=g)], dim=1)
    q, _ = torch.linalg.qr(basis)
    return q[:, 1:] * math.sqrt(n)


def test_barlow_twins_closed_forms():
    """Identical whitened views: C = I, loss 0. Views whitened and uncorrelated with each other: C = 0, the diagonal
    costs D. Both invariant to each dimension's scale and offset (standardised inside)."""
    z = _whitened(32, 10)
    assert barlow_twins_loss(z, z, lambd=0.5).item() == pytest.approx(0.0, abs=1e-4)
    both = _whitened(32, 20)
    a, b = both[:, :10], both[:, 10:]
    assert barlow_twins_loss(a, b, lambd=0.5).item() == pytest.approx(10.0, abs=1e-4)
    scaled = a * torch.linspace(0.5, 3, 10) + 7
    assert barlow_twins_loss(scaled, b, lambd=0.5).item() == pytest.approx(10.0, abs=1e-3)
    # a redundant pair of dimensions: off-diagonal 1s (both ways, both views' correlations) weighted lambda
    dup = torch.cat([a[:, :1], a[:, :1]], dim=1)
    assert barlow_twins_loss(dup, dup, lambd=0.5).item() == pytest.approx(0.5 * 2, abs=1e-3)


def test_vicreg_closed_forms():
    """Identical views with every dimension's unbiased std above 1 and no covariance: all three terms 0. A collapsed
    batch (every embedding the same): variance 1 - sqrt(eps) per dimension, invariance and covariance 0."""
    n, d = 40, 8
    z = _whitened(n, d) * 1.1  # biased variance 1.21 -> unbiased larger still: std > 1
    terms = vicreg_terms(z, z)
    assert all(v.item() == pytest.approx(0.0, abs=1e-5) for v in terms.values()), terms
    collapsed = torch.ones(n, d) * 3
    terms = vicreg_terms(collapsed, collapsed)
    assert terms["variance"].item() == pytest.approx(1 - math.sqrt(1e-4), rel=1e-5)
    assert terms["invariance"].item() == 0 and terms["covariance"].item() == 0
    # one duplicated dimension pair of unbiased variance v: covariance (2 v^2) / d per view, both views summed
    dup = torch.cat([z[:, :1], z[:, :1], z[:, 2:]], dim=1)
    v = dup[:, 0].var().item()
    assert vicreg_terms(dup, dup)["covariance"].item() == pytest.approx(2 * (2 * v * v) / d, rel=1e-4)


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(8, 1, 16, 16, generator=g) for _ in range(2)]}


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from pretrain import dist

    out = {}
    for name, recipe in RECIPES.items():
        method = build_method(load_config(recipe, [*SMALL, "model.sync_bn=true"]), distributed=True)
        half = {"views": [v[4 * rank:4 * rank + 4] for v in _batch()["views"]]}
        loss = method(half)["loss"]
        loss.backward()
        grads = {k: p.grad.clone() for k, p in method.named_parameters()}
        for g in grads.values():  # what DeepSpeed does with the ranks' gradients
            torch.distributed.all_reduce(g)
            g /= 2
        out[name] = {"loss": dist.all_reduce_mean(loss.detach()), "grads": grads}
    torch.save(out, f"{root}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_ranks_give_the_whole_batch_loss_and_gradients(tmp_path):
    """On 2 gloo ranks with half the images each (model.sync_bn: BatchNorm over both), the ranks' mean loss and
    averaged gradients are one process's on the whole batch, for both methods."""
    spawn_ranks(_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, recipe in RECIPES.items():
        method = build_method(load_config(recipe, SMALL), distributed=False)
        loss = method(_batch())["loss"]
        loss.backward()
        for res in ranks:
            torch.testing.assert_close(res[name]["loss"], loss.detach(), rtol=1e-4, atol=1e-5, msg=name)
            # the last bias's gradient is 0 but for rounding: the batch standardisation / centring removes it
            assert_ranks_grads_close(method, res[name]["grads"], name)


def _short_training(digits_shards, name: str, *overrides: str) -> tuple[dict, dict]:
    """40 AdamW steps on real DALI views of the digits: the method's outputs on a fresh batch before and after."""
    cfg = load_config(RECIPES[name], ["model.backbone_kwargs={width: 0.5}", *overrides])
    method = build_method(cfg, distributed=False)
    d = cfg.data
    with make_train_stream(digits_shards, batch_size=128, aug=d.aug, image_size=d.image_size, channels=d.channels,
                           rank=0, world_size=1, num_workers=1, num_views=2) as stream:
        batches = iter(stream)
        with torch.no_grad():
            start = {k: v.item() for k, v in method(next(batches)).items()}
        train_steps(method, batches, 40, cfg.optim.lr)
        with torch.no_grad():
            end = {k: v.item() for k, v in method(next(batches)).items()}
    return start, end


def test_barlow_twins_short_training_lowers_the_loss(digits_shards):
    """The cross-correlation of the views comes closer to the identity: the loss on fresh views falls well below its
    start (a collapsed embedding could not: its standardised dimensions would all correlate)."""
    start, end = _short_training(digits_shards, "barlow_twins")
    assert end["loss"] < 0.6 * start["loss"], (start, end)


def test_vicreg_keeps_the_spread_that_invariance_alone_loses(digits_shards):
    """VICReg's views come to agree (the invariance term falls by half) while the variance term holds the dimensions'
    spread; the same training with the invariance term alone collapses (every dimension's std near 0: the variance
    hinge near 1), which is what the other two terms are for."""
    start, end = _short_training(digits_shards, "vicreg")
    assert end["invariance"] < 0.5 * start["invariance"] and end["variance"] < 0.8, (start, end)
    _, alone = _short_training(digits_shards, "vicreg", "method.vicreg_variance=0", "method.vicreg_covariance=0")
    assert alone["variance"] > 0.9 and alone["variance"] > end["variance"] + 0.15, alone


def test_config_errors():
    assert config_error(RECIPES["vicreg"], ["data.num_views=3"]).startswith("data.num_views: vicreg compares two views")
    assert config_error(RECIPES["barlow_twins"], ["data.local_views=2"]).startswith("data.num_views: barlow_twins")
    assert config_error(RECIPES["barlow_twins"], ["method.barlow_lambda=-1"]).startswith("method.barlow_lambda")
