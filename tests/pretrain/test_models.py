"""Backbones: registry, shapes on tiny images, ViT position-embedding interpolation, mask tokens, sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.models import BACKBONES, build_backbone, interpolate_pos_embed, num_params


def _tiny_vit(image_size: int = 16, **kwargs):
    """A 2-block ViT on 16x16 images with 4x4 patches (16 patches)."""
    opts = dict(embed_dim=32, depth=2, num_heads=4)
    opts.update(kwargs)
    return build_backbone("vit_tiny", image_size=image_size, in_chans=3, patch_size=4, **opts)


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_gives_pooled_features(name: str, in_chans: int) -> None:
    """Every registered backbone maps (B, C, 16, 16) to finite (B, embed_dim) features and backpropagates."""
    torch.manual_seed(0)
    shallow = dict(depth=2) if name.startswith("vit") else {}  # full width, 2 blocks: ViT-B's 86M params take seconds
    model = build_backbone(name, image_size=16, in_chans=in_chans, patch_size=4, **shallow)
    out = model(torch.randn(3, in_chans, 16, 16))
    assert out.shape == (3, model.embed_dim)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None and n != "mask_token"]
    assert not unused, f"parameters without gradient: {unused}"


@pytest.mark.parametrize("name,embed_dim", [("convnet", 128), ("resnet18", 512), ("resnet50", 2048),
                                            ("vit_tiny", 192)])
def test_embed_dims(name: str, embed_dim: int) -> None:
    """Reference widths: ConvNet 128, ResNet-18 512, ResNet-50 2048, ViT-Ti 192."""
    assert build_backbone(name, image_size=16, in_chans=3, patch_size=4).embed_dim == embed_dim


def test_convnet_width_multiplier_scales_embed_dim() -> None:
    """width=0.5 halves every layer, so the ConvNet emits 64 features."""
    model = build_backbone("convnet", image_size=16, in_chans=1, width=0.5)
    assert model.embed_dim == 64
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 64)


@pytest.mark.parametrize("name", ["convnet", "resnet18"])
def test_groupnorm_makes_samples_independent(name: str) -> None:
    """With norm="gn" a sample's features in train mode do not depend on the rest of the batch (BatchNorm's do)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    gn = build_backbone(name, image_size=8, in_chans=3, norm="gn").train()
    torch.testing.assert_close(gn(x[:1]), gn(x)[:1], rtol=1e-4, atol=1e-5)
    bn = build_backbone(name, image_size=8, in_chans=3, norm="bn").train()
    assert not torch.allclose(bn(x[:2])[:1], bn(x)[:1], rtol=1e-4, atol=1e-5)


