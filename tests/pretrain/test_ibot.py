"""pretrain.methods.ibot in one process: the two losses against the references of its own outputs, the Triton kernels
(interpreted) against PyTorch, what the masked student sees, the patch center, config checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_pipeline.masking import block_masks
from kernels.dino_loss import dino_loss_ref, ibot_patch_loss_ref
from pretrain.config import load_config
from pretrain.methods.dino import koleo_loss
from pretrain.methods.swav import swav_loss
from pretrain.trainer import build_method
from tests.util import config_error, sinkhorn_reference

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "ibot_digits.yaml"
SMALL = ["method.num_prototypes=64", "model.proj_hidden_dim=32", "model.proj_out_dim=16",
         "model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2}", "method.mask_prob=1.0"]


def _method(*overrides: str):
    return build_method(load_config(RECIPE, [*SMALL, *overrides]), distributed=False)


def _views(b: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 1, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(b, 1, 8, 8, generator=g) for _ in range(2)]


def _features(net, x, mask=None):
    """The image-level token (N, D): the cls token, or with ``global_pool: mean`` the patch mean; the patch tokens
    (N, L, D)."""
    t = net["backbone"].forward_features(x, mask)
    patches = t[:, 1 + net["backbone"].num_registers:]  # any register tokens sit between the cls token and the patches
    return patches.mean(1) if net["backbone"].global_pool == "mean" else t[:, 0], patches


def _patch_logits(net, patches, key="head"):
    return net[key](patches.reshape(-1, patches.shape[-1])).view(*patches.shape[:2], -1)


def _tokens(net, x, mask=None, key="head"):
    """The head's logits (N, K) for the image-level token and (N, L, K') for the patch tokens by the head ``net[key]``
    (the same head, or DINOv2's separate patch head), a head run over each population apart (its BatchNorm normalises
    each by its own statistics)."""
    cls, patches = _features(net, x, mask)
    return net["head"](cls), _patch_logits(net, patches, key)


@pytest.mark.parametrize("pool, registers, head", [("cls", 0, "shared"), ("mean", 0, "shared"), ("cls", 4, "shared"),
                                                   ("cls", 0, "separate")])
def test_loss_is_cls_plus_patch_loss_of_its_outputs(pool, registers, head):
    """loss = DINO's loss on the image-level tokens (all views vs the teacher's global ones; the cls token or the patch
    mean, as the backbone pools) + the patch loss at the masked patches (each masked global view vs the teacher's view
    of it whole), each at its own teacher temperature and center; the Triton kernels (interpreted) give the same loss
    and gradients as the references. With register tokens the patch loss still sees the patches only; with DINOv2's
    separate patch head (48 prototypes against the image-level head's 64) the patches go through it alone."""
    method = _method("method.loss_impl=ref", "method.teacher_temp=0.02", "method.teacher_patch_temp=0.05",
                     "method.warmup_teacher_temp=0.04", "method.warmup_teacher_temp_steps=50",
                     "method.patch_loss_weight=0.5", "method.freeze_last_layer_steps=0",
                     f"model.backbone_kwargs={{embed_dim: 32, depth: 2, num_heads: 2, global_pool: {pool}, "
                     f"num_registers: {registers}}}", f"method.patch_head={head}",
                     f"method.patch_prototypes={48 if head == 'separate' else 0}")
    key = "patch_head" if head == "separate" else "head"
    assert method.patch_center.shape == (48 if head == "separate" else 64,)
    method.center.normal_()
    method.patch_center.normal_()
    views = _views()
    method.on_step_start(100, 200)  # after the warmup: teacher_temp and teacher_patch_temp
    torch.manual_seed(7)
    out = method({"views": views})
    torch.manual_seed(7)
    mask = block_masks(8, (4, 4), (0.1, 0.5), 1.0)
    assert mask.any(1).all()
    with torch.no_grad():
        glob = torch.cat(views[:2])
        t_cls, t_patch = _tokens(method.teacher, glob, key=key)
        s_cls, s_patches = _features(method.student, glob, mask)
        local = method.student["backbone"](torch.cat(views[2:]))
        # the student's head over all the cls tokens at once (global and local views, as DINO's), the patches apart
        cls = method.student["head"](torch.cat([s_cls, local])).view(4, 4, -1)
        cls_ref, _ = dino_loss_ref(cls, t_cls.view(2, 4, -1), method.center, 0.1, 0.02, upcast=True)
        # the student's head over its masked patches only (its BatchNorm's batch), placed back in the full grid for
        # the full-tensor reference (unmasked positions do not count there)
        s_patch = torch.zeros_like(t_patch)
        s_patch[mask] = method.student[key](s_patches[mask])
        patch_ref, _ = ibot_patch_loss_ref(s_patch, t_patch, mask, method.patch_center, 0.1, 0.05, upcast=True)
    torch.testing.assert_close(out["cls_loss"], cls_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["patch_loss"], patch_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], cls_ref + 0.5 * patch_ref, rtol=1e-5, atol=1e-6)

    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    assert method.student["backbone"].mask_token.grad.abs().sum() > 0
    method.zero_grad()
    method.loss_impl = "triton"
    for part in (method.student, method.teacher):
        part["backbone"].mask_impl = "triton"
    torch.manual_seed(7)
    fused = method({"views": views})
    fused["loss"].backward()
    torch.testing.assert_close(fused["loss"], out["loss"], rtol=1e-5, atol=1e-6)
    # fp32 sums in another order, carried back through the network: judged against each gradient's scale, and for a
    # gradient that is zero up to rounding (the ViT's last norm bias, before the head's BatchNorm) against the largest
    biggest = max(g.abs().max().item() for g in grads.values())
    for n, p in method.named_parameters():
        if n in grads:
            atol = 1e-4 * grads[n].abs().max().item() + 1e-5 * biggest
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def test_student_does_not_see_masked_patches_and_teacher_does():
    """Changing the pixels of the masked patches leaves every student output alone (the patch embedding is replaced by
    the mask token) and changes the teacher's, which sees the views whole."""
    method = _method()
    backbone = method.student["backbone"]
    views = _views()
    torch.manual_seed(3)
    mask = block_masks(4, (4, 4), (0.3, 0.5), 1.0)
    x = views[0]
    patches = backbone.patchify(x)
    changed = backbone.unpatchify(torch.where(mask[..., None], torch.randn_like(patches), patches))
    with torch.no_grad():
        torch.testing.assert_close(_tokens(method.student, changed, mask), _tokens(method.student, x, mask))
        assert not torch.allclose(_tokens(method.teacher, changed)[1], _tokens(method.teacher, x)[1])


