"""The kernel benchmark's GPU code path, run small on the CPU (--smoke: Triton interpreted), and its CSV log."""

import csv
import subprocess
import sys
from pathlib import Path

from benchmarks import bench_kernels

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_reports_every_provider_and_target(tmp_path):
    """--smoke measures eager/chunked/triton/copy rows without errors and prints all five target lines; --report
    prints the same lines from its CSV."""
    out = tmp_path / "k.csv"
    p = subprocess.run([sys.executable, "benchmarks/bench_kernels.py", "--smoke", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = list(csv.DictReader(open(out)))
    assert {(r["op"], r["provider"]) for r in rows} >= {("ntxent", "triton"), ("ntxent", "chunked"),
                                                         ("dino", "triton"), ("gather", "triton"), ("gather", "copy")}
    assert not [r for r in rows if r["note"].startswith(("error", "not run"))]
    assert all(float(r["fwdbwd_ms"] or r["fwd_ms"]) > 0 for r in rows)
    targets = [ln for ln in p.stdout.splitlines() if ln.startswith("TARGET ")]
    assert len(targets) == 5 and not [t for t in targets if "MISSING" in t], targets
    # --report rebuilds the same target lines from the CSV (what gpu_suite.sh prints after a timed-out run)
    report = subprocess.run([sys.executable, "benchmarks/bench_kernels.py", "--report", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert [ln for ln in report.stdout.splitlines() if ln.startswith("TARGET ")] == targets


def test_csv_with_older_columns_is_rewritten_under_the_current_header(tmp_path):
    """Appending to a CSV written before a column was added keeps its rows, aligned to the new header."""
    path = tmp_path / "k.csv"
    old_fields = [f for f in bench_kernels.FIELDS if f not in ("graph_ms", "target")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_fields)
        w.writeheader()
        w.writerow({"op": "dino", "provider": "eager", "peak_mem_mb": "1.5"})
    bench_kernels._append_csv(path, {"op": "gather", "provider": "triton", "graph_ms": 0.25, "target": "gather"})
    rows = list(csv.DictReader(open(path)))
    assert [r["op"] for r in rows] == ["dino", "gather"]
    assert rows[0]["peak_mem_mb"] == "1.5" and rows[1]["graph_ms"] == "0.25" and rows[0]["graph_ms"] == ""