def test_vit_runs_at_other_input_sizes() -> None:
    """A ViT built for 16x16 accepts 8x8, 24x24 and 8x16 crops (DINO multi-crop) through pos-embed interpolation."""
    model = _tiny_vit().eval()
    for h, w in [(8, 8), (24, 24), (8, 16)]:
        assert model(torch.randn(2, 3, h, w)).shape == (2, 32)
        assert model.forward_features(torch.randn(2, 3, h, w)).shape == (2, 1 + (h // 4) * (w // 4), 32)


def test_vit_interpolated_pos_embed_is_the_one_used() -> None:
    """A ViT built at 8x8 run on 16x16 equals a 16x16 ViT whose pos-embed is the bicubic upsampling of the 8x8 one."""
    torch.manual_seed(0)
    small, big = _tiny_vit(image_size=8).eval(), _tiny_vit(image_size=16).eval()
    state = {k: v for k, v in small.state_dict().items() if k != "pos_embed"}
    big.load_state_dict(state, strict=False)
    patch_pos = interpolate_pos_embed(small.pos_embed[:, 1:], (2, 2), (4, 4))
    big.pos_embed.data = torch.cat([small.pos_embed[:, :1], patch_pos], dim=1)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(small(x), big(x))


def test_interpolate_pos_embed_keeps_a_constant_field() -> None:
    """Bicubic resizing of a constant embedding stays constant; the same grid returns the input unchanged."""
    pos = torch.full((1, 4, 5), 0.3)
    torch.testing.assert_close(interpolate_pos_embed(pos, (2, 2), (3, 5)), torch.full((1, 15, 5), 0.3))
    assert interpolate_pos_embed(pos, (2, 2), (2, 2)) is pos


def test_interpolate_pos_embed_is_maes_resize_in_row_major_layout() -> None:
    """A table resized to a non-square grid is MAE's / DeiT's ``interpolate_pos_embed`` (bicubic to the new size, no
    offset), written out here; rows stay rows: a table that varies along the rows only still does."""
    torch.manual_seed(0)
    pos = torch.randn(1, 4 * 4, 6)
    grid = pos.reshape(1, 4, 4, 6).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(3, 5), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(interpolate_pos_embed(pos, (4, 4), (3, 5)), expected.reshape(1, 15, 6))
    by_row = torch.arange(4.0).repeat_interleave(4)[None, :, None].expand(1, 16, 6)  # patch (r, c) -> r
    resized = interpolate_pos_embed(by_row, (4, 4), (3, 5)).reshape(3, 5, 6)
    torch.testing.assert_close(resized, resized[:, :1].expand(3, 5, 6))
    assert (resized[1:, 0] > resized[:-1, 0]).all()


def test_vit_init_is_timm_and_dinos() -> None:
    """Linear weights trunc_normal(std 0.02; bounds +-2 absolute, as timm's and DINO's) with zero biases, LayerNorms 1
    and 0, the cls token and the learned position embeddings trunc_normal(std 0.02), the mask token 0 (iBOT's), the
    registers normal(std 1e-6), LayerScale gains at their start value."""
    torch.manual_seed(0)
    vit = build_backbone(
        "vit_small", image_size=64, in_chans=3, patch_size=8, depth=2, num_registers=2, layer_scale=1e-5
    )
    linears = [m for m in vit.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 8
    for m in linears:
        assert m.weight.std().item() == pytest.approx(0.02, rel=0.05) and abs(m.weight.mean().item()) < 2e-3
        assert torch.all(m.bias == 0)
    for m in [m for m in vit.modules() if isinstance(m, torch.nn.LayerNorm)]:
        assert torch.all(m.weight == 1) and torch.all(m.bias == 0) and m.eps == 1e-6
    assert vit.pos_embed.std().item() == pytest.approx(0.02, rel=0.1) and vit.pos_embed.requires_grad
    assert vit.cls_token.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.all(vit.mask_token == 0) and 0 < vit.register_tokens.abs().max() < 1e-5
    assert all(torch.all(b.ls1 == 1e-5) and torch.all(b.ls2 == 1e-5) for b in vit.blocks)


def test_mask_token_replaces_only_masked_patches_before_pos_embed() -> None:
    """Masked tokens equal mask_token + pos-embed; unmasked tokens and the cls token are untouched."""
    torch.manual_seed(0)
    model = _tiny_vit()
    model.mask_token.data.normal_()
    x = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5]] = True
    mask[1, 15] = True
    plain, masked = model.prepare_tokens(x), model.prepare_tokens(x, mask)
    changed = (plain != masked).any(dim=-1)  # (B, 1+L)
    assert torch.equal(changed[:, 1:], mask) and not changed[:, 0].any()
    expected = model.mask_token[0, 0] + model.pos_embed[0, 1 + 5]
    torch.testing.assert_close(masked[0, 1 + 5], expected)


def test_mask_changes_output_and_trains_mask_token() -> None:
    """A mask changes the cls output, and the loss gives mask_token a non-zero gradient; no mask gives it none."""
    torch.manual_seed(0)
    model = _tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    mask = torch.rand(2, 16) < 0.4
    out = model.forward_features(x, mask)
    assert not torch.allclose(out[:, 0], model(x))
    out.square().sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    assert model.mask_token.grad is None


def test_patchify_roundtrip_and_layout() -> None:
    """patchify puts patch (r, c) at row r*gw+c with pixels in (p, p, C) order; unpatchify inverts it."""
    model = _tiny_vit()
    imgs = torch.randn(2, 3, 16, 16)
    patches = model.patchify(imgs)
    assert patches.shape == (2, model.num_patches, 4 * 4 * 3)
    torch.testing.assert_close(patches[1, 1 * 4 + 2], imgs[1, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1))
    torch.testing.assert_close(model.unpatchify(patches), imgs)
    wide = torch.randn(1, 3, 8, 16)
    torch.testing.assert_close(model.unpatchify(model.patchify(wide), (2, 4)), wide)


def test_drop_path_rises_with_depth_or_is_uniform() -> None:
    """Stochastic depth rises linearly from 0 in the first block to drop_path_rate in the last (timm), or is
    drop_path_rate in every block with drop_path_uniform (DINOv2's)."""
    assert [b.drop_path.p for b in _tiny_vit(depth=3, drop_path_rate=0.3).blocks] == pytest.approx([0.0, 0.15, 0.3])
    uniform = _tiny_vit(depth=3, drop_path_rate=0.3, drop_path_uniform=True)
    assert [b.drop_path.p for b in uniform.blocks] == pytest.approx([0.3] * 3)


def test_layer_ids_for_layer_wise_decay() -> None:
    """VisionTransformer.layer_id: the embeddings and tokens (registers and mask token too) 0, block i i + 1, the last
    norm depth + 1; every parameter has one."""
    model = _tiny_vit(depth=3, num_registers=2)
    ids = {n: model.layer_id(n) for n, _ in model.named_parameters()}
    for name in ("patch_embed.weight", "patch_embed.bias", "cls_token", "register_tokens", "mask_token", "pos_embed"):
        assert ids[name] == 0, name
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.2.mlp.2.bias"] == 3
    assert ids["blocks.1.norm1.weight"] == 2
    assert ids["norm.weight"] == ids["norm.bias"] == 4


def test_drop_path_is_stochastic_in_train_only() -> None:
    """With drop_path_rate > 0 two train-mode passes differ and eval-mode passes agree."""
    torch.manual_seed(0)
    model = _tiny_vit(drop_path_rate=0.5)
    x = torch.randn(4, 3, 16, 16)
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize("name,patch,expected", [("vit_small", 16, 21.7e6), ("vit_base", 16, 85.8e6),
                                                  ("vit_large", 16, 303.3e6), ("vit_huge", 14, 632e6)])
def test_vit_parameter_counts_match_published(name: str, patch: int, expected: float) -> None:
    """ViT-S/16, ViT-B/16, ViT-L/16 and ViT-H/14 at 224 without a head have the published 21.7M / 85.8M / 303.3M /
    632M parameters (within 2%)."""
    with torch.device("meta"):
        model = build_backbone(name, image_size=224, in_chans=3, patch_size=patch)
    assert abs(num_params(model) - expected) / expected < 0.02


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_grad_checkpointing_recomputes_blocks_and_steps_as_without(name: str) -> None:
    """grad_checkpointing on a ResNet: each residual block runs again in the backward (its activations recomputed, not
    kept), and the output, every gradient and the BatchNorm statistics (moved once, not twice) are those of the plain
    network; in eval mode or without grad it runs plainly."""
    torch.manual_seed(0)
    kwargs = dict(image_size=32, in_chans=3, widths=(8, 8, 16, 16), stem="cifar")
    plain = build_backbone(name, **kwargs)
    ckpt = build_backbone(name, grad_checkpointing=True, **kwargs)
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    for block in ckpt.stages[-1]:  # counted at forward (module hooks do not fire in the recomputation)
        block.forward = lambda x, f=block.forward: calls.append(1) or f(x)
    x = torch.randn(4, 3, 32, 32)
    outs = []
    for model in (plain, ckpt):
        model.train()
        out = model(x)
        out.pow(2).sum().backward()
        outs.append(out)
    assert len(calls) == 2 * len(ckpt.stages[-1])  # the step's forward and the backward's recomputation
    torch.testing.assert_close(outs[1], outs[0])
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=lambda m, n=n: f"{n}: {m}")
    for (n, a), b in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        torch.testing.assert_close(b, a, msg=lambda m, n=n: f"{n}: {m}")
    assert ckpt.stages[0][0].bn1.num_batches_tracked.item() == 1
    calls.clear()
    with torch.no_grad():
        ckpt(x)
    ckpt.eval()
    ckpt(x).sum().backward()
    assert len(calls) == 2 * len(ckpt.stages[-1])  # once each: no recomputation


