"""End to end through the real stack: CLI -> local Ray cluster -> 2 Ray Train workers -> DeepSpeed ZeRO-3 (DINO's EMA
teacher on ZeRO-3 partitions) -> MLflow server over HTTP, with multi-crop DALI views; the teacher's backbone is
evaluated against its random init; a worker killed mid-run is restarted by Ray and resumes from the latest checkpoint.
(SimCLR goes through the same stack in tests/integration/test_join_cluster.py and tests/cluster/, where `--resume`
continues Ray runs of requeued Slurm jobs and restarted Kubernetes pods.)"""

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from pretrain.cli import main
from pretrain.trainer import RANK_STATE_DIR

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "simclr_digits.yaml"
DINO = ROOT / "configs" / "dino_digits.yaml"
STEPS = 120

pytestmark = pytest.mark.slow


def _pretrain(args: list[str], log: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "pretrain.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                              cwd=ROOT, timeout=timeout)
    return proc


def _history(run_dir: Path) -> dict[int, float]:
    with (run_dir / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mlflow_server):
    """A 120-step DINO run (a half-width ConvNet) of 2 workers with ZeRO-3, tracked on the test's mlflow server,
    evaluated at the end. With job.max_failures=1, rank 1's worker is SIGKILLed (as a lost node or the OOM killer
    would) once Ray has registered the step-60 checkpoint and the run has gone on to step 70: Ray starts the group
    again, which resumes from it."""
    out = tmp_path_factory.mktemp("runs")
    # the recipe's ConvNet at half width: the steps are compute-bound, and this one takes a quarter of the work
    sets = [f"--set={s}" for s in ["data.batch_size=96", "model.backbone_kwargs={norm: gn, width: 0.5}",
                                    f"job.max_steps={STEPS}", "job.log_every=10", "job.ckpt_every=60",
                                    "job.progress=false", f"job.out_dir={out}", "job.run_name=e2e",
                                    f"data.cache_dir={out / 'cache'}", "zero.stage=3", "job.num_workers=2",
                                    "method.freeze_last_layer_steps=10", "eval.knn_every=60",
                                    "tracking.system_metrics_s=2", "job.max_failures=1"]]
    log = out / "train.log"
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pretrain.cli", "train", "--config", str(DINO),
                                 "--tracking-uri", mlflow_server, *sets], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            _kill_rank_1_after(proc, log, out / "e2e", checkpoint=60, step=70)
            assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    return out / "e2e", log


