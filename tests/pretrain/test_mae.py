"""pretrain.methods.mae in one process: masking, the encoder's view of the image, the loss against a reference written
here with torch.gather and boolean indexing, the Triton gather (interpreted) against PyTorch, config checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.methods.mae import mae_loss, num_visible, random_masking
from pretrain.models.vit import sincos_pos_embed_2d
from pretrain.trainer import build_method
from tests.util import assert_grads_close, config_error

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "mae_digits.yaml"
SMALL = ["model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2}", "method.decoder_dim=16",
         "method.decoder_depth=1", "method.decoder_heads=2", "method.mask_ratio=0.75"]


def _method(*overrides: str):
    return build_method(load_config(RECIPE, [*SMALL, *overrides]), distributed=False)


def _images(b: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_random_masking_hides_a_random_subset_per_sample():
    torch.manual_seed(0)
    ids_keep, ids_restore, mask = random_masking(64, 16, 0.75, "cpu")
    assert ids_keep.shape == (64, 4) and ids_keep.dtype == torch.int64 and mask.shape == (64, 16)
    assert (mask.sum(1) == 12).all()
    for k, r, m in zip(ids_keep, ids_restore, mask):
        assert len(set(k.tolist())) == 4
        assert not m[k].any()  # the kept patches are exactly the visible ones
        shuffle = r.argsort()  # ids_restore inverts the shuffle whose prefix is ids_keep
        assert torch.equal(shuffle[:4], k)
    assert len({tuple(sorted(k.tolist())) for k in ids_keep}) > 32  # per sample, not one mask for the batch
    # every patch is hidden about equally often
    freq = mask.float().mean(0)
    assert freq.min() > 0.5 and freq.max() < 0.95
    assert num_visible(196, 0.75) == 49 and num_visible(16, 0.9) == 1


def _reference_loss(method, imgs: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """MAE written out with torch.gather, an explicit unshuffle and boolean indexing over the hidden patches."""
    enc, dec = method.backbone, method.decoder
    tokens = enc.patch_embed(imgs).flatten(2).transpose(1, 2) + enc.pos_embed[:, 1:]
    visible = torch.stack([t[k] for t, k in zip(tokens, ids_keep)])
    prefix = enc.cls_token + enc.pos_embed[:, :1]
    if enc.register_tokens is not None:  # registers after the cls token, no position; the decoder never sees them
        prefix = torch.cat([prefix, enc.register_tokens], dim=1)
    latent = enc.forward_tokens(torch.cat([prefix.expand(len(imgs), -1, -1), visible], dim=1))
    latent = torch.cat([latent[:, :1], latent[:, prefix.shape[1]:]], dim=1)
    x = dec.embed(latent)
    rows = []
    for b in range(len(imgs)):
        full = torch.empty(16, x.shape[-1])
        full[ids_keep[b]] = x[b, 1:]
        full[mask[b]] = dec.mask_token[0, 0]
        rows.append(full)
    x = torch.cat([x[:, :1], torch.stack(rows)], dim=1) + dec.pos_embed
    for block in dec.blocks:
        x = block(x)
    pred = dec.pred(dec.norm(x))[:, 1:]
    target = enc.patchify(imgs)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    return ((pred - target) ** 2).mean(-1)[mask].mean()


@pytest.mark.parametrize("registers", [0, 2])
def test_loss_is_mae_of_the_hidden_patches(registers: int):
    """The method's loss (drawn masks replayed from the same seed) equals MAE written out by hand, and the Triton
    gathers (interpreted) give the same loss and gradients as PyTorch's; with register tokens too (the encoder's
    scratch space: every patch stays in place and the decoder gets the cls token and the visible patches only)."""
    method = _method("method.loss_impl=ref", f"model.backbone_kwargs.num_registers={registers}")
    assert method.backbone.num_prefix_tokens == 1 + registers
    imgs = _images()
    torch.manual_seed(3)
    out = method({"views": [imgs]})["loss"]
    torch.manual_seed(3)
    masking = random_masking(6, 16, 0.75, "cpu")
    torch.testing.assert_close(out, _reference_loss(method, imgs, *masking), rtol=1e-5, atol=1e-6)

    out.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g.abs().sum() == 0]
    method.zero_grad()
    method.impl = method.decoder.impl = "triton"
    torch.manual_seed(3)
    fused = method({"views": [imgs]})["loss"]
    fused.backward()
    torch.testing.assert_close(fused, out, rtol=1e-6, atol=1e-6)
    assert_grads_close(method, grads)


def test_encoder_sees_only_the_visible_patches():
    """Whatever the hidden patches hold, the encoder's output is the same; changing a visible patch changes it."""
    method = _method()
    imgs = _images(4)
    torch.manual_seed(0)
    ids_keep, _, mask = random_masking(4, 16, 0.75, "cpu")
    patches = method.backbone.patchify(imgs)
    noisy = torch.where(mask[..., None], torch.randn_like(patches), patches)
    with torch.no_grad():
        ref = method.encode(imgs, ids_keep)
        torch.testing.assert_close(method.encode(method.backbone.unpatchify(noisy), ids_keep), ref)
        shifted = patches.clone()
        shifted[0, ids_keep[0, 0]] += 1.0
        assert not torch.allclose(method.encode(method.backbone.unpatchify(shifted), ids_keep)[0], ref[0])
    assert ref.shape == (4, 1 + 4, 32)


