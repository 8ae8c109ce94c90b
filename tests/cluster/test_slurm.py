"""`pretrain submit slurm`: option checks and the rendered script, then real jobs on a private 2-node Slurm cluster."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.slurm_fixture import slurm_cluster  # noqa: F401 - fixture
from tests.util import run_cli, worker_placement

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "simclr_digits.yaml"


def _submit(args: list[str], tmp_path: Path, *, env: dict | None = None):
    """`pretrain submit slurm` with the digits recipe into ``tmp_path``, in this process (tests.util.run_cli)."""
    return run_cli(["submit", "slurm", "--config", str(RECIPE), "--set", f"job.out_dir={tmp_path}",
                    "--set", f"data.cache_dir={tmp_path / 'cache'}", *args], env=env)


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "--nodes: must be an integer >= 1, got 0"),
    (["--time", "tomorrow"], "--time: 'tomorrow' is not an sbatch time"),
    (["--time", "00:04:00", "--requeue-grace", "300"], "--requeue-grace: 300 s is not shorter than --time 00:04:00 "
                                                       "(240 s): every start would requeue at once"),
    (["--time", "5", "--requeue-grace", "300"], "--requeue-grace: 300 s is not shorter than --time 5 (300 s)"),
    (["--sbatch-arg=qos=high"], "--sbatch-arg: 'qos=high' must be one long option"),
    (["--sbatch-arg=--nodes=4"], "--sbatch-arg: '--nodes=4' would change what the job script sets itself; use --nodes"),
    (["--sbatch-arg=--qos=high", "--sbatch-arg=--out=/tmp/x.log"], "--sbatch-arg: '--out=/tmp/x.log' would change what "
     "the job script sets itself; the log is <run>/slurm/<job id>.out"),
    (["--sbatch-arg=--gres=gpu:h100:4"], "--sbatch-arg: '--gres=gpu:h100:4' would change what the job script sets "
     "itself; use --gpus-per-node"),
    (["--cpus-per-node", "1", "--set", "job.num_workers=3"], "job.num_workers: 3 CPU workers need 3 Ray CPUs, the job "
                                                               "has 1 (1 nodes x 1 --cpus-per-node)"),
    # GPUs are asked for with --gpus-per-node only: Ray is told the node's GPUs, and each node's one task has them all
    (["--sbatch-arg=--gpus-per-task=1"], "--sbatch-arg: '--gpus-per-task=1' would change what the job script sets "
     "itself; use --gpus-per-node"),
    (["--sbatch-arg=--gpus-per-socket=1"], "'--gpus-per-socket=1' would change what the job script sets itself; use "
     "--gpus-per-node"),
    (["--sbatch-arg=--gpu-bind=single:1"], "'--gpu-bind=single:1' would change what the job script sets itself; each "
     "node's one task (its Ray node) gets all the node's GPUs"),
    (["--sbatch-arg=--cpus-per-gpu=4"], "'--cpus-per-gpu=4' would change what the job script sets itself; use "
     "--cpus-per-node"),
    (["--sbatch-arg=--tres-per-task=gres/gpu:1"], "'--tres-per-task=gres/gpu:1' would change what the job script sets "
     "itself; use --gpus-per-node"),
    (["--nodes", "4", "--set", "job.num_workers=2"], "job.num_workers: 2 CPU workers leave at least 2 of the 4 --nodes "
                                                     "idle; give --nodes 2 or more job.num_workers"),
    (["--set", "job.nope=1"], "job.nope"),
    # the script not run or not submitted as written (they had been written into it, to fail or hang at sbatch)
    (["--sbatch-arg=--wrap=hostname"], "'--wrap=hostname' would change what the job script sets itself; the job runs "
     "the script written for the run"),
    (["--sbatch-arg=--wait"], "'--wait' would change what the job script sets itself; use `pretrain submit slurm "
     "--wait`"),
    (["--sbatch-arg=--export=NONE"], "'--export=NONE' would change what the job script sets itself; the job's steps "
     "need the environment"),
    (["--sbatch-arg=--time-min=10"], "'--time-min=10' would change what the job script sets itself; use --time"),
    (["--sbatch-arg=--gres=shard:2"], "'--gres=shard:2' would change what the job script sets itself; use "
     "--gpus-per-node"),
    (["--sbatch-arg=--tres-bind=gres/gpu:closest"], "'--tres-bind=gres/gpu:closest' would change what the job script "
     "sets itself; each node's one task"),
    (["--wait"], "--wait: a --dry-run submits nothing to wait for; give one or the other"),
    # the nodes would each take it for their own (it had been accepted)
    (["--tracking-uri", "http://127.0.0.1:5000"], "tracking.uri: http://127.0.0.1:5000 is this host's own loopback "
     "address, which each of the job's nodes would take for its own"),
])
def test_bad_options_fail_before_anything_is_written(tmp_path, args, message):
    """A bad option or config is one line on stderr, exit status 2, and no run directory."""
    proc = _submit([*args, "--set", "job.run_name=bad", "--dry-run"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_other_sbatch_options_are_written(tmp_path):
    """Options that ask for no GPUs and set nothing the script sets are passed on as directives, among them GPU
    tuning and a --gres of another resource."""
    args = ["--sbatch-arg=--gpu-freq=high", "--sbatch-arg=--gres=nvme:1", "--sbatch-arg=--tres-per-task=cpu=2",
            "--sbatch-arg=--mem-per-gpu=40G"]
    proc = _submit(["--gpus-per-node", "1", *args, "--set", "job.run_name=o", "--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "o" / "slurm" / "job.sbatch").read_text().splitlines()
    for arg in args:
        assert f"#SBATCH {arg[len('--sbatch-arg='):]}" in lines, arg


def test_nodes_up_to_the_cpu_workers_are_taken(tmp_path):
    """A CPU job of as many nodes as workers (one worker a node) is written; a worker fewer is refused above."""
    proc = _submit(["--nodes", "2", "--cpus-per-node", "1", "--set", "job.num_workers=2", "--set", "job.run_name=n2",
                    "--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=2" in (tmp_path / "n2" / "slurm" / "job.sbatch").read_text().splitlines()


@pytest.mark.parametrize("args, message", [
    (["--set", "job.use_gpu=true"], "job.use_gpu: true gives each worker a GPU, and the job asks for none; give "
                                    "--gpus-per-node N (one worker per GPU), or set job.use_gpu=false for CPU workers"),
    (["--gpus-per-node", "2", "--set", "job.use_gpu=false"], "job.use_gpu: --set gives false, and the job's GPUs make "
     "it true (one worker per GPU: --nodes 1 x --gpus-per-node 2); leave it out, or leave out --gpus-per-node"),
    (["--gpus-per-node", "2", "--nodes", "2", "--set", "job.num_workers=3"], "job.num_workers: --set gives 3, and the "
     "job's GPUs make it 4 (one worker per GPU: --nodes 2 x --gpus-per-node 2); leave it out, or change --nodes"),
    (["--gpus-per-node", "2", "--set", "job={use_gpu: no}"], "job.use_gpu: --set gives false"),
])
def test_gpu_settings_against_the_jobs_gpus_are_refused(tmp_path, args, message):
    """use_gpu true on a job of no GPUs (Ray would be told of none, and the workers wait for them), and a --set that
    the job's GPUs would silently overrule, are one line, before anything is written."""
    proc = _submit([*args, "--set", "job.run_name=bad", "--dry-run"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr, proc.stderr
    assert not (tmp_path / "bad").exists()


def test_gpu_run_resumed_on_cpu_nodes_needs_use_gpu_false(tmp_path):
    """A run written for GPUs (use_gpu true) resumed on a job of no GPUs is refused, its config left as it was; with
    --set job.use_gpu=false it goes on CPU workers."""
    assert _submit(["--gpus-per-node", "2", "--set", "job.run_name=gr", "--dry-run"], tmp_path).returncode == 0
    config = tmp_path / "gr" / "config.yaml"
    before = config.read_text()
    proc = run_cli(["submit", "slurm", "--resume", str(tmp_path / "gr"), "--dry-run"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: job.use_gpu: true gives "
                                                                                      "each worker a GPU"), proc.stderr
    assert config.read_text() == before
    proc = run_cli(["submit", "slurm", "--resume", str(tmp_path / "gr"), "--nodes", "2", "--set", "job.use_gpu=false",
                    "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(config.read_text())["job"] == {**yaml.safe_load(before)["job"], "use_gpu": "false"}


def test_check_workers_sees_gpu_settings():
    """RayNodes.check_workers, as the submit commands call it with the run's use_gpu and the user's --set: what the
    job's GPUs decide is not asked otherwise, and CPU nodes do not take use_gpu true; what agrees passes."""
    from cluster.slurm import SlurmJob

    cpu, gpu = SlurmJob(nodes=2), SlurmJob(nodes=2, gpus_per_node=4)
    for use_gpu in ("auto", "false"):
        cpu.check_workers(2, use_gpu=use_gpu, overrides=["job.num_workers=2"])
    with pytest.raises(ValueError, match=r"^job.use_gpu: true gives each worker a GPU, and the job asks for none"):
        cpu.check_workers(2, use_gpu="true")
    for overrides in ([], ["job.num_workers=8", "job.use_gpu=true"], ["job.use_gpu=auto"], ["job.use_gpu=yes"],
                      ["job={num_workers: 8}"], ["job.num_workers='8'"]):
        gpu.check_workers(8, use_gpu="true", overrides=overrides)
    for overrides, key in ((["job.num_workers=2"], "num_workers"), (["job.use_gpu=false"], "use_gpu"),
                           (["job.use_gpu=off"], "use_gpu"), (["job={num_workers: 16, use_gpu: true}"], "num_workers")):
        with pytest.raises(ValueError, match=rf"^job.{key}: --set gives .*, and the job's GPUs make it"):
            gpu.check_workers(8, use_gpu="true", overrides=overrides)


def test_no_time_limit_takes_any_requeue_grace(tmp_path):
    """sbatch's --time 0, UNLIMITED or INFINITE mean no limit: no end to requeue before, so the grace is no conflict
    (0 had been refused as shorter than the grace), and the script asks for it as given."""
    for limit in ("0", "UNLIMITED", "infinite"):
        proc = _submit(["--time", limit, "--requeue-grace", "300", "--set", f"job.run_name=t{limit}", "--dry-run"],
                       tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert f"#SBATCH --time={limit}\n" in (tmp_path / f"t{limit}" / "slurm" / "job.sbatch").read_text()


def test_run_dir_with_a_space_is_refused_before_writing(tmp_path):
    """A run directory sbatch's --output directive could not carry (whitespace, a %) is refused up front."""
    out = tmp_path / "my runs"
    proc = _submit(["--set", f"job.out_dir={out}", "--set", "job.run_name=sp", "--dry-run"], tmp_path)
    assert proc.returncode == 2 and "has whitespace" in proc.stderr.strip().splitlines()[-1]
    assert not out.exists()
    proc = _submit(["--set", "job.run_name=g%j", "--dry-run"], tmp_path)  # sbatch would expand %j in --output
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: job.run_name: the run directory {str(tmp_path / 'g%j')!r} has a %, which sbatch would expand in the "
        "job's log path (%j: the job id), writing the log elsewhere")
    assert not (tmp_path / "g%j").exists()


def test_no_sbatch_is_one_line(tmp_path):
    """Submitting from a host without sbatch says so before writing the run."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # the venv's bin: python, no Slurm
    proc = _submit(["--set", "job.run_name=nosb"], tmp_path, env=env)
    assert proc.returncode == 2 and "sbatch: not found on PATH" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "nosb").exists()


def test_gpu_dry_run_writes_config_and_script(tmp_path):
    """On GPU nodes one worker per GPU: the run's config says 16 workers on GPU, the script asks Slurm for them, and
    bash accepts its syntax (64 digits a GPU: 16 x the recipe's 256 would be more than the 1,797 digits, refused)."""
    proc = _submit(["--nodes", "2", "--gpus-per-node", "8", "--cpus-per-node", "64", "--partition", "gpu",
                    "--time", "2-00:00:00", "--sbatch-arg=--qos=high", "--set", "job.run_name=g", "--set",
                    "data.batch_size=64", "--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "g"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["job"]["num_workers"] == 16 and cfg["job"]["use_gpu"] == "true"
    script = (run / "slurm" / "job.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=64",
                 "#SBATCH --partition=gpu", "#SBATCH --time=2-00:00:00", "#SBATCH --qos=high", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@300",
                 f"#SBATCH --output={run}/slurm/%j.out"):
        assert line in script.splitlines(), line
    assert 'train --resume "$RUN_DIR"' in script and f"RUN_DIR={run}" in script
    assert script.count("srun --overlap --nodes=1 --ntasks=1 --gpus-per-node=8 -w") == 2  # both Ray node steps
    assert subprocess.run(["bash", "-n", str(run / "slurm" / "job.sbatch")]).returncode == 0


@pytest.mark.slow
def test_sbatch_refusal_is_one_line(tmp_path, slurm_cluster):  # noqa: F811
    """A job Slurm refuses (no such partition) ends the command with one line and status 2; the run is kept."""
    proc = _submit(["--partition", "nope", "--set", "job.run_name=np"], tmp_path, env=slurm_cluster)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: sbatch: refused ")
    assert (tmp_path / "np" / "slurm" / "job.sbatch").is_file()


def _job_state(job_id: str, env: dict) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    found = re.search(r"JobState=(\w+)", out)
    return found.group(1) if found else "GONE"


def _registered_checkpoints(run: Path) -> list:
    """Checkpoints Ray has registered (every rank reported; a checkpoint_* directory alone may be half written)."""
    snapshot = run / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []


@pytest.mark.slow
def test_two_node_job_survives_preemption(tmp_path, slurm_cluster):  # noqa: F811
    """A real sbatch job over 2 Slurm nodes (Ray head on n1, a Ray node on n2, one Train worker on each) gets the
    time-limit warning (SIGUSR1 to the batch script) after its first checkpoint: it asks the run to stop, both ranks
    checkpoint after the step they are on and end (the driver's exit status 75), and the job requeues itself; the
    requeued job resumes from that very step on a new Ray cluster (no step trained twice) and completes every step;
    Ray's session dir on the head node is removed at the end."""
    # 48 steps: room to signal the job while it still trains, also on a loaded machine
    sets = ["job.max_steps=48", "job.log_every=1", "job.ckpt_every=8", "optim.warmup_steps=1", "data.batch_size=32",
            "eval.enabled=false", "eval.knn_every=0", "job.progress=false", "job.run_name=sl", "job.num_workers=2"]
    proc = _submit(["--nodes", "2", "--cpus-per-node", "1"] + [a for s in sets for a in ("--set", s)], tmp_path,
                   env=slurm_cluster)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"Submitted Slurm job (\d+)", proc.stdout).group(1)
    run = tmp_path / "sl"
    deadline = time.monotonic() + 300
    while not _registered_checkpoints(run):
        assert time.monotonic() < deadline and _job_state(job_id, slurm_cluster) in ("PENDING", "RUNNING")
        time.sleep(0.5)
    ray_dir = Path(f"/tmp/sslray-{job_id}")  # the head node's: n1 and n2 share this machine's /tmp
    assert (ray_dir / "session_latest" / "logs").is_dir()
    # What Slurm sends --requeue-grace seconds before the time limit (--signal=B:USR1@300), sent now.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm_cluster, check=True)
    # A requeued job waits ~2 minutes before it may start again; an operator (here the test) can let it go now.
    while _job_state(job_id, slurm_cluster) != "PENDING":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm_cluster, check=True)
    while (state := _job_state(job_id, slurm_cluster)) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"):
        assert time.monotonic() < deadline, state
        time.sleep(1)
    text = (run / "slurm" / f"{job_id}.out").read_text()
    assert state == "COMPLETED", text[-6000:]
    assert "SIGUSR1 (time limit near): asking the run to checkpoint after the step it is on and stop" in text
    assert f"SIGUSR1 (time limit near): requeueing job {job_id}" in text and "not stopped after" not in text
    assert not ray_dir.exists()  # the finished job removed Ray's session dir
    assert text.count("2 nodes up") == 2  # a Ray cluster over both nodes, once per start of the job
    stopped = re.search(r"Stopped at step (\d+) as asked, checkpointed; resume with --resume", text)
    resumed = re.search(r"Resumed from .* at step (\d+) \(epoch \d+\), reading on from its data position", text)
    assert stopped and resumed and resumed.group(1) == stopped.group(1), text[-6000:]
    assert int(stopped.group(1)) < 48 and not (run / "stop_requested").exists()
    for start in text.split("ssl-pretrain: job")[1:]:
        placed = worker_placement(start)
        assert sorted(placed) == ["0", "1"] and set(placed.values()) == {"127.0.0.2", "127.0.0.3"}, placed
    with (run / "metrics.csv").open() as f:
        steps = [int(line.split(",")[0]) for line in list(f)[1:]]
    assert steps == list(range(1, 49))  # each step trained once
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlrun = client.get_run((run / "mlflow_run_id").read_text().strip())
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.tags["slurm.job_id"] == job_id and mlrun.data.tags["slurm.restart_count"] == "1"
    assert mlrun.data.tags["slurm.nodelist"] == "n[1-2]"


def test_use_gpu_auto_follows_the_ray_cluster():
    """`auto` is whether the Ray cluster has GPUs, not whether the driver's machine shows some: a CPU job's Ray is
    told of none (--num-gpus=0) on a node whose GPUs the driver sees anyway, and workers asking for them waited for
    ever."""
    from cluster.ray_launcher import use_gpu
    from pretrain.config import load_config

    config = Path(__file__).resolve().parents[2] / "configs" / "simclr_digits.yaml"
    auto, on, off = (load_config(config, [f"job.use_gpu={v}"]) for v in ("auto", "true", "false"))
    assert not use_gpu(auto, {"CPU": 16.0, "memory": 1e9}) and not use_gpu(auto, {"CPU": 16.0, "GPU": 0.0})
    assert use_gpu(auto, {"CPU": 16.0, "GPU": 8.0})
    assert use_gpu(on, {"CPU": 16.0}) and not use_gpu(off, {"GPU": 8.0})
