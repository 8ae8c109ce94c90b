"""`pretrain train --address` joins a running Ray cluster instead of starting its own; a run that fails on the
workers ends the command in one line (on a joined cluster, as on the private one: the same launcher code)."""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from data_pipeline.remote import AUTH_ENV
from tests.http_fixture import serve
from tests.util import free_port

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "simclr_digits.yaml"

pytestmark = pytest.mark.slow



@contextlib.contextmanager
def _ray_head(ip: str) -> Iterator[str]:
    """A Ray head of the test's own (port, temp dir, process group) on ``ip``; only its processes are stopped."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="sslray-head-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray_bin = Path(sys.executable).parent / "ray"
    cmd = [str(ray_bin), "start", "--head", "--block", f"--port={port}", f"--node-ip-address={ip}",
           f"--temp-dir={temp_dir}", "--num-cpus=3", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={free_port()}", "--disable-usage-stats"]
    log = open(Path(temp_dir) / "head.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"{ip}:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            status = subprocess.run([str(ray_bin), "status", f"--address={address}"], env=env, capture_output=True)
            if status.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray head did not start: {(Path(temp_dir) / 'head.log').read_text()[-2000:]}")
            time.sleep(1)
        yield address
    finally:
        # `ray start --block` drains its node for up to 30 s on SIGTERM; this head's jobs are over, so not long
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    """This module's Ray head on 127.0.0.2.

    Not 127.0.0.1: `ray start` replaces that one with the machine's routable address, and the test must stay on
    loopback; any 127/8 address is loopback and Ray keeps it as given."""
    with _ray_head("127.0.0.2") as address:
        yield address


def _unlabelled_jpegs(root: Path) -> Path:
    """200 JPEG crops of scikit-learn's two sample photos, half loose in ``root``, half two folders deeper."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    (root / "a" / "b").mkdir(parents=True)
    photos = load_sample_images().images
    for n in range(200):
        top, left = 8 * (n // 20), 16 * (n % 20)
        crop = Image.fromarray(photos[n % 2][top:top + 96, left:left + 96])
        crop.save(root / ("" if n % 2 else "a/b") / f"img{n:03d}.jpg", quality=90)
    return root


def test_train_joins_existing_cluster(ray_head, tmp_path):
    """Training with --address runs its 2 workers on the given cluster (no private cluster is started), on unlabelled
    JPEGs written to shards by `pretrain data shards --source images:PATH` and served over HTTP by a server that wants
    a token: the driver has it in PRETRAIN_HTTP_AUTHORIZATION, the workers (started by the cluster, not by the driver)
    get it from the launcher, and every shard is fetched."""
    shards = tmp_path / "data" / "shards"
    made = subprocess.run([sys.executable, "-m", "pretrain.cli", "data", "shards", "--source",
                           f"images:{_unlabelled_jpegs(tmp_path / 'photos')}", "--out", str(shards), "--shard-size",
                           "64", "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    with serve(tmp_path / "data", token="Bearer t0ken") as (base, seen):
        sets = ["job.max_steps=6", "job.log_every=3", "job.ckpt_every=6", "optim.warmup_steps=1",
                "data.batch_size=32", f"job.out_dir={tmp_path}", "job.run_name=joined", "eval.enabled=false",
                "eval.knn_every=0", "job.progress=false", f"data.source={base}/shards"]
        cmd = [sys.executable, "-m", "pretrain.cli", "train", "--config", str(RECIPE), "--address", ray_head]
        for s in sets:
            cmd += ["--set", s]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "RAY_AUTH_MODE": "disabled", AUTH_ENV: "Bearer t0ken"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert all(seen[f"/shards/shard-{i:06d}.tar"] >= 1 for i in range(4))  # 200 photos in shards of 64
    assert "Local Ray cluster" not in out
    assert ray_head in out or "Connecting to existing Ray cluster" in out
    # the cluster's 3 CPUs serve 2 workers: no warning; Ray's per-rank report lines (a metrics dict each) are quiet
    assert "Warning: the cluster" not in out and "Reporting training result" not in out
    lines = (tmp_path / "joined" / "metrics.csv").read_text().splitlines()
    assert len(lines) == 1 + 6
    assert float(lines[-1].split(",")[-1]) >= 1  # 6 steps of 2 x 32 read the 200 photos more than once


def test_worker_failure_is_reported_and_run_kept(ray_head, tmp_path):
    """A worker that raises (the loss diverges at a learning rate of 1e20: the trainer stops every rank) ends the
    command with status 1 and one line that says why; the run directory stays."""
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "--config", str(RECIPE), "--address", ray_head]
    for s in ["optim.lr=1e20", "data.batch_size=64", "job.max_steps=20", "job.log_every=4", "optim.warmup_steps=1",
              "eval.knn_every=0", f"job.out_dir={tmp_path}", "job.run_name=fails", "job.progress=false",
              f"data.cache_dir={tmp_path / 'cache'}"]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training failed on the workers") and "the loss is not finite at step" in last, last
    assert (tmp_path / "fails" / "config.yaml").is_file()


def test_a_private_cluster_beside_another_ray_finds_its_own(ray_head, tmp_path):
    """A local run (no --address) while another Ray runs on the machine (this module's head): Ray Train's placement
    group cleaner asks its own cluster's state API (RAY_API_SERVER_ADDRESS, set for the private cluster), where it
    looked for a Ray on the machine, found two and died with a traceback in the run's log; the run completes."""
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "--config", str(RECIPE)]
    for s in ["data.batch_size=32", "job.max_steps=4", "job.log_every=2", "optim.warmup_steps=1", "eval.enabled=false",
              "eval.knn_every=0", f"job.out_dir={tmp_path}", "job.run_name=beside", "job.progress=false",
              f"data.cache_dir={tmp_path / 'cache'}"]:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**env, "RAY_AUTH_MODE": "disabled"})
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "Local Ray cluster" in text and (tmp_path / "beside" / "backbone.pt").is_file()
    assert "multiple active Ray instances" not in text and "PlacementGroupCleaner" not in text, text[-3000:]
    # the run finished: its cluster's temp dir (Ray's logs) is gone
    temp_dir = Path(re.search(r"Local Ray cluster: temp dir (\S+),", text).group(1))
    assert temp_dir.name.startswith("sslray-") and not temp_dir.exists() and "Ray's logs" not in text


