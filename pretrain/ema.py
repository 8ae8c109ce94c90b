"""Exponential moving average of a student into a teacher (BYOL, DINO, iBOT, MoCo v3, I-JEPA): ``torch._foreach_*``,
ZeRO-3 aware.

Under DeepSpeed ZeRO-3 a parameter's full value exists only while a forward gathers it; between steps each rank holds
its partition in ``param.ds_tensor``. A teacher and a student of the same architecture are partitioned alike (the same
numel per parameter), so the EMA runs on the partitions, locally and without communication. Parameters that ZeRO-3
keeps whole on every rank (``ds_persist``: small ones, below its persistence threshold) are read from ``param.data`` by
the forward without a gather, so those are updated there as well (on one rank the two are one storage: updated once).
Without ZeRO-3 the update is on ``param.data``.
Nothing here imports DeepSpeed: it only reads the attributes DeepSpeed sets.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import nn


def teacher_copy(student: nn.Module) -> nn.Module:
    """An EMA teacher's start: a copy of ``student`` without gradients and without stochastic depth (every
    ``DropPath`` at 0), as the reference DINO, iBOT and DINOv2 code build their teachers (drop_path_rate 0: a target is
    not a randomly thinned network) and MoCo v3's momentum encoder has none; the rest of its train-mode behaviour (a
    head's BatchNorm on batch statistics) stays the student's. The EMA moves parameters only, so it stays so."""
    from pretrain.models.vit import DropPath

    teacher = copy.deepcopy(student).requires_grad_(False)
    for module in teacher.modules():
        if isinstance(module, DropPath):
            module.p = 0.0
    return teacher


def cosine_momentum(step: int, max_steps: int, base: float) -> float:
    """BYOL/DINO schedule: ``base`` at step 0, rising along a half cosine to 1 at ``max_steps``."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, max_steps) / max(1, max_steps)) + 1.0) / 2.0


def linear_momentum(step: int, max_steps: int, base: float) -> float:
    """I-JEPA's schedule: ``base`` at step 0, rising linearly to 1 at ``max_steps``."""
    return base + (1.0 - base) * min(step, max_steps) / max(1, max_steps)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _local_tensors(teacher: Iterable[nn.Parameter], student: Iterable[nn.Parameter]):
    t_out, s_out = [], []
    for t, s in zip(teacher, student, strict=True):
        if hasattr(t, "ds_tensor") != hasattr(s, "ds_tensor"):
            raise ValueError("teacher and student must both be ZeRO-3 partitioned, or neither")
        if hasattr(t, "ds_tensor"):
            if t.ds_tensor.shape != s.ds_tensor.shape:
                raise ValueError(f"teacher/student partitions differ: {tuple(t.ds_tensor.shape)} vs "
                                 f"{tuple(s.ds_tensor.shape)}")
            t_out.append(t.ds_tensor)
            s_out.append(s.ds_tensor)
            # a persistent parameter's whole copy, unless it is the partition itself (one rank: ZeRO-3 then keeps the
            # two in one storage, and updating both would apply the EMA twice)
            if getattr(t, "ds_persist", False) and not _same_storage(t.data, t.ds_tensor):
                t_out.append(t.data)
                s_out.append(s.data)
        else:
            if t.shape != s.shape:
                raise ValueError(f"teacher/student parameters differ: {tuple(t.shape)} vs {tuple(s.shape)}")
            t_out.append(t.data)
            s_out.append(s.data)
    return t_out, s_out


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, parameter by parameter, in place.

    ``teacher`` and ``student`` must list their parameters in the same order with the same shapes (a deep copy does).
    Buffers (BatchNorm statistics) are left alone: the teacher keeps its own, from its own forward passes.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    t, s = _local_tensors(teacher.parameters(), student.parameters())
    if momentum == 1.0 or not t:
        return
    # a foreach op takes one dtype and device per call: group (a bf16 student copy is cast to the teacher's dtype)
    groups: dict[tuple, tuple[list, list]] = {}
    for a, b in zip(t, s):
        ts, ss = groups.setdefault((a.dtype, a.device), ([], []))
        ts.append(a)
        ss.append(b.to(a.dtype))
    for ts, ss in groups.values():
        torch._foreach_lerp_(ts, ss, 1.0 - momentum)
