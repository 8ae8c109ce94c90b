"""MoCo v3 (pretrain.methods.moco): its loss against the official code's formula on every kernel path, the method's
networks and momentum encoder, on 2 gloo ranks the whole batch's loss and gradients (keys gathered, BatchNorm over
both ranks), the ViT's frozen patch projection, and a short training on real DALI views of the digits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import load_config
from pretrain.ema import cosine_momentum
from pretrain.methods.moco import moco_v3_loss
from pretrain.trainer import build_method
from tests.util import assert_ranks_grads_close, config_error, dcl_from_logits, short_training, train_steps, two_ranks

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "mocov3_digits.yaml"
SMALL = ["model.proj_hidden_dim=32", "model.proj_out_dim=16", "method.predictor_hidden_dim=24",
         "model.backbone_kwargs={width: 0.25}"]


def _official(q: torch.Tensor, k_all: torch.Tensor, t: float, offset: int, decoupled: bool = False) -> torch.Tensor:
    """MoCo v3's contrastive_loss (moco/builder.py): normalise, logits q @ k_all.T / T, labels on the rank's diagonal,
    cross-entropy x 2T; ``decoupled``: DCL of the same logits (each positive out of its row's denominator) x 2T."""
    q, k_all = F.normalize(q.float(), dim=1), F.normalize(k_all.float(), dim=1)
    labels = torch.arange(q.shape[0]) + offset
    logits = q @ k_all.T / t
    return (dcl_from_logits(logits, labels) if decoupled else F.cross_entropy(logits, labels)) * (2 * t)


def _method(*overrides: str):
    return build_method(load_config(RECIPE, [*SMALL, *overrides]), distributed=False)


def _views(b: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 1, 16, 16, generator=g) for _ in range(2)]


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("impl", ["ref", "chunked"])
def test_loss_is_the_official_formula(impl, decoupled):
    """An odd batch of 7 queries at offset 10 among 37 gathered keys of width 130; the gradient reaches the queries
    only. Collinear embeddings: every logit 1/T, so 2T ln N (DCL, the positive out: 2T ln(N - 1))."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(7, 130, generator=g, requires_grad=True)
    k_all = torch.randn(37, 130, generator=g, requires_grad=True)
    k = k_all[10:17]
    loss = moco_v3_loss(q, k, 0.2, k_all=k_all, offset=10, impl=impl, decoupled=decoupled)
    q_ref = q.detach().clone().requires_grad_(True)
    expected = _official(q_ref, k_all.detach(), 0.2, 10, decoupled)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(q.grad, q_ref.grad, rtol=1e-4, atol=1e-6)
    assert k_all.grad is None
    same = torch.ones(5, 4)
    assert moco_v3_loss(same, 3 * same, 0.5, impl=impl, decoupled=decoupled).item() == pytest.approx(
        2 * 0.5 * math.log(4 if decoupled else 5), rel=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        moco_v3_loss(q, k, 0.2, k_all=k_all, offset=31, impl=impl)


@pytest.mark.parametrize("decoupled", [False, True])
def test_method_loss_contrasts_each_views_queries_with_the_other_views_keys(decoupled):
    """loss = official(q of view 0, keys of view 1) + official(q of view 1, keys of view 0), queries through the base
    encoder's projector and the predictor, keys through the momentum encoder, each view through each encoder on its own
    (BatchNorm statistics per view, as the official code); symmetric in the views; with method.decoupled, DCL's."""
    method = _method(f"method.decoupled={str(decoupled).lower()}")
    views = _views()
    with torch.no_grad():
        method.target["projector"].mlp[-1].weight.add_(0.1)  # a momentum encoder that is not the base encoder
    loss = method({"views": views})["loss"]
    with torch.no_grad():
        q = torch.cat([method.predictor(method.online["projector"](method.online["backbone"](v))) for v in views])
        k = torch.cat([method.target["projector"](method.target["backbone"](v)) for v in views])
    t = method.temperature
    expected = _official(q[:6], k[6:], t, 0, decoupled) + _official(q[6:], k[:6], t, 0, decoupled)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method({"views": views[::-1]})["loss"], loss, rtol=1e-5, atol=1e-6)