def _kill_rank_1_after(proc: subprocess.Popen, log: Path, run_dir: Path, *, checkpoint: int, step: int) -> None:
    """SIGKILL the worker of rank 1 once Ray's checkpoint manager holds step ``checkpoint`` (a checkpoint reported but
    not yet registered would be lost with the worker) and metrics.csv has reached ``step``."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline, victim = time.monotonic() + 600, None
    while time.monotonic() < deadline and proc.poll() is None:
        victim = victim or re.search(r"pid=(\d+)\) world_rank=1,", log.read_text())
        registered = snapshot.is_file() and f'"step": {checkpoint}' in snapshot.read_text().replace('":', '": ')
        done = _history(run_dir) if (run_dir / "metrics.csv").is_file() else {}
        if victim and registered and done and max(done) >= step:
            os.kill(int(victim.group(1)), signal.SIGKILL)
            return
        time.sleep(0.5)
    pytest.fail("the run ended or stalled before its worker could be killed: " + log.read_text()[-3000:])


def test_killed_worker_was_restarted_and_resumed(trained):
    """The restarted group resumed from the step-60 checkpoint at its data position, trained steps 61-70 (or more)
    again as they were, without logging them twice, and finished: a finished run's files, each step once in
    metrics.csv."""
    run_dir, log = trained
    text = log.read_text()
    assert re.search(r"Resumed from \S+ at step 60 \(epoch \d+\), reading on from its data position", text)
    assert re.search(r"Steps 61-(\d+), logged before, are trained again as they were: not logged twice", text)
    with (run_dir / "metrics.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == list(range(1, STEPS + 1))
    assert (run_dir / "backbone.pt").is_file() and (run_dir / "eval.json").is_file()


def test_teacher_backbone_learns(trained):
    """After 120 steps the teacher backbone (backbone.pt, evaluated at the end) beats the same network at its random
    init on digits by kNN and KMeans NMI (measured on an AMD EPYC: kNN 0.929 vs 0.882, NMI 0.577 vs 0.450; the
    float rounding of other CPUs gives other runs)."""
    run_dir, _ = trained
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["knn_top1"] > report["random_init"]["knn_top1"] + 0.02, report
    assert report["kmeans_nmi"] > report["random_init"]["kmeans_nmi"] + 0.02, report
    saved = torch.load(run_dir / "backbone.pt", weights_only=True)
    assert saved["config"]["method"]["name"] == "dino"
    assert saved["step"] == report["step"] == STEPS  # what a resume tells a finished run by
    assert not any(k.startswith(("teacher.", "student.", "head.")) for k in saved["state_dict"])


def test_knn_monitor_curve(trained, mlflow_server):
    """eval.knn_every=60: the teacher's kNN top-1 at steps 0, 60 and 120 in MLflow, both ranks embedding the digits
    from ZeRO-3 partitions; it starts at the random init's and ends at eval.json's (the same protocol), one test
    image apart at most."""
    run_dir, log = trained
    report = json.loads((run_dir / "eval.json").read_text())
    client = MlflowClient(mlflow_server)
    curve = {m.step: m.value for m in client.get_metric_history((run_dir / "mlflow_run_id").read_text().strip(),
                                                                 "knn_top1")}
    assert sorted(curve) == [0, 60, STEPS]
    assert curve[0] == pytest.approx(report["random_init"]["knn_top1"], abs=1 / 450 + 1e-9)
    assert curve[STEPS] == pytest.approx(report["knn_top1"], abs=1 / 450 + 1e-9)
    assert f"step 60: kNN top-1 {curve[60]:.4f}" in log.read_text()


def test_extract_a_step_and_evaluate_it(trained, mlflow_server, capsys, tmp_path):
    """`pretrain extract` merges a Ray checkpoint's two ZeRO-3 partitions offline: the latest (step 120) gives the
    very backbone.pt training wrote at its end; step 60's directory evaluates like a finished run, to the kNN
    monitor's step-60 point; a missing step or a second extract of one is refused in one line."""
    from pretrain.evaluate import evaluate_checkpoint

    run_dir, _ = trained
    assert main(["extract", "--checkpoint", str(run_dir), "--list"]) == 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["60", str(STEPS)]
    assert main(["extract", "--checkpoint", str(run_dir)]) == 0
    assert main(["extract", "--checkpoint", str(run_dir), "--step", "60"]) == 0
    assert f"Wrote the encoder of step 60 of {run_dir} to {run_dir / 'steps' / 'step_0000060'}" in \
        capsys.readouterr().out
    final = torch.load(run_dir / "backbone.pt", weights_only=True)["state_dict"]
    latest = torch.load(run_dir / "steps" / f"step_{STEPS:07d}" / "backbone.pt", weights_only=True)["state_dict"]
    assert final.keys() == latest.keys()
    assert all(torch.equal(final[k], latest[k].float()) for k in final)
    report = evaluate_checkpoint(run_dir / "steps" / "step_0000060")
    curve = {m.step: m.value for m in MlflowClient(mlflow_server).get_metric_history(
        (run_dir / "mlflow_run_id").read_text().strip(), "knn_top1")}
    assert report["knn_top1"] == pytest.approx(curve[60], abs=1 / 450 + 1e-9)
    assert main(["extract", "--checkpoint", str(run_dir), "--step", "60"]) == 2
    assert main(["extract", "--checkpoint", str(run_dir), "--step", "61"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --out: {run_dir / 'steps' / 'step_0000060'} already holds an encoder; extract overwrites nothing",
        f"error: --step: {run_dir} has no checkpoint of step 61; it has steps 60, {STEPS}"]
    # a checkpoint cut short (a disk that filled while it was written): one line naming it (it had been a traceback)
    copy = Path(shutil.copytree(run_dir, tmp_path / "copy", ignore=shutil.ignore_patterns("steps")))
    from pretrain.steps import list_checkpoints

    damaged = list_checkpoints(copy)[60]
    states = sorted((damaged / "state").glob("*model_states.pt"))[0]
    states.write_bytes(states.read_bytes()[:1000])
    assert main(["extract", "--checkpoint", str(copy), "--step", "60"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --step: checkpoint {damaged} (step 60) does not load (") and "\n" not in err
    assert err.endswith("damaged (a job stopped or a disk filled while it was written?); `--list` names the others")


def test_loss_leaves_uniform(trained):
    """The loss starts near ln K (teacher and student near uniform) and ends clearly below it: no collapse to the
    uniform distribution."""
    run_dir, _ = trained
    hist = _history(run_dir)
    assert sorted(hist) == list(range(1, STEPS + 1))
    ln_k = math.log(yaml.safe_load((run_dir / "config.yaml").read_text())["method"]["num_prototypes"])
    assert abs(hist[1] - ln_k) < 0.5, (hist[1], ln_k)
    last = sum(hist[s] for s in range(STEPS - 9, STEPS + 1)) / 10
    assert last < ln_k - 0.5, (last, ln_k)


def test_checkpoints_hold_both_ranks(trained):
    """The checkpoints Ray reported (steps 60 and 120) hold both ranks' ZeRO-3 partitions (teacher included) and both
    ranks' data positions."""
    run_dir, _ = trained
    ckpts = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 2
    files = {p.name for p in (ckpts[-1] / "state").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= files
    assert {p.name for p in (ckpts[-1] / "ranks").iterdir()} == {"rank_00000.pt", "rank_00001.pt"}


def test_mlflow_server_has_params_and_metrics(trained, mlflow_server):
    """Rank 0 logged the resolved config, per-step metrics, the node's system metrics and the run's artifacts to the
    mlflow server over HTTP."""
    run_dir, _ = trained
    client = MlflowClient(mlflow_server)
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["method.name"] == "dino" and params["zero.stage"] == "3" and params["data.local_views"] == "2"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, STEPS + 1))  # 61-70 once, though trained twice
    hist = _history(run_dir)
    assert all(abs(m.value - hist[m.step]) < 1e-6 for m in losses)
    for name in ("lr", "images_per_s", "step_time_s", "epoch"):
        assert len(client.get_metric_history(run.info.run_id, name)) >= STEPS
    # MLflow's system metrics, sampled every 2 s by the one node's local rank 0 (no GPU here: no gpu rows)
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    memory = client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
    assert len(cpu) >= 5 and all(0 <= m.value <= 100 for m in cpu) and min(m.value for m in memory) > 0
    assert not any(k.startswith("system/gpu") for k in run.data.metrics)
    assert run.data.metrics["eval/knn_top1"] == pytest.approx(json.loads((run_dir / "eval.json").read_text())
                                                              ["knn_top1"])
    assert {"config.yaml", "backbone.pt", "eval.json", "eval-map.png", "loss_curve.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)}


def test_eval_command_reproduces_the_report(trained):
    """`pretrain eval --checkpoint RUN_DIR` recomputes the end-of-training report from backbone.pt, identically."""
    run_dir, _ = trained
    out = run_dir.parent / "eval_again.json"
    assert main(["eval", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    assert (run_dir.parent / "eval_again-map.png").is_file()  # its embedding map beside it
    again, first = json.loads(out.read_text()), json.loads((run_dir / "eval.json").read_text())
    for key in ("knn_top1", "linear_top1", "fewshot_1", "fewshot_5", "kmeans_nmi", "kmeans_ari"):
        assert again[key] == pytest.approx(first[key], abs=1e-6), key
    assert again["step"] == first["step"] == STEPS  # the step of the encoder scored


def test_resume_on_one_worker_goes_on_from_the_two_workers_checkpoint(trained):
    """`--resume` with another job.num_workers: the step-120 checkpoint of 2 ZeRO-3 ranks (DINO's teacher among the
    partitions) is converted once to DeepSpeed's universal form beside them and loaded by 1 worker, which trains on
    to step 130 where the 2 left off (the loss stays at its trained level, far below the ln K of an untrained DINO)
    and writes 1-rank checkpoints. A checkpoint directory that a job stopped mid-write left with rank 1's files only
    (newer than every other; Ray never registered it) is passed over, by the driver's checks as by Ray. Last in this
    module: it extends the run the tests above read."""
    run_dir, _ = trained
    from pretrain.steps import list_checkpoints

    ckpt = list_checkpoints(run_dir)[120]
    zero_files = sorted(p.name for p in (ckpt / "state").iterdir())
    half = run_dir / "checkpoint_2999-01-01_00-00-00.000000"
    (half / "state").mkdir(parents=True)
    for name in zero_files:
        if "rank_1_" in name:
            shutil.copy(ckpt / "state" / name, half / "state" / name)
    (half / RANK_STATE_DIR).mkdir()
    shutil.copy(ckpt / RANK_STATE_DIR / "rank_00001.pt", half / RANK_STATE_DIR)
    assert sorted(list_checkpoints(run_dir)) == [60, 120]
    log = run_dir.parent / "resume_one_worker.log"
    proc = _pretrain(["train", "--resume", str(run_dir), "--set", "job.num_workers=1", "--set", "job.max_steps=130",
                      "--set", "eval.enabled=false"], log, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert f"Checkpoint {ckpt.name} holds the ZeRO-3 partitions of 2 ranks and this run has 1: converting" in text
    assert "Resumed from" in text and "at step 120 (epoch" in text and "now split over 1" in text
    assert sorted(p.name for p in (ckpt / "state").iterdir()) == zero_files  # the ZeRO form as it was
    assert (ckpt / "state_universal" / "module.pt").is_file()
    hist = _history(run_dir)
    assert sorted(hist) == list(range(1, 131))
    before, after = (sum(hist[s] for s in steps) / 10 for steps in (range(111, 121), range(121, 131)))
    ln_k = math.log(yaml.safe_load((run_dir / "config.yaml").read_text())["method"]["num_prototypes"])
    assert abs(after - before) < 0.25 * (ln_k - before), (before, after, ln_k)
    last = list_checkpoints(run_dir)[130]
    assert json.loads((last / "checkpoint.json").read_text())["world_size"] == 1
    files = {p.name for p in (last / "state").iterdir()}
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in files
    assert not any("rank_1" in f for f in files)
