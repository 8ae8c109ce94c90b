"""Comparison helpers shared by kernel tests (and any test comparing a kernel with its *_ref)."""

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference, in fp32."""
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def assert_lowp_close(out: torch.Tensor, ref32: torch.Tensor, ref_lowp: torch.Tensor, atol: float = 1e-5) -> None:
    """flash-attn's rule: error of `out` vs the fp32 reference <= 2x PyTorch's own low-precision error (+ atol)."""
    err, base = max_err(out, ref32), max_err(ref_lowp, ref32)
    assert err <= 2 * base + atol, f"error {err:.3g} > 2 x torch low-precision error {base:.3g} + {atol:g}"
