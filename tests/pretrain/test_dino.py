"""pretrain.methods.dino and pretrain.ema in one process: loss, schedules, freezing, center, EMA, config checks."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from kernels.dino_loss import dino_loss_ref
from pretrain.config import ConfigError, load_config
from pretrain.ema import cosine_momentum, ema_update_
from pretrain.methods.dino import koleo_loss, teacher_temperature
from pretrain.methods.swav import swav_loss
from pretrain.trainer import build_method
from tests.util import assert_grads_close, assert_ranks_grads_close, sinkhorn_reference, spawn_ranks

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "dino_digits.yaml"
SMALL = ["method.num_prototypes=96", "model.proj_hidden_dim=32", "model.proj_out_dim=16",
         "model.backbone_kwargs={width: 0.25}", "data.local_views=2", "data.local_size=8"]


def _method(*overrides: str):
    return build_method(load_config(RECIPE, [*SMALL, *overrides]), distributed=False)


def _views(b: int = 6, local: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 1, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(b, 1, 8, 8, generator=g) for _ in range(local)]


def test_loss_is_dino_of_teacher_and_student_outputs():
    """The method's loss is DINO's reference loss of its own student (all views) and teacher (global views) outputs,
    at the scheduled teacher temperature, and the Triton kernel (interpreted) gives the same loss and gradients."""
    method = _method("method.loss_impl=ref", "method.warmup_teacher_temp=0.04", "method.teacher_temp=0.06",
                     "method.warmup_teacher_temp_steps=10")
    method.center.normal_()  # a non-trivial center
    views = _views()
    method.on_step_start(5, 100)
    temp = teacher_temperature(5, 0.04, 0.06, 10)
    assert temp == pytest.approx(0.05)
    out = method({"views": views})["loss"]
    with torch.no_grad():
        t = method.teacher["head"](method.teacher["backbone"](torch.cat(views[:2]))).view(2, 6, -1)
        backbone = method.student["backbone"]  # one pass per resolution, then the head over all views at once
        s = method.student["head"](torch.cat([backbone(torch.cat(views[:2])), backbone(torch.cat(views[2:]))]))
        s = s.view(4, 6, -1)
    ref, _ = dino_loss_ref(s, t, method.center, 0.1, temp, upcast=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)

    out.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    method.zero_grad()
    method.loss_impl = "triton"
    fused = method({"views": views})["loss"]
    fused.backward()
    torch.testing.assert_close(fused, out, rtol=1e-5, atol=1e-6)
    assert_grads_close(method, grads, rtol=1e-4)


def _outputs(method, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's logits (2 * B, K) of the global views and the student's (V, B, K) of every view."""
    b = views[0].shape[0]
    with torch.no_grad():
        t = method.teacher["head"](method.teacher["backbone"](torch.cat(views[:2])))
        backbone = method.student["backbone"]
        s = method.student["head"](torch.cat([backbone(torch.cat(views[:2])), backbone(torch.cat(views[2:]))]))
    return t, s.view(len(views), b, -1)


SINKHORN = ["method.centering=sinkhorn", "method.norm_last_layer=true", "method.warmup_teacher_temp=0.05",
            "method.teacher_temp=0.05"]


def test_sinkhorn_centering_is_dinov2s():
    """method.centering=sinkhorn: the loss is DINO's pairwise cross-entropy against the official Sinkhorn-Knopp
    teacher distributions (both global views' outputs balanced together at the teacher temperature) instead of the
    centred softmax; the Triton kernel (interpreted) gives the same; the EMA center is neither used nor updated."""
    method = _method("method.loss_impl=ref", *SINKHORN)
    method.center.normal_()  # would change the loss if it were used
    center = method.center.clone()
    views = _views()
    method.on_step_start(0, 100)
    out = method({"views": views})["loss"]
    t, s = _outputs(method, views)
    codes = sinkhorn_reference(t, 0.05, 3).view(2, 6, -1)
    torch.testing.assert_close(out, swav_loss(s, codes, 0.1), rtol=1e-5, atol=1e-6)
    method.loss_impl = "triton"
    torch.testing.assert_close(method({"views": views})["loss"], out, rtol=1e-5, atol=1e-6)
    method.on_step_end(0, 100)
    assert torch.equal(method.center, center)


