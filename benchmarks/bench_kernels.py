"""Benchmark kernels/ against their references, providers side by side in one run.

Ops and providers:
  ntxent  (2N x D):   eager = kernels.ntxent.ntxent_loss_ref, compile = torch.compile of it, chunked, triton
  dino    (S,T,B,K):  eager = kernels.dino_loss.dino_loss_ref, compile, triton
  gather  (B,L,D,keep): eager = torch.gather (masked_gather_ref), compile, triton; plus `copy`: a plain copy of the
                      same bytes (out.copy_(contiguous src)), the bandwidth ceiling
Modes: fwd (under no_grad), bwd (backward of a retained graph), fwd+bwd. The chunked path, and Triton NT-Xent with
D <= 128, form (part of) the gradients inside a grad-enabled forward, so their fwd/bwd split is not comparable with
eager's: compare fwd+bwd. Time: median of repeated runs after warm-up (synchronised on
CUDA). Peak memory, measured for one fwd+bwd after warm-up, inputs excluded:
  cuda: torch.cuda.max_memory_allocated() minus the memory allocated before the step;
  cpu:  each (op, size, provider) runs in a fresh subprocess (glibc mmap threshold fixed at 128 KiB so freed
        buffers leave RSS); peak RSS (VmHWM, reset through /proc/self/clear_refs) minus RSS before the step. It
        counts everything the process touched (allocator slack included); small buffers may hide in the heap.
Triton runs only on CUDA here (the CPU interpreter is for correctness, not speed).

Results are appended to a CSV (device, git sha, UTC time per row); a short table is printed last.
    python benchmarks/bench_kernels.py --quick            # CPU-sized sweep (benchmarks/results/kernels_cpu.txt)
    python benchmarks/bench_kernels.py --out $OUT/k.csv   # full sweep, on a GPU
    python benchmarks/bench_kernels.py --smoke            # the GPU sweep's code path, tiny, on the CPU (seconds)
On CUDA the gather cases are also timed as graph replays (graph ms: the host's launch cost out), and their GB/s
come from that time; the gather targets compare graph-timed device time with graph-timed device time.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._functorch.config

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if "--smoke" in sys.argv:  # Triton reads the switch when the kernel modules are imported, just below
    os.environ["TRITON_INTERPRET"] = "1"

from benchmarks.common import (  # noqa: E402
    CPU_MALLOC_ENV,
    Parser,
    append_csv,
    cpu_name,
    csv_out,
    git_sha,
    median_ms,
    peak_mb,
    print_result,
    run_worker,
)
from kernels.contrastive import tuning_report  # noqa: E402
from kernels.dino_loss import dino_loss, dino_loss_ref  # noqa: E402
from kernels.masked_gather import masked_gather, masked_gather_ref  # noqa: E402
from kernels.ntxent import ntxent_loss, ntxent_loss_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FIELDS = ["time_utc", "git_sha", "device", "op", "shape", "dtype", "provider", "fwd_ms", "bwd_ms", "fwdbwd_ms",
          "graph_ms", "peak_mem_mb", "mem_method", "gbps", "target", "note"]


# ------------------------------------------------------------------------------------------------ cases
def _sizes(mode: str, cuda: bool) -> list[dict]:
    """The sweep: a list of case dicts (op + shape). Keys starting with "_" steer the run and are not the shape:
    _compile (also run torch.compile of the reference), _chunked (also run the chunked path), _once (one fwd+bwd:
    its time and peak memory only), _target (the issue target this case's rows are judged by, see gpu_targets).
    mode: "full" (GPU or CPU sweep), "quick" (CPU-sized), "smoke" (tiny shapes, the GPU sweep's code path on the
    CPU with Triton interpreted: exercises every provider, the targets table and the error handling in seconds)."""
    if mode == "smoke":
        return [dict(op="ntxent", n2=256, d=32, _chunked=True, _target="ntxent_speed"),
                dict(op="ntxent", n2=512, d=32, _once=True, _target="ntxent_memory"),
                dict(op="dino", s=4, t=2, b=4, k=500, _target="dino_speed"),
                dict(op="gather", b=4, l=16, d=64, keep=0.25, _target="gather")]
    if mode == "quick":
        return ([dict(op="ntxent", n2=n2, d=d, _compile=True, _chunked=True) for n2, d in ((4096, 128), (4096, 256))]
                + [dict(op="ntxent", n2=32768, d=128, _chunked=True, _target="cpu_memory")]
                + [dict(op="dino", s=10, t=2, b=32, k=k, _compile=True) for k in (4096, 65536)]
                + [dict(op="gather", b=b, l=196, d=768, keep=0.25, _compile=True) for b in (64, 256)])
    if not cuda:
        return ([dict(op="ntxent", n2=n2, d=d, _compile=n2 <= 16384, _chunked=True,
                      _target="cpu_memory" if (n2, d) == (32768, 128) else None)
                 for d in (128, 256) for n2 in (4096, 16384, 32768)]
                + [dict(op="dino", s=10, t=2, b=64, k=k, _compile=True) for k in (4096, 16384, 65536)]
                + [dict(op="gather", b=256, l=196, d=768, keep=0.25, _compile=True)])
    # GPU: sized for the 8-minute suite; torch.compile only where a target compares against eager. The gather
    # target is judged at B=1024, where the kept rows (77 MB) exceed the L2 cache, so repeated runs time DRAM, not
    # L2; B=256 (19 MB kept) is shown beside it.
    return ([dict(op="ntxent", n2=n2, d=128, _chunked=n2 <= 16384, _compile=n2 == 65536,
                  _target="ntxent_speed" if n2 == 65536 else None) for n2 in (4096, 16384, 65536)]
            + [dict(op="ntxent", n2=65536, d=d) for d in (256, 512)] + [dict(op="ntxent", n2=262144, d=128),
               dict(op="ntxent", n2=1048576, d=128, _once=True, _target="ntxent_memory")]
            + [dict(op="dino", s=10, t=2, b=64, k=k, _compile=k == 65536, _target="dino_speed" if k == 65536 else None)
               for k in (4096, 16384, 65536)]
            + [dict(op="gather", b=b, l=196, d=768, keep=0.25, _compile=b == 1024,
                    _target="gather" if b == 1024 else None) for b in (256, 1024)])


OPS = ("ntxent", "dino", "gather")
PROVIDERS = ("eager", "compile", "chunked", "triton", "copy")


def _providers(case: dict, triton_ok: bool) -> list[str]:
    out = ["eager"] + (["compile"] if case.get("_compile") else []) + (["chunked"] if case.get("_chunked") else [])
    return out + (["triton"] if triton_ok else []) + (["copy"] if case["op"] == "gather" else [])


def _naive_bytes(case: dict, elsize: int) -> int:
    """Rough peak of the eager NT-Xent reference: 3 live (2N, 2N) matrices in its backward (log-softmax output,
    NLL gradient, log-softmax gradient) plus slack."""
    return int(3.2 * case["n2"] ** 2 * elsize)


def _available_bytes(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", 0)


# ------------------------------------------------------------------------------------------------ builders
def _build(case: dict, provider: str, dtype: torch.dtype, device: str):
    """-> (step() -> loss or output tensor, inputs needing grad, bytes moved by fwd or None)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    op = case["op"]
    if op == "ntxent":
        n, d = case["n2"] // 2, case["d"]
        z0 = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        z1 = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        if provider in ("eager", "compile"):
            fn = ntxent_loss_ref if provider == "eager" else torch.compile(ntxent_loss_ref)
            return (lambda: fn(z0, z1, 0.1)), [z0, z1], None
        return (lambda: ntxent_loss(z0, z1, 0.1, impl=provider)), [z0, z1], None
    if op == "dino":
        st = (3 * torch.randn(case["s"], case["b"], case["k"], generator=gen)).to(device=device, dtype=dtype)
        st.requires_grad_()
        te = (3 * torch.randn(case["t"], case["b"], case["k"], generator=gen)).to(device=device, dtype=dtype)
        c = torch.zeros(case["k"], device=device)
        if provider in ("eager", "compile"):
            fn = dino_loss_ref if provider == "eager" else torch.compile(dino_loss_ref)
            return (lambda: fn(st, te, c, 0.1, 0.04)[0]), [st], None
        return (lambda: dino_loss(st, te, c, 0.1, 0.04, impl=provider)[0]), [st], None
    b, length, d = case["b"], case["l"], case["d"]
    lk = int(length * case["keep"])
    x = torch.randn(b, length, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    ids = torch.rand(b, length, generator=gen).argsort(dim=1)[:, :lk].to(device)
    moved = 2 * b * lk * d * x.element_size()  # read + write of the kept rows
    if provider == "copy":  # all of x: a DRAM-sized copy (a kept-rows-sized one could sit in a GPU's L2)
        src = x.detach().clone()
        dst = torch.empty_like(src)
        return (lambda: dst.copy_(src)), [], 2 * src.numel() * src.element_size()
    if provider in ("eager", "compile"):
        fn = masked_gather_ref if provider == "eager" else torch.compile(masked_gather_ref)
        return (lambda: fn(x, ids)), [x], moved
    return (lambda: masked_gather(x, ids, impl="triton")), [x], moved


# ------------------------------------------------------------------------------------------------ measurement
def _graph_ms(fn, budget_s: float, calls: int = 20) -> float:
    """Median device time of fn() in ms with the host out of the loop: `calls` calls captured in one CUDA graph,
    the graph replayed between events (METHOD: many small launches are timed through graph replays). A kernel
    that moves 38 MB needs ~10 us of an H200's bandwidth, less than Python and the launcher take to issue it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: compilation, autotuning, allocator pools
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (len(times) < 200 and time.perf_counter() - start < budget_s):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / calls)
    return statistics.median(times)


def measure(case: dict, provider: str, dtype_name: str, device: str, budget_s: float) -> dict:
    """Time fwd / bwd / fwd+bwd and the peak memory of one case and provider."""
    # The bwd timing replays one graph (retain_graph=True), which compiled graphs allow only without donated buffers.
    torch._functorch.config.donated_buffer = False
    dtype = DTYPES[dtype_name]
    fwd, inputs, moved = _build(case, provider, dtype, device)
    row: dict = {}
    if not inputs:  # copy: forward only
        row["fwd_ms"] = median_ms(fwd, device, budget_s)
        row["peak_mem_mb"], row["mem_method"] = peak_mb(fwd, device)
    else:
        def fwd_bwd():
            out = fwd()
            g = torch.ones_like(out) if out.dim() else None
            torch.autograd.grad(out, inputs, g)

        if case.get("_once"):  # too big to repeat within the suite's budget: one timed fwd+bwd, also the memory one
            t0 = time.perf_counter()
            row["peak_mem_mb"], row["mem_method"] = peak_mb(fwd_bwd, device)
            row["fwdbwd_ms"], row["note"] = (time.perf_counter() - t0) * 1e3, "single run"
            return row
        row["fwdbwd_ms"] = median_ms(fwd_bwd, device, budget_s)
        row["peak_mem_mb"], row["mem_method"] = peak_mb(fwd_bwd, device)
        with torch.no_grad():
            row["fwd_ms"] = median_ms(fwd, device, budget_s)
        out = fwd()
        g = torch.ones_like(out) if out.dim() else None
        row["bwd_ms"] = median_ms(lambda: torch.autograd.grad(out, inputs, g, retain_graph=True), device, budget_s)
    if device == "cuda" and case["op"] == "gather":
        try:
            with torch.no_grad():
                row["graph_ms"] = _graph_ms(fwd, budget_s)
        except Exception as e:  # noqa: BLE001 - a provider that cannot be captured keeps its plain timing
            row["note"] = f"no graph timing: {type(e).__name__}: {str(e)[:120]}"
            torch.cuda.synchronize()
    if moved:
        row["gbps"] = moved / (row.get("graph_ms", row["fwd_ms"]) * 1e-3) / 1e9
    return row


def _worker(spec: str) -> None:
    """Subprocess entry: measure one case and print one JSON line."""
    a = json.loads(spec)
    torch.set_num_threads(a["threads"])
    try:
        print_result(measure(a["case"], a["provider"], a["dtype"], "cpu", a["budget_s"]))
    except Exception as e:  # noqa: BLE001 - reported as a row note
        print_result({"note": f"error: {type(e).__name__}: {str(e)[:200]}"})


def _run_cpu_subprocess(case: dict, provider: str, dtype: str, budget_s: float, timeout_s: float) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(CPU_MALLOC_ENV)
    row, why = run_worker(__file__, dict(case=case, provider=provider, dtype=dtype, budget_s=budget_s,
                                         threads=torch.get_num_threads()), timeout_s=timeout_s, env=env)
    return row if row is not None else {"note": why[:250]}


# ------------------------------------------------------------------------------------------------ reporting
def _append_csv(path: Path, row: dict) -> None:
    """Append one row; a file written with older columns is first rewritten under the current header."""
    append_csv(path, [row], FIELDS)


def load_rows(path: Path) -> list[dict]:
    """The rows of the latest run (newest time_utc) in a CSV this script wrote, numbers as floats."""
    with open(path, newline="", errors="replace") as f:
        reader = csv.DictReader(f)
        if not {"time_utc", "provider", "op", "shape"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path} is not a CSV of bench_kernels rows (no time_utc, op, shape and provider columns)")
        rows = list(reader)
    if not rows:
        return []
    latest = max(r["time_utc"] for r in rows)
    out = []
    for r in (r for r in rows if r["time_utc"] == latest):
        for k in ("fwd_ms", "bwd_ms", "fwdbwd_ms", "graph_ms", "peak_mem_mb", "gbps"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else None
        out.append(r)
    return out


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def _shape_str(case: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items() if k != "op" and not k.startswith("_"))


def _fmt(v, nd=2) -> str:
    return "-" if v in (None, "") else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def print_table(rows: list[dict]) -> list[str]:
    """Short table: per case, each provider's times, speed-up vs eager (fwd+bwd, else graph-timed fwd, else fwd),
    peak MB and GB/s; returns the lines."""
    lines = [f"{'op':7} {'shape':32} {'provider':8} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} {'graph ms':>9} "
             f"{'x eager':>8} {'peak MB':>9} {'GB/s':>7}  note"]
    eager = {(r["op"], r["shape"]): r for r in rows if r["provider"] == "eager"}
    for r in rows:
        e = eager.get((r["op"], r["shape"]), {})
        key = next((k for k in ("fwdbwd_ms", "graph_ms", "fwd_ms") if r.get(k) not in (None, "")), "fwd_ms")
        speed = (e[key] / r[key]) if e.get(key) not in (None, "") and r.get(key) not in (None, "") else None
        lines.append(f"{r['op']:7} {r['shape']:32} {r['provider']:8} {_fmt(r.get('fwd_ms')):>9} "
                     f"{_fmt(r.get('bwd_ms')):>9} {_fmt(r.get('fwdbwd_ms')):>9} {_fmt(r.get('graph_ms'), 4):>9} "
                     f"{_fmt(speed):>8} {_fmt(r.get('peak_mem_mb'), 1):>9} {_fmt(r.get('gbps'), 1):>7}  "
                     f"{r.get('note', '')}")
    return lines


def _pick(rows: list[dict], target: str, provider: str, key: str):
    """The value `key` of the row of `provider` in the case tagged `target` (None when missing or empty)."""
    r = next((r for r in rows if r.get("target") == target and r["provider"] == provider), None)
    v = None if r is None else r.get(key)
    return None if v in (None, "") else v


def _shape_of(rows: list[dict], target: str) -> str:
    return next((r["shape"] for r in rows if r.get("target") == target), "?")


def cpu_target(rows: list[dict]) -> str | None:
    """The CPU goal: chunked NT-Xent at 2N=32768, D=128 uses <= 5% of the eager peak memory and is no slower."""
    e_ms, c_ms = _pick(rows, "cpu_memory", "eager", "fwdbwd_ms"), _pick(rows, "cpu_memory", "chunked", "fwdbwd_ms")
    e_mb, c_mb = _pick(rows, "cpu_memory", "eager", "peak_mem_mb"), _pick(rows, "cpu_memory", "chunked", "peak_mem_mb")
    if None in (e_ms, c_ms, e_mb, c_mb):
        return None
    mem_ratio = c_mb / max(e_mb, 1e-9)
    ok = mem_ratio <= 0.05 and c_ms <= e_ms
    return (f"CPU target chunked vs eager NT-Xent {_shape_of(rows, 'cpu_memory')} fwd+bwd: memory "
            f"{100 * mem_ratio:.2f}% (<= 5%), time {c_ms:.0f} ms vs {e_ms:.0f} ms -> {'PASS' if ok else 'FAIL'}")


def gpu_targets(rows: list[dict]) -> list[str]:
    """The issue's GPU targets, one PASS/FAIL/MISSING line each, from the rows of the cases tagged with them."""
    lines = []

    def check(name: str, value, goal: float, fmt: str, higher: bool = True):
        if value is None:
            lines.append(f"TARGET {name}: MISSING")
        else:
            ok = value >= goal if higher else value < goal
            lines.append(f"TARGET {name}: {fmt.format(value)} -> {'PASS' if ok else 'FAIL'}")

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    check(f"NT-Xent fwd+bwd {_shape_of(rows, 'ntxent_speed')} triton vs eager >= 3x",
          ratio(_pick(rows, "ntxent_speed", "eager", "fwdbwd_ms"), _pick(rows, "ntxent_speed", "triton", "fwdbwd_ms")),
          3.0, "{:.2f}x")
    peak = _pick(rows, "ntxent_memory", "triton", "peak_mem_mb")
    shape = _shape_of(rows, "ntxent_memory")
    n2, d = (int(part.split("=")[1]) for part in shape.split()) if shape != "?" else (0, 0)
    item = DTYPES.get(next((r["dtype"] for r in rows if r.get("target") == "ntxent_memory"), "bf16"), torch.bfloat16)
    check(f"NT-Xent {shape} fwd+bwd total memory < 10 GB (step peak + inputs)",
          None if peak is None else (peak + n2 * d * item.itemsize / 2**20) / 1024, 10.0, "{:.2f} GB", higher=False)
    check(f"DINO fwd+bwd {_shape_of(rows, 'dino_speed')} triton vs eager >= 2x",
          ratio(_pick(rows, "dino_speed", "eager", "fwdbwd_ms"), _pick(rows, "dino_speed", "triton", "fwdbwd_ms")),
          2.0, "{:.2f}x")
    # Kernel-to-kernel: graph-replayed device time where both have it (the host's launch cost out), else plain fwd.
    key = "graph_ms" if _pick(rows, "gather", "triton", "graph_ms") and _pick(rows, "gather", "eager", "graph_ms") \
        else "fwd_ms"
    check(f"gather fwd {_shape_of(rows, 'gather')} triton vs torch.gather >= 1.5x ({key})",
          ratio(_pick(rows, "gather", "eager", key), _pick(rows, "gather", "triton", key)), 1.5, "{:.2f}x")
    check("gather fwd bandwidth >= 70% of copy (same timing)",
          ratio(_pick(rows, "gather", "triton", "gbps"), _pick(rows, "gather", "copy", "gbps")), 0.7, "{:.0%}")
    return lines


GPU_TARGETS = {"ntxent_speed", "ntxent_memory", "dino_speed", "gather"}


def report(rows: list[dict]) -> list[str]:
    """The table, then the target lines of the targets these rows' cases are tagged with (GPU and/or CPU)."""
    lines = print_table(rows)
    if GPU_TARGETS & {r.get("target") for r in rows}:
        lines += gpu_targets(rows)
    target = cpu_target(rows)
    return lines + ([target] if target else [])


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small CPU-sized sweep")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes through the GPU sweep's code path on the CPU (Triton interpreted); a check "
                         "of this script, not a measurement")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: cuda where torch sees a GPU, else cpu (default auto)")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--ops", default="ntxent,dino,gather", help="comma list of ntxent,dino,gather (default all three)")
    ap.add_argument("--providers", default=None,
                    help=f"comma list to restrict the providers to, of {','.join(PROVIDERS)} (default all that run on "
                    "the device)")
    ap.add_argument("--budget-s", type=float, default=None, help="timing budget per mode (default 2 cpu, 0.5 cuda)")
    ap.add_argument("--case-timeout-s", type=float, default=900.0,
                    help="on cpu, seconds after which a provider's subprocess for one case is killed (default 900)")
    ap.add_argument("--out", default=None, help="CSV to append to (default benchmarks/results/kernels_<dev>.csv)")
    ap.add_argument("--report", default=None, metavar="CSV",
                    help="print the table and target lines of the latest run in CSV (e.g. one cut short by a timeout)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    if args.report:
        path = Path(args.report)
        if not path.is_file():
            ap.error(f"--report: {path} is not a file (a CSV this script wrote)")
        try:
            rows = load_rows(path)
        except ValueError as e:
            ap.error(f"--report: {e}")
        print("\n".join(report(rows)))
        return 0
    for option, value, known in (("--ops", args.ops, OPS), ("--providers", args.providers, PROVIDERS)):
        unknown = [v for v in (value or "").split(",") if v and v not in known] or ([""] if value == "" else [])
        if unknown:
            ap.error(f"{option}: {', '.join(map(repr, unknown))} not among {','.join(known)}")
        if value is not None and not any(value.split(",")):
            ap.error(f"{option}: names none of {','.join(known)}")
    for option, value in (("--budget-s", args.budget_s), ("--case-timeout-s", args.case_timeout_s)):
        if value is not None and not value > 0:  # NaN too
            ap.error(f"{option}: must be > 0, got {value:g}")
    if args.smoke and args.quick:  # (--quick had been dropped silently)
        ap.error("--quick: --smoke runs its own tiny sweep; give one or the other")
    if args.smoke and args.device == "cuda":
        ap.error("--smoke runs the GPU sweep's code path on the CPU; drop --device cuda (or --smoke to measure there)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.smoke:
        device = "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: this machine has no GPU that torch can use")
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    budget = args.budget_s if args.budget_s is not None else (0.5 if device == "cuda" else 0.05 if args.smoke else 2.0)
    ops = set(args.ops.split(","))
    only = set(args.providers.split(",")) if args.providers else None
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"kernels_{'smoke' if args.smoke else device}.csv")
    csv_out(ap, "--out", out, FIELDS)  # the default one too: before anything is measured
    meta = dict(time_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                git_sha=git_sha(), device=device_name(device))
    print(f"# bench_kernels device={meta['device']} dtype={dtype} torch={torch.__version__} sha={meta['git_sha']}"
          f" mode={mode}")
    # In-process: the GPU and the smoke run. CPU measurements run each provider in a fresh subprocess (peak RSS).
    in_process = device == "cuda" or args.smoke
    planned = [(c, p) for c in _sizes(mode, device == "cuda") if c["op"] in ops
               for p in _providers(c, triton_ok=in_process) if not only or p in only]
    if not planned:
        ap.error(f"nothing to measure: --providers {args.providers} on {device}" + (" (Triton runs on a GPU, or on the "
                                                                                   "CPU with --smoke)" if device ==
                                                                                   "cpu" else ""))
    rows: list[dict] = []
    broken = None  # a CUDA error that poisons the context ends the sweep (the rows so far are kept)
    for case in [c for c in _sizes(mode, device == "cuda") if c["op"] in ops]:
        for provider in _providers(case, triton_ok=in_process):
            if only and provider not in only:
                continue
            row = dict(meta, op=case["op"], shape=_shape_str(case), dtype=dtype, provider=provider,
                       target=case.get("_target") or "")
            if broken:
                row["note"] = f"not run: {broken}"
            elif (case["op"] == "ntxent" and provider in ("eager", "compile")
                    and _naive_bytes(case, DTYPES[dtype].itemsize) > 0.9 * _available_bytes(device)):
                row["note"] = "skipped: (2N)^2 logits do not fit in memory"
            elif not in_process:
                row.update(_run_cpu_subprocess(case, provider, dtype, budget, args.case_timeout_s))
            else:
                try:
                    row.update(measure(case, provider, dtype, device, budget))
                except torch.OutOfMemoryError:
                    row["note"] = "out of memory"
                except Exception as e:  # noqa: BLE001 - one provider's failure is a row note, not the end of the run
                    row["note"] = f"error: {type(e).__name__}: {str(e)[:200]}"
                if device == "cuda":
                    try:
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                    except Exception as e:  # noqa: BLE001
                        broken = f"CUDA context lost after {case['op']} {provider}: {type(e).__name__}"
            rows.append(row)
            _append_csv(out, row)  # row by row: a run cut short by a timeout keeps what it measured
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                              if k not in meta}), flush=True)
    print(f"# appended {len(rows)} rows to {out}")
    for line in tuning_report():
        print(f"# autotuned contrastive {line}")
    if args.smoke:
        print("# smoke run: interpreted Triton on tiny shapes; the TARGET lines below show the report is complete, "
              "their values mean nothing")
    print("\n".join(report(rows)))
    errors = [r for r in rows if str(r.get("note", "")).startswith(("error", "not run"))]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
