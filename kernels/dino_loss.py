"""DINO's cross-view distillation loss and iBOT's masked-patch loss, tiled over the prototype axis K.

Per row r (an image; or a patch for iBOT), teacher probabilities q_i = softmax((t_i - c) / tau_t) and student
log-probabilities log p_j = s_j / tau_s - lse_j. Since sum_k q_ik = 1,

    -sum_k q_ik log p_jk = lse_j - q_i . s_j / tau_s

so the loss needs per-view log-sum-exps and dot products with q_i. Both come from ONE read of the logits: the
dot products are accumulated against exp(z_i - running max), rescaled whenever the max rises, as attention
accumulates its output, and K is split into chunks across programs (flash-decoding's split-K) whose partial
(max, sum, dot) triples a small combine kernel merges. No (views, B, K) softmax is ever stored. The backward to the
student is elementwise given the saved LSEs:

    dL/ds_jk = w_r / tau_s * (c_j p_jk - (sum_{i paired with j} q_ik))

Pairs: DINO uses every (teacher i, student j) with i != j (official DINOLoss; views i < T are the same crops in
both), iBOT's patch loss the diagonal (i, i). Rows are weighted (w_r) so that iBOT's per-image masked mean is the
same kernel. The batch mean of the teacher logits (for the center EMA, applied OUTSIDE: no all_reduce here) is
accumulated in the same pass with fp32 atomics (order of addition, hence last bits, may vary run to run).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from kernels.utils import check_float, fp32_loss, next_pow2, resolve_impl


# ----------------------------------------------------------------------------------------------- Triton kernels
@triton.jit
def _dino_fwd_partial_kernel(
    part_t_ptr, part_s_ptr, tsum_ptr,          # outputs: (4, C, T, R), (2, C, S, R) fp32 partials; (K,) fp32 sum
    s_ptr, t_ptr, c_ptr, w_ptr,                # student (S, R, K), teacher (T, R, K), center (K,), weights (R,)
    s_view_stride, s_row_stride, t_view_stride, t_row_stride,
    n_rows, n_s, n_t, n_k, chunk_k, inv_ts, inv_tt,
    DIAG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_REST: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grid (R, C): one read of row r's K-chunk c. Per teacher view i, with z_i = (t_i - center) / tau_t and
    e_ik = exp(z_ik - m_i): the running max m_i, l_i = sum_k e_ik, a_i = sum_k e_ik sum_j zs_jk and
    d_i = sum_k e_ik zs_ik (zs = s / tau_s); per student view j the running max and sum of exp(zs_j). The combine
    kernel merges the C chunks (flash-decoding's split-K), where q_i . x = (sum_k e_ik x_k) / l_i.
    Student views i < T (the teacher's crops) are a teacher-shaped tile, views T..S-1 a BLOCK_REST tile: no exp
    is spent on padding rows when S - T and T are powers of two (DINO: 10 = 2 + 8)."""
    r = tl.program_id(0).to(tl.int64)
    n_chunks = tl.num_programs(1)
    ch = tl.program_id(1)
    k_lo = ch * chunk_k
    k_hi = tl.minimum(k_lo + chunk_k, n_k)
    vt, vr = tl.arange(0, BLOCK_T), n_t + tl.arange(0, BLOCK_REST)
    # iBOT: unmasked patches (w == 0) only feed the teacher sum; their student views count as absent.
    n_s_read = tl.where(tl.load(w_ptr + r) != 0.0, n_s, 0)
    t_ok = vt < n_t
    d_ok, r_ok = vt < tl.minimum(n_t, n_s_read), vr < n_s_read
    t_base = t_ptr + r * t_row_stride + vt.to(tl.int64)[:, None] * t_view_stride
    d_base = s_ptr + r * s_row_stride + vt.to(tl.int64)[:, None] * s_view_stride
    r_base = s_ptr + r * s_row_stride + vr.to(tl.int64)[:, None] * s_view_stride
    m_t = tl.full((BLOCK_T,), -1.0e30, dtype=tl.float32)
    l_t = tl.zeros((BLOCK_T,), dtype=tl.float32)
    a_t = tl.zeros((BLOCK_T,), dtype=tl.float32)
    d_t = tl.zeros((BLOCK_T,), dtype=tl.float32)
    m_d = tl.full((BLOCK_T,), -1.0e30, dtype=tl.float32)
    l_d = tl.zeros((BLOCK_T,), dtype=tl.float32)
    m_r = tl.full((BLOCK_REST,), -1.0e30, dtype=tl.float32)
    l_r = tl.zeros((BLOCK_REST,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        mt, md, mr = t_ok[:, None] & k_ok[None, :], d_ok[:, None] & k_ok[None, :], r_ok[:, None] & k_ok[None, :]
        t = tl.load(t_base + k[None, :], mask=mt, other=0.0).to(tl.float32)
        tl.atomic_add(tsum_ptr + k, tl.sum(t, axis=0), mask=k_ok)
        c = tl.load(c_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        zt = tl.where(mt, (t - c[None, :]) * inv_tt, float("-inf"))
        zd = tl.load(d_base + k[None, :], mask=md, other=0.0).to(tl.float32) * inv_ts  # 0 where masked
        zr = tl.load(r_base + k[None, :], mask=mr, other=0.0).to(tl.float32) * inv_ts
        # teacher: online max/sum and the two cross sums, rescaled together
        mt_new = tl.maximum(m_t, tl.max(zt, axis=1))
        alpha = tl.exp(m_t - mt_new)
        e = tl.exp(zt - mt_new[:, None])
        l_t = l_t * alpha + tl.sum(e, axis=1)
        d_t = d_t * alpha + tl.sum(e * zd, axis=1)
        if not DIAG:
            zsum = tl.sum(zd, axis=0) + tl.sum(zr, axis=0)
            a_t = a_t * alpha + tl.sum(e * zsum[None, :], axis=1)
        m_t = mt_new
        # student: online max/sum per view, both tiles
        z = tl.where(md, zd, float("-inf"))
        mx = tl.maximum(m_d, tl.max(z, axis=1))
        l_d = l_d * tl.exp(m_d - mx) + tl.sum(tl.exp(z - mx[:, None]), axis=1)
        m_d = mx
        z = tl.where(mr, zr, float("-inf"))
        mx = tl.maximum(m_r, tl.max(z, axis=1))
        l_r = l_r * tl.exp(m_r - mx) + tl.sum(tl.exp(z - mx[:, None]), axis=1)
        m_r = mx
    plane_t = tl.cast(n_chunks, tl.int64) * n_t * n_rows
    off_t = (ch.to(tl.int64) * n_t + vt) * n_rows + r
    tl.store(part_t_ptr + off_t, m_t, mask=t_ok)
    tl.store(part_t_ptr + plane_t + off_t, l_t, mask=t_ok)
    tl.store(part_t_ptr + 2 * plane_t + off_t, a_t, mask=t_ok)
    tl.store(part_t_ptr + 3 * plane_t + off_t, d_t, mask=t_ok)
    plane_s = tl.cast(n_chunks, tl.int64) * n_s * n_rows
    off_d = (ch.to(tl.int64) * n_s + vt) * n_rows + r
    tl.store(part_s_ptr + off_d, m_d, mask=t_ok)
    tl.store(part_s_ptr + plane_s + off_d, l_d, mask=t_ok)
    off_r = (ch.to(tl.int64) * n_s + vr) * n_rows + r
    tl.store(part_s_ptr + off_r, m_r, mask=vr < n_s)
    tl.store(part_s_ptr + plane_s + off_r, l_r, mask=vr < n_s)


@triton.jit
def _dino_combine_kernel(
    loss_ptr, lse_s_ptr, lse_t_ptr,            # outputs: (R,) weighted row loss, (S, R), (T, R) fp32
    part_t_ptr, part_s_ptr, w_ptr,
    n_rows, n_s, n_t, n_chunks,
    DIAG: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """grid (R,): merge the chunk partials of row r into its LSEs and weighted loss
    w_r * (sum_j coef_j lse_s_j - sum_i q_i . x_i), x_i = sum_j zs_j - zs_i (DINO) or zs_i (iBOT's diagonal)."""
    r = tl.program_id(0).to(tl.int64)
    vs, vt = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_T)
    s_ok, t_ok = vs < n_s, vt < n_t
    w = tl.load(w_ptr + r)
    m_t = tl.full((BLOCK_T,), -1.0e30, dtype=tl.float32)
    l_t = tl.zeros((BLOCK_T,), dtype=tl.float32)
    x_t = tl.zeros((BLOCK_T,), dtype=tl.float32)
    m_s = tl.full((BLOCK_S,), -1.0e30, dtype=tl.float32)
    l_s = tl.zeros((BLOCK_S,), dtype=tl.float32)
    plane_t = tl.cast(n_chunks, tl.int64) * n_t * n_rows
    plane_s = tl.cast(n_chunks, tl.int64) * n_s * n_rows
    for ch in range(0, n_chunks):
        off_t = (ch * n_t + vt).to(tl.int64) * n_rows + r
        m = tl.load(part_t_ptr + off_t, mask=t_ok, other=-1.0e30)
        mx = tl.maximum(m_t, m)
        a_old, a_new = tl.exp(m_t - mx), tl.exp(m - mx)
        l_t = l_t * a_old + tl.load(part_t_ptr + plane_t + off_t, mask=t_ok, other=0.0) * a_new
        d = tl.load(part_t_ptr + 3 * plane_t + off_t, mask=t_ok, other=0.0)
        if DIAG:
            x = d
        else:
            x = tl.load(part_t_ptr + 2 * plane_t + off_t, mask=t_ok, other=0.0) - d
        x_t = x_t * a_old + x * a_new
        m_t = mx
        off_s = (ch * n_s + vs).to(tl.int64) * n_rows + r
        m = tl.load(part_s_ptr + off_s, mask=s_ok, other=-1.0e30)
        mx = tl.maximum(m_s, m)
        l_s = l_s * tl.exp(m_s - mx) + tl.load(part_s_ptr + plane_s + off_s, mask=s_ok, other=0.0) * tl.exp(m - mx)
        m_s = mx
    lse_t = m_t + tl.log(tl.where(l_t > 0.0, l_t, 1.0))
    tl.store(lse_t_ptr + vt.to(tl.int64) * n_rows + r, lse_t, mask=t_ok)
    loss = 0.0
    # Rows with w == 0 saw no student data: their LSE is +inf, so the backward's p = exp(zs - lse) is 0, not nan.
    lse_s = tl.where(w != 0.0, m_s + tl.log(tl.where(l_s > 0.0, l_s, 1.0)), float("inf"))
    tl.store(lse_s_ptr + vs.to(tl.int64) * n_rows + r, lse_s, mask=s_ok)
    if w != 0.0:
        if DIAG:
            coef = tl.where(vs < n_t, 1.0, 0.0)
        else:
            coef = n_t - tl.where(vs < n_t, 1.0, 0.0)
        cross = tl.sum(tl.where(t_ok, x_t / tl.where(l_t > 0.0, l_t, 1.0), 0.0), axis=0)
        loss = w * (tl.sum(tl.where(s_ok, coef * lse_s, 0.0), axis=0) - cross)
    tl.store(loss_ptr + r, loss)


@triton.jit
def _dino_bwd_kernel(
    ds_ptr,                                    # output (S, R, K), student dtype
    s_ptr, t_ptr, c_ptr, w_ptr, lse_s_ptr, lse_t_ptr, g_ptr,
    s_view_stride, s_row_stride, t_view_stride, t_row_stride,
    n_rows, n_s, n_t, n_k, inv_ts, inv_tt,
    DIAG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_REST: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grid (R, K tiles): dL/ds_jk = g * w_r / tau_s * (coef_j p_jk - paired teacher mass q).

    Student views j >= T pair with every teacher view (DINO; none under DIAG); views j < T also get + q_jk (their
    own crop is not a pair), so they are written from a second, teacher-shaped tile: no exp is spent on padding."""
    r = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < n_k
    vt = tl.arange(0, BLOCK_T)
    t_ok = vt < n_t
    mt = t_ok[:, None] & k_ok[None, :]
    scale = tl.load(g_ptr) * tl.load(w_ptr + r) * inv_ts
    c = tl.load(c_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    lse_t = tl.load(lse_t_ptr + vt.to(tl.int64) * n_rows + r, mask=t_ok, other=0.0)
    t = tl.load(t_ptr + r * t_row_stride + vt.to(tl.int64)[:, None] * t_view_stride + k[None, :], mask=mt,
                other=0.0).to(tl.float32)
    q = tl.where(mt, tl.exp((t - c[None, :]) * inv_tt - lse_t[:, None]), 0.0)
    q_sum = tl.sum(q, axis=0)
    # student views < T (teacher-shaped tile)
    offd = r * s_row_stride + vt.to(tl.int64)[:, None] * s_view_stride + k[None, :]
    lse_d = tl.load(lse_s_ptr + vt.to(tl.int64) * n_rows + r, mask=t_ok, other=0.0)
    pd = tl.where(mt, tl.exp(tl.load(s_ptr + offd, mask=mt, other=0.0).to(tl.float32) * inv_ts - lse_d[:, None]),
                  0.0)
    if DIAG:
        gd = pd - q
    else:
        gd = (n_t - 1.0) * pd - (q_sum[None, :] - q)
    tl.store(ds_ptr + offd, (gd * scale).to(ds_ptr.dtype.element_ty), mask=mt)
    # student views T..S-1
    vr = n_t + tl.arange(0, BLOCK_REST)
    r_ok = vr < n_s
    msk = r_ok[:, None] & k_ok[None, :]
    offs = r * s_row_stride + vr.to(tl.int64)[:, None] * s_view_stride + k[None, :]
    if DIAG:
        gs = tl.zeros((BLOCK_REST, BLOCK_K), dtype=tl.float32)
    else:
        lse_s = tl.load(lse_s_ptr + vr.to(tl.int64) * n_rows + r, mask=r_ok, other=0.0)
        ps = tl.where(msk, tl.exp(tl.load(s_ptr + offs, mask=msk, other=0.0).to(tl.float32) * inv_ts
                                  - lse_s[:, None]), 0.0)
        gs = n_t * ps - q_sum[None, :]
    tl.store(ds_ptr + offs, (gs * scale).to(ds_ptr.dtype.element_ty), mask=msk)


def _blocks(n_s: int, n_t: int, n_k: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_REST, BLOCK_S, BLOCK_K): teacher-shaped tiles for the T teacher views and the student views
    0..T-1, a BLOCK_REST tile for student views T..S-1, all of S in the combine; about 4096 loaded elements per
    K tile (DINO 2 + 10 views: 256 prototypes a tile)."""
    block_t, block_rest = next_pow2(n_t), next_pow2(max(1, n_s - n_t))
    per_k = 4096 // (2 * block_t + block_rest)
    return block_t, block_rest, next_pow2(n_s), max(16, min(next_pow2(n_k), 1 << (per_k.bit_length() - 1)))


@functools.cache
def _target_programs(device: torch.device) -> int:
    """Programs the split-K forward aims for: 4 per multiprocessor on CUDA; a few on the CPU interpreter (where
    several chunks per row still get exercised by the tests)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 16


def _split(n_rows: int, n_k: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """(n_chunks, chunk_k): K cut into chunks of whole tiles so that rows x chunks fills the GPU (64 DINO rows
    alone would leave half an H100 idle); iBOT's thousands of patch rows get one chunk each."""
    n_tiles = triton.cdiv(n_k, block_k)
    want = min(n_tiles, max(1, triton.cdiv(_target_programs(device), n_rows)))
    chunk_k = triton.cdiv(n_tiles, want) * block_k
    return triton.cdiv(n_k, chunk_k), chunk_k


# Custom ops around the launches: opaque to torch.compile, which traces DinoLossFunction around them.
@torch.library.custom_op("ssl_pretrain::dino_fwd", mutates_args=())
def dino_fwd(s: Tensor, t: Tensor, c: Tensor, w: Tensor, tau_s: float, tau_t: float,
             diag: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton forward. s (S, R, K), t (T, R, K) contiguous, c (K,), w (R,) fp32 -> weighted row losses (R,),
    teacher logit sum (K,), student and teacher LSEs (S, R), (T, R); all fp32."""
    (n_s, n_rows, n_k), n_t = s.shape, t.shape[0]
    dev = s.device
    bt, brest, bs, bk = _blocks(n_s, n_t, n_k)
    n_chunks, chunk_k = _split(n_rows, n_k, bk, dev)
    part_t = torch.empty((4, n_chunks, n_t, n_rows), device=dev, dtype=torch.float32)
    part_s = torch.empty((2, n_chunks, n_s, n_rows), device=dev, dtype=torch.float32)
    tsum = torch.zeros(n_k, device=dev, dtype=torch.float32)
    _dino_fwd_partial_kernel[(n_rows, n_chunks)](
        part_t, part_s, tsum, s, t, c, w, s.stride(0), s.stride(1), t.stride(0), t.stride(1), n_rows, n_s, n_t, n_k,
        chunk_k, 1.0 / tau_s, 1.0 / tau_t, DIAG=diag, BLOCK_T=bt, BLOCK_REST=brest, BLOCK_K=bk,
    )
    rows = torch.empty(n_rows, device=dev, dtype=torch.float32)
    lse_s = torch.empty((n_s, n_rows), device=dev, dtype=torch.float32)
    lse_t = torch.empty((n_t, n_rows), device=dev, dtype=torch.float32)
    _dino_combine_kernel[(n_rows,)](
        rows, lse_s, lse_t, part_t, part_s, w, n_rows, n_s, n_t, n_chunks, DIAG=diag, BLOCK_S=bs, BLOCK_T=bt,
    )
    return rows, tsum, lse_s, lse_t


@dino_fwd.register_fake
def _(s: Tensor, t: Tensor, c: Tensor, w: Tensor, tau_s: float, tau_t: float,
      diag: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    (n_s, n_rows, n_k), n_t = s.shape, t.shape[0]
    f32 = dict(dtype=torch.float32)
    return s.new_empty(n_rows, **f32), s.new_empty(n_k, **f32), s.new_empty((n_s, n_rows), **f32), \
        s.new_empty((n_t, n_rows), **f32)


@torch.library.custom_op("ssl_pretrain::dino_bwd", mutates_args=())
def dino_bwd(s: Tensor, t: Tensor, c: Tensor, w: Tensor, lse_s: Tensor, lse_t: Tensor, g: Tensor, tau_s: float,
             tau_t: float, diag: bool) -> Tensor:
    """Triton backward: the student gradient (S, R, K) in the student's dtype for the upstream scalar g (1,)."""
    (n_s, n_rows, n_k), n_t = s.shape, t.shape[0]
    ds = torch.empty_like(s)
    bt, brest, _, bk = _blocks(n_s, n_t, n_k)
    _dino_bwd_kernel[(n_rows, triton.cdiv(n_k, bk))](
        ds, s, t, c, w, lse_s, lse_t, g, s.stride(0), s.stride(1), t.stride(0), t.stride(1), n_rows, n_s, n_t, n_k,
        1.0 / tau_s, 1.0 / tau_t, DIAG=diag, BLOCK_T=bt, BLOCK_REST=brest, BLOCK_K=bk,
    )
    return ds


@dino_bwd.register_fake
def _(s: Tensor, t: Tensor, c: Tensor, w: Tensor, lse_s: Tensor, lse_t: Tensor, g: Tensor, tau_s: float,
      tau_t: float, diag: bool) -> Tensor:
    return torch.empty_like(s)


class DinoLossFunction(torch.autograd.Function):
    """forward(s (S, R, K), t (T, R, K), c (K,), w (R,), tau_s, tau_t, diag) -> (loss (), tsum (K,))."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, c: Tensor, w: Tensor, tau_s: float, tau_t: float, diag: bool):
        s, t, c, w = s.contiguous(), t.detach().contiguous(), c.detach().contiguous(), w.contiguous()
        rows, tsum, lse_s, lse_t = dino_fwd(s, t, c, w, tau_s, tau_t, diag)
        ctx.save_for_backward(s, t, c, w, lse_s, lse_t)
        ctx.consts = (tau_s, tau_t, diag)
        ctx.mark_non_differentiable(tsum)
        return rows.sum(), tsum

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_tsum: Tensor):
        s, t, c, w, lse_s, lse_t = ctx.saved_tensors
        ds = dino_bwd(s, t, c, w, lse_s, lse_t, grad.float().reshape(1).contiguous(), *ctx.consts)
        return ds, None, None, None, None, None, None


# -------------------------------------------------------------------------------------------- public functions
def _check_common(center: Tensor, logits: Tensor, k: int, student_temp: float, teacher_temp: float) -> None:
    if k < 1:
        raise ValueError(f"the logits must have K >= 1 prototypes, got K={k}")
    if tuple(center.shape) not in ((k,), (1, k)) or not center.is_floating_point():
        raise ValueError(f"center must be a float tensor of shape ({k},) or (1, {k}), got {center.dtype} "
                         f"{tuple(center.shape)}")
    if center.device != logits.device:
        raise ValueError(f"center on {center.device} but the logits on {logits.device}")
    if not (student_temp > 0 and teacher_temp > 0):
        raise ValueError(f"temperatures must be > 0, got student_temp={student_temp}, teacher_temp={teacher_temp}")


def dino_loss_ref(student_out: Tensor, teacher_out: Tensor, center: Tensor, student_temp: float,
                  teacher_temp: float, *, upcast: bool = False) -> tuple[Tensor, Tensor]:
    """Official-DINOLoss-style reference (softmax / log_softmax over the full (views, B, K) tensors, pair loop).
    Same contract as `dino_loss`; computes in the input dtype unless upcast. teacher_mean is fp32."""
    t = teacher_out.detach()
    teacher_mean = t.float().mean(dim=(0, 1))
    s = student_out.float() if upcast else student_out
    t = t.float() if upcast else t
    q = F.softmax((t - center.detach().reshape(-1).to(t.dtype)) / teacher_temp, dim=-1)
    logp = F.log_softmax(s / student_temp, dim=-1)
    total, n_pairs = 0.0, 0
    for i in range(q.shape[0]):
        for j in range(logp.shape[0]):
            if i != j:
                total = total + torch.sum(-q[i] * logp[j], dim=-1).mean()
                n_pairs += 1
    return total / n_pairs, teacher_mean


@fp32_loss
def dino_loss(student_out: Tensor, teacher_out: Tensor, center: Tensor, student_temp: float, teacher_temp: float,
              *, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """DINO loss and the teacher batch mean, in one pass.

    student_out: (S, B, K); teacher_out: (T, B, K), T <= S, teacher view i and student view i are the same crop;
    center: (K,). Loss (fp32 scalar) = mean over pairs (i, j), i != j, of the batch-mean cross-entropy between
    softmax((t_i - center) / teacher_temp) and log_softmax(s_j / student_temp). teacher_mean: (K,) fp32, the mean
    of the teacher logits over T and B, for the center EMA (done by the caller, with its own all_reduce).
    Gradient flows to student_out only. impl: "auto" | "triton" | "ref".
    """
    check_float("student_out", student_out, 3)
    check_float("teacher_out", teacher_out, 3)
    (n_s, b, k), n_t = student_out.shape, teacher_out.shape[0]
    if teacher_out.shape[1:] != student_out.shape[1:] or not 1 <= n_t <= n_s or n_s < 2:
        raise ValueError(f"need student_out (S>=2, B, K) and teacher_out (T, B, K) with 1 <= T <= S; got "
                         f"{tuple(student_out.shape)} and {tuple(teacher_out.shape)}")
    if b < 1:
        raise ValueError("student_out and teacher_out must hold at least one image (B >= 1)")
    _check_common(center, student_out, k, student_temp, teacher_temp)
    if resolve_impl(impl, student_out, op="dino_loss") == "ref":
        return dino_loss_ref(student_out, teacher_out, center, student_temp, teacher_temp, upcast=True)
    n_pairs = n_t * (n_s - 1)
    w = torch.full((b,), 1.0 / (b * n_pairs), device=student_out.device, dtype=torch.float32)
    loss, tsum = DinoLossFunction.apply(student_out, teacher_out, center.reshape(-1), w, float(student_temp),
                                        float(teacher_temp), False)
    return loss, tsum / (n_t * b)


def ibot_patch_loss_ref(student_patch: Tensor, teacher_patch: Tensor, mask: Tensor, center: Tensor,
                        student_temp: float, teacher_temp: float, *, upcast: bool = False) -> tuple[Tensor, Tensor]:
    """Official-iBOT-style reference of `ibot_patch_loss` (full softmax over (B, L, K))."""
    t = teacher_patch.detach()
    teacher_mean = t.float().mean(dim=(0, 1))
    s = student_patch.float() if upcast else student_patch
    t = t.float() if upcast else t
    q = F.softmax((t - center.detach().reshape(-1).to(t.dtype)) / teacher_temp, dim=-1)
    ce = torch.sum(-q * F.log_softmax(s / student_temp, dim=-1), dim=-1)  # (B, L)
    per_image = torch.sum(ce * mask.to(ce.dtype), dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
    return per_image.mean(), teacher_mean


@fp32_loss
def ibot_patch_loss(student_patch: Tensor, teacher_patch: Tensor, mask: Tensor, center: Tensor,
                    student_temp: float, teacher_temp: float, *, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """iBOT masked-patch loss on the DINO kernel (diagonal pairs, row weights).

    student_patch, teacher_patch: (B, L, K) patch logits of the same view (stack several views as (V*B, L, K):
    the result is then iBOT's mean over views); mask: (B, L) bool, the patches masked in the student's input;
    center: (K,). Loss (fp32 scalar) = mean over images of the masked-patch mean cross-entropy (an image without
    masked patches contributes 0, as in iBOT). teacher_mean: (K,) fp32 over ALL B*L patches (iBOT's center2).
    """
    check_float("student_patch", student_patch, 3)
    check_float("teacher_patch", teacher_patch, 3)
    if teacher_patch.shape != student_patch.shape:
        raise ValueError(f"teacher_patch {tuple(teacher_patch.shape)} must match student_patch "
                         f"{tuple(student_patch.shape)}")
    b, length, k = student_patch.shape
    if mask.dtype != torch.bool or tuple(mask.shape) != (b, length) or mask.device != student_patch.device:
        raise ValueError(f"mask must be bool ({b}, {length}) on {student_patch.device}, got {mask.dtype} "
                         f"{tuple(mask.shape)} on {mask.device}")
    if b * length < 1:
        raise ValueError(f"student_patch must hold at least one patch, got {tuple(student_patch.shape)}")
    _check_common(center, student_patch, k, student_temp, teacher_temp)
    if resolve_impl(impl, student_patch, op="ibot_patch_loss") == "ref":
        return ibot_patch_loss_ref(student_patch, teacher_patch, mask, center, student_temp, teacher_temp,
                                   upcast=True)
    m = mask.float()
    w = (m / (m.sum(dim=1, keepdim=True).clamp(min=1.0) * b)).reshape(-1)
    loss, tsum = DinoLossFunction.apply(student_patch.reshape(1, b * length, k),
                                        teacher_patch.reshape(1, b * length, k), center.reshape(-1), w,
                                        float(student_temp), float(teacher_temp), True)
    return loss, tsum / (b * length)


def _masked_row_weights(mask: Tensor, rows: int) -> Tensor:
    """(rows,) fp32: each masked patch's weight in iBOT's mean, 1 / (its image's masked count * B), in the row-major
    order of ``mask`` (B, L). ``rows`` = mask.sum(), known to the caller: no host sync here."""
    counts = mask.sum(dim=1)
    per_image = 1.0 / (counts.clamp(min=1).float() * mask.shape[0])
    return per_image.repeat_interleave(counts, output_size=rows)


def ibot_masked_patch_loss_ref(student_masked: Tensor, teacher_masked: Tensor, mask: Tensor, center: Tensor,
                               student_temp: float, teacher_temp: float, *, upcast: bool = False) -> Tensor:
    """Reference of `ibot_masked_patch_loss` (full softmax over the (M, K) rows)."""
    t = teacher_masked.detach()
    s = student_masked.float() if upcast else student_masked
    t = t.float() if upcast else t
    q = F.softmax((t - center.detach().reshape(-1).to(t.dtype)) / teacher_temp, dim=-1)
    ce = torch.sum(-q * F.log_softmax(s / student_temp, dim=-1), dim=-1)  # (M,)
    return torch.sum(ce * _masked_row_weights(mask, ce.shape[0]).to(ce.dtype))


@fp32_loss
def ibot_masked_patch_loss(student_masked: Tensor, teacher_masked: Tensor, mask: Tensor, center: Tensor,
                           student_temp: float, teacher_temp: float, *, impl: str = "auto") -> Tensor:
    """`ibot_patch_loss` on the masked patches only, packed: the student's head then runs where the loss reads.

    student_masked, teacher_masked: (M, K) logits of the masked patches in the row-major order of mask (B, L) bool
    (``kernels.packed_gather``), M = mask.sum(). Loss (fp32 scalar): the same mean over images of the masked-patch mean
    cross-entropy as `ibot_patch_loss`. The teacher's mean for iBOT's patch center is over every patch, which these
    rows are not: the caller takes it from its full teacher logits. Gradient to student_masked only.
    """
    check_float("student_masked", student_masked, 2)
    check_float("teacher_masked", teacher_masked, 2)
    if teacher_masked.shape != student_masked.shape:
        raise ValueError(f"teacher_masked {tuple(teacher_masked.shape)} must match student_masked "
                         f"{tuple(student_masked.shape)}")
    if mask.dtype != torch.bool or mask.ndim != 2 or mask.device != student_masked.device:
        raise ValueError(f"mask must be a bool (B, L) tensor on {student_masked.device}, got {mask.dtype} "
                         f"{tuple(mask.shape)} on {mask.device}")
    rows, k = student_masked.shape
    # the count, where it is free: on a GPU it would cost a host sync, and a compiled graph cannot branch on it
    if mask.device.type == "cpu" and not torch.compiler.is_compiling() and int(mask.sum()) != rows:
        raise ValueError(f"student_masked has {rows} rows but mask marks {int(mask.sum())} patches")
    _check_common(center, student_masked, k, student_temp, teacher_temp)
    path = resolve_impl(impl, student_masked, op="ibot_masked_patch_loss")
    if rows == 0:  # nothing masked: no loss, and a zero gradient
        return student_masked.float().sum()
    if path == "ref":
        return ibot_masked_patch_loss_ref(student_masked, teacher_masked, mask, center, student_temp, teacher_temp,
                                          upcast=True)
    w = _masked_row_weights(mask, rows)
    loss, _ = DinoLossFunction.apply(student_masked.reshape(1, rows, k), teacher_masked.reshape(1, rows, k),
                                     center.reshape(-1), w, float(student_temp), float(teacher_temp), True)
    return loss
