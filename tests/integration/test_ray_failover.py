"""job.max_failures: a Ray Train worker killed mid-run (SIGKILL, as a lost node or the OOM killer would) is started
again with its group, which resumes from the latest checkpoint; the run completes in the same run directory and MLflow
run, every step logged."""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "simclr_digits.yaml"

pytestmark = pytest.mark.slow


def test_killed_worker_is_restarted_and_resumes(tmp_path):
    sets = ["job.max_steps=30", "job.log_every=5", "job.ckpt_every=10", "optim.warmup_steps=2", "data.batch_size=64",
            f"job.out_dir={tmp_path}", "job.run_name=failover", "eval.enabled=false", "eval.knn_every=0",
            "job.progress=false", "job.max_failures=1", f"data.cache_dir={tmp_path / 'cache'}",
            "model.backbone_kwargs={width: 0.5}"]
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "--config", str(RECIPE)]
    for s in sets:
        cmd += ["--set", s]
    log = tmp_path / "train.log"
    run = tmp_path / "failover"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            # rank 1's process, once the run holds its first checkpoint (step 10) and has gone on past it
            deadline, victim = time.monotonic() + 300, None
            while time.monotonic() < deadline and proc.poll() is None:
                text = log.read_text()
                victim = victim or re.search(r"pid=(\d+)\) world_rank=1,", text)
                if victim and any(run.glob("checkpoint_*")) and _steps(run) and max(_steps(run)) >= 15:
                    break
                time.sleep(0.5)
            assert victim and proc.poll() is None, log.read_text()[-3000:]
            os.kill(int(victim.group(1)), signal.SIGKILL)
            assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert re.search(r"Resumed from \S+ at step (10|20) \(epoch", text), text[-3000:]
    steps = _steps(run)
    assert sorted(set(steps)) == list(range(1, 31)) and len(steps) > 30  # some steps again after the restart
    assert (run / "backbone.pt").is_file()


def _steps(run: Path) -> list[int]:
    path = run / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return [int(r["step"]) for r in csv.DictReader(f)]
