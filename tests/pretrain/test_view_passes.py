"""Each view through the networks on its own (pretrain.methods.base.each_view): BatchNorm normalises a view by that
view's statistics, as the official code of BYOL, MoCo v3, SimSiam, NNCLR (solo-learn), Barlow Twins and VICReg, not by
the joint statistics of a pass over both views (SimCLR's, which keeps it: tests/pretrain/test_simclr.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import load_config
from pretrain.methods.base import each_view
from pretrain.trainer import build_method

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.proj_hidden_dim=32", "model.proj_out_dim=16", "method.predictor_hidden_dim=24",
         "model.backbone_kwargs={width: 0.25}"]
B = 8


def _views() -> list[Tensor]:
    """Two views of B images whose statistics differ (the second shifted and narrower), so that joint BatchNorm
    statistics are far from either view's."""
    g = torch.Generator().manual_seed(0)
    v0 = torch.randn(B, 1, 16, 16, generator=g)
    return [v0, 0.2 * torch.randn(B, 1, 16, 16, generator=g) + 1]


Encode = Callable[[list[Tensor], tuple[Callable[[Tensor], Tensor], ...]], Tensor]


def _per_view(views: list[Tensor], modules: tuple) -> Tensor:
    """The official code's passes, written out: one view at a time through every module."""
    outs = []
    for x in views:
        for m in modules:
            x = m(x)
        outs.append(x)
    return torch.cat(outs)


def _joint(views: list[Tensor], modules: tuple) -> Tensor:
    """One pass over both views (BatchNorm over both): what the methods did before."""
    x = torch.cat(views)
    for m in modules:
        x = m(x)
    return x


def _off_diagonal(m: Tensor) -> Tensor:
    return m - torch.diag(torch.diagonal(m))


def _byol(method, views: list[Tensor], encode: Encode) -> Tensor:
    """deepmind byol: regression_loss(online prediction of view 1, target projection of view 2) + the other way."""
    p = encode(views, (method.online["backbone"], method.online["projector"], method.predictor))
    t = encode(views, (method.target["backbone"], method.target["projector"]))

    def reg(x, y):
        return (F.normalize(x, dim=-1) - F.normalize(y, dim=-1)).square().sum(-1).mean()

    return reg(p[:B], t[B:]) + reg(p[B:], t[:B])


def _moco_v3(method, views: list[Tensor], encode: Encode) -> Tensor:
    """moco-v3 builder.py: contrastive_loss(q1, k2) + contrastive_loss(q2, k1), each CE(q . k^T / T) x 2T."""
    q = encode(views, (method.online["backbone"], method.online["projector"], method.predictor))
    k = encode(views, (method.target["backbone"], method.target["projector"]))
    t = method.temperature

    def contrastive(q, k):
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / t
        return F.cross_entropy(logits, torch.arange(B)) * 2 * t

    return contrastive(q[:B], k[B:]) + contrastive(q[B:], k[:B])


def _simsiam(method, views: list[Tensor], encode: Encode) -> Tensor:
    """simsiam builder.py + main: z = encoder(x), p = predictor(z) per view; -(cos(p1, z2) + cos(p2, z1)) / 2."""
    z = encode(views, (method.backbone, method.projector))
    p = encode([z[:B], z[B:]], (method.predictor,))
    return -(F.cosine_similarity(p[:B], z[B:]).mean() + F.cosine_similarity(p[B:], z[:B]).mean()) / 2


def _nnclr(method, views: list[Tensor], encode: Encode) -> Tensor:
    """solo-learn's NNCLR on the first step (an empty support set: each embedding its own neighbour): the mean of
    nnclr_loss_func(nn(z1), p2) and nnclr_loss_func(nn(z2), p1), each CE(nn . p^T / T)."""
    z = encode(views, (method.backbone, method.projector))
    p = encode([z[:B], z[B:]], (method.predictor,))
    t = method.temperature

    def nnclr(nn_, p):
        logits = F.normalize(nn_, dim=1) @ F.normalize(p, dim=1).T / t
        return F.cross_entropy(logits, torch.arange(B))

    return (nnclr(z[:B], p[B:]) + nnclr(z[B:], p[:B])) / 2