def _student_head_calls(method) -> tuple[int, dict]:
    calls = []
    handle = method.student["head"].register_forward_hook(lambda *_: calls.append(1))
    try:
        out = method({"views": _views()})
    finally:
        handle.remove()
    return len(calls), out


def test_a_draw_that_hides_nothing_has_no_patch_loss():
    """mask_prob 0 (or a draw that hid under 2 patches): the patch loss is 0, the step is DINO's on the unmasked views,
    its gradients flow, and the patch center still follows the teacher's patches. The student's head runs as often as
    in a step that masks (ranks that drew differently must make the same ZeRO-3 parameter gathers)."""
    calls_masked, _ = _student_head_calls(_method("method.mask_prob=1.0"))
    method = _method("method.mask_prob=0.0", "method.freeze_last_layer_steps=0")
    method.patch_center.fill_(0.5)
    calls, out = _student_head_calls(method)
    assert calls == calls_masked == 2
    assert out["patch_loss"].item() == 0.0 and torch.equal(out["loss"], out["cls_loss"])
    out["loss"].backward()
    assert method.student["head"].last_layer.weight_v.grad.abs().sum() > 0
    method.on_step_end(0, 10)
    assert not torch.allclose(method.patch_center, torch.full_like(method.patch_center, 0.5))