def test_resnet50_is_torchvisions_layout() -> None:
    """ResNet-50 with its ImageNet stem: torchvision's resnet50 less its 1000-class fc (25,557,032 - 2,049,000
    parameters), 2048 features, a 7x7 map at 224 px; the CIFAR stem keeps 32 px images at 4x4."""
    with torch.device("meta"):
        model = build_backbone("resnet50", image_size=224, in_chans=3)
    assert num_params(model) == 25_557_032 - 2_049_000 and model.embed_dim == 2048
    small = build_backbone("resnet50", image_size=32, in_chans=3, stem="cifar")
    assert small.forward_dense(torch.randn(1, 3, 32, 32)).shape == (1, 2048, 4, 4)
    stem = build_backbone("resnet18", image_size=224, in_chans=3, stem="imagenet").forward_dense
    assert stem(torch.randn(1, 3, 224, 224)).shape == (1, 512, 7, 7)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_zero_init_residual_starts_each_block_as_its_shortcut(name: str) -> None:
    """zero_init_residual: the last norm of every residual block has a zero gain (and only those), so a block with an
    identity shortcut passes its (non-negative) input through unchanged and one with a projection gives relu of the
    projection; its gradient is not zero, so the block learns. Without it, every gain starts at 1."""
    from pretrain.models.resnet import BasicBlock, Bottleneck

    torch.manual_seed(0)
    model = build_backbone(name, image_size=32, in_chans=3, stem="cifar", zero_init_residual=True).eval()
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    last = {id(b.bn3 if isinstance(b, Bottleneck) else b.bn2) for b in blocks}
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(blocks) == (8 if name == "resnet18" else 16) and len(last) == len(blocks)
    for m in norms:
        assert torch.all(m.weight == 0) if id(m) in last else torch.all(m.weight == 1)
    x = torch.relu(torch.randn(2, 3, 32, 32))
    x = model.stem(x)
    for block in blocks:
        out = block(x)
        expected = x if isinstance(block.shortcut, torch.nn.Identity) else torch.relu(block.shortcut(x))
        torch.testing.assert_close(out, expected)
        x = out
    model.train()
    model(torch.randn(4, 3, 32, 32)).square().sum().backward()
    assert all(b.bn3.weight.grad.abs().sum() > 0 if isinstance(b, Bottleneck) else b.bn2.weight.grad.abs().sum() > 0
               for b in blocks)
    plain = build_backbone(name, image_size=32, in_chans=3, stem="cifar")
    assert all(torch.all(m.weight == 1) for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_unknown_backbone_lists_known_names() -> None:
    """An unknown name raises ValueError naming every registered backbone."""
    with pytest.raises(ValueError, match="unknown backbone 'vit_giant'.*convnet.*resnet18.*vit_base"):
        build_backbone("vit_giant", image_size=16, in_chans=3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="vit_small", image_size=18, patch_size=4), "image_size=18 is not divisible by patch_size=4"),
        (dict(name="vit_tiny", image_size=16, num_heads=5), "embed_dim=192 is not divisible by num_heads"),
        (dict(name="convnet", image_size=16, depth=3), r"unknown option\(s\) \['depth'\]"),
        (dict(name="resnet18", image_size=0), "image_size must be a positive int"),
        (dict(name="convnet", image_size=16, norm="ln"), "norm must be one of"),
        (dict(name="resnet50", image_size=16, stem="vgg"), r"stem must be one of \('cifar', 'imagenet'\)"),
        (dict(name="vit_tiny", image_size=16, pos_embed="rope"), "pos_embed must be 'learned' or 'sincos'"),
        (dict(name="vit_tiny", image_size=16, layer_scale=0), "layer_scale must be > 0"),
        (dict(name="vit_tiny", image_size=16, num_registers=-1), "num_registers must be an int >= 0, got -1"),
        (dict(name="vit_tiny", image_size=16, num_registers=True), "num_registers must be an int >= 0, got True"),
        (dict(name="vit_tiny", image_size=16, embed_dim=30, num_heads=3, pos_embed="sincos"),
         "needs an embed_dim divisible by 4, got 30"),
    ],
)
def test_bad_options_raise_value_error(kwargs: dict, match: str) -> None:
    """Bad sizes and options fail with one ValueError line naming the problem."""
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        build_backbone(name, in_chans=3, **kwargs)