def _sinkhorn_worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from pretrain import dist

    method = build_method(load_config(RECIPE, [*SMALL, *SINKHORN, "model.sync_bn=true"]), distributed=True)
    loss = method({"views": [v[4 * rank:4 * rank + 4] for v in _views(8)]})["loss"]
    loss.backward()
    grads = {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}
    for g in grads.values():
        torch.distributed.all_reduce(g)
        g /= 2
    torch.save({"loss": dist.all_reduce_mean(loss.detach()), "grads": grads}, f"{root}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_sinkhorn_centering_on_two_ranks_is_the_whole_batchs(tmp_path):
    """On 2 gloo ranks with half the images each, the teacher's codes are balanced over both ranks' images: the
    ranks' mean loss and averaged gradients are one process's on the whole batch."""
    spawn_ranks(_sinkhorn_worker, 2, str(tmp_path))
    method = _method(*SINKHORN)
    loss = method({"views": _views(8)})["loss"]
    loss.backward()
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-4, atol=1e-5)
        assert_ranks_grads_close(method, res["grads"])


def test_koleo_loss_is_dinov2s():
    """KoLeo against DINOv2's formula (nearest other row by cosine, PairwiseDistance with eps) on an odd batch, and
    closed forms: orthonormal rows are each sqrt(2) from their nearest, whatever their scale; two close rows cost
    more than far ones."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g)
    xn = nn.functional.normalize(x, dim=-1, eps=1e-8)
    dots = xn @ xn.T
    dots.view(-1)[::8].fill_(-1)
    expected = -torch.log(nn.PairwiseDistance(2, eps=1e-8)(xn, xn[dots.argmax(1)]) + 1e-8).mean()
    torch.testing.assert_close(koleo_loss(x), expected)
    assert koleo_loss(3 * torch.eye(4)).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    close = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]])
    assert koleo_loss(close) > koleo_loss(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]))


def test_koleo_term_adds_to_the_loss_on_the_students_global_features():
    """koleo_weight: the loss is DINO's plus the weight times KoLeo of each global view's student features (this
    rank's batch, views apart), both logged; it sends a gradient to the student's backbone; 0 leaves DINO as it was."""
    views = _views()
    plain = _method("method.loss_impl=ref")({"views": views})
    method = _method("method.loss_impl=ref", "method.koleo_weight=0.1")
    out = method({"views": views})
    assert "koleo" not in plain
    torch.testing.assert_close(out["dino_loss"], plain["loss"].detach())
    with torch.no_grad():
        f = method.student["backbone"](torch.cat(views[:2]))
    torch.testing.assert_close(out["koleo"], 0.1 * (koleo_loss(f[:6]) + koleo_loss(f[6:])), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], plain["loss"] + out["koleo"], rtol=1e-5, atol=1e-6)
    koleo = method._koleo(method.student["backbone"](torch.cat(views[:2])), 6)
    koleo.backward()
    grads = [p.grad for p in method.student["backbone"].parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_teacher_gets_no_gradient_and_backbone_is_teacher():
    """Only the student trains; ``backbone`` (what evaluation and backbone.pt use) is the teacher's."""
    method = _method()
    method({"views": _views()})["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert method.backbone is method.teacher["backbone"]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student["backbone"].parameters())


def test_last_layer_frozen_for_the_first_steps():
    """During freeze_last_layer_steps the prototypes get no gradient (the rest of the student does); afterwards they
    do."""
    method = _method("method.freeze_last_layer_steps=3")
    last = method.student["head"].last_layer.weight_v
    for step, frozen in ((0, True), (2, True), (3, False)):
        method.zero_grad()
        method.on_step_start(step, 100)
        method({"views": _views(seed=step)})["loss"].backward()
        assert (last.grad is None) == frozen, step
        assert method.student["head"].mlp[0].weight.grad.abs().sum() > 0


def test_center_is_ema_of_reduced_teacher_mean():
    """After a step the center moves towards the teacher's batch mean as averaged by ``reduce``, at center_momentum."""
    method = _method("method.center_momentum=0.75")
    reduced = []

    def reduce(x):  # the contract: a tensor in, its mean over ranks out; here a world of 2 where the other rank adds 1
        reduced.append(x.clone())
        return (x + (x + 1.0)) / 2

    method.reduce = reduce
    views = _views()
    method({"views": views})
    with torch.no_grad():
        t = method.teacher["head"](method.teacher["backbone"](torch.cat(views[:2])))
    before = method.center.clone()
    method.on_step_end(0, 100)
    torch.testing.assert_close(reduced[0], t.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method.center, 0.75 * before + 0.25 * (t.mean(0) + 0.5), rtol=1e-5, atol=1e-6)


def test_ema_update_formula_and_ends():
    """teacher <- m * teacher + (1 - m) * student; m = 1 keeps the teacher, m = 0 copies the student; buffers stay."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7))
    teacher = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7))
    teacher[1].running_mean.fill_(3.0)
    t0 = [p.clone() for p in teacher.parameters()]
    ema_update_(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), t0))
    ema_update_(teacher, student, 0.9)
    for a, b, s in zip(teacher.parameters(), t0, student.parameters()):
        torch.testing.assert_close(a, 0.9 * b + 0.1 * s, rtol=1e-6, atol=1e-7)
    ema_update_(teacher, student, 0.0)
    assert all(torch.equal(a, s) for a, s in zip(teacher.parameters(), student.parameters()))
    assert torch.all(teacher[1].running_mean == 3.0)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(teacher, student, 1.5)
    with pytest.raises(ValueError, match="differ"):
        ema_update_(nn.Linear(5, 6), nn.Linear(6, 5), 0.5)


def test_schedules_closed_forms():
    """Teacher momentum: base at step 0, halfway at max/2, 1 at the end; teacher temperature: linear warmup."""
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert teacher_temperature(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert teacher_temperature(15, 0.04, 0.07, 30) == pytest.approx(0.055)
    assert teacher_temperature(30, 0.04, 0.07, 30) == 0.07 == teacher_temperature(99, 0.04, 0.07, 0)


def test_training_step_moves_teacher_towards_student():
    """One optimizer step then on_step_end: the teacher lies strictly between its old value and the new student."""
    method = _method("method.teacher_momentum=0.9")
    old = [p.clone() for p in method.teacher.parameters()]
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    method.on_step_start(0, 10)
    method({"views": _views()})["loss"].backward()
    opt.step()
    method.on_step_end(0, 10)
    m = cosine_momentum(0, 10, 0.9)
    for t, o, s in zip(method.teacher.parameters(), old, method.student.parameters()):
        torch.testing.assert_close(t, m * o + (1 - m) * s, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(t, o) for t, o in zip(method.teacher.parameters(), old))


@pytest.mark.parametrize("overrides, message", [
    (["method.loss_impl=chunked"], "method.loss_impl: dino takes one of auto, triton, ref"),
    (["data.local_size=32"], "data.local_size: must be in [1, image_size=16]"),
    (["data.local_views=-1"], "data.local_views: must be >= 0"),
    (["data.local_crop_scale=[0.5, 0.2]"], "data.local_crop_scale: need 0 < low <= high <= 1"),
    (["method.teacher_momentum=1.5"], "method.teacher_momentum: must be in [0, 1]"),
    (["method.teacher_temp=0"], "method.teacher_temp: must be > 0"),
    (["method.centering=sinkhorn", "method.norm_last_layer=false"], "method.centering: sinkhorn needs "
                                                                    "method.norm_last_layer: true"),
    (["method.centering=median"], "method.centering: must be ema or sinkhorn"),
    (["method.koleo_weight=-0.1"], "method.koleo_weight: must be >= 0"),
    (["model.backbone=vit_tiny", "model.patch_size=4", "data.local_size=6"],
     "model.patch_size: 4 does not divide data.local_size 6"),
])
def test_bad_dino_settings_one_line(overrides, message):
    """Impossible DINO settings stop before anything starts, with one line naming the key."""
    with pytest.raises(ConfigError) as err:
        load_config(RECIPE, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_simclr_refuses_local_crops():
    """SimCLR has no use for local crops: asking for them is an error, not silent extra decoding."""
    with pytest.raises(ConfigError, match="data.local_views: simclr"):
        load_config(ROOT / "configs" / "simclr_digits.yaml", ["data.local_views=2"])
    load_config(ROOT / "configs" / "simclr_digits.yaml", ["data.local_size=32"])  # unused without local crops: fine


def test_collapsed_teacher_gives_log_k():
    """A teacher whose outputs equal the center gives uniform targets; a student with constant logits then pays
    ln K per pair, so the method's loss is ln K."""
    method = _method("method.loss_impl=ref")
    with torch.no_grad():
        for head in (method.student["head"], method.teacher["head"]):
            head.last_layer.weight_v.zero_()
            head.last_layer.weight_v[:, 0] = 1.0  # every prototype the same unit vector: constant logits
    loss = method({"views": _views()})["loss"]
    assert loss.item() == pytest.approx(math.log(96), rel=1e-5)


def test_vit_student_sees_local_crops_at_their_size():
    """With a ViT, local crops (8x8, 4 patches) go through the same student as the 16x16 globals (16 patches, position
    embeddings interpolated); every student parameter that the loss reaches gets a gradient."""
    method = _method("model.backbone=vit_tiny", "model.patch_size=4",
                     "model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}",
                     "method.freeze_last_layer_steps=0")
    views = _views()
    loss = method({"views": views})["loss"]
    loss.backward()
    assert math.isfinite(loss.item())
    missing = [n for n, p in method.student.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


@pytest.mark.parametrize("recipe, teacher", [("dino_vit_digits.yaml", "teacher"), ("ibot_digits.yaml", "teacher"),
                                             ("byol_digits.yaml", "target"), ("mocov3_digits.yaml", "target")])
def test_ema_teacher_has_no_stochastic_depth(recipe, teacher):
    """With drop_path_rate on the ViT, the student drops residual branches per sample and the EMA teacher (target,
    momentum encoder) does not, as the reference code builds it: in train mode two passes of the student over the
    same images differ, the teacher's agree; the EMA leaves it so. iBOT's separate patch head's teacher too."""
    overrides = ["model.backbone=vit_tiny", "model.patch_size=4", "model.proj_hidden_dim=32", "model.proj_out_dim=16",
                 "model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2, drop_path_rate: 0.5}"]
    if recipe.startswith("ibot"):
        overrides.append("method.patch_head=separate")
    cfg = load_config(ROOT / "configs" / recipe, overrides)
    method = build_method(cfg, distributed=False).train()
    student = method.student if teacher == "teacher" else method.online
    target = getattr(method, teacher)
    assert [b.drop_path.p for b in student["backbone"].blocks] == [0.0, 0.5]
    assert all(b.drop_path.p == 0.0 for b in target["backbone"].blocks)
    x = torch.randn(8, cfg.data.channels, 16, 16)
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.allclose(student["backbone"](x), student["backbone"](x))
        torch.testing.assert_close(target["backbone"](x), target["backbone"](x))
    method.on_step_end(0, 10)  # the EMA: parameters only
    assert all(b.drop_path.p == 0.0 for b in target["backbone"].blocks)