def test_sinkhorn_centering_balances_the_cls_and_the_masked_patches():
    """method.centering=sinkhorn (DINOv2's): the cls loss is against the official Sinkhorn-Knopp codes of the
    teacher's global views' image-level logits (teacher_temp), the patch loss against those of the teacher's logits at
    the masked patches (teacher_patch_temp, balanced over the masked patches alone); both centers stay as they were.
    With DINOv2's separate patch head, as DINOv2 trains."""
    method = _method("method.loss_impl=ref", "method.centering=sinkhorn", "method.norm_last_layer=true",
                     "method.warmup_teacher_temp_steps=0", "method.teacher_temp=0.05", "method.teacher_patch_temp=0.06",
                     "method.freeze_last_layer_steps=0", "method.patch_head=separate", "method.patch_prototypes=48")
    key = "patch_head"
    method.center.normal_()
    method.patch_center.normal_()
    centers = method.center.clone(), method.patch_center.clone()
    views = _views()
    method.on_step_start(0, 10)
    torch.manual_seed(7)
    out = method({"views": views})
    torch.manual_seed(7)
    mask = block_masks(8, (4, 4), (0.1, 0.5), 1.0)
    with torch.no_grad():
        glob = torch.cat(views[:2])
        t_cls, t_patch = _tokens(method.teacher, glob, key=key)
        s_cls, s_patches = _features(method.student, glob, mask)
        cls = method.student["head"](torch.cat([s_cls, method.student["backbone"](torch.cat(views[2:]))]))
        cls_codes = sinkhorn_reference(t_cls, 0.05, 3).view(2, 4, -1)
        patch_codes = sinkhorn_reference(t_patch[mask], 0.06, 3)
        s_masked = torch.log_softmax(method.student[key](s_patches[mask]) / 0.1, dim=-1)
        # each masked patch weighs 1 / (its view's masked count), averaged over the views (iBOT's patch loss)
        weight = (1 / mask.sum(1, keepdim=True).float()).expand_as(mask)[mask] / mask.shape[0]
        patch_ref = -((patch_codes * s_masked).sum(-1) * weight).sum()
    torch.testing.assert_close(out["cls_loss"], swav_loss(cls.view(4, 4, -1), cls_codes, 0.1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["patch_loss"], patch_ref, rtol=1e-5, atol=1e-6)
    method.on_step_end(0, 10)
    assert torch.equal(method.center, centers[0]) and torch.equal(method.patch_center, centers[1])


def test_koleo_on_the_students_masked_global_views():
    """koleo_weight: DINOv2's KoLeo of the student's image-level tokens of each (masked) global view joins the sum of
    the two losses."""
    method = _method("method.koleo_weight=0.2", "method.patch_loss_weight=0.5")
    views = _views()
    torch.manual_seed(7)
    out = method({"views": views})
    torch.manual_seed(7)
    mask = block_masks(8, (4, 4), (0.1, 0.5), 1.0)
    with torch.no_grad():
        cls, _ = _features(method.student, torch.cat(views[:2]), mask)
    torch.testing.assert_close(out["koleo"], 0.2 * (koleo_loss(cls[:4]) + koleo_loss(cls[4:])), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["cls_loss"] + 0.5 * out["patch_loss"] + out["koleo"], rtol=1e-5,
                               atol=1e-6)


def test_patch_center_is_ema_of_teacher_patch_mean():
    method = _method("method.center_momentum=0.8")
    views = _views()
    method.patch_center.fill_(0.5)
    method({"views": views})
    with torch.no_grad():
        mean = _tokens(method.teacher, torch.cat(views[:2]))[1].float().mean((0, 1))
    method.on_step_end(0, 10)
    torch.testing.assert_close(method.patch_center, 0.8 * 0.5 + 0.2 * mean, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(method.patch_center, method.center)  # a center of its own


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_image_level_loss_trains_the_released_representation(pool):
    """The cls loss's token is the backbone's pooled one, the representation evaluation and downstream use get (and the
    local crops' path): with ``global_pool: mean`` the patch mean, not the untrained cls token."""
    method = _method(f"model.backbone_kwargs={{embed_dim: 32, depth: 2, num_heads: 2, global_pool: {pool}}}")
    x = _views()[0]
    with torch.no_grad():
        for net in (method.teacher, method.student):
            feats = net["backbone"].forward_features(x)
            pooled = feats[:, 1:].mean(1) if pool == "mean" else feats[:, 0]
            image, patches = method._encode(net["backbone"], x, None)
            torch.testing.assert_close(net["backbone"](x), pooled)
            torch.testing.assert_close(image, pooled)
            torch.testing.assert_close(patches, feats[:, 1:])


def test_separate_patch_head_takes_the_patch_loss_alone_and_has_an_ema_teacher():
    """DINOv2's separate head: the image-level loss trains the image-level head and not the patch head, the patch loss
    the patch head and not the image-level one (both train the backbone); the patch head's teacher starts as a copy of
    the student's and follows it by the EMA at the teacher momentum."""
    method = _method("method.patch_head=separate", "method.patch_prototypes=48", "method.freeze_last_layer_steps=0",
                     "method.teacher_momentum=0.5")
    student, teacher = method.student, method.teacher
    for a, b in zip(student["patch_head"].parameters(), teacher["patch_head"].parameters(), strict=True):
        torch.testing.assert_close(a, b)
        assert a.requires_grad and not b.requires_grad
    views = _views()
    grads = {}
    for weight in (0.0, 1.0):  # the cls loss alone, then with the patch loss
        method.zero_grad()
        method.patch_weight = weight
        torch.manual_seed(7)
        method({"views": views})["loss"].backward()
        grads[weight] = {n: None if p.grad is None else p.grad.clone() for n, p in student.named_parameters()}
    for n in grads[0.0]:
        alone, both = grads[0.0][n], grads[1.0][n]
        if n.startswith("head."):  # the image-level head: the patch loss adds nothing
            assert alone.abs().sum() > 0, n
            torch.testing.assert_close(both, alone, msg=lambda m, n=n: f"{n}: {m}")
        elif n.startswith("patch_head."):  # the patch head: the patch loss alone
            assert (alone is None or not alone.any()) and both.abs().sum() > 0, n
    qkv = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.allclose(grads[0.0][qkv], grads[1.0][qkv])  # both train the backbone
    before = [p.clone() for p in teacher["patch_head"].parameters()]
    with torch.no_grad():
        for p in student["patch_head"].parameters():
            p.add_(1.0)
    method.on_step_end(0, 10)  # momentum 0.5 at step 0
    for a, b, s in zip(before, teacher["patch_head"].parameters(), student["patch_head"].parameters(), strict=True):
        torch.testing.assert_close(b, 0.5 * a + 0.5 * s)


def test_backbone_is_teacher_with_mask_token():
    method = _method()
    assert method.backbone is method.teacher["backbone"]
    assert method.backbone.mask_token is not None
    assert method.backbone(_views()[0]).shape == (4, 32)


@pytest.mark.parametrize("override, key", [
    (["model.backbone=convnet"], "model.backbone"),
    (["method.mask_ratio_range=[0.5, 0.2]"], "method.mask_ratio_range"),
    (["method.mask_prob=1.5"], "method.mask_prob"),
    (["method.teacher_patch_temp=0"], "method.teacher_patch_temp"),
    (["method.loss_impl=chunked"], "method.loss_impl"),
    (["method.patch_head=own"], "method.patch_head"),
    (["method.patch_prototypes=48"], "method.patch_prototypes"),  # a shared head has num_prototypes for both
    (["method.patch_prototypes=-1", "method.patch_head=separate"], "method.patch_prototypes"),
])
def test_config_errors_name_the_key(override, key):
    assert config_error(RECIPE, override).startswith(f"{key}:")