def test_vit_rejects_bad_inputs() -> None:
    """Wrong channel count, a size not divisible by the patch, and a mis-shaped mask raise ValueError."""
    model = _tiny_vit()
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(torch.randn(1, 3, 10, 16))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        model.forward_features(torch.randn(1, 3, 16, 16), torch.zeros(1, 15, dtype=torch.bool))


def test_vit_without_mask_token_has_no_unused_parameter() -> None:
    """use_mask_token=False drops the parameter (DDP-friendly for unmasked methods) and refuses masks."""
    model = _tiny_vit(use_mask_token=False)
    assert model.mask_token is None and "mask_token" not in dict(model.named_parameters())
    with pytest.raises(ValueError, match="use_mask_token=False"):
        model.forward_features(torch.randn(1, 3, 16, 16), torch.zeros(1, 16, dtype=torch.bool))


def test_vit_global_pool_mean_averages_the_patch_tokens() -> None:
    """global_pool="mean" gives the mean of the final-normed patch tokens (not the cls token); a bad value fails."""
    model = _tiny_vit(global_pool="mean").eval()
    x = torch.randn(2, 3, 16, 16)
    tokens = model.forward_features(x)
    torch.testing.assert_close(model(x), tokens[:, 1:].mean(1))
    assert not torch.allclose(model(x), tokens[:, 0])
    with pytest.raises(ValueError, match="global_pool must be 'cls' or 'mean'"):
        _tiny_vit(global_pool="max")