def _barlow_twins(method, views: list[Tensor], encode: Encode) -> Tensor:
    """barlowtwins main.py: c = bn(z1).T @ bn(z2) / N (BatchNorm without affine), on_diag + lambda x off_diag."""
    z = encode(views, (method.backbone, method.projector))
    bn = nn.BatchNorm1d(z.shape[1], affine=False)
    c = bn(z[:B]).T @ bn(z[B:]) / B
    return (torch.diagonal(c) - 1).square().sum() + method.lambd * _off_diagonal(c).square().sum()


def _vicreg(method, views: list[Tensor], encode: Encode) -> Tensor:
    """vicreg main_vicreg.py: sim x mse(x, y) + std x (hinge of each std) + cov x (off-diagonal covariances^2 / D)."""
    z = encode(views, (method.backbone, method.projector))
    x, y = z[:B], z[B:]
    repr_loss = F.mse_loss(x, y)
    x, y = x - x.mean(0), y - y.mean(0)
    std_x, std_y = torch.sqrt(x.var(0) + 1e-4), torch.sqrt(y.var(0) + 1e-4)
    std_loss = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
    d = x.shape[1]
    cov_loss = (_off_diagonal(x.T @ x / (B - 1)).square().sum() + _off_diagonal(y.T @ y / (B - 1)).square().sum()) / d
    w = method.weights
    return w["invariance"] * repr_loss + w["variance"] * std_loss + w["covariance"] * cov_loss


OFFICIAL = {
    "byol_digits.yaml": _byol,
    "mocov3_digits.yaml": _moco_v3,
    "simsiam_digits.yaml": _simsiam,
    "nnclr_digits.yaml": _nnclr,
    "barlow_twins_digits.yaml": _barlow_twins,
    "vicreg_digits.yaml": _vicreg,
}


@pytest.mark.parametrize("recipe", list(OFFICIAL))
def test_method_loss_is_the_official_one_with_each_view_on_its_own(recipe):
    """In train mode (BatchNorm on batch statistics) the method's loss is the official formula on outputs of one pass
    per view, and far from the same formula on one pass over both views."""
    method = build_method(load_config(ROOT / "configs" / recipe, SMALL), distributed=False)
    assert method.training and any(isinstance(m, nn.BatchNorm2d) for m in method.backbone.modules())
    if hasattr(method, "target"):
        with torch.no_grad():  # a target that is not the online network
            method.target["projector"].mlp[-1].weight.add_(0.1)
    views = _views()
    official = OFFICIAL[recipe]
    with torch.no_grad():  # before the method's forward, which fills NNCLR's support set
        per_view, joint = official(method, views, _per_view), official(method, views, _joint)
        loss = method({"views": views})["loss"]
    torch.testing.assert_close(loss, per_view, rtol=1e-5, atol=1e-5)
    # the check tells the passes apart: the joint pass's loss is out of 100x that tolerance
    assert not torch.allclose(joint, per_view, rtol=1e-3, atol=1e-3), (per_view, joint)


def test_each_view_is_one_pass_per_view_in_the_views_order():
    """each_view(views, *modules): the modules in turn on each view, the outputs in the views' order; a BatchNorm sees
    each view's statistics (every view's rows standardised on their own) and updates its running mean once per view."""
    g = torch.Generator().manual_seed(1)
    lin, bn = nn.Linear(5, 7), nn.BatchNorm1d(7, affine=False, momentum=0.5)
    views = [torch.randn(6, 5, generator=g), 4 * torch.randn(9, 5, generator=g) - 3]
    out = each_view(views, lin, bn)
    assert out.shape == (15, 7)
    for rows in (out[:6], out[6:]):
        torch.testing.assert_close(rows.mean(0), torch.zeros(7), atol=1e-5, rtol=0)
        torch.testing.assert_close(rows.var(0, unbiased=False), torch.ones(7), atol=1e-3, rtol=0)
    with torch.no_grad():
        h = [lin(v) for v in views]
    torch.testing.assert_close(bn.running_mean, 0.25 * h[0].mean(0) + 0.5 * h[1].mean(0))
    assert int(bn.num_batches_tracked) == 2
