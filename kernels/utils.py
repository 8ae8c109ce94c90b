"""Shared helpers for the kernels: the `impl` switch, Triton availability, block-size arithmetic.

Triton is imported here and in the kernel modules only (STYLE.md: one place per heavy dependency).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with the venv; keep the refs usable without it
    HAS_TRITON = False

# Triton decides interpreter vs compiler when `@triton.jit` runs, i.e. at import of the kernel modules, so the
# switch is read once here (kernels.* import this module first).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# SSL_KERNELS_AUTOTUNE=0 pins every launch to its default blocks (no first-call tuning: e.g. a test run that
# compiles many shapes once each).
AUTOTUNE = os.environ.get("SSL_KERNELS_AUTOTUNE", "1") != "0"

IMPLS_WITH_CHUNKED = ("auto", "triton", "chunked", "ref")
IMPLS = ("auto", "triton", "ref")

DOT_MIN_CAPABILITY = 8
"""The compute capability from which "auto" runs the kernels built on tl.dot (the tiled contrastive losses, the ops
with a chunked path): compiled for sm_70 (V100) and sm_75 (T4), which lack Ampere's mma, their half-precision
variants spill 2.5-12 KB of stack per thread (benchmarks/results/aot_sm70.txt), so "auto" takes the chunked PyTorch
path (cuBLAS) there. The kernels without tl.dot (DINO's, the gathers) spill at most 16 bytes on those targets."""


def auto_impl(is_cuda: bool, capability: int | None, *, has_chunked: bool) -> str:
    """What "auto" resolves to for a tensor on CUDA or not, on a GPU of major compute ``capability``."""
    if is_cuda and HAS_TRITON and not (has_chunked and capability is not None and capability < DOT_MIN_CAPABILITY):
        return "triton"
    return "chunked" if has_chunked else "ref"


def resolve_impl(impl: str, x: torch.Tensor, *, has_chunked: bool = False, op: str = "op") -> str:
    """Map `impl` ("auto" | "triton" | "ref" [| "chunked"]) to a concrete path for tensor `x`.

    "auto" -> "triton" on CUDA (ops with a chunked path: from compute capability 8, ``DOT_MIN_CAPABILITY``), else
    "chunked" (ops that have one) or "ref". "triton" on a CPU tensor needs the
    Triton interpreter (TRITON_INTERPRET=1 set before importing kernels); otherwise a ValueError says so.
    """
    allowed = IMPLS_WITH_CHUNKED if has_chunked else IMPLS
    if impl not in allowed:
        raise ValueError(f"{op}: impl must be one of {allowed}, got {impl!r}")
    if impl == "auto":
        capability = torch.cuda.get_device_capability(x.device)[0] if x.is_cuda else None
        return auto_impl(x.is_cuda, capability, has_chunked=has_chunked)
    if impl == "triton":
        if not HAS_TRITON:
            raise ValueError(f"{op}: impl='triton' but triton is not installed")
        if not x.is_cuda and not INTERPRET:
            raise ValueError(
                f"{op}: impl='triton' needs a CUDA tensor (got device {x.device}); on CPU set TRITON_INTERPRET=1 "
                "before importing kernels, or use impl='ref'" + (" / 'chunked'" if has_chunked else "")
            )
    return impl


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    """ValueError unless `t` is a floating tensor (fp32/fp16/bf16) with `ndim` dimensions."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be float32/float16/bfloat16, got {t.dtype}")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 ("ieee") for fp32 inputs so fp32 matches the reference to ~1e-5;
    fp16/bf16 go to the tensor cores with fp32 accumulation regardless."""
    return "ieee" if dtype == torch.float32 else "tf32"


def fp32_loss(fn):
    """Run a loss with autocast off, so its fp32 accumulation holds inside a bf16/fp16 autocast region.

    Under ``torch.autocast`` a plain ``a @ b`` returns bf16 even for fp32 inputs; the losses here promise fp32 logits,
    log-sum-exps and results. Inputs keep their dtype (bf16 inputs are upcast inside each path as before).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def check_pair(names: tuple[str, str], a: torch.Tensor, b: torch.Tensor, a_all: torch.Tensor | None,
               b_all: torch.Tensor | None, offset: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Validate a local pair ``a, b: (n, D)`` and its all-rank pair ``a_all, b_all: (N, D)`` holding this rank's rows at
    ``offset``; returns ``(a_all, b_all, offset)`` with the single-process defaults (``a, b, 0``) filled in."""
    na, nb = names
    check_float(na, a, 2)
    check_float(nb, b, 2)
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"{na} {tuple(a.shape)} {a.dtype} and {nb} {tuple(b.shape)} {b.dtype} must match")
    if a.shape[0] == 0:
        raise ValueError(f"{na}/{nb} must have at least one row")
    if (a_all is None) != (b_all is None):
        raise ValueError(f"pass both {na}_all and {nb}_all, or neither")
    if a_all is None:
        if offset != 0:
            raise ValueError(f"offset must be 0 without {na}_all/{nb}_all, got {offset}")
        return a, b, 0
    check_float(f"{na}_all", a_all, 2)
    check_float(f"{nb}_all", b_all, 2)
    if a_all.shape != b_all.shape or a_all.shape[1] != a.shape[1] or {a_all.dtype, b_all.dtype} != {a.dtype} \
            or {a_all.device, b_all.device} != {a.device}:
        raise ValueError(f"{na}_all {tuple(a_all.shape)} {a_all.dtype} and {nb}_all {tuple(b_all.shape)} "
                         f"{b_all.dtype} must be (N, {a.shape[1]}) {a.dtype} on {a.device}")
    if isinstance(offset, bool) or not isinstance(offset, (int, torch.SymInt)):
        raise ValueError(f"offset must be an int (this rank's first row in {na}_all), got {offset!r}")
    if not 0 <= offset <= a_all.shape[0] - a.shape[0]:
        raise ValueError(f"offset {offset} + n {a.shape[0]} must fit in N {a_all.shape[0]}")
    return a_all, b_all, int(offset)
