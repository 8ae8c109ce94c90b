"""Comparison helpers shared by kernel tests (and any test comparing a kernel with its *_ref)."""

import math

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference, in fp32."""
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def half_ulp(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Half a unit in the last place of `dtype` at the magnitude of max|ref|: the least error of rounding to it."""
    top = ref.float().abs().max().item() if ref.numel() else 0.0
    if top == 0.0 or not math.isfinite(top):
        return 0.0
    return torch.finfo(dtype).eps / 2 * 2.0 ** (math.frexp(top)[1] - 1)


def assert_lowp_close(out: torch.Tensor, ref32: torch.Tensor, ref_lowp: torch.Tensor, atol: float = 1e-5) -> None:
    """flash-attn's rule: error of `out` vs the fp32 reference <= 2x PyTorch's own low-precision error (+ atol).

    PyTorch's error is taken as at least the rounding of its output to its dtype (half an ulp at the reference's
    largest magnitude): a low-precision scalar, a loss say, is otherwise off by anything from 0 to that by chance
    (a bf16 NT-Xent loss of 4.875 came out 1.1e-4 from fp32 where its ulp is 0.031; the kernel's fp32 loss, 2.5e-4)."""
    err, base = max_err(out, ref32), max(max_err(ref_lowp, ref32), half_ulp(ref32, ref_lowp.dtype))
    assert err <= 2 * base + atol, f"error {err:.3g} > 2 x torch low-precision error {base:.3g} + {atol:g}"
