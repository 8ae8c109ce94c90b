"""DINO's cross-view distillation loss and iBOT's masked-patch loss, tiled over the prototype axis K.

Per row r (an image; or a patch for iBOT), teacher probabilities q_i = softmax((t_i - c) / tau_t) and student
log-probabilities log p_j = s_j / tau_s - lse_j. Since sum_k q_ik = 1,

    -sum_k q_ik log p_jk = lse_j - q_i . s_j / tau_s

so the loss needs per-view log-sum-exps (one online max/sum pass over K tiles) and dot products (a second pass);
no (views, B, K) softmax is ever stored. The backward to the student is elementwise given the saved LSEs:

    dL/ds_jk = w_r / tau_s * (c_j p_jk - (sum_{i paired with j} q_ik))

Pairs: DINO uses every (teacher i, student j) with i != j (official DINOLoss; views i < T are the same crops in
both), iBOT's patch loss the diagonal (i, i). Rows are weighted (w_r) so that iBOT's per-image masked mean is the
same kernel. The batch mean of the teacher logits (for the center EMA, applied OUTSIDE: no all_reduce here) is
accumulated in the same pass with fp32 atomics (order of addition, hence last bits, may vary run to run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from kernels.utils import check_float, fp32_loss, next_pow2, resolve_impl


# ----------------------------------------------------------------------------------------------- Triton kernels
@triton.jit
def _dino_fwd_kernel(
    loss_ptr, lse_s_ptr, lse_t_ptr, tsum_ptr,  # outputs: (R,) weighted row loss, (S, R), (T, R), (K,) fp32
    s_ptr, t_ptr, c_ptr, w_ptr,                # student (S, R, K), teacher (T, R, K), center (K,), weights (R,)
    s_view_stride, s_row_stride, t_view_stride, t_row_stride,
    n_rows, n_s, n_t, n_k, inv_ts, inv_tt,
    DIAG: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    v = tl.arange(0, BLOCK_V)
    s_ok, t_ok = v < n_s, v < n_t
    s_base = s_ptr + r * s_row_stride + v.to(tl.int64)[:, None] * s_view_stride
    t_base = t_ptr + r * t_row_stride + v.to(tl.int64)[:, None] * t_view_stride
    w = tl.load(w_ptr + r)

    # Pass 1a: teacher log-sum-exp per view (online over K) and the teacher logit sum for the center.
    m_t = tl.full((BLOCK_V,), -1.0e30, dtype=tl.float32)
    l_t = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for k0 in range(0, n_k, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < n_k
        msk = t_ok[:, None] & k_ok[None, :]
        t = tl.load(t_base + k[None, :], mask=msk, other=0.0).to(tl.float32)
        tl.atomic_add(tsum_ptr + k, tl.sum(t, axis=0), mask=k_ok)
        c = tl.load(c_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        z = tl.where(msk, (t - c[None, :]) * inv_tt, float("-inf"))
        m_new = tl.maximum(m_t, tl.max(z, axis=1))
        l_t = l_t * tl.exp(m_t - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_t = m_new
    lse_t = tl.where(t_ok, m_t + tl.log(tl.where(t_ok, l_t, 1.0)), 0.0)
    tl.store(lse_t_ptr + v.to(tl.int64) * n_rows + r, lse_t, mask=t_ok)

    loss = 0.0
    if w != 0.0:  # iBOT: unmasked patches only feed the teacher sum
        # Pass 1b: student log-sum-exp per view.
        m_s = tl.full((BLOCK_V,), -1.0e30, dtype=tl.float32)
        l_s = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for k0 in range(0, n_k, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            msk = s_ok[:, None] & (k < n_k)[None, :]
            z = tl.where(msk, tl.load(s_base + k[None, :], mask=msk, other=0.0).to(tl.float32) * inv_ts,
                         float("-inf"))
            m_new = tl.maximum(m_s, tl.max(z, axis=1))
            l_s = l_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m_s = m_new
        lse_s = tl.where(s_ok, m_s + tl.log(tl.where(s_ok, l_s, 1.0)), 0.0)
        tl.store(lse_s_ptr + v.to(tl.int64) * n_rows + r, lse_s, mask=s_ok)

        # Pass 2: sum over pairs of q_i . s_j / tau_s.
        cross = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, n_k, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < n_k
            mt = t_ok[:, None] & k_ok[None, :]
            ms = s_ok[:, None] & k_ok[None, :]
            c = tl.load(c_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            t = tl.load(t_base + k[None, :], mask=mt, other=0.0).to(tl.float32)
            q = tl.where(mt, tl.exp((t - c[None, :]) * inv_tt - lse_t[:, None]), 0.0)
            zs = tl.load(s_base + k[None, :], mask=ms, other=0.0).to(tl.float32) * inv_ts
            diag = tl.sum(q * zs, axis=0)  # sum_i q_i * s_i (rows beyond T have q = 0)
            if DIAG:
                cross += diag
            else:
                cross += tl.sum(q, axis=0) * tl.sum(zs, axis=0) - diag
        if DIAG:
            coef = tl.where(t_ok, 1.0, 0.0)
        else:
            coef = tl.where(s_ok, n_t - tl.where(t_ok, 1.0, 0.0), 0.0)
        loss = w * (tl.sum(coef * lse_s, axis=0) - tl.sum(cross, axis=0))
    tl.store(loss_ptr + r, loss)


@triton.jit
def _dino_bwd_kernel(
    ds_ptr,                                    # output (S, R, K), student dtype
    s_ptr, t_ptr, c_ptr, w_ptr, lse_s_ptr, lse_t_ptr, g_ptr,
    s_view_stride, s_row_stride, t_view_stride, t_row_stride,
    n_rows, n_s, n_t, n_k, inv_ts, inv_tt,
    DIAG: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grid (R, K tiles): dL/ds_jk = g * w_r / tau_s * (c_j p_jk - paired teacher mass q)."""
    r = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < n_k
    v = tl.arange(0, BLOCK_V)
    s_ok, t_ok = v < n_s, v < n_t
    mt = t_ok[:, None] & k_ok[None, :]
    ms = s_ok[:, None] & k_ok[None, :]
    scale = tl.load(g_ptr) * tl.load(w_ptr + r) * inv_ts
    lse_t = tl.load(lse_t_ptr + v.to(tl.int64) * n_rows + r, mask=t_ok, other=0.0)
    lse_s = tl.load(lse_s_ptr + v.to(tl.int64) * n_rows + r, mask=s_ok, other=0.0)
    c = tl.load(c_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + r * t_row_stride + v.to(tl.int64)[:, None] * t_view_stride + k[None, :], mask=mt,
                other=0.0).to(tl.float32)
    q = tl.where(mt, tl.exp((t - c[None, :]) * inv_tt - lse_t[:, None]), 0.0)
    s_off = r * s_row_stride + v.to(tl.int64)[:, None] * s_view_stride + k[None, :]
    zs = tl.load(s_ptr + s_off, mask=ms, other=0.0).to(tl.float32) * inv_ts
    # Rows with w == 0 were skipped by the forward; their student LSE stays +inf, so p = 0 (not exp(overflow)).
    p = tl.where(ms, tl.exp(zs - lse_s[:, None]), 0.0)
    if DIAG:
        grad = tl.where(t_ok, 1.0, 0.0)[:, None] * p - q
    else:
        coef = n_t - tl.where(t_ok, 1.0, 0.0)
        grad = coef[:, None] * p - (tl.sum(q, axis=0)[None, :] - q)
    # ds has the student's (S, R, K) strides (made contiguous by the launcher).
    tl.store(ds_ptr + s_off, (grad * scale).to(ds_ptr.dtype.element_ty), mask=ms)


