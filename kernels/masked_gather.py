"""Token selection for masked image modelling: MAE's keep-gather, iBOT/BEiT's mask-token replace, and a packed
gather of a per-sample varying number of masked tokens.

Every op reads one index/flag per row (torch.gather reads a (B, L_keep, D) int64 index), so the Triton path is a
plain row copy; backward is the matching scatter (rows not selected get zero gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.utils import check_float, next_pow2, resolve_impl


# ----------------------------------------------------------------------------------------------- Triton kernels
@triton.jit
def _gather_rows_fwd_kernel(
    dst_ptr, src_ptr, idx_ptr,
    n_rows, rows_per_batch, batch_stride, row_stride, dim,
    SCATTER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row r of the packed side <-> row idx[r] of batch r // rows_per_batch of the indexed side (both last-dim
    contiguous; packed side is (n_rows, dim) contiguous). SCATTER=False: dst[r] = src[b, idx[r]] (gather);
    SCATTER=True: dst[b, idx[r]] = src[r] (its backward; indices within a batch must be distinct)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < n_rows
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = r_ok[:, None] & (d < dim)[None, :]
    b = (r // rows_per_batch).to(tl.int64)
    pos = tl.load(idx_ptr + r, mask=r_ok, other=0).to(tl.int64)
    indexed = (b * batch_stride + pos * row_stride)[:, None] + d[None, :]
    packed = r.to(tl.int64)[:, None] * dim + d[None, :]
    if SCATTER:
        tl.store(dst_ptr + indexed, tl.load(src_ptr + packed, mask=m), mask=m)
    else:
        tl.store(dst_ptr + packed, tl.load(src_ptr + indexed, mask=m), mask=m)


@triton.jit
def _flagged_tile(mask_ptr, n_rows, dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (BLOCK_R, BLOCK_D) tile of a contiguous (n_rows, dim) tensor: (columns d, d_ok, element mask,
    element offsets, per-row mask flag)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < n_rows
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    flag = tl.load(mask_ptr + r, mask=r_ok, other=0) != 0
    return d, d_ok, r_ok[:, None] & d_ok[None, :], r.to(tl.int64)[:, None] * dim + d[None, :], flag


@triton.jit
def _mask_token_fwd_kernel(
    out_ptr, x_ptr, mask_ptr, tok_ptr, n_rows, dim,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[r] = tok if mask[r] else x[r]; x, out (n_rows, dim) contiguous, mask (n_rows,) uint8."""
    d, d_ok, m, off, flag = _flagged_tile(mask_ptr, n_rows, dim, BLOCK_R, BLOCK_D)
    tok = tl.load(tok_ptr + d, mask=d_ok, other=0.0).to(out_ptr.dtype.element_ty)
    x = tl.load(x_ptr + off, mask=m & ~flag[:, None], other=0.0)
    tl.store(out_ptr + off, tl.where(flag[:, None], tok[None, :], x), mask=m)