def test_mae_loss_normalises_each_target_patch():
    """norm_pix: a prediction equal to the per-patch normalised target has zero loss; visible patches do not count."""
    target = torch.randn(3, 16, 12) * 5 + 2
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, :12] = True
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert mae_loss(normed, target, mask).item() == pytest.approx(0.0, abs=1e-6)
    pred = normed.clone()
    pred[:, 12:] += 10.0  # wrong only on visible patches
    assert mae_loss(pred, target, mask).item() == pytest.approx(0.0, abs=1e-6)
    pred[:, 0] += 1.0  # off by one on every pixel of one hidden patch per sample: 1 / 12 of the hidden patches
    assert mae_loss(pred, target, mask).item() == pytest.approx(1 / 12, rel=1e-5)
    assert mae_loss(target, target, mask, norm_pix=False).item() == 0.0


def test_backbone_is_the_whole_image_encoder():
    """Downstream the encoder sees every patch and gives the cls token; backbone.pt holds no decoder."""
    method = _method()
    assert method.backbone.mask_token is None  # MAE drops patches, it never replaces them
    assert method.backbone(_images(3)).shape == (3, 32)
    assert not any(k.startswith("decoder") for k in method.backbone.state_dict())
    assert "pos_embed" not in method.decoder.state_dict()  # fixed sin-cos, derived from the grid


def test_sincos_positions_are_distinct_and_bounded():
    pos = sincos_pos_embed_2d((4, 4), 16)
    assert pos.shape == (16, 16) and pos.abs().max() <= 1.0
    assert torch.cdist(pos, pos).add(torch.eye(16) * 10).min() > 0.1
    # row and column halves: patches in one row share the row half
    torch.testing.assert_close(pos[0, :8], pos[3, :8])
    assert math.isclose(pos[5, 0].item(), math.sin(1.0), rel_tol=1e-6)


@pytest.mark.parametrize("override, key", [
    (["model.backbone=convnet"], "model.backbone"),
    (["data.num_views=2"], "data.num_views"),
    (["method.mask_ratio=0.97"], "method.mask_ratio"),
    (["method.mask_ratio=1.0"], "method.mask_ratio"),
    (["method.decoder_dim=30"], "method.decoder_dim"),
    (["method.loss_impl=chunked"], "method.loss_impl"),
    (["method.decoder_depth=0"], "method.decoder_depth"),
])
def test_config_errors_name_the_key(override, key):
    assert config_error(RECIPE, override).startswith(f"{key}:")


def test_other_methods_refuse_one_view():
    with pytest.raises(ConfigError, match=r"^data.num_views: simclr"):
        load_config(ROOT / "configs" / "simclr_digits.yaml", ["data.num_views=1"])
    with pytest.raises(ConfigError, match=r"^data.num_views: dino"):
        load_config(ROOT / "configs" / "dino_digits.yaml", ["data.num_views=1"])
