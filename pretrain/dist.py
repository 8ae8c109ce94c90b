"""The distribution helpers models and losses use; nothing here decides how a job is launched.

All functions work unchanged in a single process (no process group): rank 0 of a world of 1. Collectives take an
optional ``group`` (default: the whole world) so callers pass the communication in.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def is_initialized() -> bool:
    """True inside an initialised default process group."""
    return dist.is_available() and dist.is_initialized()


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (0 when not distributed)."""
    return dist.get_rank(group) if is_initialized() else 0


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of processes in ``group`` (1 when not distributed)."""
    return dist.get_world_size(group) if is_initialized() else 1


def local_rank() -> int:
    """Rank on this node, from ``LOCAL_RANK`` (set by torchrun, Ray Train and DeepSpeed's launcher); 0 when unset."""
    return int(os.environ.get("LOCAL_RANK", "0"))


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the incoming gradient across ranks and returns this rank's slice.

    Every rank's loss uses every rank's rows, so d(sum of losses)/d(my rows) needs the gradient from all ranks; a plain
    ``all_gather`` returns tensors without history and silently drops the other ranks' share (lightly #1977,
    open_clip #616).
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.n = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def gather_with_grad(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """x: (n, ...) on each rank -> (world*n, ...), ranks in order, differentiable.

    Backward all-reduces (SUM) the gradient of the gathered tensor and returns this rank's rows, so averaging parameter
    gradients over ranks afterwards (DDP / DeepSpeed) gives the gradient of the mean loss over the whole global batch.
    Returns ``x`` itself when not distributed or in a world of 1. Every rank must pass the same shape (checked with one
    small all-gather; ValueError on all ranks otherwise).
    """
    if not is_initialized() or world_size(group) == 1:
        return x
    if not 1 <= x.ndim <= 8:
        raise ValueError(f"gather_with_grad needs a tensor with 1 to 8 dims, got shape {tuple(x.shape)}")
    # the shape check costs one tiny all-gather; a mismatch would otherwise hang or mis-slice the backward
    shape = torch.tensor([x.ndim, *x.shape, *([0] * (8 - x.ndim))], dtype=torch.int64, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size(group))]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(s, shape) for s in shapes):
        seen = [tuple(s[1 : 1 + int(s[0])].tolist()) for s in shapes]
        raise ValueError(f"gather_with_grad needs the same shape on every rank, got {seen} (rank order)")
    return _GatherWithGrad.apply(x, group)


class _AllReduceSumWithGrad(torch.autograd.Function):
    """All-reduce (SUM) whose backward is the all-reduce (SUM) of the gradient: every rank's loss depends on the sum,
    so each rank's input gets the gradient of the sum of all ranks' losses."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum_with_grad(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum of ``x`` over ranks, differentiable (batch statistics of the global batch: ``pretrain.sync_bn``). As with
    ``gather_with_grad``, averaging parameter gradients over ranks afterwards gives the gradient of the mean loss.
    ``x`` itself when not distributed or in a world of 1."""
    if not is_initialized() or world_size(group) == 1:
        return x
    return _AllReduceSumWithGrad.apply(x, group)


@torch.no_grad()
def all_reduce_mean(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Mean of float ``x`` over ranks (new tensor, no autograd) for logging and centers; ``x`` when not distributed."""
    if not is_initialized() or world_size(group) == 1:
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out.div_(world_size(group))


def consecutive_group(size: int) -> dist.ProcessGroup | None:
    """This rank's group of ``size`` consecutive ranks (0, 1, ...; apex's ``create_syncbn_process_group``); None (the
    whole world) for 0, for the world's size or more, and when not distributed. Collective: every rank creates every
    group, in the same order. ValueError (one line) where ``size`` does not divide the world."""
    world = world_size()
    if size == 0 or size >= world or not is_initialized():
        return None
    if size < 0 or world % size:
        raise ValueError(f"model.sync_bn_group: {size} ranks a group does not divide the {world} ranks")
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank() < start + size:
            mine = group
    return mine


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank; a no-op when not distributed."""
    if world_size(group) > 1:
        dist.barrier(group=group)


class LaggedAny:
    """Whether any rank said yes one call before, known to every rank at the same call without waiting for it: each
    call starts an all-reduce of this rank's answer and takes the one the call before started, long done by then (the
    trainer's stop request: rank 0 reads it at every step; every rank stops at the next). Every rank calls it at the
    same points; without a process group it answers at once. Under gloo (CPU) the all-reduce is on a host tensor in a
    gloo group of its own (on the training's group, 2 ranks aborted at exit in 3 of 6 tries: "terminate called without
    an active exception"); under NCCL on the default group (a gloo group beside NCCL would need each node's hostname to
    resolve to an address the others reach), on a device tensor copied back to pinned memory behind a CUDA event, so
    that the host waits for the call before, never for the step it has just queued. Built by every rank (it may make a
    process group); ``close`` after the last call."""

    def __init__(self) -> None:
        self.distributed = is_initialized()
        cuda = self.distributed and dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.group = dist.new_group(backend="gloo") if self.distributed and not cuda else None
        self.host = torch.zeros(1, dtype=torch.int64, pin_memory=cuda)
        self.pending = None  # the gloo work or the CUDA event of the call before

    def __call__(self, mine: bool) -> bool:
        if not self.distributed:
            return mine
        before = self._take()
        flag = torch.full((1,), int(mine), dtype=torch.int64, device=self.device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        if self.device.type == "cuda":
            work.wait()  # the current stream waits for the all-reduce; the host does not
            self.host.copy_(flag, non_blocking=True)
            self.pending = torch.cuda.Event()
            self.pending.record()
        else:
            self.host, self.pending = flag, work
        return before

    def close(self) -> None:
        """Wait for the all-reduce still under way (the last call's)."""
        self._take()

    def _take(self) -> bool:
        if self.pending is None:
            return False
        if isinstance(self.pending, torch.cuda.Event):
            self.pending.synchronize()
        else:
            self.pending.wait()
        self.pending = None
        return bool(self.host.item())