@triton.jit
def _mask_token_bwd_kernel(
    dx_ptr, dtok_partial_ptr, g_ptr, mask_ptr, n_rows, dim,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx[r] = 0 if mask[r] else g[r]; dtok_partial[program, :] = sum of g over this tile's masked rows (fp32)."""
    d, d_ok, m, off, flag = _flagged_tile(mask_ptr, n_rows, dim, BLOCK_R, BLOCK_D)
    g = tl.load(g_ptr + off, mask=m, other=0.0)
    tl.store(dx_ptr + off, tl.where(flag[:, None], 0.0, g).to(dx_ptr.dtype.element_ty), mask=m)
    part = tl.sum(tl.where(flag[:, None], g.to(tl.float32), 0.0), axis=0)
    tl.store(dtok_partial_ptr + tl.program_id(0).to(tl.int64) * dim + d, part, mask=d_ok)


def _row_blocks(dim: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D): about 4096 elements per program, D tiled by up to 1024."""
    block_d = min(1024, next_pow2(dim))
    return max(1, 4096 // block_d), block_d


def _launch_rows(dst: Tensor, src: Tensor, idx: Tensor, rows_per_batch: int, batch_stride: int, row_stride: int,
                 scatter: bool) -> None:
    n_rows, dim = idx.numel(), src.shape[-1]
    if n_rows == 0 or dim == 0:
        return
    br, bd = _row_blocks(dim)
    _gather_rows_fwd_kernel[(triton.cdiv(n_rows, br), triton.cdiv(dim, bd))](
        dst, src, idx, n_rows, rows_per_batch, batch_stride, row_stride, dim, SCATTER=scatter, BLOCK_R=br,
        BLOCK_D=bd,
    )


# Custom ops around the launches: opaque to torch.compile, which traces the autograd.Functions around them.
@torch.library.custom_op("ssl_pretrain::gather_rows", mutates_args=())
def gather_rows(x: Tensor, ids: Tensor) -> Tensor:
    """x (B, L, D), ids (B, L_keep) int64, both contiguous -> x[b, ids[b, j]] as (B, L_keep, D)."""
    (b, _, d), lk = x.shape, ids.shape[1]
    out = torch.empty((b, lk, d), device=x.device, dtype=x.dtype)
    _launch_rows(out, x, ids, max(lk, 1), x.stride(0), x.stride(1), scatter=False)
    return out


@gather_rows.register_fake
def _(x: Tensor, ids: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], ids.shape[1], x.shape[2]))


@torch.library.custom_op("ssl_pretrain::scatter_rows", mutates_args=())
def scatter_rows(grad: Tensor, ids: Tensor, length: int) -> Tensor:
    """gather_rows' backward: grad (B, L_keep, D) contiguous into zeros (B, length, D) at rows ids."""
    b, d = grad.shape[0], grad.shape[2]
    dx = torch.zeros((b, length, d), device=grad.device, dtype=grad.dtype)
    _launch_rows(dx, grad, ids, max(ids.shape[1], 1), dx.stride(0), dx.stride(1), scatter=True)
    return dx


@scatter_rows.register_fake
def _(grad: Tensor, ids: Tensor, length: int) -> Tensor:
    return grad.new_empty((grad.shape[0], length, grad.shape[2]))


@torch.library.custom_op("ssl_pretrain::mask_token_fwd", mutates_args=())
def mask_token_fwd(x: Tensor, flags: Tensor, token: Tensor) -> Tensor:
    """x (B, L, D) contiguous, flags (B, L) uint8, token (D,) -> x with flagged rows set to token (x's dtype)."""
    n_rows, dim = x.shape[0] * x.shape[1], x.shape[2]
    out = torch.empty_like(x)
    br, bd = _row_blocks(dim)
    if n_rows and dim:
        _mask_token_fwd_kernel[(triton.cdiv(n_rows, br), triton.cdiv(dim, bd))](
            out, x, flags, token, n_rows, dim, BLOCK_R=br, BLOCK_D=bd
        )
    return out


@mask_token_fwd.register_fake
def _(x: Tensor, flags: Tensor, token: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("ssl_pretrain::mask_token_bwd", mutates_args=())
def mask_token_bwd(grad: Tensor, flags: Tensor) -> tuple[Tensor, Tensor]:
    """grad (B, L, D) contiguous -> (dx: grad with flagged rows zeroed, dtoken (D,) fp32: sum of flagged rows)."""
    n_rows, dim = grad.shape[0] * grad.shape[1], grad.shape[2]
    br, bd = _row_blocks(dim)
    n_prog = triton.cdiv(n_rows, br)
    dx = torch.empty_like(grad)
    partial = torch.zeros((n_prog, dim), device=grad.device, dtype=torch.float32)
    if n_rows and dim:
        _mask_token_bwd_kernel[(n_prog, triton.cdiv(dim, bd))](dx, partial, grad, flags, n_rows, dim,
                                                               BLOCK_R=br, BLOCK_D=bd)
    return dx, partial.sum(0)


@mask_token_bwd.register_fake
def _(grad: Tensor, flags: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(grad), grad.new_empty(grad.shape[2], dtype=torch.float32)


class MaskedGatherFunction(torch.autograd.Function):
    """x (B, L, D), ids_keep (B, L_keep) int64 -> (B, L_keep, D); backward scatters into zeros."""

    @staticmethod
    def forward(ctx, x: Tensor, ids_keep: Tensor) -> Tensor:
        ids = ids_keep.contiguous()
        ctx.save_for_backward(ids)
        ctx.length = x.shape[1]
        return gather_rows(x.contiguous(), ids)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        return scatter_rows(grad.contiguous(), ids, ctx.length), None


class MaskTokenReplaceFunction(torch.autograd.Function):
    """x (B, L, D), mask (B, L) bool, mask_token (D,) -> (B, L, D) in x's dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
        flags = mask.contiguous().to(torch.uint8)  # (a uint8 view failed to lower in inductor, torch 2.11 CUDA)
        ctx.save_for_backward(flags)
        ctx.tok_dtype = mask_token.dtype
        return mask_token_fwd(x.contiguous(), flags, mask_token.contiguous())

    @staticmethod
    def backward(ctx, grad: Tensor):
        (flags,) = ctx.saved_tensors
        dx, dtok = mask_token_bwd(grad.contiguous(), flags)
        return dx, None, dtok.to(ctx.tok_dtype)


# -------------------------------------------------------------------------------------------- public functions
def _check_ids(x: Tensor, ids_keep: Tensor) -> None:
    check_float("x", x, 3)
    if ids_keep.dtype != torch.int64 or ids_keep.dim() != 2 or ids_keep.shape[0] != x.shape[0]:
        raise ValueError(f"ids_keep must be int64 (B={x.shape[0]}, L_keep), got {ids_keep.dtype} "
                         f"{tuple(ids_keep.shape)}")
    if ids_keep.device != x.device:
        raise ValueError(f"ids_keep on {ids_keep.device} but x on {x.device}")
    # A value check needs a host sync on CUDA (and breaks a compiled graph); do it where it is free (eager, CPU)
    # and document the contract otherwise.
    checkable = not ids_keep.is_cuda and not torch.compiler.is_compiling() and ids_keep.numel() > 0
    if checkable and not 0 <= int(ids_keep.min()) <= int(ids_keep.max()) < x.shape[1]:
        raise ValueError(f"ids_keep values must lie in [0, L={x.shape[1]})")
    # the backward scatters: a repeated id would take one of its gradients, not their sum (a gather without a
    # backward, I-JEPA's of the target's overlapping blocks, may repeat ids)
    if checkable and ids_keep.shape[1] > 1 and x.requires_grad and torch.is_grad_enabled():
        ordered = ids_keep.sort(dim=1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError("ids_keep values must be distinct within each row (the positions kept)")


def _check_mask(x: Tensor, mask: Tensor) -> None:
    check_float("x", x, 3)
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]) or mask.device != x.device:
        raise ValueError(f"mask must be bool {tuple(x.shape[:2])} on {x.device}, got {mask.dtype} "
                         f"{tuple(mask.shape)} on {mask.device}")


def masked_gather_ref(x: Tensor, ids_keep: Tensor) -> Tensor:
    """torch.gather reference: x (B, L, D), ids_keep (B, L_keep) -> (B, L_keep, D)."""
    return torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))


def masked_gather(x: Tensor, ids_keep: Tensor, *, impl: str = "auto") -> Tensor:
    """out[b, j] = x[b, ids_keep[b, j]] (MAE's visible tokens). x: (B, L, D) fp32/fp16/bf16; ids_keep: (B, L_keep)
    int64, distinct within a row (MAE's argsort prefix; the Triton backward stores, it does not add).
    Returns (B, L_keep, D); gradient flows to x. impl: "auto" | "triton" | "ref"."""
    _check_ids(x, ids_keep)
    if resolve_impl(impl, x, op="masked_gather") == "triton":
        return MaskedGatherFunction.apply(x, ids_keep)
    return masked_gather_ref(x, ids_keep)


def mask_token_replace_ref(x: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
    """torch.where reference: x (B, L, D), mask (B, L) bool, mask_token (D,) -> (B, L, D) in x's dtype."""
    return torch.where(mask[..., None], mask_token.to(x.dtype), x)


def mask_token_replace(x: Tensor, mask: Tensor, mask_token: Tensor, *, impl: str = "auto") -> Tensor:
    """Rows of x where mask is set become mask_token (iBOT/BEiT). x: (B, L, D); mask: (B, L) bool;
    mask_token: (D,) (any float dtype; cast to x's). Gradients to x (zero where masked) and mask_token (sum)."""
    _check_mask(x, mask)
    if mask_token.dim() != 1 or mask_token.shape[0] != x.shape[2] or not mask_token.is_floating_point():
        raise ValueError(f"mask_token must be a float ({x.shape[2]},) tensor, got {tuple(mask_token.shape)}")
    if resolve_impl(impl, x, op="mask_token_replace") == "triton":
        return MaskTokenReplaceFunction.apply(x, mask, mask_token)
    return mask_token_replace_ref(x, mask, mask_token)


def packed_gather_ref(x: Tensor, mask: Tensor) -> Tensor:
    """Boolean-index reference: x (B, L, D), mask (B, L) -> (M, D), M = mask.sum(), row-major order."""
    return x[mask]


def packed_gather(x: Tensor, mask: Tensor, *, impl: str = "auto") -> Tensor:
    """All masked rows of x in row-major (b, l) order: x (B, L, D), mask (B, L) bool -> (M, D), M = mask.sum()
    (varies per sample, iBOT). Backward scatters into zeros. M is data dependent, so this syncs with the host."""
    _check_mask(x, mask)
    if resolve_impl(impl, x, op="packed_gather") == "ref":
        return packed_gather_ref(x, mask)
    flat_ids = torch.nonzero(mask.reshape(-1)).reshape(1, -1)  # (1, M) indices into the B*L rows
    x_flat = x.reshape(1, x.shape[0] * x.shape[1], x.shape[2])
    return MaskedGatherFunction.apply(x_flat, flat_ids).squeeze(0)
