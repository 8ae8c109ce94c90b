"""pretrain.methods.ijepa and data_pipeline.masking.multiblock_masks in one process: the masks' shapes and guarantees,
the loss against I-JEPA written out here with Python indexing, the Triton gathers (interpreted) against PyTorch, the
context encoder's view of the image, the linear EMA, short training on the digits, config checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from data_pipeline.masking import block_shape, multiblock_masks
from pretrain.config import load_config
from pretrain.ema import linear_momentum
from pretrain.trainer import build_method
from tests.util import assert_grads_close, config_error, train_steps

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "ijepa_digits.yaml"
SMALL = ["model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2, global_pool: mean}", "method.decoder_dim=16",
         "method.decoder_depth=2", "method.decoder_heads=2"]


def _method(*overrides: str):
    return build_method(load_config(RECIPE, [*SMALL, *overrides]), distributed=False)


def _images(b: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _rect(ids: np.ndarray, grid: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the rectangle that the patch indices ``ids`` fill exactly (fails otherwise)."""
    rows, cols = ids // grid[1], ids % grid[1]
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert len(set(ids.tolist())) == len(ids) == h * w, ids
    return int(h), int(w)


def test_multiblock_masks_targets_are_blocks_and_the_context_avoids_them():
    torch.manual_seed(0)
    grid = (8, 8)
    context, targets = multiblock_masks(64, grid, min_context=1)
    assert context.dtype == targets.dtype == torch.int64
    assert targets.shape[:2] == (64, 4) and context.shape[0] == 64
    shapes = {_rect(t.numpy(), grid) for row in targets for t in row}
    assert len(shapes) == 1  # one target shape per batch, as the reference's collator draws
    (h, w), = shapes
    assert 0.15 * 64 - 2 <= h * w <= 0.2 * 64 + 2 and 0.5 <= h / w <= 2
    for c, t in zip(context, targets):
        assert torch.equal(c, c.sort().values) and len(set(c.tolist())) == len(c)
        assert not set(c.tolist()) & set(t.flatten().tolist())  # the context never sees what it predicts
        assert c.max() < 64
    # the context is one square block less the targets: with half the grid (a 6x6 block), its patches lie within a
    # 6x6 square, and some contexts span all of it
    side = block_shape(grid, 0.5, 1.0)
    assert side == (6, 6)
    half, _ = multiblock_masks(64, grid, context_scale=(0.5, 0.5), min_context=1)
    spans = [np.ptp(c // 8) + 1 for c in half.numpy()] + [np.ptp(c % 8) + 1 for c in half.numpy()]
    assert max(spans) == 6
    # positions vary per image and reach every patch, the last row and column included
    torch.manual_seed(1)
    _, many = multiblock_masks(200, grid)
    assert len({tuple(t[0].tolist()) for t in many}) > 30
    assert set(many.flatten().tolist()) == set(range(64))


def test_multiblock_masks_follow_torch_seed_and_take_other_grids():
    torch.manual_seed(5)
    a = multiblock_masks(8, (6, 10))
    torch.manual_seed(5)
    b = multiblock_masks(8, (6, 10))
    c = multiblock_masks(8, (6, 10))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))
    assert a[0].max() < 60 and a[1].max() < 60


def test_context_overlaps_targets_only_to_keep_its_minimum():
    """Four large targets on a 4x4 grid leave fewer than 12 context patches: the context gives up avoiding targets,
    one at a time, until it keeps 12; cut to the batch's smallest, every context has as many patches."""
    torch.manual_seed(0)
    context, targets = multiblock_masks(32, (4, 4), target_scale=(0.25, 0.25), target_aspect=(1.0, 1.0),
                                        context_scale=(1.0, 1.0), min_context=12)
    assert context.shape[1] >= 12
    overlaps = [bool(set(c.tolist()) & set(t.flatten().tolist())) for c, t in zip(context, targets)]
    assert any(overlaps)
    with pytest.raises(ValueError, match="context_scale"):
        multiblock_masks(2, (4, 4), context_scale=(0.5, 1.0), min_context=12)


def _reference_loss(method, imgs: torch.Tensor, context: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """I-JEPA written out: every index a Python loop, one predictor pass per image and target block."""
    enc, pred = method.encoder, method.predictor
    p = enc.num_prefix_tokens
    with torch.no_grad():
        full = method.target.forward_features(imgs)[:, p:]
        full = F.layer_norm(full, (full.shape[-1],))
    tokens = enc.patch_embed(imgs).flatten(2).transpose(1, 2) + enc.pos_embed[:, 1:]
    prefix = enc.cls_token + enc.pos_embed[:, :1]
    if enc.register_tokens is not None:
        prefix = torch.cat([prefix, enc.register_tokens], dim=1)
    losses = []
    for i in range(len(imgs)):
        ctx = torch.stack([tokens[i, j] for j in context[i].tolist()])
        z = enc.forward_tokens(torch.cat([prefix[0], ctx])[None])[0, p:]
        x = pred.embed(z) + pred.pos_embed[context[i]]
        for block in targets[i]:
            q = pred.mask_token.view(1, -1) + pred.pos_embed[block]
            y = torch.cat([x, q])[None]
            for b in pred.blocks:
                y = b(y)
            out = pred.proj(pred.norm(y))[0, len(x):]
            want = torch.stack([full[i, j] for j in block.tolist()])
            losses.append(F.smooth_l1_loss(out, want, reduction="none"))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("registers", [0, 2])
def test_loss_is_ijepa_written_out(registers: int):
    """The method's loss (masks replayed from the same seed) equals I-JEPA written out by hand; the Triton gathers
    (interpreted) give the same loss and gradients as PyTorch's; every trainable parameter of the context encoder and
    the predictor gets a gradient, the target encoder none."""
    method = _method("method.loss_impl=ref", f"model.backbone_kwargs.num_registers={registers}")
    # a target encoder that is not the context encoder (as after training), so mixing them up shows
    with torch.no_grad():
        for t in method.target.parameters():
            t.add_(0.05 * torch.randn_like(t))
    imgs = _images()
    torch.manual_seed(3)
    out = method({"views": [imgs]})
    torch.manual_seed(3)
    context, targets = multiblock_masks(6, (8, 8))
    assert out["context_patches"].item() == context.shape[1]
    torch.testing.assert_close(out["loss"], _reference_loss(method, imgs, context, targets), rtol=1e-5, atol=1e-6)

    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.requires_grad}
    assert not any(n.startswith("target.") for n in grads)
    assert {n.split(".")[0] for n in grads} == {"encoder", "predictor"}
    assert all(g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g.abs().sum() == 0]
    method.zero_grad()
    method.impl = "triton"
    torch.manual_seed(3)
    fused = method({"views": [imgs]})["loss"]
    fused.backward()
    torch.testing.assert_close(fused, out["loss"], rtol=1e-6, atol=1e-6)
    assert_grads_close(method, grads)


