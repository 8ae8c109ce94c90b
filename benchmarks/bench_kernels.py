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
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch._functorch.config

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_name, git_sha  # noqa: E402
from kernels.dino_loss import dino_loss, dino_loss_ref  # noqa: E402
from kernels.masked_gather import masked_gather, masked_gather_ref  # noqa: E402
from kernels.ntxent import ntxent_loss, ntxent_loss_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FIELDS = ["time_utc", "git_sha", "device", "op", "shape", "dtype", "provider", "fwd_ms", "bwd_ms", "fwdbwd_ms",
          "peak_mem_mb", "mem_method", "gbps", "note"]


# ------------------------------------------------------------------------------------------------ cases
def _sizes(quick: bool, cuda: bool) -> list[dict]:
    """The sweep: a list of case dicts (op + shape). Keys starting with "_" steer the run and are not the shape:
    _compile (also run torch.compile of the reference), _chunked (also run the chunked path), _once (one fwd+bwd:
    its time and peak memory only)."""
    if quick:
        return ([dict(op="ntxent", n2=n2, d=d, _compile=True, _chunked=True) for n2, d in ((4096, 128), (4096, 256))]
                + [dict(op="ntxent", n2=32768, d=128, _chunked=True)]
                + [dict(op="dino", s=10, t=2, b=32, k=k, _compile=True) for k in (4096, 65536)]
                + [dict(op="gather", b=b, l=196, d=768, keep=0.25, _compile=True) for b in (64, 256)])
    if not cuda:
        return ([dict(op="ntxent", n2=n2, d=d, _compile=n2 <= 16384, _chunked=True) for d in (128, 256)
                 for n2 in (4096, 16384, 32768)]
                + [dict(op="dino", s=10, t=2, b=64, k=k, _compile=True) for k in (4096, 16384, 65536)]
                + [dict(op="gather", b=256, l=196, d=768, keep=0.25, _compile=True)])
    # GPU: sized for the 8-minute suite; torch.compile only where a target compares against eager.
    return ([dict(op="ntxent", n2=n2, d=128, _chunked=n2 <= 16384, _compile=n2 == 65536) for n2 in (4096, 16384, 65536)]
            + [dict(op="ntxent", n2=65536, d=256), dict(op="ntxent", n2=262144, d=128),
               dict(op="ntxent", n2=1048576, d=128, _once=True)]
            + [dict(op="dino", s=10, t=2, b=64, k=k, _compile=k == 65536) for k in (4096, 16384, 65536)]
            + [dict(op="gather", b=256, l=196, d=768, keep=0.25, _compile=True)])


def _providers(case: dict, cuda: bool) -> list[str]:
    out = ["eager"] + (["compile"] if case.get("_compile") else []) + (["chunked"] if case.get("_chunked") else [])
    return out + (["triton"] if cuda else []) + (["copy"] if case["op"] == "gather" else [])


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
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, device: str, budget_s: float, max_reps: int = 100) -> float:
    """Median time of fn() in ms: warm-up (a second call unless the first took over budget_s / 4), then repeats
    until budget_s or max_reps (at least 3). On CUDA each repeat times a batch of calls lasting >= ~2 ms between
    CUDA events (launch overhead amortised, as in triton.testing.do_bench)."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    if first < budget_s / 4:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        first = time.perf_counter() - t0
    inner = max(1, min(1000, int(2e-3 / max(first, 1e-7)))) if device == "cuda" else 1
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _peak_mb(step, device: str) -> tuple[float, str]:
    """Peak memory of one step() above what was allocated before it (see module docstring)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20, "cuda max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        method = "cpu peak RSS (VmHWM) delta"
    except OSError:
        method = "cpu ru_maxrss delta (lower bound)"
    before = _rss_kb("VmRSS")
    step()
    return max(0, _rss_kb("VmHWM") - before) / 1024, method