def test_only_the_base_encoder_trains_and_the_momentum_encoder_follows_it():
    """Gradients reach the base encoder and the predictor, none the momentum encoder; after a step the momentum
    encoder moves toward the base encoder by 1 - momentum(step) (cosine from teacher_momentum to 1), without the
    predictor."""
    method = _method("method.teacher_momentum=0.9")
    assert method.backbone is method.online["backbone"]
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    before = {k: v.clone() for k, v in method.target.state_dict().items()}
    method({"views": _views()})["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in method.target.parameters())
    for part in (method.online, method.predictor):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    opt.step()
    method.on_step_end(3, 10)
    m = cosine_momentum(3, 10, 0.9)
    base = method.online.state_dict()
    for name, p in method.target.named_parameters():
        torch.testing.assert_close(p.detach(), m * before[name] + (1 - m) * base[name], rtol=1e-6, atol=1e-7,
                                   msg=name)
        assert not torch.equal(p, before[name]), name


def test_vit_patch_projection_frozen():
    """backbone_kwargs freeze_patch_embed: the ViT's patch projection gets no gradient and stays at its init through
    training while the rest moves; the momentum encoder's copy is the same frozen init."""
    method = _method("model.backbone=vit_tiny", "model.patch_size=4",
                     "model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2, freeze_patch_embed: true}")
    vit = method.backbone
    init = {k: v.clone() for k, v in vit.state_dict().items()}
    batches = iter([{"views": _views(seed=s)} for s in range(3)])
    train_steps(method, batches, 3, lr=1e-2)
    assert not any(p.requires_grad for p in vit.patch_embed.parameters())
    for k, v in vit.state_dict().items():
        assert torch.equal(v, init[k]) == k.startswith("patch_embed."), k
    torch.testing.assert_close(method.target["backbone"].patch_embed.weight, vit.patch_embed.weight)


def test_two_ranks_give_the_whole_batch_loss_and_gradients(tmp_path):
    """On 2 gloo ranks with half the images each (keys gathered from both, BatchNorm over both), the ranks' mean loss
    and averaged gradients are one process's on the whole batch: each rank's queries meet every rank's keys."""
    ranks = two_ranks(tmp_path, RECIPE, SMALL, [{"views": _views(8)}])
    method = _method()
    loss = method({"views": _views(8)})["loss"]
    loss.backward()
    for res in ranks:
        torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-4, atol=1e-5)
        assert res["grads"].keys() == {k for k, p in method.named_parameters() if p.requires_grad}
        assert_ranks_grads_close(method, res["grads"])


def _positive_rank(method, batch: dict) -> float:
    """MoCo's instance discrimination: the mean rank of each view-0 query's own key (momentum encoder, view 1) among
    the batch's keys by similarity, 0 = first; (B - 1) / 2 by chance."""
    v0, v1 = batch["views"]
    with torch.no_grad():
        q = method.predictor(method.online["projector"](method.online["backbone"](v0)))
        k = method.target["projector"](method.target["backbone"](v1))
    s = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T
    return (s > s.diag()[:, None]).sum(1).float().mean().item()


def test_short_training_learns_to_tell_the_images_apart(digits_shards):
    """40 AdamW steps (with the momentum update) on real DALI views of the digits: the loss on fresh views falls from
    about 4T ln(batch), embeddings that tell no image apart, and each query's own key climbs from a chance rank among
    the batch's 128 (63.5) to well above it (measured: 62 -> 23 at step 40, 10 at step 80)."""
    method, cfg, (start, start_rank), (end, end_rank) = short_training(digits_shards, RECIPE, _positive_rank)
    chance = 4 * cfg.method.temperature * math.log(128)
    assert start > 0.9 * chance and end < 0.9 * start, (start, end, chance)
    assert start_rank > 45 and end_rank < 0.6 * start_rank, (start_rank, end_rank)


def test_projector_last_bn_on_both_encoders_not_the_predictor():
    """model.proj_last_bn: the base and momentum encoders' projectors end in a BatchNorm without affine parameters (the
    official MoCo v3 heads), the predictor in a plain Linear; the method still gives a finite loss and trains."""
    from torch import nn

    method = _method("model.proj_last_bn=true")
    for net in (method.online, method.target):
        last = net["projector"].mlp[-1]
        assert isinstance(last, nn.BatchNorm1d) and not last.affine
    assert isinstance(method.predictor.mlp[-1], nn.Linear)
    views = [torch.randn(8, 1, 16, 16) for _ in range(2)]
    loss = method({"views": views})["loss"]
    loss.backward()
    assert torch.isfinite(loss) and method.online["projector"].mlp[0].weight.grad.abs().sum() > 0


def test_vit_predictor_ends_in_batchnorm_with_the_official_heads():
    """With model.proj_last_bn a ViT's predictor also ends in a bias-free Linear and a BatchNorm without affine
    parameters (the official MoCo_ViT builds it with _build_mlp's default last_bn; MoCo_ResNet's passes False): each
    query dimension standardised over the batch (of one view: each view goes through on its own). Without
    proj_last_bn the predictor stays a plain Linear."""
    from torch import nn

    vit = ["model.backbone=vit_tiny", "model.patch_size=4",
           "model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}"]
    method = _method("model.proj_last_bn=true", *vit)
    last = method.predictor.mlp[-1]
    assert isinstance(last, nn.BatchNorm1d) and not last.affine
    assert method.predictor.mlp[-2].bias is None
    views = _views(8)
    with torch.no_grad():
        q = method.predictor(method.online["projector"](method.online["backbone"](views[0])))
    torch.testing.assert_close(q.mean(0), torch.zeros(q.shape[1]), atol=1e-5, rtol=0)
    assert torch.isfinite(method({"views": views})["loss"])
    assert isinstance(_method(*vit).predictor.mlp[-1], nn.Linear)


def test_config_errors():
    assert config_error(RECIPE, ["data.num_views=3"]).startswith("data.num_views: moco_v3 contrasts two views")
    assert config_error(RECIPE, ["data.local_views=2"]).startswith("data.num_views: moco_v3")
    assert config_error(RECIPE, ["method.temperature=0"]).startswith("method.temperature")