def test_vit_grad_checkpointing_gives_the_same_step_and_random_stream() -> None:
    """grad_checkpointing recomputes each block in the backward: the output, every gradient (with stochastic depth on:
    the recomputation replays the same drops) and the RNG afterwards are those of the plain forward; with no backward
    to come (no_grad, eval) it is the plain forward."""
    x = torch.randn(4, 3, 32, 32)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        vit = build_backbone("vit_tiny", image_size=32, in_chans=3, patch_size=8, depth=3,
                             drop_path_rate=0.5, grad_checkpointing=checkpointing)
        torch.manual_seed(1)
        out = vit(x)
        (out * torch.arange(out.shape[1])).sum().backward()
        results.append((out.detach(), {k: p.grad for k, p in vit.named_parameters() if p.grad is not None},
                        torch.rand(3)))
    (out0, grads0, after0), (out1, grads1, after1) = results
    torch.testing.assert_close(out1, out0)
    assert grads0.keys() == grads1.keys() and len(grads0) > 10
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=1e-5, atol=1e-6, msg=k)
    assert torch.equal(after0, after1)  # the recomputation did not advance the RNG
    # the drops were real: another seed gives another output
    torch.manual_seed(2)
    with torch.no_grad():
        assert not torch.allclose(vit(x), out1)


