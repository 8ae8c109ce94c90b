"""Compile every kernel ahead of time for an NVIDIA target, without a GPU: `python -m kernels.aot_check [--arch 90]`.

The CPU interpreter accepts code the compiler rejects (and vice versa); this runs the real Triton front end, the MLIR
passes and the bundled ptxas down to a cubin, for the bf16, fp16 (zero.precision fp16, as on V100 / T4: --arch 70 / 75)
and fp32 variants the launchers use, and prints registers and stack (spill) bytes per kernel. Must run WITHOUT
TRITON_INTERPRET (the interpreter replaces @triton.jit).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import contrastive, dino_loss, masked_gather


def _cases() -> list[tuple]:
    """(kernel, signature, constexprs, options) for the launch configurations in use."""
    out = []
    fwd_sig = {"loss_ptr": "*fp32", "lse_ptr": "*fp32", "dqu_ptr": "*fp32", "q_ptr": "*{dt}", "k_ptr": "*{dt}",
               "pos_ptr": "*i64", "excl_ptr": "*i64", "q_row_stride": "i32", "k_row_stride": "i32", "n_rows": "i32",
               "n_cols": "i32", "dim": "i32", "size_class": "i32"}

    def bwd_sig(o: str) -> dict:
        sig = {f"{o}_ptr": "*{dt}", "q_ptr": "*{dt}", "k_ptr": "*{dt}", "pos_ptr": "*i64", "excl_ptr": "*i64",
               "lse_ptr": "*fp32", "g_ptr": "*fp32", "g_scale_ptr": "*fp32", "q_row_stride": "i32",
               "k_row_stride": "i32", f"{o}_row_stride": "i32", "n_rows": "i32", "n_cols": "i32", "dim": "i32"}
        return {**sig, "size_class": "i32"}

    def typed(sig: dict, dt: str) -> dict:
        return {k: v.format(dt=dt) for k, v in sig.items()}

    # The default (untuned) launches: bf16 with D in one slice (D = 128; D = 256 wide, sm_80+) and in slices
    # (D = 512), fp16, exact fp32.
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for dt, prec, dim, wide in (("bf16", "tf32", 128, False), ("bf16", "tf32", 256, True), ("bf16", "tf32", 512, True),
                                ("fp16", "tf32", 128, False), ("fp32", "ieee", 128, False)):
        bm, bn, bd, warps = contrastive._blocks(dim, dtypes[dt], wide)
        c = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PRECISION=prec, SINGLE_D=dim <= bd)
        out.append((contrastive._contrastive_fwd_kernel, typed(fwd_sig, dt),
                    dict(c, WITH_DQ=dim <= contrastive.MAX_SINGLE_D), dict(num_warps=warps)))
        for fn, o in ((contrastive._contrastive_bwd_dq_kernel, "dq"), (contrastive._contrastive_bwd_dk_kernel, "dk")):
            out.append((fn, typed(bwd_sig(o), dt), c, dict(num_warps=warps)))
    # Every autotuning candidate (bf16, D = 128): which ones spill shows in STACK.
    for table, fn, sig, extra in ((contrastive.FWD_TUNE, contrastive._contrastive_fwd_kernel, fwd_sig,
                                   {"WITH_DQ": True}),
                                  (contrastive.DK_TUNE, contrastive._contrastive_bwd_dk_kernel, bwd_sig("dk"), {})):
        for bm, bn, warps, stages in table[1:]:  # the first is the default, compiled above
            c = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=128, DOT_PRECISION="tf32", SINGLE_D=True, **extra)
            out.append((fn, typed(sig, "bf16"), c, dict(num_warps=warps, num_stages=stages)))
    common = {"s_view_stride": "i32", "s_row_stride": "i32", "t_view_stride": "i32", "t_row_stride": "i32",
              "n_rows": "i32", "n_s": "i32", "n_t": "i32", "n_k": "i32"}
    temps = {"inv_ts": "fp32", "inv_tt": "fp32"}
    # DINO's 10 student / 2 teacher views at K=65,536; iBOT's one view at K=8,192; in bf16 and fp16
    for diag, h in ((False, "bf16"), (True, "bf16"), (False, "fp16"), (True, "fp16")):
        bt, brest, bs, bk = dino_loss._blocks(1, 1, 8192) if diag else dino_loss._blocks(10, 2, 65536)
        c = dict(DIAG=diag, BLOCK_T=bt, BLOCK_REST=brest, BLOCK_K=bk)
        out.append((dino_loss._dino_fwd_partial_kernel, {
            "part_t_ptr": "*fp32", "part_s_ptr": "*fp32", "tsum_ptr": "*fp32", "s_ptr": f"*{h}", "t_ptr": f"*{h}",
            "c_ptr": "*fp32", "w_ptr": "*fp32", **common, "chunk_k": "i32", **temps}, c, {}))
        if h == "bf16":  # fp32 only: once per shape
            out.append((dino_loss._dino_combine_kernel, {
                "loss_ptr": "*fp32", "lse_s_ptr": "*fp32", "lse_t_ptr": "*fp32", "part_t_ptr": "*fp32",
                "part_s_ptr": "*fp32", "w_ptr": "*fp32", "n_rows": "i32", "n_s": "i32", "n_t": "i32",
                "n_chunks": "i32"},
                dict(DIAG=diag, BLOCK_S=bs, BLOCK_T=bt), {}))
        out.append((dino_loss._dino_bwd_kernel, {
            "ds_ptr": f"*{h}", "s_ptr": f"*{h}", "t_ptr": f"*{h}", "c_ptr": "*fp32", "w_ptr": "*fp32",
            "lse_s_ptr": "*fp32", "lse_t_ptr": "*fp32", "g_ptr": "*fp32", **common, **temps}, c, {}))
    br, bd = masked_gather._row_blocks(768)
    for scatter in (False, True):
        out.append((masked_gather._gather_rows_fwd_kernel, {
            "dst_ptr": "*bf16", "src_ptr": "*bf16", "idx_ptr": "*i64", "n_rows": "i32", "rows_per_batch": "i32",
            "batch_stride": "i32", "row_stride": "i32", "dim": "i32"}, dict(SCATTER=scatter, BLOCK_R=br, BLOCK_D=bd),
            {}))
    rows = {"n_rows": "i32", "dim": "i32"}
    out.append((masked_gather._mask_token_fwd_kernel, {"out_ptr": "*bf16", "x_ptr": "*bf16", "mask_ptr": "*u8",
                                                       "tok_ptr": "*fp32", **rows}, dict(BLOCK_R=br, BLOCK_D=bd), {}))
    out.append((masked_gather._mask_token_bwd_kernel, {"dx_ptr": "*bf16", "dtok_partial_ptr": "*fp32",
                                                       "g_ptr": "*bf16", "mask_ptr": "*u8", **rows},
                dict(BLOCK_R=br, BLOCK_D=bd), {}))
    # Triton's launcher passes an int argument equal to 1 as a compile-time constant (a Python int, not a tensor:
    # `n.to(...)` on it fails to compile); each kernel once more with every int argument 1 (DINO's one K chunk).
    seen = set()
    for fn, sig, consts, opts in list(out):
        if fn not in seen:
            seen.add(fn)
            ones = {k: 1 for k, v in sig.items() if v == "i32"}
            out.append((fn, {k: v for k, v in sig.items() if k not in ones}, {**consts, **ones}, opts))
    return out


def _usage(cubin: bytes) -> str:
    """'REG:n STACK:m' from cuobjdump (bundled with Triton), or '' when unavailable."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = next((ln for ln in text.splitlines() if "REG:" in ln), "")
    return " ".join(w for w in line.split() if w.startswith(("REG:", "STACK:")))


ARCHS = (70, 72, 75, 80, 86, 87, 89, 90)
"""Compute capabilities of the NVIDIA GPUs the kernels target (V100 .. H200); another number made LLVM abort."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", type=int, default=90, choices=ARCHS, metavar="ARCH",
                    help=f"CUDA compute capability, one of {', '.join(map(str, ARCHS))} (default 90)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("kernels.aot_check: unset TRITON_INTERPRET (it replaces the compiler)")
    target = GPUTarget("cuda", args.arch, 32)
    for fn, sig, consts, opts in _cases():
        src = ASTSource(fn, {**sig, **{k: "constexpr" for k in consts}}, consts)
        kernel = triton.compile(src, target=target, options=opts)
        shown = ",".join([f"{k}={v}" for k, v in consts.items()] + [f"{k}={v}" for k, v in opts.items()])
        data = next((t[1:] for t in sig.values() if t in ("*bf16", "*fp16")), "fp32")  # the inputs' type
        print(f"ok sm_{args.arch} {fn.__name__}<{data}>[{shown}] shared={kernel.metadata.shared} "
              f"{_usage(kernel.asm['cubin'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
