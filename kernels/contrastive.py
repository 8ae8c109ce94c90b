"""Row-vs-columns softmax cross-entropy without the similarity matrix: the core of NT-Xent and CLIP.

For query rows q (M, D) and key columns k (C, D), a positive column pos (M,) and an excluded column excl (M,)
(-1 = none) per row:

    loss_i = logsumexp_{j != excl_i}(q_i . k_j) - q_i . k_{pos_i}

Any logit scale (1/temperature, exp(logit_scale)) is applied by the caller to q, so its gradient comes from autograd.

Three implementations with one contract (per-row fp32 loss, gradients to q and k in their dtypes):
- "triton": FlashAttention-style. The forward streams column tiles with an online max/sum and keeps the per-row
  log-sum-exp; when D fits one tile (<= 128) it also accumulates dq for a unit upstream gradient the way attention
  accumulates its output. The backward recomputes the logit tiles from the LSE: one kernel for dk over column
  tiles (and, for D > 128, one for dq over row tiles); no atomics, deterministic. Memory O((M + C) D).
  Per-logit work is kept to the matmul, one FMA + exp2 and the row sums: the positive/excluded-column masks run
  only on the few column tiles that hold a row tile's positives or excluded columns, and the forward's running max
  is raised lazily (RESCALE_SLACK), so most tiles skip rescaling. On CUDA, fp16/bf16 blocks are autotuned.
- "chunked": pure PyTorch, rows in chunks of about `chunk_elems / C`; gradients for a uniform upstream gradient
  (mean/sum losses) are formed in the forward while each chunk's softmax is at hand (Liger-Kernel style), any other
  upstream gradient recomputes chunks from the saved LSE. What CPU training runs use. Memory O((M + C) D + chunk).
- "ref": the naive (M, C) logits matrix and F.cross_entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from kernels.utils import AUTOTUNE, INTERPRET, check_float, dot_precision, fp32_loss, next_pow2, resolve_impl

DEFAULT_CHUNK_ELEMS = 1 << 22  # 16 MiB of fp32 logits per chunk
MAX_SINGLE_D = 128  # D up to this is one tl.dot slice: the query tile stays in registers, the forward forms dq
# 16-bit D up to this is one slice too on sm_80+ (and in the interpreter), without the forward's dq, whose (BLOCK_M, D)
# fp32 accumulator would spill; beyond it, D in MAX_SINGLE_D slices. First H200 run, 2N = 65,536 bf16: D = 256 in
# slices took 136 ms fwd+bwd (eager: 40 ms), each backward program recomputing the logits over every slice.
MAX_WIDE_D = 256
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2 e): one FMA and the hardware's exp2 per logit
# Lazy rescaling (as in FlashAttention-4): the forward's running max is raised only when a tile's max exceeds it
# by more than this (natural log units), so most tiles skip rescaling the sum and the (BLOCK_M, D) dq accumulator;
# exp(s - stale max) <= e^5.5 ~ 245 stays well inside fp32 (and bf16, for the p @ k product). Exact: the same max is
# used for the sum and the accumulator.
RESCALE_SLACK = tl.constexpr(5.5)


# ----------------------------------------------------------------------------------------------- Triton kernels
@triton.jit
def _logits_tile(
    a_ptr, b_ptr, a0, b0, n_a, n_b, a_row_stride, b_row_stride, dim,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """(BLOCK_A, BLOCK_B) fp32 tile of a[a0:a0+BLOCK_A] @ b[b0:b0+BLOCK_B].T, reduced over D in BLOCK_D slices.

    The 64-bit part of the address is one scalar per tile; in-tile offsets stay 32-bit (fewer registers)."""
    ia = tl.arange(0, BLOCK_A)
    ib = tl.arange(0, BLOCK_B)
    a_ok = (a0 + ia) < n_a
    b_ok = (b0 + ib) < n_b
    a_blk = a_ptr + tl.cast(a0, tl.int64) * a_row_stride
    b_blk = b_ptr + tl.cast(b0, tl.int64) * b_row_stride
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < dim
        a = tl.load(a_blk + ia[:, None] * a_row_stride + d[None, :], mask=a_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(b_blk + ib[None, :] * b_row_stride + d[:, None], mask=d_ok[:, None] & b_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)  # b is loaded transposed: (BLOCK_D, BLOCK_B)
    return acc


@triton.jit
def _load_rows(ptr, r0, n, row_stride, d, dim, BLOCK_R: tl.constexpr):
    """(BLOCK_R, len(d)) tile of rows r0.. of a (n, dim) matrix, zero outside."""
    i = tl.arange(0, BLOCK_R)
    return tl.load(ptr + tl.cast(r0, tl.int64) * row_stride + i[:, None] * row_stride + d[None, :],
                   mask=((r0 + i) < n)[:, None] & (d < dim)[None, :], other=0.0)


@triton.jit
def _special_ranges(pos, excl, row_ok):
    """Smallest and largest positive column and excluded column of a row tile (lo > hi when none)."""
    big = 2147483647
    has_excl = row_ok & (excl >= 0)
    return (tl.min(tl.where(row_ok, pos, big), axis=0), tl.max(tl.where(row_ok, pos, -1), axis=0),
            tl.min(tl.where(has_excl, excl, big), axis=0), tl.max(tl.where(has_excl, excl, -1), axis=0))


@triton.jit
def _meets(c0, BLOCK: tl.constexpr, p_lo, p_hi, e_lo, e_hi):
    """Does the column tile [c0, c0 + BLOCK) hold a positive or an excluded column of the row tile? Only such
    tiles (a few per row tile: NT-Xent's diagonal and its +-N partner) pay for the per-element column masks."""
    c1 = c0 + BLOCK
    return ((c0 <= p_hi) & (c1 > p_lo)) | ((c0 <= e_hi) & (c1 > e_lo))


@triton.jit
def _bwd_rows(pos_ptr, excl_ptr, lse_ptr, g_ptr, g_scale, r0, n_rows, BLOCK_M: tl.constexpr):
    """The backward's per-row inputs of rows r0.. : (pos, excl, lse in log2 units, g / g_scale (0 past n_rows),
    row_ok). g arrives divided by max|g| (g_scale) so that fp16 ds = g * (p - 1[pos]) stays out of the subnormals."""
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    excl = tl.load(excl_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    lse2 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0) / g_scale
    return pos, excl, lse2, g, row_ok


@triton.jit
def _contrastive_fwd_kernel(
    loss_ptr, lse_ptr, dqu_ptr,                 # outputs: (M,) fp32 x2; (M, D) fp32 when WITH_DQ
    q_ptr, k_ptr, pos_ptr, excl_ptr,            # inputs
    q_row_stride, k_row_stride,
    n_rows, n_cols, dim, size_class,            # size_class: the autotuning key's size bucket (unused here)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SINGLE_D: tl.constexpr, WITH_DQ: tl.constexpr,
):
    """Per-row loss and LSE. WITH_DQ (needs SINGLE_D) also writes dqu_i = sum_j p_ij k_j - k_{pos_i}, the query
    gradient for a unit upstream gradient, accumulated like attention's output (softmax(q k^T) v with v = k)."""
    m0 = tl.program_id(0) * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    excl = tl.load(excl_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    # A finite start for the running max keeps exp(m_old - m_new) = 0, never nan, while a row has seen only -inf.
    m = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    s_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if SINGLE_D:  # D fits one slice: the query tile stays in registers, one pipelined load per column tile
        q = _load_rows(q_ptr, m0, n_rows, q_row_stride, d, dim, BLOCK_M)
    p_lo, p_hi, e_lo, e_hi = _special_ranges(pos, excl, row_ok)
    for n0 in range(0, n_cols, BLOCK_N):
        if SINGLE_D:
            kt = _load_rows(k_ptr, n0, n_cols, k_row_stride, d, dim, BLOCK_N)
            s = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION)
        else:
            s = _logits_tile(q_ptr, k_ptr, m0, n0, n_rows, n_cols, q_row_stride, k_row_stride, dim,
                             BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
        if _meets(n0, BLOCK_N, p_lo, p_hi, e_lo, e_hi) | (n0 + BLOCK_N > n_cols):
            cols = n0 + tl.arange(0, BLOCK_N)
            pos_logit += tl.sum(tl.where(cols[None, :] == pos[:, None], s, 0.0), axis=1)
            s = tl.where((cols[None, :] < n_cols) & (cols[None, :] != excl[:, None]), s, float("-inf"))
        m_tile = tl.max(s, axis=1)
        if tl.max(m_tile - m, axis=0) > RESCALE_SLACK:
            m_new = tl.maximum(m, m_tile)
            alpha = tl.exp2((m - m_new) * LOG2E)
            s_sum = s_sum * alpha
            if WITH_DQ:
                acc = acc * alpha[:, None]
            m = m_new
        e = tl.exp2(s * LOG2E - (m * LOG2E)[:, None])
        s_sum += tl.sum(e, axis=1)
        if WITH_DQ:
            acc = tl.dot(e.to(kt.dtype), kt, acc, input_precision=DOT_PRECISION)
    lse = m + tl.log(s_sum)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, lse - pos_logit, mask=row_ok)
    if WITH_DQ:
        d_ok = d < dim
        k_pos = tl.load(k_ptr + pos.to(tl.int64)[:, None] * k_row_stride + d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        dqu_blk = dqu_ptr + tl.cast(m0, tl.int64) * dim
        tl.store(dqu_blk + tl.arange(0, BLOCK_M)[:, None] * dim + d[None, :], acc / s_sum[:, None] - k_pos,
                 mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _contrastive_bwd_dq_kernel(
    dq_ptr,                                     # output (M, D)
    q_ptr, k_ptr, pos_ptr, excl_ptr, lse_ptr, g_ptr, g_scale_ptr,
    q_row_stride, k_row_stride, dq_row_stride,
    n_rows, n_cols, dim, size_class,            # size_class: the autotuning key's size bucket (unused here)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SINGLE_D: tl.constexpr,
):
    """dq_i = g_i * sum_j (p_ij - [j == pos_i]) k_j; grid (row tiles, D slices)."""
    m0 = tl.program_id(0) * BLOCK_M
    d_out = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d_out < dim
    g_scale = tl.load(g_scale_ptr)
    pos, excl, lse2, g, row_ok = _bwd_rows(pos_ptr, excl_ptr, lse_ptr, g_ptr, g_scale, m0, n_rows, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if SINGLE_D:
        q = _load_rows(q_ptr, m0, n_rows, q_row_stride, d_out, dim, BLOCK_M)
    p_lo, p_hi, e_lo, e_hi = _special_ranges(pos, excl, row_ok)
    # Columns past n_cols need no mask here: their key rows load as zeros, so they add nothing to ds @ k.
    for n0 in range(0, n_cols, BLOCK_N):
        kd = _load_rows(k_ptr, n0, n_cols, k_row_stride, d_out, dim, BLOCK_N)
        if SINGLE_D:  # the key tile serves both the logits and the dq product
            s = tl.dot(q, tl.trans(kd), input_precision=DOT_PRECISION)
        else:
            s = _logits_tile(q_ptr, k_ptr, m0, n0, n_rows, n_cols, q_row_stride, k_row_stride, dim,
                             BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
        p = tl.exp2(s * LOG2E - lse2[:, None])
        if _meets(n0, BLOCK_N, p_lo, p_hi, e_lo, e_hi):
            cols = n0 + tl.arange(0, BLOCK_N)
            p = tl.where(cols[None, :] != excl[:, None], p, 0.0) - tl.where(cols[None, :] == pos[:, None], 1.0, 0.0)
        ds = g[:, None] * p
        acc = tl.dot(ds.to(kd.dtype), kd, acc, input_precision=DOT_PRECISION)
    acc = acc * g_scale
    dq_blk = dq_ptr + m0.to(tl.int64) * dq_row_stride
    tl.store(dq_blk + tl.arange(0, BLOCK_M)[:, None] * dq_row_stride + d_out[None, :],
             acc.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _contrastive_bwd_dk_kernel(
    dk_ptr,                                     # output (C, D)
    q_ptr, k_ptr, pos_ptr, excl_ptr, lse_ptr, g_ptr, g_scale_ptr,
    q_row_stride, k_row_stride, dk_row_stride,
    n_rows, n_cols, dim, size_class,            # size_class: the autotuning key's size bucket (unused here)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SINGLE_D: tl.constexpr,
):
    """dk_j = sum_i g_i (p_ij - [j == pos_i]) q_i; grid (column tiles, D slices); logits recomputed transposed."""
    n0 = tl.program_id(0) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    d_out = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d_out < dim
    g_scale = tl.load(g_scale_ptr)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if SINGLE_D:
        kd = _load_rows(k_ptr, n0, n_cols, k_row_stride, d_out, dim, BLOCK_N)
    for m0 in range(0, n_rows, BLOCK_M):
        pos, excl, lse2, g, row_ok = _bwd_rows(pos_ptr, excl_ptr, lse_ptr, g_ptr, g_scale, m0, n_rows, BLOCK_M)
        qd = _load_rows(q_ptr, m0, n_rows, q_row_stride, d_out, dim, BLOCK_M)
        if SINGLE_D:  # (BLOCK_N, BLOCK_M) = logits.T; the query tile serves both products
            s_t = tl.dot(kd, tl.trans(qd), input_precision=DOT_PRECISION)
        else:
            s_t = _logits_tile(k_ptr, q_ptr, n0, m0, n_cols, n_rows, k_row_stride, q_row_stride, dim,
                               BLOCK_N, BLOCK_M, BLOCK_D, DOT_PRECISION)
        # Rows past n_rows need no mask: their g is 0 (and their zero query rows add nothing to ds^T @ q).
        p_t = tl.exp2(s_t * LOG2E - lse2[None, :])
        p_lo, p_hi, e_lo, e_hi = _special_ranges(pos, excl, row_ok)
        if _meets(n0, BLOCK_N, p_lo, p_hi, e_lo, e_hi):
            p_t = tl.where(cols[:, None] != excl[None, :], p_t, 0.0) - tl.where(cols[:, None] == pos[None, :], 1.0, 0.0)
        ds_t = g[None, :] * p_t
        acc = tl.dot(ds_t.to(qd.dtype), qd, acc, input_precision=DOT_PRECISION)
    acc = acc * g_scale
    dk_blk = dk_ptr + n0.to(tl.int64) * dk_row_stride
    tl.store(dk_blk + tl.arange(0, BLOCK_N)[:, None] * dk_row_stride + d_out[None, :],
             acc.to(dk_ptr.dtype.element_ty), mask=col_ok[:, None] & d_ok[None, :])


def _blocks(dim: int, dtype: torch.dtype, wide: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) of the untuned launches; D in slices of at most 128 (tl.dot needs
    >= 16).

    Chosen by compiling for sm_90 with Triton's bundled ptxas (`python -m kernels.aot_check`, report in
    benchmarks/results/aot_sm90.txt), not by timing, to avoid register spills: fp16/bf16 with D <= 128 in one slice,
    64x64 tiles on 8 warps (fwd+dq / dq / dk: 235 / 178 / 218 registers, no stack); with D > 128 in slices, 64x32
    (64x64 spilled 160 bytes in dk); exact-fp32 dots (FMA, not tensor cores), 32x32 on 8 warps (4 warps spilled
    880 bytes). For D > 128 the logits are reduced over slices and the backward grid also splits D (recomputing the
    logits once per slice). wide (16-bit on sm_80+, ``_wide``): D up to MAX_WIDE_D in one slice as well, 64x32 on
    8 warps (fwd without dq / dq / dk: 142 / 222 / 255 registers and no stack at D = 256 on sm_90; 64x64 spilled in
    dk; sm_75 spilled kilobytes and needs more shared memory than it has)."""
    single = dim <= MAX_SINGLE_D
    if dtype == torch.float32:
        return 32, 32, max(16, next_pow2(dim)) if single else MAX_SINGLE_D, 8
    if single:
        return 64, 64, max(16, next_pow2(dim)), 8
    return 64, 32, next_pow2(dim) if wide and dim <= MAX_WIDE_D else MAX_SINGLE_D, 8


def _wide(q: Tensor) -> bool:
    """May a 16-bit q with MAX_SINGLE_D < D <= MAX_WIDE_D run in one slice? On sm_80+ and in the interpreter."""
    if q.dtype == torch.float32:
        return False
    return INTERPRET or not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] >= 8


# Autotuned on CUDA for the training case (fp16/bf16, D <= 128 in one slice): (BLOCK_M, BLOCK_N, warps, stages).
# Candidates are the sm_90 compiles with little or no spilling (kernels/aot_check.py prints them), plus
# FlashAttention's 128x64 tile; the first of each list is the untuned default. Tuned once per (D, size class,
# dtype): a training run pays a compile and a timing per candidate at its first step, on whatever GPU it runs on,
# so the lists stay short.
FWD_TUNE = [(64, 64, 8, 3), (32, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3)]
DK_TUNE = [(64, 64, 8, 3), (32, 64, 4, 3), (64, 128, 8, 3), (128, 32, 8, 3)]
# D > MAX_SINGLE_D (16-bit, sm_80+; the forward without dq, so the dq kernel too), in one wide slice or in slices:
# each kernel alone at 2N = 65,536 on the H200 (ms; the default first, 64x32 on 8 warps, which fits the 99 KB of
# shared memory of sm_86/89). D = 256 in one slice: fwd 12.1 / 5.5 / 7.5 / 7.1, dq 11.2 / 6.6 / 7.3 / 7.4, dk 29.8 /
# 16.4 / 17.0 / 18.4; D = 512 in slices: fwd 26.6 / 15.2 / 21.0 / 24.7, dq 111 / 69 / 104 / 90, dk 192 / 131 / 150 /
# 173. 128x64 needs more shared memory than sm_86/89 have: there the autotuner drops it (out of resources).
FWD_WIDE_TUNE = [(64, 32, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3)]
DQ_WIDE_TUNE = [(64, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (128, 64, 8, 2)]
DK_WIDE_TUNE = [(64, 32, 8, 3), (128, 64, 8, 2), (64, 64, 8, 3), (64, 32, 4, 3)]


def _configs(table: list[tuple[int, int, int, int]]) -> list:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in table]


_fwd_tuned = triton.autotune(_configs(FWD_TUNE), key=["dim", "size_class", "WITH_DQ"])(_contrastive_fwd_kernel)
_dk_tuned = triton.autotune(_configs(DK_TUNE), key=["dim", "size_class"])(_contrastive_bwd_dk_kernel)
_fwd_wide_tuned = triton.autotune(_configs(FWD_WIDE_TUNE), key=["dim", "size_class", "WITH_DQ"])(
    _contrastive_fwd_kernel)
_dq_wide_tuned = triton.autotune(_configs(DQ_WIDE_TUNE), key=["dim", "size_class"])(_contrastive_bwd_dq_kernel)
_dk_wide_tuned = triton.autotune(_configs(DK_WIDE_TUNE), key=["dim", "size_class"])(_contrastive_bwd_dk_kernel)
TUNERS = {"fwd": _fwd_tuned, "dk": _dk_tuned, "fwd wide": _fwd_wide_tuned, "dq wide": _dq_wide_tuned,
          "dk wide": _dk_wide_tuned}


def tuning_report() -> list[str]:
    """What autotuning chose so far in this process: one line per kernel and key (dim, size class, ..., dtypes)."""
    lines = []
    for name, tuner in TUNERS.items():
        for key, cfg in tuner.cache.items():
            blocks = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
            lines.append(f"{name} {key}: {blocks} num_warps={cfg.num_warps} num_stages={cfg.num_stages}")
    return lines


def _size_class(n: int) -> int:
    """Tuning bucket of a row count: one per factor of 4, all sizes from 2^16 up sharing the last (a 2N = 1,048,576
    run reuses the 65,536 tuning instead of timing each candidate for seconds)."""
    return min(max(int(n), 1).bit_length() // 2, 8)


def _tuned(q: Tensor) -> bool:
    """Autotune only compiled 16-bit launches: any D on sm_80+, D <= MAX_SINGLE_D before; everything else runs the
    default blocks."""
    if not (AUTOTUNE and q.is_cuda and not INTERPRET and q.dtype != torch.float32):
        return False
    return q.shape[1] <= MAX_SINGLE_D or _wide(q)


# The launches are custom ops: opaque to torch.compile (which traces the autograd.Function around them and uses
# the fake implementations for shapes), so a compiled training step keeps the Triton kernels in one graph.
@torch.library.custom_op("ssl_pretrain::contrastive_fwd", mutates_args=())
def contrastive_fwd(q: Tensor, k: Tensor, pos: Tensor, excl: Tensor, with_dq: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Triton forward of the row losses. q (M, D), k (C, D) contiguous -> loss (M,), lse (M,) fp32 and, when
    with_dq (needs D <= MAX_SINGLE_D), dq_unit (M, D) fp32: the query gradient for a unit upstream gradient;
    else an empty (0, D)."""
    (m, dim), c = q.shape, k.shape[0]
    loss = torch.empty(m, device=q.device, dtype=torch.float32)
    lse = torch.empty(m, device=q.device, dtype=torch.float32)
    dq_unit = torch.empty((m if with_dq else 0, dim), device=q.device, dtype=torch.float32)
    if m > 0:
        bm, bn, bd, warps = _blocks(dim, q.dtype, _wide(q))
        args = (loss, lse, dq_unit, q, k, pos, excl, q.stride(0), k.stride(0), m, c, dim, _size_class(m))
        consts = dict(BLOCK_D=bd, DOT_PRECISION=dot_precision(q.dtype), SINGLE_D=dim <= bd, WITH_DQ=with_dq)
        if _tuned(q):
            tuner = _fwd_tuned if dim <= MAX_SINGLE_D else _fwd_wide_tuned
            tuner[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](*args, **consts)
        else:
            _contrastive_fwd_kernel[(triton.cdiv(m, bm),)](*args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **consts)
    return loss, lse, dq_unit


@contrastive_fwd.register_fake
def _(q: Tensor, k: Tensor, pos: Tensor, excl: Tensor, with_dq: bool) -> tuple[Tensor, Tensor, Tensor]:
    m, dim = q.shape
    return q.new_empty(m, dtype=torch.float32), q.new_empty(m, dtype=torch.float32), \
        q.new_empty((m if with_dq else 0, dim), dtype=torch.float32)


@torch.library.custom_op("ssl_pretrain::contrastive_bwd", mutates_args=())
def contrastive_bwd(q: Tensor, k: Tensor, pos: Tensor, excl: Tensor, lse: Tensor, g: Tensor,
                    with_dq: bool) -> tuple[Tensor, Tensor]:
    """Triton backward for upstream g (M,) fp32 -> (dq (M, D) when with_dq else (0, D), dk (C, D)), input dtypes."""
    (m, dim), c = q.shape, k.shape[0]
    dq = torch.empty((m if with_dq else 0, dim), device=q.device, dtype=q.dtype)
    dk = torch.empty_like(k)
    if m == 0:
        return dq, dk.zero_()
    # g is divided by max|g| inside the kernels so that fp16 g * (p - 1[pos]) stays out of the subnormals.
    g_scale = g.abs().amax().clamp_min(1e-30).reshape(1)
    bm, bn, bd, warps = _blocks(dim, q.dtype, _wide(q))
    consts = dict(BLOCK_D=bd, DOT_PRECISION=dot_precision(q.dtype), SINGLE_D=dim <= bd)
    fixed = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **consts)
    n_d = triton.cdiv(dim, bd)
    tuned, single = _tuned(q), dim <= MAX_SINGLE_D
    if with_dq:
        args = (dq, q, k, pos, excl, lse, g, g_scale, q.stride(0), k.stride(0), dq.stride(0), m, c, dim,
                _size_class(m))
        if tuned and not single:  # with D in one narrow slice the forward forms dq: no dq tuner for it
            _dq_wide_tuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), n_d)](*args, **consts)
        else:
            _contrastive_bwd_dq_kernel[(triton.cdiv(m, bm), n_d)](*args, **fixed)
    args = (dk, q, k, pos, excl, lse, g, g_scale, q.stride(0), k.stride(0), dk.stride(0), m, c, dim, _size_class(m))
    if tuned:
        (_dk_tuned if single else _dk_wide_tuned)[lambda meta: (triton.cdiv(c, meta["BLOCK_N"]), n_d)](*args, **consts)
    else:
        _contrastive_bwd_dk_kernel[(triton.cdiv(c, bn), n_d)](*args, **fixed)
    return dq, dk


@contrastive_bwd.register_fake
def _(q: Tensor, k: Tensor, pos: Tensor, excl: Tensor, lse: Tensor, g: Tensor,
      with_dq: bool) -> tuple[Tensor, Tensor]:
    return q.new_empty((q.shape[0] if with_dq else 0, q.shape[1])), torch.empty_like(k)


class ContrastiveFunction(torch.autograd.Function):
    """forward(q (M, D), k (C, D), pos (M,), excl (M,)) -> per-row loss (M,) fp32, on the Triton ops above."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, pos: Tensor, excl: Tensor) -> Tensor:
        q, k = q.contiguous(), k.contiguous()
        pos, excl = pos.contiguous(), excl.contiguous()
        # With D in one slice the forward also forms dq for a unit upstream gradient (dq_i scales with g_i), so
        # the backward runs only the dk kernel: 4 tile matmuls per (row, column) tile pair instead of 5.
        fwd_dq = bool(ctx.needs_input_grad[0]) and q.shape[1] <= MAX_SINGLE_D
        loss, lse, dq_unit = contrastive_fwd(q, k, pos, excl, fwd_dq)
        ctx.save_for_backward(q, k, pos, excl, lse, dq_unit)
        ctx.fwd_dq = fwd_dq
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, pos, excl, lse, dq_unit = ctx.saved_tensors
        g = grad.contiguous().float()
        dq, dk = contrastive_bwd(q, k, pos, excl, lse, g, not ctx.fwd_dq)
        if ctx.fwd_dq:
            dq = (dq_unit * g[:, None]).to(q.dtype)
        return dq, dk, None, None


# ----------------------------------------------------------------------------------------- chunked PyTorch path
def _chunk_logits(qc: Tensor, kf: Tensor, excl_c: Tensor) -> Tensor:
    """fp32 logits (R, C) of a row chunk with each row's excluded column set to -inf."""
    s = qc.float() @ kf.T
    has = excl_c >= 0
    if bool(has.any()):
        r = torch.nonzero(has).squeeze(1)
        s[r, excl_c[r]] = float("-inf")
    return s


class ChunkedContrastiveFunction(torch.autograd.Function):
    """Pure-PyTorch, memory-efficient: rows in chunks of (rows, C) fp32 logits, never the whole matrix.

    Like Liger-Kernel's fused linear cross-entropy, the forward also computes the gradients for a uniform upstream
    gradient (the loss is a mean or sum of the rows) while each chunk's softmax is at hand: 3 matmuls and one exp
    pass in all, fewer passes than the naive path. backward scales them; for any other upstream gradient it
    recomputes the chunks from the saved log-sum-exp. Memory O((M + C) D + chunk_elems).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, pos: Tensor, excl: Tensor, chunk_elems: int) -> Tensor:
        m, c = q.shape[0], k.shape[0]
        rows = max(1, chunk_elems // max(c, 1))
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        kf = k.float()
        lse = torch.empty(m, device=q.device, dtype=torch.float32)
        pos_logit = torch.empty(m, device=q.device, dtype=torch.float32)
        dq_u = torch.empty(q.shape, device=q.device, dtype=torch.float32) if needs_grad else None
        dk_u = torch.zeros(k.shape, device=k.device, dtype=torch.float32) if needs_grad else None
        for r0 in range(0, m, rows):
            r1 = min(m, r0 + rows)
            qc = q[r0:r1].float()
            s = _chunk_logits(qc, kf, excl[r0:r1])
            pos_logit[r0:r1] = s.gather(1, pos[r0:r1, None]).squeeze(1)
            mx = s.amax(dim=1, keepdim=True)  # finite: the positive column is never excluded
            e = s.sub_(mx).exp_()
            total = e.sum(dim=1, keepdim=True)
            lse[r0:r1] = (mx + total.log()).squeeze(1)
            if needs_grad:
                ds = e.div_(total)  # softmax p, then p - onehot(pos): d loss_i / d logits_i
                ds.scatter_add_(1, pos[r0:r1, None], torch.full((r1 - r0, 1), -1.0, device=ds.device))
                torch.mm(ds, kf, out=dq_u[r0:r1])
                dk_u.addmm_(ds.T, qc)
        ctx.save_for_backward(q, k, pos, excl, lse, dq_u, dk_u)
        ctx.rows = rows
        return lse - pos_logit

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, pos, excl, lse, dq_u, dk_u = ctx.saved_tensors
        m, rows = q.shape[0], ctx.rows
        g = grad.float()
        if dq_u is not None and m > 0 and bool((g == g[0]).all()):
            return (dq_u * g[:, None]).to(q.dtype), (dk_u * g[0]).to(k.dtype), None, None, None
        kf = k.float()
        dq = torch.empty(q.shape, device=q.device, dtype=torch.float32)
        dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        for r0 in range(0, m, rows):
            r1 = min(m, r0 + rows)
            qc = q[r0:r1].float()
            ds = _chunk_logits(qc, kf, excl[r0:r1]).sub_(lse[r0:r1, None]).exp_()  # softmax p
            ds.scatter_add_(1, pos[r0:r1, None], torch.full((r1 - r0, 1), -1.0, device=ds.device))
            ds.mul_(g[r0:r1, None])
            torch.mm(ds, kf, out=dq[r0:r1])
            dk.addmm_(ds.T, qc)
        return dq.to(q.dtype), dk.to(k.dtype), None, None, None


# -------------------------------------------------------------------------------------------- public functions
def contrastive_rows_loss_ref(q: Tensor, k: Tensor, pos: Tensor, excl: Tensor | None = None, *,
                              upcast: bool = False) -> Tensor:
    """Naive reference. q: (M, D), k: (C, D), pos/excl: (M,) int64 -> per-row loss (M,), in q's dtype unless upcast."""
    if upcast:
        q, k = q.float(), k.float()
    s = q @ k.T
    if excl is not None:
        r = torch.nonzero(excl >= 0).squeeze(1)
        s[r, excl[r]] = float("-inf")  # in place is safe: mm's backward needs its inputs, not its output
    return F.cross_entropy(s, pos, reduction="none")


def _check(q: Tensor, k: Tensor, pos: Tensor, excl: Tensor) -> None:
    check_float("q", q, 2)
    check_float("k", k, 2)
    if q.shape[1] != k.shape[1] or q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype} must share D, dtype, device")
    for name, t in (("pos", pos), ("excl", excl)):
        if t.dtype != torch.int64 or t.shape != (q.shape[0],) or t.device != q.device:
            raise ValueError(f"{name} must be int64 of shape ({q.shape[0]},) on {q.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    if k.shape[0] == 0:
        raise ValueError("k must have at least one column")
    # The values, where that is free (eager, CPU): on a GPU it would cost a host sync, and a compiled graph cannot
    # branch on them; the kernels read k[pos] unchecked, so there the contract is the caller's.
    if pos.is_cuda or torch.compiler.is_compiling() or pos.numel() == 0:
        return
    c = k.shape[0]
    if not 0 <= int(pos.min()) <= int(pos.max()) < c:
        raise ValueError(f"pos values must lie in [0, C={c})")
    if not -1 <= int(excl.min()) <= int(excl.max()) < c:
        raise ValueError(f"excl values must lie in [0, C={c}), or be -1 (none)")
    if bool((excl == pos).any()):
        raise ValueError("excl must never equal pos (a row's positive cannot be its excluded column)")


def decoupled_rows(rows: Tensor) -> Tensor:
    """Per-row losses of ``contrastive_rows_loss`` (each >= 0: the positive is among the columns) -> the decoupled
    contrastive loss's (DCL, Yeh et al. 2022), the positive out of each row's denominator. With ``x`` a row's loss (its
    log-sum-exp over the columns less its positive logit), DCL's is the log-sum-exp over the other columns less the same
    logit, ``log(exp(x) - 1) = x + log(-expm1(-x))`` (the stable form); the core's backward takes a gradient per row,
    so this needs no kernel of its own. A row whose other columns vanish next to its positive (x below 1e-6, DCL's
    loss there -> -inf) is held at 1e-6, without gradient."""
    x = rows.clamp_min(1e-6)
    return x + torch.log(-torch.expm1(-x))


@fp32_loss
def contrastive_rows_loss(q: Tensor, k: Tensor, pos: Tensor, excl: Tensor | None = None, *, impl: str = "auto",
                          chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> Tensor:
    """Per-row loss_i = logsumexp_{j != excl_i}(q_i . k_j) - q_i . k_{pos_i}, fp32 of shape (M,).

    q: (M, D) (already scaled), k: (C, D), same dtype/device; pos: (M,) int64 in [0, C); excl: (M,) int64, -1 = none,
    never equal to pos. impl: "auto" | "triton" | "chunked" | "ref". Gradients flow to q and k.
    """
    if excl is None:
        excl = torch.full_like(pos, -1)
    _check(q, k, pos, excl)
    path = resolve_impl(impl, q, has_chunked=True, op="contrastive_rows_loss")
    if path == "triton":
        return ContrastiveFunction.apply(q, k, pos, excl)
    if path == "chunked":
        return ChunkedContrastiveFunction.apply(q, k, pos, excl, int(chunk_elems))
    return contrastive_rows_loss_ref(q, k, pos, excl, upcast=True)
