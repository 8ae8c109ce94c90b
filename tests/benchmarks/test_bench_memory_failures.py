"""bench_memory keeps what it measured: a case that fails is a row saying why (the run goes on, exit status 1), and
a stop (Ctrl-C, SIGTERM) ends it in one line with its case's worker process gone."""

import csv
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--image-size", "32", "--patch-size", "8", "--batch", "4", "--budget-s", "0.1"]


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def test_a_failed_case_is_a_row_and_the_run_goes_on(tmp_path):
    """Under a 3 GB address-space limit ViT-H (2.5 GB of weights) fails and ViT-Ti is still measured after it: every
    case has its row, the failed ones with a one-line note; exit status 1 with one `error:` line."""
    out = tmp_path / "m.csv"

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    p = subprocess.run([sys.executable, "benchmarks/bench_memory.py", "--backbones", "vit_huge,vit_tiny", *SMALL,
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert [(r["backbone"], r["checkpointing"]) for r in rows] == [("vit_huge", "False"), ("vit_huge", "True"),
                                                                    ("vit_tiny", "False"), ("vit_tiny", "True")]
    assert all(r["note"].startswith("failed: ") and "\n" not in r["note"] and not r["peak_mem_mb"] for r in rows[:2])
    assert all(not r["note"] and float(r["peak_mem_mb"]) > 0 for r in rows[2:])
    assert "vit_tiny: checkpointing keeps" in p.stdout
    assert p.stderr.strip().splitlines() == ["error: 2 cases of 4 failed (their rows' note says why)"]


def test_sigint_stops_in_one_line_without_a_worker_left(tmp_path):
    """SIGINT while a case's worker runs: exit 130, one line on stderr (no traceback), the worker ended, the cases
    finished before it kept in --out."""
    out = tmp_path / "m.csv"
    proc = subprocess.Popen([sys.executable, "benchmarks/bench_memory.py", "--backbones", "vit_tiny,vit_base",
                             "--image-size", "224", "--batch", "16", "--budget-s", "30", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not _children(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = _children(proc.pid)
    assert workers, "no worker started"
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("Stopped by SIGINT after 0 cases of 4"), err
    assert not [w for w in workers if os.path.exists(f"/proc/{w}") and
                Path(f"/proc/{w}/stat").read_text().split()[2] != "Z"]
