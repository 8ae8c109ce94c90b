"""The training loop without Ray: `pretrain train --dry-run` writes the run, `torchrun -m pretrain.train` trains it."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.util import free_port

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "simclr_digits.yaml"

pytestmark = pytest.mark.slow



def test_torchrun_two_processes(tmp_path):
    """2 torchrun processes train 4 steps; both ZeRO partitions land in the run's checkpoints; a rerun resumes."""
    sets = ["job.max_steps=4", "job.log_every=2", "job.ckpt_every=4", "optim.warmup_steps=1", "data.batch_size=32",
            f"job.out_dir={tmp_path}", "job.run_name=tr", "eval.enabled=false", "job.progress=false",
            f"data.cache_dir={tmp_path / 'cache'}"]
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "--config", str(RECIPE), "--dry-run"]
    for s in sets:
        cmd += ["--set", s]
    dry = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    run = tmp_path / "tr"
    assert (run / "config.yaml").is_file() and not (run / "metrics.csv").exists()

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                f"--master-port={free_port()}", "-m", "pretrain.train", str(run)]
    proc = subprocess.run(torchrun, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    files = {p.name for p in (run / "checkpoints" / "step_0000004" / "state").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files
    assert len((run / "metrics.csv").read_text().splitlines()) == 1 + 4
    assert (run / "backbone.pt").is_file()

    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("max_steps: 4", "max_steps: 6"))
    torchrun[5] = f"--master-port={free_port()}"
    again = subprocess.run(torchrun, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "at step 4" in again.stdout
    assert len((run / "metrics.csv").read_text().splitlines()) == 1 + 6