def test_a_private_cluster_that_failed_keeps_its_logs_and_names_them():
    """Where the work on a private cluster raised, its temp dir stays, Ray's logs in it, and the last line says where
    (a finished run's goes: the test above)."""
    code = ("from cluster.ray_launcher import ray_cluster\n"
            "try:\n"
            "    with ray_cluster(None, num_cpus=1):\n"
            "        raise RuntimeError('the run failed')\n"
            "except RuntimeError:\n"
            "    pass\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    temp_dir = Path(re.search(r"Local Ray cluster: temp dir (\S+),", proc.stdout).group(1))
    try:
        logs = temp_dir / "session_latest" / "logs"
        assert proc.stdout.strip().splitlines()[-1] == f"Ray's logs of this run are kept in {logs}"
        assert (logs / "raylet.out").is_file() and (logs / "gcs_server.out").is_file(), sorted(logs.iterdir())
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_joined_cluster_short_of_resources_is_named():
    """What a joined cluster lacks for the run's workers (a CPU each, a GPU each on GPUs), as the warning says it
    before Ray Train waits for nodes; nothing when it has enough."""
    from cluster.ray_launcher import resource_shortfall

    assert resource_shortfall({"CPU": 3.0}, 2, gpu=False) is None
    assert resource_shortfall({"CPU": 64.0, "GPU": 8.0}, 8, gpu=True) is None
    assert resource_shortfall({"CPU": 64.0}, 8, gpu=True) == "has 0 GPUs for 8 workers"
    assert resource_shortfall({"CPU": 1.0, "GPU": 2.0}, 4, gpu=True) == ("has 1 CPUs for 4 workers and 2 GPUs for 4 "
                                                                          "workers")
    assert resource_shortfall({"CPU": 1.0}, 2, gpu=False) == "has 1 CPUs for 2 workers"


def _train_until_signal(cmd: list[str], run_dir: Path, sig: int, checkpoints: int) -> tuple[int, str]:
    """Run ``cmd``; send ``sig`` once Ray has registered ``checkpoints`` checkpoints of ``run_dir``; (status, log)."""
    from pretrain.steps import list_checkpoints

    log = run_dir.parent / f"{run_dir.name}-{sig}.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                registered = (run_dir / "checkpoint_manager_snapshot.json").is_file()
                if registered and len(list_checkpoints(run_dir)) >= checkpoints:
                    proc.send_signal(sig)
                    break
                time.sleep(0.5)
            else:
                pytest.fail("the run ended or stalled before it could be stopped: " + log.read_text()[-3000:])
            return proc.wait(timeout=120), log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()


def test_ctrl_c_and_sigterm_stop_the_run_killed_and_it_resumes(ray_head, mlflow_server, tmp_path):
    """SIGINT (Ctrl-C) and SIGTERM (`kill`, and what Slurm and Kubernetes send a job they stop) abort the workers: the
    command ends with 128 + the signal and a line naming the latest checkpoint and the resume, the MLflow run is KILLED
    (it stayed RUNNING: its workers are gone before they can end it; SIGTERM had ended in Ray's C++ backtrace, 134);
    `--resume` goes on from there in the same MLflow run, which ends FINISHED. Another Ray runs on the machine
    meanwhile: the joined cluster's processes find their own (Ray Train's placement-group cleaner had looked for a Ray
    on the machine, found two and printed a traceback every poll)."""
    from mlflow import MlflowClient

    from pretrain.checkpoint import remove_orphan_stages
    from pretrain.steps import list_checkpoints

    run_dir = tmp_path / "stopped"
    sets = ["data.batch_size=32", "job.max_steps=2000", "job.log_every=2", "job.ckpt_every=4", "optim.warmup_steps=1",
            "eval.enabled=false", "eval.knn_every=0", f"job.out_dir={tmp_path}", "job.run_name=stopped",
            "job.progress=false", f"data.cache_dir={tmp_path / 'cache'}"]
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "--config", str(RECIPE), "--address", ray_head,
           "--tracking-uri", mlflow_server, *(a for s in sets for a in ("--set", s))]
    client = MlflowClient(mlflow_server)
    resume = [sys.executable, "-m", "pretrain.cli", "train", "--resume", str(run_dir), "--address", ray_head]
    previous = None
    with _ray_head("127.0.0.3"):
        for i, (sig, command) in enumerate([(signal.SIGINT, cmd), (signal.SIGTERM, resume)]):
            status, out = _train_until_signal(command, run_dir, sig, checkpoints=i + 2)
            assert "multiple active Ray instances" not in out and "PlacementGroupCleaner" not in out, out[-3000:]
            assert status == 128 + sig, out[-3000:]
            latest = max(list_checkpoints(run_dir))
            last = out.strip().splitlines()[-1]
            assert last == (f"Stopped by {sig.name}; its latest checkpoint is step {latest}; resume with --resume "
                            f"{run_dir}"), out[-3000:]
            assert "MLflow: run marked KILLED" in out and "Traceback" not in out, out[-3000:]
            if sig == signal.SIGTERM:  # the run is marked before the workers are aborted (a scheduler may not wait)
                stopping, marked = out.index("Stopping (SIGTERM): aborting the workers"), out.index("run marked KILLED")
                assert stopping < marked < out.index(last)
                assert "Received SIGINT" not in out  # Ray Train's line of its own handler, run for SIGTERM too
            run_id = (run_dir / "mlflow_run_id").read_text().strip()
            assert client.get_run(run_id).info.status == "KILLED"
            if previous is not None:
                assert f"at step {previous} (epoch" in out  # the second start went on from the first one's checkpoint
            previous = latest
    proc = subprocess.run(resume + ["--set", f"job.max_steps={latest + 2}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    # workers aborted while reporting a checkpoint leave its local stage behind: the resumed run's checkpoints removed
    # them (none left of processes gone)
    assert remove_orphan_stages(Path(tempfile.gettempdir())) == []
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert set(range(1, latest + 3)) <= set(steps)  # (with those logged after the checkpoints it went on from)
