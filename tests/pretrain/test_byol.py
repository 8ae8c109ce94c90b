"""pretrain.methods.byol in one process: the loss against its formula, the gradient path, the target EMA, checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import load_config
from pretrain.ema import cosine_momentum
from pretrain.methods.byol import byol_loss
from pretrain.trainer import build_method
from tests.util import config_error

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "byol_digits.yaml"
SMALL = ["model.proj_hidden_dim=32", "model.proj_out_dim=16", "method.predictor_hidden_dim=24",
         "model.backbone_kwargs={width: 0.25}"]


def _method(*overrides: str):
    return build_method(load_config(RECIPE, [*SMALL, *overrides]), distributed=False)


def _views(b: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 1, 16, 16, generator=g) for _ in range(2)]


def _regression_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The official BYOL code's helpers.regression_loss: per row, the squared distance of the unit vectors."""
    return (F.normalize(x, dim=-1) - F.normalize(y, dim=-1)).square().sum(-1)


def test_loss_predicts_the_other_views_target():
    """loss = the paper's L + L~ as the official code computes it: mean over the batch of regression_loss(online
    prediction of view 1, target projection of view 2) + regression_loss(view 2's prediction, view 1's target), each
    2 - 2 cos (the sum of the two directions, not their mean: the scale LARS's plain momentum steps see), each view
    through each network on its own (BatchNorm statistics per view)."""
    method = _method()
    views = _views()
    with torch.no_grad():
        method.target["projector"].mlp[-1].weight.add_(0.1)  # a target that is not the online network
    loss = method({"views": views})["loss"]
    with torch.no_grad():
        p = torch.cat([method.predictor(method.online["projector"](method.online["backbone"](v))) for v in views])
        t = torch.cat([method.target["projector"](method.target["backbone"](v)) for v in views])
    official = (_regression_loss(p[:6], t[6:]) + _regression_loss(p[6:], t[:6])).mean()
    torch.testing.assert_close(loss, official, rtol=1e-5, atol=1e-6)
    # swapping the views gives the same loss (symmetric), and 0 <= loss <= 8
    torch.testing.assert_close(method({"views": views[::-1]})["loss"], loss, rtol=1e-5, atol=1e-6)
    assert 0.0 <= loss.item() <= 8.0


def test_byol_loss_bounds():
    x = torch.randn(5, 8)
    assert byol_loss(x, 3 * x).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(x, -x).item() == pytest.approx(4.0, abs=1e-5)


def test_only_online_network_trains_and_backbone_is_online():
    method = _method()
    method({"views": _views()})["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in method.target.parameters())
    for part in (method.online, method.predictor):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert method.backbone is method.online["backbone"]


def test_target_is_ema_of_online_with_cosine_momentum():
    """After a step the target moves toward the online network by 1 - momentum(step), the predictor is no part of
    it, and the schedule ends at 1 (the target frozen)."""
    method = _method("method.teacher_momentum=0.9")
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    before = {k: v.clone() for k, v in method.target.state_dict().items()}
    method({"views": _views()})["loss"].backward()
    opt.step()
    method.on_step_end(3, 10)
    m = cosine_momentum(3, 10, 0.9)
    assert 0.9 < m < 1.0
    online = method.online.state_dict()
    for name, p in method.target.named_parameters():
        expected = m * before[name] + (1 - m) * online[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7, msg=name)
    # every parameter the step changed pulls its target along; all but one changed: the projector's last bias, whose
    # gradient is 0 but for rounding (the predictor's BatchNorm removes a shift), may not move on some CPUs
    changed = [n for n, _ in method.target.named_parameters() if (online[n] - before[n]).abs().max() > 1e-6]
    assert len(changed) >= len(list(method.target.parameters())) - 1
    assert all(not torch.equal(p, before[n]) for n, p in method.target.named_parameters() if n in changed)
    frozen = {k: v.clone() for k, v in method.target.state_dict().items()}
    method.on_step_end(10, 10)
    assert all(torch.equal(v, method.target.state_dict()[k]) for k, v in frozen.items())


@pytest.mark.parametrize("override, key", [
    (["data.num_views=3"], "data.num_views"),
    (["data.local_views=2"], "data.num_views"),
    (["method.loss_impl=triton"], "method.loss_impl"),
    (["method.predictor_hidden_dim=0"], "method.predictor_hidden_dim"),
])
def test_config_errors_name_the_key(override, key):
    assert config_error(RECIPE, override).startswith(f"{key}:")