def test_context_encoder_sees_only_the_context():
    """Whatever the other patches hold, the encoded context is the same; changing a context patch changes it."""
    method = _method()
    imgs = _images(4)
    torch.manual_seed(0)
    context, _ = multiblock_masks(4, (8, 8))
    patches = method.encoder.patchify(imgs)
    hidden = torch.ones(4, 64, dtype=torch.bool)
    hidden[torch.arange(4)[:, None], context] = False
    noisy = torch.where(hidden[..., None], torch.randn_like(patches), patches)
    with torch.no_grad():
        ref = method.encode_context(imgs, context)
        torch.testing.assert_close(method.encode_context(method.encoder.unpatchify(noisy), context), ref)
        shifted = patches.clone()
        shifted[0, context[0, 0]] += 1.0
        assert not torch.allclose(method.encode_context(method.encoder.unpatchify(shifted), context)[0], ref[0])
    assert ref.shape == (4, context.shape[1], 32)


def test_target_encoder_follows_a_linear_ema_and_is_the_backbone():
    """After step k of n the target is m * target + (1 - m) * context encoder, m rising linearly from the base to 1;
    it has no stochastic depth (a teacher copy). It is the backbone downstream tasks get, without the predictor."""
    method = _method("method.teacher_momentum=0.9", "model.backbone_kwargs.drop_path_rate=0.2")
    assert all(b.drop_path.p == 0 for b in method.target.blocks) and method.encoder.blocks[1].drop_path.p > 0
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in method.target.state_dict().items()}
    student = {k: v.clone() for k, v in method.encoder.state_dict().items()}
    method.on_step_end(3, 10)
    m = linear_momentum(3, 10, 0.9)
    assert m == pytest.approx(0.93)
    for k, v in method.target.state_dict().items():
        torch.testing.assert_close(v, m * before[k] + (1 - m) * student[k], msg=k)
    settled = {k: v.clone() for k, v in method.target.state_dict().items()}
    method.on_step_end(10, 10)  # momentum 1 at the end: the target stays
    assert all(torch.equal(v, settled[k]) for k, v in method.target.state_dict().items())
    assert method.backbone is method.target and not any(p.requires_grad for p in method.backbone.parameters())
    assert method.encoder.mask_token is None and method.backbone.global_pool == "mean"
    assert not any(k.startswith("predictor") for k in method.backbone.state_dict())


def test_short_training_learns_to_predict_the_targets():
    """40 steps on the digits (16x16 upscales): the predictor's loss falls by more than 40% (the objective is learnable
    through the gathers, the predictor and the EMA as wired). Whether the features are worth anything downstream is
    the digits probe's question (README), through the whole stack and its evaluation."""
    digits = load_digits()
    imgs = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    imgs = (F.interpolate(imgs, size=16, mode="bilinear", align_corners=False) - 0.3) / 0.38
    torch.manual_seed(0)
    method = _method("model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2, global_pool: mean, "
                     "pos_embed: sincos}", "method.teacher_momentum=0.9")

    def batches():
        g = torch.Generator().manual_seed(1)
        while True:
            yield {"views": [imgs[torch.randint(0, len(imgs), (128,), generator=g)]]}

    stream = batches()
    with torch.no_grad():
        start = method(next(stream))["loss"].item()
    train_steps(method, stream, 40, lr=2e-3, max_steps=40)
    with torch.no_grad():
        end = method(next(stream))["loss"].item()
    assert end < 0.6 * start, (start, end)


@pytest.mark.parametrize("override, key", [
    (["model.backbone=convnet", "model.backbone_kwargs={}"], "model.backbone"),
    (["data.num_views=2"], "data.num_views"),
    (["model.backbone_kwargs.global_pool=cls"], "model.backbone_kwargs.global_pool"),
    (["method.loss_impl=chunked"], "method.loss_impl"),
    (["method.decoder_dim=30"], "method.decoder_dim"),
    (["method.min_context_patches=60"], "method.context_scale"),
    (["method.min_context_patches=0"], "method.min_context_patches"),
    (["method.target_scale=[0.3, 0.2]"], "method.target_scale"),
    (["method.context_scale=[0.5, 1.5]"], "method.context_scale"),
    (["method.target_aspect=[0, 1]"], "method.target_aspect"),
    (["method.num_target_blocks=0"], "method.num_target_blocks"),
])
def test_config_errors_name_the_key(override, key):
    assert config_error(RECIPE, override).startswith(f"{key}:")