def _blocks(n_views: int, n_k: int) -> tuple[int, int]:
    """(BLOCK_V, BLOCK_K): all views of a row in one tile, about 4096 elements per tile."""
    block_v = max(2, next_pow2(n_views))
    return block_v, max(16, min(next_pow2(n_k), 4096 // block_v))


class DinoLossFunction(torch.autograd.Function):
    """Launchers. forward(s (S, R, K), t (T, R, K), c (K,), w (R,), tau_s, tau_t, diag) -> (loss (), tsum (K,))."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, c: Tensor, w: Tensor, tau_s: float, tau_t: float, diag: bool):
        s, t, c, w = s.contiguous(), t.detach().contiguous(), c.detach().contiguous(), w.contiguous()
        (n_s, n_rows, n_k), n_t = s.shape, t.shape[0]
        dev = s.device
        rows = torch.empty(n_rows, device=dev, dtype=torch.float32)
        lse_s = torch.full((n_s, n_rows), float("inf"), device=dev, dtype=torch.float32)
        lse_t = torch.empty((n_t, n_rows), device=dev, dtype=torch.float32)
        tsum = torch.zeros(n_k, device=dev, dtype=torch.float32)
        bv, bk = _blocks(n_s, n_k)
        _dino_fwd_kernel[(n_rows,)](
            rows, lse_s, lse_t, tsum, s, t, c, w, s.stride(0), s.stride(1), t.stride(0), t.stride(1),
            n_rows, n_s, n_t, n_k, 1.0 / tau_s, 1.0 / tau_t, DIAG=diag, BLOCK_V=bv, BLOCK_K=bk,
        )
        ctx.save_for_backward(s, t, c, w, lse_s, lse_t)
        ctx.consts = (tau_s, tau_t, diag)
        ctx.mark_non_differentiable(tsum)
        return rows.sum(), tsum

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_tsum: Tensor):
        s, t, c, w, lse_s, lse_t = ctx.saved_tensors
        tau_s, tau_t, diag = ctx.consts
        (n_s, n_rows, n_k), n_t = s.shape, t.shape[0]
        ds = torch.empty_like(s)
        bv, bk = _blocks(n_s, n_k)
        _dino_bwd_kernel[(n_rows, triton.cdiv(n_k, bk))](
            ds, s, t, c, w, lse_s, lse_t, grad.float().reshape(1).contiguous(), s.stride(0), s.stride(1),
            t.stride(0), t.stride(1), n_rows, n_s, n_t, n_k, 1.0 / tau_s, 1.0 / tau_t, DIAG=diag, BLOCK_V=bv,
            BLOCK_K=bk,
        )
        return ds, None, None, None, None, None, None


# -------------------------------------------------------------------------------------------- public functions
def _check_common(center: Tensor, k: int, student_temp: float, teacher_temp: float) -> None:
    if center.numel() != k or not center.is_floating_point():
        raise ValueError(f"center must be a float tensor with K={k} elements, got {tuple(center.shape)}")
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
    q = F.softmax((t - center.to(t.dtype)) / teacher_temp, dim=-1)
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
    _check_common(center, k, student_temp, teacher_temp)
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
    q = F.softmax((t - center.to(t.dtype)) / teacher_temp, dim=-1)
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
    if mask.dtype != torch.bool or tuple(mask.shape) != (b, length):
        raise ValueError(f"mask must be bool ({b}, {length}), got {mask.dtype} {tuple(mask.shape)}")
    _check_common(center, k, student_temp, teacher_temp)
    if resolve_impl(impl, student_patch, op="ibot_patch_loss") == "ref":
        return ibot_patch_loss_ref(student_patch, teacher_patch, mask, center, student_temp, teacher_temp,
                                   upcast=True)
    m = mask.float()
    w = (m / (m.sum(dim=1, keepdim=True).clamp(min=1.0) * b)).reshape(-1)
    loss, tsum = DinoLossFunction.apply(student_patch.reshape(1, b * length, k),
                                        teacher_patch.reshape(1, b * length, k), center.reshape(-1), w,
                                        float(student_temp), float(teacher_temp), True)
    return loss, tsum / (b * length)