def measure(case: dict, provider: str, dtype_name: str, device: str, budget_s: float) -> dict:
    """Time fwd / bwd / fwd+bwd and the peak memory of one case and provider."""
    # The bwd timing replays one graph (retain_graph=True), which compiled graphs allow only without donated buffers.
    torch._functorch.config.donated_buffer = False
    dtype = DTYPES[dtype_name]
    fwd, inputs, moved = _build(case, provider, dtype, device)
    row: dict = {}
    if not inputs:  # copy: forward only
        row["fwd_ms"] = _median_ms(fwd, device, budget_s)
        row["peak_mem_mb"], row["mem_method"] = _peak_mb(fwd, device)
    else:
        def fwd_bwd():
            out = fwd()
            g = torch.ones_like(out) if out.dim() else None
            torch.autograd.grad(out, inputs, g)

        if case.get("_once"):  # too big to repeat within the suite's budget: one timed fwd+bwd, also the memory one
            t0 = time.perf_counter()
            row["peak_mem_mb"], row["mem_method"] = _peak_mb(fwd_bwd, device)
            row["fwdbwd_ms"], row["note"] = (time.perf_counter() - t0) * 1e3, "single run"
            return row
        row["fwdbwd_ms"] = _median_ms(fwd_bwd, device, budget_s)
        row["peak_mem_mb"], row["mem_method"] = _peak_mb(fwd_bwd, device)
        with torch.no_grad():
            row["fwd_ms"] = _median_ms(fwd, device, budget_s)
        out = fwd()
        g = torch.ones_like(out) if out.dim() else None
        row["bwd_ms"] = _median_ms(lambda: torch.autograd.grad(out, inputs, g, retain_graph=True), device, budget_s)
    if moved:
        row["gbps"] = moved / (row["fwd_ms"] * 1e-3) / 1e9
    return row


def _worker(spec: str) -> None:
    """Subprocess entry: measure one case and print one JSON line."""
    a = json.loads(spec)
    torch.set_num_threads(a["threads"])
    try:
        print("RESULT " + json.dumps(measure(a["case"], a["provider"], a["dtype"], "cpu", a["budget_s"])))
    except Exception as e:  # noqa: BLE001 - reported as a row note
        print("RESULT " + json.dumps({"note": f"error: {type(e).__name__}: {str(e)[:200]}"}))


def _run_cpu_subprocess(case: dict, provider: str, dtype: str, budget_s: float, timeout_s: float) -> dict:
    spec = json.dumps(dict(case=case, provider=provider, dtype=dtype, budget_s=budget_s,
                           threads=torch.get_num_threads()))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # A fixed mmap threshold turns off glibc's adaptive one, so every large buffer is mmapped and returned on free:
    # RSS then follows live memory and the warm-up's freed buffers do not hide the measured step's peak.
    env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    try:
        p = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True,
                           timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"note": f"timeout after {timeout_s:.0f}s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"note": f"worker failed (rc {p.returncode}): {p.stderr.strip()[-200:]}"}