def test_sincos_table_is_moco_v3s_and_maes_transposed() -> None:
    """sincos_pos_embed_2d is MoCo v3's ``build_2d_sincos_position_embedding`` (row, then column) and MAE's
    ``get_2d_sincos_pos_embed`` with its two halves swapped (MAE puts the column first), both written out here."""
    from pretrain.models.vit import sincos_pos_embed_2d

    h, w, dim = 3, 5, 16
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    out_r, out_c = rows.flatten()[:, None] * omega, cols.flatten()[:, None] * omega
    moco = torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1).float()
    mae = torch.cat([out_c.sin(), out_c.cos(), out_r.sin(), out_r.cos()], dim=1).float()
    ours = sincos_pos_embed_2d((h, w), dim)
    torch.testing.assert_close(ours, moco)
    torch.testing.assert_close(torch.cat([ours[:, dim // 2 :], ours[:, : dim // 2]], dim=1), mae)


def test_vit_sincos_pos_embed_is_fixed() -> None:
    """pos_embed=sincos: the patches' rows are the 2-D sine-cosine table (the cls row 0), with no gradient, and stay
    so through training steps while the rest trains; a local crop interpolates it like a learned one."""
    from pretrain.models.vit import sincos_pos_embed_2d

    torch.manual_seed(0)
    vit = _tiny_vit(pos_embed="sincos")
    expected = torch.cat([torch.zeros(1, 32), sincos_pos_embed_2d((4, 4), 32)])[None]
    assert torch.equal(vit.pos_embed.detach(), expected) and not vit.pos_embed.requires_grad
    init = vit.patch_embed.weight.detach().clone()
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        (vit(torch.randn(4, 3, 16, 16)).square().mean() + vit(torch.randn(4, 3, 8, 8)).square().mean()).backward()
        opt.step()
    assert torch.equal(vit.pos_embed.detach(), expected) and vit.pos_embed.grad is None
    assert not torch.equal(vit.patch_embed.weight, init)


def test_vit_layer_scale_starts_each_block_near_identity() -> None:
    """layer_scale=1e-5: each residual branch is scaled by a per-channel gain that starts at 1e-5, so a fresh block
    changes its input by about 1e-5 of what the plain block adds; the gains train (a gradient reaches them) and are
    1-D, so they take no weight decay."""
    torch.manual_seed(0)
    scaled = _tiny_vit(layer_scale=1e-5)
    plain = _tiny_vit()
    plain.load_state_dict({k: v for k, v in scaled.state_dict().items() if ".ls" not in k})
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        delta_scaled = scaled.blocks[0](x) - x
        delta_plain = plain.blocks[0](x) - x
    assert delta_scaled.abs().max() < 1e-3 * delta_plain.abs().max()
    scaled(torch.randn(2, 3, 16, 16)).square().sum().backward()
    gains = [p for n, p in scaled.named_parameters() if ".ls" in n]
    assert len(gains) == 4 and all(p.ndim == 1 and p.grad.abs().sum() > 0 for p in gains)


def test_vit_register_tokens_sit_between_cls_and_patches() -> None:
    """num_registers=3: the tokens are [cls + its position, 3 registers (no position), patches + positions, masked ones
    replaced first], written out here by hand; the registers take part in attention (they change the cls token), get
    a gradient, and stay out of every output: ``patch_tokens``, the mean pool, ``forward_dense``; a local crop
    interpolates the patches' positions only."""
    torch.manual_seed(0)
    vit = _tiny_vit(num_registers=3, global_pool="mean").eval()
    assert vit.num_prefix_tokens == 4 and vit.register_tokens.shape == (1, 3, 32)
    assert 0 < vit.register_tokens.abs().max() < 1e-4  # DINOv2's init, normal(std=1e-6)
    with torch.no_grad():
        vit.register_tokens.normal_()
    x = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 5] = mask[1, :3] = True
    patches = vit.patch_embed(x).flatten(2).transpose(1, 2)
    patches = torch.where(mask[..., None], vit.mask_token, patches) + vit.pos_embed[:, 1:]
    prefix = torch.cat([vit.cls_token + vit.pos_embed[:, :1], vit.register_tokens], dim=1).expand(2, -1, -1)
    expected = torch.cat([prefix, patches], dim=1)
    for block in vit.blocks:
        expected = block(expected)
    expected = vit.norm(expected)
    tokens = vit.forward_features(x, mask)
    assert tokens.shape == (2, 4 + 16, 32)
    torch.testing.assert_close(tokens, expected)
    torch.testing.assert_close(vit.patch_tokens(tokens), expected[:, 4:])
    torch.testing.assert_close(vit.pool(tokens), expected[:, 4:].mean(1))
    torch.testing.assert_close(vit.forward_dense(x), vit.patch_tokens(vit.forward_features(x)).transpose(1, 2)
                               .reshape(2, 32, 4, 4))
    assert vit(torch.randn(2, 3, 8, 8)).shape == (2, 32)  # a local crop: 4 patches, the same 3 registers
    with torch.no_grad():
        vit.register_tokens.add_(torch.randn(1, 3, 32))
    assert not torch.allclose(vit.forward_features(x, mask)[:, 0], tokens[:, 0])
    vit.train()
    vit(x).square().sum().backward()
    assert vit.register_tokens.grad.abs().sum() > 0
