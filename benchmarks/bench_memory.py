"""Training-step memory and time of a backbone with and without gradient checkpointing (``grad_checkpointing``).

For each backbone and batch size, side by side in one run: a forward + backward of the backbone alone on a random
batch (``sum of squares`` of its pooled output as the loss), plain and with each block recomputed in the backward.
Peak memory is that of one step after a warm-up step, above what was allocated before it (benchmarks.common.peak_mb:
CUDA's max_memory_allocated, or on the CPU the peak RSS of a fresh process per case); time is the median step.

    python benchmarks/bench_memory.py                       # ViT-S/16 and ViT-B/16 at 224, batch 32 (GPU or CPU)
    python benchmarks/bench_memory.py --backbones vit_tiny --image-size 32 --patch-size 8 --batch 8   # seconds

Rows are appended to benchmarks/results/memory.csv with the machine, git sha and time, each as its case ends (a case
that fails, e.g. out of memory, gets a row whose ``note`` says why, and the next case runs; the exit status is then 1);
a table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    CPU_MALLOC_ENV,
    Parser,
    Stopped,
    append_csv,
    at_least,
    cpu_name,
    csv_out,
    git_sha,
    median_ms,
    peak_mb,
    plural,
    positive_float,
    print_result,
    run_worker,
    stop_on_signals,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "memory.csv"
VITS = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge")
FIELDS = ["machine", "git", "utc", "backbone", "image_size", "patch_size", "batch", "checkpointing", "device",
          "peak_mem_mb", "mem_method", "step_ms", "note"]
"""The CSV's columns (``note``: empty, or why the case has no numbers)."""


def measure(backbone: str, image_size: int, patch_size: int, batch: int, checkpointing: bool, device: str,
            budget_s: float) -> dict:
    """One case in this process: peak MiB and median ms of a forward + backward step."""
    from pretrain.models import build_backbone

    torch.manual_seed(0)
    model = build_backbone(backbone, image_size=image_size, in_chans=3, patch_size=patch_size,
                           grad_checkpointing=checkpointing).to(device).train()
    x = torch.randn(batch, 3, image_size, image_size, device=device)

    def step() -> None:
        model(x).square().sum().backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: allocator pools, lazy init
    peak, method = peak_mb(step, device)
    return {"peak_mem_mb": round(peak, 1), "mem_method": method, "step_ms": round(median_ms(step, device, budget_s), 1)}


def _in_subprocess(args: dict) -> dict:
    """A CPU case in a fresh process, so its peak RSS is its own; ``{"note": why}`` where it failed."""
    row, why = run_worker(__file__, args, timeout_s=1800, env={**os.environ, **CPU_MALLOC_ENV})
    return row if row is not None else {"note": f"failed: {' '.join(why.split())[-250:]}"}


def run_case(case: dict) -> dict:
    """One case's measurements, or ``{"note": why}`` where it failed (out of memory, a worker that died): one case's
    failure had raised and lost the rows of every case measured before it."""
    if case["device"] != "cuda":
        return _in_subprocess(case)
    try:
        return measure(**case)
    except torch.OutOfMemoryError:
        return {"note": "failed: out of memory"}
    except Exception as e:  # noqa: BLE001 - one case's failure is a row note, not the end of the run
        return {"note": f"failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"}
    finally:
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default="vit_small,vit_base",
                   help=f"comma list of ViT backbones (default vit_small,vit_base; of {', '.join(VITS)})")
    p.add_argument("--image-size", type=at_least(1), default=224, help="input side in pixels (default 224)")
    p.add_argument("--patch-size", type=at_least(1), default=16, help="ViT patch side, dividing --image-size "
                   "(default 16)")
    p.add_argument("--batch", type=at_least(1), default=32, help="images per step (default 32)")
    p.add_argument("--budget-s", type=positive_float, default=None,
                   help="timing budget per case (default 3 cpu, 1 cuda)")
    p.add_argument("--out", type=Path, default=RESULTS, help="the CSV to append the rows to (default "
                   "benchmarks/results/memory.csv)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print_result(measure(**json.loads(a.worker)))
        return 0
    unknown = [b for b in a.backbones.split(",") if b not in VITS]
    if unknown:
        p.error(f"--backbones: {', '.join(map(repr, unknown))} not among the ViT backbones {', '.join(VITS)}")
    if a.image_size % a.patch_size:
        p.error(f"--patch-size: {a.patch_size} does not divide --image-size {a.image_size}")
    csv_out(p, "--out", a.out, FIELDS)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    budget = a.budget_s if a.budget_s is not None else (1.0 if device == "cuda" else 3.0)
    machine = f"{cpu_name()}, {torch.cuda.get_device_name(0) if device == 'cuda' else 'no GPU'}"
    utc = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    stamp = {"machine": machine, "git": git_sha(), "utc": utc}
    cases = [dict(backbone=backbone, image_size=a.image_size, patch_size=a.patch_size, batch=a.batch,
                  checkpointing=checkpointing, device=device, budget_s=budget)
             for backbone in a.backbones.split(",") for checkpointing in (False, True)]
    rows = []
    try:
        with stop_on_signals():
            for case in cases:
                row = {**stamp, **{k: v for k, v in case.items() if k != "budget_s"}, **run_case(case)}
                append_csv(a.out, [row], FIELDS)  # as each case ends: a later failure or a stop keeps it
                rows.append(row)
                if row.get("note"):
                    print(f"{row['backbone']} checkpointing={row['checkpointing']}: {row['note']}", flush=True)
    except Stopped as e:
        print(f"Stopped by {e} after {plural(len(rows), 'case')} of {len(cases)} (appended to {a.out})",
              file=sys.stderr)
        return 128 + e.signum
    done = [r for r in rows if not r.get("note")]
    print(f"{machine}; {a.image_size}px, batch {a.batch}, {done[0]['mem_method'] if done else 'no case measured'}")
    print(f"{'backbone':<10} {'checkpointing':>13} {'peak MiB':>9} {'step ms':>9}")
    for r in rows:
        if r.get("note"):
            print(f"{r['backbone']:<10} {str(r['checkpointing']):>13} {r['note']}")
        else:
            print(f"{r['backbone']:<10} {str(r['checkpointing']):>13} {r['peak_mem_mb']:>9.0f} {r['step_ms']:>9.0f}")
    for plain, recomputed in zip(rows[::2], rows[1::2]):
        if not plain.get("note") and not recomputed.get("note"):
            print(f"{plain['backbone']}: checkpointing keeps {recomputed['peak_mem_mb'] / plain['peak_mem_mb']:.0%} "
                  f"of the peak memory at {recomputed['step_ms'] / plain['step_ms']:.2f}x the step time")
    failed = len(rows) - len(done)
    if failed:
        print(f"error: {plural(failed, 'case')} of {len(rows)} failed (their rows' note says why)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
