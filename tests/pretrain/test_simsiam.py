"""SimSiam: the loss against the paper's pseudo-code, the stop-gradient, the collapse monitor, 2 ranks = one process,
short training on the digits without collapse, config errors. Through a ZeRO-2 engine with SGD:
tests/pretrain/test_engine.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import load_config
from pretrain.methods.simsiam import simsiam_loss
from pretrain.trainer import build_method
from tests.util import assert_ranks_grads_close, config_error, train_steps, train_stream, two_ranks

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "simsiam_digits.yaml"
SMALL = ["model.proj_hidden_dim=32", "model.proj_out_dim=32", "method.predictor_hidden_dim=8",
         "model.backbone_kwargs={width: 0.25}"]


def _paper(p1, p2, z1, z2) -> torch.Tensor:
    """Algorithm 1 of the paper: L = D(p1, z2) / 2 + D(p2, z1) / 2, D(p, z) = -cos(p, z.detach()), batch means."""
    def d(p, z):
        return -F.cosine_similarity(p, z.detach(), dim=-1).mean()

    return d(p1, z2) / 2 + d(p2, z1) / 2


def _method(*overrides: str):
    return build_method(load_config(RECIPE, [*SMALL, *overrides]), distributed=False)


def _views(b: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 1, 16, 16, generator=g) for _ in range(2)]


def test_loss_is_the_paper_formula_and_its_bounds():
    g = torch.Generator().manual_seed(1)
    p, z = torch.randn(7, 130, generator=g, requires_grad=True), torch.randn(7, 130, generator=g, requires_grad=True)
    loss = simsiam_loss(p, z)
    torch.testing.assert_close(loss, -F.cosine_similarity(p, z, dim=-1).mean(), rtol=1e-6, atol=1e-7)
    loss.backward()
    assert z.grad is None and p.grad.abs().sum() > 0  # the stop-gradient
    assert simsiam_loss(z.detach(), 3 * z.detach()).item() == pytest.approx(-1.0)
    assert simsiam_loss(z.detach(), -z.detach()).item() == pytest.approx(1.0)


def test_method_is_the_paper_algorithm_and_stops_the_gradient():
    """The method's loss and every gradient are Algorithm 1's on the same projector and predictor outputs (each view
    through the networks on its own, BatchNorm statistics per view, as the official code); without the stop-gradient
    the gradients would differ (the detach is what the check sees). The projector ends in a BatchNorm without affine
    parameters, the predictor in a plain Linear."""
    method = _method()
    assert isinstance(method.projector.mlp[-1], nn.BatchNorm1d) and not method.projector.mlp[-1].affine
    assert isinstance(method.predictor.mlp[-1], nn.Linear)
    views = _views()
    out = method({"views": views})
    out["loss"].backward()
    got = {k: p.grad.clone() for k, p in method.named_parameters()}

    def paper_grads(stop: bool) -> tuple[torch.Tensor, dict]:
        method.zero_grad()
        z = torch.cat([method.projector(method.backbone(v)) for v in views])
        p = torch.cat([method.predictor(z[:6]), method.predictor(z[6:])])
        z1, z2 = (z[:6], z[6:]) if stop else (z[:6] * 1, z[6:] * 1)
        loss = _paper(p[:6], p[6:], z1, z2) if stop else (
            -F.cosine_similarity(p[:6], z2, dim=-1).mean() / 2 - F.cosine_similarity(p[6:], z1, dim=-1).mean() / 2)
        loss.backward()
        return loss, {k: q.grad.clone() for k, q in method.named_parameters()}

    loss, expected = paper_grads(stop=True)
    torch.testing.assert_close(out["loss"], loss, rtol=1e-6, atol=1e-7)
    for k, g in got.items():
        torch.testing.assert_close(g, expected[k], rtol=1e-5, atol=1e-7, msg=k)
    _, through = paper_grads(stop=False)
    assert any(not torch.allclose(through[k], expected[k], rtol=1e-3, atol=1e-6) for k in expected
               if k.startswith(("backbone.", "projector.")))


def test_collapse_monitor():
    """z_std: the std over the batch of the L2-normalised projections, mean over channels (the paper's Fig. 2):
    0 when every image gives one vector; for unit vectors spread over the sphere about 1/sqrt(d)."""
    method = _method()
    views = _views(64)
    out = method({"views": views})
    with torch.no_grad():
        z = method.projector(method.backbone(views[0]))  # view 0 through on its own, as the method passes it
    torch.testing.assert_close(out["z_std"], F.normalize(z, dim=-1).std(dim=0).mean(), rtol=1e-5, atol=1e-7)
    assert 0.5 / math.sqrt(32) < out["z_std"].item() < 1.5 / math.sqrt(32)
    same = {"views": [views[0][:1].expand(64, -1, -1, -1), views[1][:1].expand(64, -1, -1, -1)]}
    method.eval()  # BatchNorm on its running statistics: one image repeated gives one projection
    assert method(same)["z_std"].item() < 1e-4


def test_two_ranks_give_the_whole_batch_loss_and_gradients(tmp_path):
    """On 2 gloo ranks with half the images each (model.sync_bn: BatchNorm over both), the ranks' mean loss and
    averaged gradients are one process's on the whole batch."""
    ranks = two_ranks(tmp_path, RECIPE, SMALL, [{"views": _views(8)}])
    method = _method()
    loss = method({"views": _views(8)})["loss"]
    loss.backward()
    for res in ranks:
        torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-4, atol=1e-5)
        assert res["grads"].keys() == {k for k, p in method.named_parameters() if p.grad is not None}
        assert_ranks_grads_close(method, res["grads"])


def test_short_training_agrees_across_views_without_collapse(digits_shards):
    """40 AdamW steps (lr 4e-3, the SimCLR demo's: faster to start than the recipe's SGD, which a probe run measures)
    on real DALI views of the digits: the views' predictions agree far better (the loss falls from about 0 toward -1)
    while the projections stay spread (z_std near 1/sqrt(d), far from the collapse's 0)."""
    cfg = load_config(RECIPE, ["model.backbone_kwargs={width: 0.5}"])
    method = build_method(cfg, distributed=False)
    with train_stream(digits_shards, cfg, batch_size=128) as stream:
        batches = iter(stream)
        with torch.no_grad():
            start = method(next(batches))
        train_steps(method, batches, 40, 4e-3)
        with torch.no_grad():
            end = method(next(batches))
    d = cfg.model.proj_out_dim
    assert start["loss"].item() > -0.3 and end["loss"].item() < start["loss"].item() - 0.4, (start, end)
    assert end["z_std"].item() > 0.7 / math.sqrt(d), end


def test_config_errors():
    assert config_error(RECIPE, ["data.num_views=3"]).startswith("data.num_views: simsiam predicts one view")
    assert config_error(RECIPE, ["data.local_views=2"]).startswith("data.num_views: simsiam")
    assert config_error(RECIPE, ["method.loss_impl=triton"]).startswith("method.loss_impl: simsiam's loss has no")
    assert config_error(RECIPE, ["optim.name=sgdw"]).startswith("optim.name: must be adamw, lars, larc or sgd")