# ------------------------------------------------------------------------------------------------ reporting
def _append_csv(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def _shape_str(case: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items() if k != "op" and not k.startswith("_"))


def _fmt(v, nd=2) -> str:
    return "-" if v in (None, "") else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def print_table(rows: list[dict]) -> list[str]:
    """Short table: per case, each provider's fwd+bwd (or fwd) ms, speed-up vs eager, peak MB; returns lines."""
    lines = [f"{'op':7} {'shape':32} {'provider':8} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} {'x eager':>8} "
             f"{'peak MB':>9} {'GB/s':>7}  note"]
    eager = {(r["op"], r["shape"]): r for r in rows if r["provider"] == "eager"}
    for r in rows:
        e = eager.get((r["op"], r["shape"]), {})
        key = "fwdbwd_ms" if r.get("fwdbwd_ms") not in (None, "") else "fwd_ms"
        speed = (e[key] / r[key]) if e.get(key) not in (None, "") and r.get(key) not in (None, "") else None
        lines.append(f"{r['op']:7} {r['shape']:32} {r['provider']:8} {_fmt(r.get('fwd_ms')):>9} "
                     f"{_fmt(r.get('bwd_ms')):>9} {_fmt(r.get('fwdbwd_ms')):>9} {_fmt(speed):>8} "
                     f"{_fmt(r.get('peak_mem_mb'), 1):>9} {_fmt(r.get('gbps'), 1):>7}  {r.get('note', '')}")
    return lines


def cpu_target(rows: list[dict]) -> str | None:
    """The CPU goal: chunked NT-Xent at 2N=32768, D=128 uses <= 5% of the eager peak memory and is no slower."""
    pick = {r["provider"]: r for r in rows if r["op"] == "ntxent" and r["shape"] == "n2=32768 d=128"}
    e, c = pick.get("eager"), pick.get("chunked")
    if not e or not c or e.get("fwdbwd_ms") in (None, "") or c.get("fwdbwd_ms") in (None, ""):
        return None
    mem_ratio = c["peak_mem_mb"] / max(e["peak_mem_mb"], 1e-9)
    ok = mem_ratio <= 0.05 and c["fwdbwd_ms"] <= e["fwdbwd_ms"]
    return (f"CPU target chunked vs eager NT-Xent 2N=32768 D=128 fwd+bwd: memory {100 * mem_ratio:.2f}% "
            f"(<= 5%), time {c['fwdbwd_ms']:.0f} ms vs {e['fwdbwd_ms']:.0f} ms -> {'PASS' if ok else 'FAIL'}")


def _get(rows: list[dict], op: str, shape: str, provider: str, key: str):
    r = next((r for r in rows if (r["op"], r["shape"], r["provider"]) == (op, shape, provider)), None)
    v = None if r is None else r.get(key)
    return None if v in (None, "") else v


def gpu_targets(rows: list[dict]) -> list[str]:
    """The issue's GPU targets, one PASS/FAIL/MISSING line each (bf16 rows of this run)."""
    lines = []

    def check(name: str, value, goal: float, fmt: str, higher: bool = True):
        if value is None:
            lines.append(f"TARGET {name}: MISSING")
        else:
            ok = value >= goal if higher else value < goal
            lines.append(f"TARGET {name}: {fmt.format(value)} -> {'PASS' if ok else 'FAIL'}")

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    nt = "n2=65536 d=128"
    check("NT-Xent fwd+bwd 2N=65536 D=128 triton vs eager >= 3x",
          ratio(_get(rows, "ntxent", nt, "eager", "fwdbwd_ms"), _get(rows, "ntxent", nt, "triton", "fwdbwd_ms")),
          3.0, "{:.2f}x")
    big = "n2=1048576 d=128"
    peak = _get(rows, "ntxent", big, "triton", "peak_mem_mb")
    check("NT-Xent 2N=1048576 D=128 fwd+bwd total memory < 10 GB (step peak + bf16 inputs)",
          None if peak is None else (peak + 1048576 * 128 * 2 / 2**20) / 1024, 10.0, "{:.2f} GB", higher=False)
    dk = "s=10 t=2 b=64 k=65536"
    check("DINO fwd+bwd K=65536 triton vs eager >= 2x",
          ratio(_get(rows, "dino", dk, "eager", "fwdbwd_ms"), _get(rows, "dino", dk, "triton", "fwdbwd_ms")),
          2.0, "{:.2f}x")
    gk = "b=256 l=196 d=768 keep=0.25"
    check("gather fwd triton vs torch.gather >= 1.5x",
          ratio(_get(rows, "gather", gk, "eager", "fwd_ms"), _get(rows, "gather", gk, "triton", "fwd_ms")),
          1.5, "{:.2f}x")
    check("gather fwd bandwidth >= 70% of copy",
          ratio(_get(rows, "gather", gk, "triton", "gbps"), _get(rows, "gather", gk, "copy", "gbps")),
          0.7, "{:.0%}")
    return lines


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small CPU-sized sweep")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--ops", default="ntxent,dino,gather", help="comma list of ntxent,dino,gather")
    ap.add_argument("--providers", default=None, help="comma list to restrict providers (eager,compile,...)")
    ap.add_argument("--budget-s", type=float, default=None, help="timing budget per mode (default 2 cpu, 0.5 cuda)")
    ap.add_argument("--case-timeout-s", type=float, default=900.0, help="cpu: kill a provider's subprocess after")
    ap.add_argument("--out", default=None, help="CSV to append to (default benchmarks/results/kernels_<dev>.csv)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    budget = args.budget_s if args.budget_s is not None else (0.5 if device == "cuda" else 2.0)
    ops = set(args.ops.split(","))
    only = set(args.providers.split(",")) if args.providers else None
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"kernels_{device}.csv")
    meta = dict(time_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                git_sha=git_sha(), device=device_name(device))
    print(f"# bench_kernels device={meta['device']} dtype={dtype} torch={torch.__version__} sha={meta['git_sha']}")
    rows: list[dict] = []
    for case in [c for c in _sizes(args.quick, device == "cuda") if c["op"] in ops]:
        for provider in _providers(case, device == "cuda"):
            if only and provider not in only:
                continue
            row = dict(meta, op=case["op"], shape=_shape_str(case), dtype=dtype, provider=provider)
            if (case["op"] == "ntxent" and provider in ("eager", "compile")
                    and _naive_bytes(case, DTYPES[dtype].itemsize) > 0.9 * _available_bytes(device)):
                row["note"] = "skipped: (2N)^2 logits do not fit in memory"
            elif device == "cpu":
                row.update(_run_cpu_subprocess(case, provider, dtype, budget, args.case_timeout_s))
            else:
                try:
                    row.update(measure(case, provider, dtype, device, budget))
                except torch.OutOfMemoryError:
                    row["note"] = "out of memory"
                torch.cuda.empty_cache()
            rows.append(row)
            _append_csv(out, row)  # row by row: a run cut short by a timeout keeps what it measured
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                              if k not in meta}), flush=True)
    print(f"# appended {len(rows)} rows to {out}")
    print("\n".join(print_table(rows)))
    if device == "cpu":
        target = cpu_target(rows)
        if target:
            print(target)
    else:
        print("\n".join(gpu_targets(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
