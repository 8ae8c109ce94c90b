"""The memory benchmark (benchmarks/bench_memory.py) run small on the CPU: both cases measured in their own
processes, rows appended to its CSV, the comparison printed."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_small_run_measures_both_cases(tmp_path):
    """Both cases measured and appended, under a header, to an --out that exists empty (it had got rows with no
    header; a missing --out goes through the same benchmarks.common.append_csv, tested in test_bench_csv)."""
    out = tmp_path / "memory.csv"
    out.write_bytes(b"")
    p = subprocess.run([sys.executable, "benchmarks/bench_memory.py", "--backbones", "vit_tiny", "--image-size", "32",
                        "--patch-size", "8", "--batch", "8", "--budget-s", "0.2", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert [(r["backbone"], r["checkpointing"]) for r in rows] == [("vit_tiny", "False"), ("vit_tiny", "True")]
    assert all(float(r["peak_mem_mb"]) > 0 and float(r["step_ms"]) > 0 for r in rows)
    assert rows[0]["mem_method"] == "cpu peak RSS (VmHWM) delta" and rows[0]["git"]
    assert "vit_tiny: checkpointing keeps" in p.stdout
