"""The training loop without Ray: `pretrain train --dry-run` writes the run, `torchrun -m pretrain.train` trains it."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.cli import main
from pretrain.steps import extract_step, list_checkpoints
from pretrain.tracking import MLflowTracker
from tests.util import free_port

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "simclr_digits.yaml"

pytestmark = pytest.mark.slow


def _dry_run(tmp_path: Path, name: str, sets: list[str], recipe: Path = RECIPE) -> Path:
    """`pretrain train --dry-run` (in this process: it only checks and writes): the run directory with its config,
    nothing trained."""
    args = ["train", "--config", str(recipe), "--dry-run"]
    for s in [f"job.out_dir={tmp_path}", f"job.run_name={name}", "eval.enabled=false", "eval.knn_every=0",
              "job.progress=false", f"data.cache_dir={tmp_path / 'cache'}", *sets]:
        args += ["--set", s]
    assert main(args) == 0
    return tmp_path / name


def _torchrun_cmd(run: Path) -> list[str]:
    """torchrun's command for 2 ranks training ``run``, its logs beside the run (it leaves a /tmp/torchelastic_* folder
    per start otherwise)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", f"--log-dir={run.parent / 'torchrun-logs'}", "-m", "pretrain.train",
            str(run)]


def _torchrun(run: Path) -> subprocess.CompletedProcess:
    cmd = _torchrun_cmd(run)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _losses(run: Path) -> dict[int, str]:
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    return {int(r[0]): r[1] for r in rows}  # the loss exactly as written


# iBOT: the prototypes unfreeze and the teacher temperature finishes its warmup after the resume point, so the teacher,
# its centers and every schedule (the weight decay's cosine too) must come back exactly for the losses to match; its
# block masks come from torch's generator, so they repeat only if the resume restores it. This case stands for DINO
# (iBOT is DINO plus the patch loss: the same teacher, center and schedule code), BYOL (its EMA target is restored by
# the same code as the teacher, pretrain.ema inside the engine's module) and, on CPU, MAE (its masks come from the
# device's generator, which on CPU is that same generator).
IBOT = (ROOT / "configs" / "ibot_digits.yaml", [
    "method.freeze_last_layer_steps=7", "method.num_prototypes=256", "method.warmup_teacher_temp=0.005",
    "method.warmup_teacher_temp_steps=8", "model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2}",
    "method.mask_prob=0.8", "optim.weight_decay_end=0.4"])


def _killed_after(whole: Path, step: int) -> Path:
    """A copy of run ``whole`` as if killed between step ``step``'s checkpoint and the next step: later checkpoints
    and metric rows gone (a sibling directory "cut")."""
    cut = whole.parent / "cut"
    cut.mkdir()
    (cut / "config.yaml").write_text((whole / "config.yaml").read_text().replace(f"run_name: {whole.name}",
                                                                                   "run_name: cut"))
    name = f"step_{step:07d}"
    shutil.copytree(whole / "checkpoints" / name, cut / "checkpoints" / name)
    head = (whole / "metrics.csv").read_text().splitlines()[: step + 1]
    (cut / "metrics.csv").write_text("\n".join(head) + "\n")
    return cut


@pytest.mark.parametrize("recipe, extra", [(RECIPE, []), IBOT], ids=["simclr", "ibot"])
def test_resume_mid_epoch_repeats_the_uninterrupted_run(tmp_path, capsys, recipe, extra):
    """Killed after its step-5 checkpoint (mid-epoch: rank 0 reads 8 batches an epoch) while copying its step-10 one,
    a run resumed to step 12 starts at step 5 and logs the very losses of the uninterrupted run, also past the epoch
    boundary: same samples, augmentations and RNG (for iBOT the same teacher, centers, schedules and masks, though the
    resumed run also runs the kNN monitor every 3 steps). SimCLR's run then diverges on purpose
    (_diverging_continuation_stops_before_checkpointing)."""
    whole = _dry_run(tmp_path, "whole", ["job.max_steps=12", "job.log_every=1", "job.ckpt_every=5",
                                         "optim.warmup_steps=2", "data.batch_size=128", "data.num_loader_workers=2",
                                         *extra], recipe)
    _torchrun(whole)
    expected = _losses(whole)
    assert sorted(expected) == list(range(1, 13))

    cut = _killed_after(whole, 5)
    if recipe == IBOT[0]:  # the resumed run only watches kNN: it must not change a loss
        config = cut / "config.yaml"
        assert "knn_every: 0\n" in config.read_text()
        config.write_text(config.read_text().replace("knn_every: 0\n", "knn_every: 3\n"))
    torn = cut / "checkpoints" / "step_0000010.partial"  # killed while copying its step-10 checkpoint
    torn.mkdir()
    (torn / "state").write_bytes(b"half")
    again = _torchrun(cut)
    assert "at step 5 (epoch 0), reading on from its data position" in again.stdout
    assert "Data: re-read 640 samples of epoch 0 up to the saved position" in again.stdout  # 5 batches of 128
    assert _losses(cut) == expected
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step_0000005", "step_0000010",
                                                                         "step_0000012"]
    assert sorted(list_checkpoints(cut)) == [5, 10, 12]  # torchrun's layout (Ray's: tests/integration/test_train_e2e)
    if recipe == IBOT[0]:  # the method's parts of the loss are tracked beside it, and add up to it
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        run_id = (whole / "mlflow_run_id").read_text().strip()
        parts = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in
                 ("loss", "cls_loss", "patch_loss")}
        assert sorted(parts["patch_loss"]) == list(range(1, 13))
        for step, loss in parts["loss"].items():
            assert loss == pytest.approx(parts["cls_loss"][step] + parts["patch_loss"][step], rel=1e-5)
        knn = client.get_metric_history((cut / "mlflow_run_id").read_text().strip(), "knn_top1")
        assert sorted(m.step for m in knn) == [6, 9, 12] and all(0.1 < m.value <= 1 for m in knn)
    else:  # the last checkpoint's encoder, merged offline from both ranks' ZeRO-2 partitions, is the final one
        step, out = extract_step(whole)
        final = torch.load(whole / "backbone.pt", weights_only=True)["state_dict"]
        merged = torch.load(out / "backbone.pt", weights_only=True)["state_dict"]
        assert step == 12 and all(torch.equal(final[k], merged[k].float()) for k in final)
        # refused in one line each: resuming the extracted step (an encoder, no checkpoint: it would train anew over
        # it), extracting into a directory that holds other files, listing the checkpoints of a non-run
        busy = tmp_path / "busy"
        busy.mkdir()
        (busy / "notes.txt").write_text("mine\n")
        capsys.readouterr()
        for args, message in ((["train", "--resume", str(out), "--dry-run"], f"--resume: {out} holds an encoder and no "
                               "checkpoint to go on from"),
                              (["extract", "--checkpoint", str(whole), "--out", str(busy)], f"--out: {busy} exists and "
                               "is not an empty directory"),
                              (["extract", "--checkpoint", str(busy), "--list"], f"--checkpoint: {busy} is not a run "
                               "directory (no config.yaml)"),
                              (["extract", "--checkpoint", str(whole), "--list", "--step", "12"], "--step: --list only "
                               "lists the run's checkpoints; give it without --step"),
                              # (it had said the step has "no checkpoint yet")
                              (["extract", "--checkpoint", str(out)], f"--checkpoint: {out} holds an encoder and no "
                               f"training checkpoint (a step extracted from {whole.resolve()}: give that run)")):
            assert main(args) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"error: {message}") and "\n" not in err, err
        assert [p.name for p in busy.iterdir()] == ["notes.txt"] and (out / "backbone.pt").is_file()
        # the checkpoint's own config builds the model: a run whose config.yaml was emptied or edited by hand since
        # gives the same encoder (it had been a traceback of load_state_dict)
        copy = Path(shutil.copytree(whole, tmp_path / "edited", ignore=shutil.ignore_patterns("steps")))
        edited = (whole / "config.yaml").read_text().replace("backbone: convnet", "backbone: resnet18")
        assert "backbone: resnet18" in edited
        for text in ("", edited):
            (copy / "config.yaml").write_text(text)
            step, again = extract_step(copy)
            merged = torch.load(again / "backbone.pt", weights_only=True)["state_dict"]
            assert step == 12 and all(torch.equal(final[k], merged[k].float()) for k in final)
            assert (again / "config.yaml").read_text() == (out / "config.yaml").read_text()
            shutil.rmtree(again)
        _diverging_continuation_stops_before_checkpointing(cut)
        _branch_goes_on_as_the_run_did(whole, expected, capsys)
        _a_crash_after_logging_logs_each_step_once(whole, expected)


def _branch_goes_on_as_the_run_did(whole: Path, expected: dict[int, str], capsys) -> None:
    """`--from-step 10` of the finished run: a new run beside it, in an MLflow run of its own, trains steps 11-12 to
    the very losses the run had (same data position, random state and schedules), its rows up to step 10 the run's;
    the run itself is left as it was."""
    before = sorted((p.relative_to(whole), p.stat().st_mtime_ns) for p in whole.rglob("*"))
    capsys.readouterr()
    assert main(["train", "--resume", str(whole), "--from-step", "10", "--dry-run"]) == 0
    branch = whole.parent / "whole-from-10"
    assert f"Branched from {whole} at step 10" in capsys.readouterr().out
    _torchrun(branch)
    assert _losses(branch) == expected
    assert sorted(list_checkpoints(branch)) == [10, 12]
    assert sorted((p.relative_to(whole), p.stat().st_mtime_ns) for p in whole.rglob("*")) == before
    parent, child = ((run / "mlflow_run_id").read_text().strip() for run in (whole, branch))
    assert parent != child
    from mlflow import MlflowClient

    tags = MlflowClient(f"sqlite:///{whole.parent / 'mlflow.db'}").get_run(child).data.tags  # nested under the run
    assert tags["mlflow.parentRunId"] == tags["branched_from.mlflow_run_id"] == parent
    assert tags["branched_from.step"] == "10" and tags["branched_from.run_dir"] == str(whole)


def _a_crash_after_logging_logs_each_step_once(run: Path, expected: dict[int, str]) -> None:
    """The run as a crash after step 12 had left it, its checkpoints after step 5 lost (its MLflow run and metrics.csv
    hold steps 1-12): the resume, though set to log every 4 steps and to evaluate on fewer samples (keys outside the
    steps), trains steps 6-12 again as they were (the cut run above shows it) and logs none of them twice, in MLflow
    or metrics.csv, and finishes."""
    from mlflow import MlflowClient

    for name in ("step_0000010", "step_0000012"):
        shutil.rmtree(run / "checkpoints" / name)
    (run / "backbone.pt").unlink()
    assert main(["train", "--resume", str(run), "--dry-run", "--set", "job.log_every=4", "--set",
                 "eval.max_samples=100"]) == 0
    again = _torchrun(run)
    assert "at step 5 (epoch 0), reading on from its data position" in again.stdout
    assert "Steps 6-12, logged before, are trained again as they were: not logged twice" in again.stdout
    rows = [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert rows == [str(s) for s in range(1, 13)] and _losses(run) == expected
    client = MlflowClient(f"sqlite:///{run.parent / 'mlflow.db'}")
    run_id = (run / "mlflow_run_id").read_text().strip()
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 13))
    assert sorted(m.step for m in client.get_metric_history(run_id, "images_per_s")) == list(range(1, 13))
    assert client.get_run(run_id).info.status == "FINISHED" and (run / "backbone.pt").is_file()


def _diverging_continuation_stops_before_checkpointing(run: Path) -> None:
    """The finished run continued to step 20 at a learning rate of 1e20: the loss goes NaN at step 14 (step 13's
    update is the first at that rate) on both ranks, which stop together at the flush before the step-15 checkpoint,
    exit non-zero naming the step, and leave the checkpoints and losses already written as they were."""
    before = (_losses(run), sorted(p.name for p in (run / "checkpoints").iterdir()))
    assert main(["train", "--resume", str(run), "--dry-run", "--set", "optim.lr=1e20", "--set",
                 "job.max_steps=20"]) == 0
    cmd = _torchrun_cmd(run)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert (f"[rank{rank}]: pretrain.trainer.NonFiniteLoss: the loss is not finite at step 14 (rank {rank}'s: "
                "nan); the run stopped before checkpointing that state") in proc.stderr, proc.stderr[-3000:]
    after = _losses(run)
    assert {s: after[s] for s in before[0]} == before[0] and sorted(after) == list(range(1, 14))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before[1]


def test_one_plain_process_trains_without_a_launcher(tmp_path, capsys):
    """`python -m pretrain.train RUN` without torchrun: a process group of one (DeepSpeed's LOCAL_RANK set for it, the
    store on a free port, so two such runs can share a machine), checkpointed as one rank and finished, its rows
    logged with each step's rate; a resume with nothing left to train is refused in one line (torchrun's resumes:
    test_resume_mid_epoch_repeats_the_uninterrupted_run)."""
    run = _dry_run(tmp_path, "one", ["job.max_steps=3", "job.log_every=3", "job.ckpt_every=3", "optim.warmup_steps=1",
                                     "data.batch_size=32"])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    cmd = [sys.executable, "-m", "pretrain.train", str(run)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.startswith("No launcher (torchrun sets WORLD_SIZE): training as one process\n")
    assert sorted(_losses(run)) == [1, 2, 3] and (run / "backbone.pt").is_file()
    # each step's row has the rate of that step's update, also where one flush logs several steps
    from pretrain.config import load_config, to_dict
    from pretrain.engine import lr_lambda, peak_lr

    cfg = load_config(run / "config.yaml")
    with (run / "metrics.csv").open() as f:
        logged = [float(r["lr"]) for r in csv.DictReader(f)]
    assert logged == pytest.approx([peak_lr(cfg, 1) * lr_lambda(cfg)(s) for s in range(3)], rel=1e-6)
    assert logged[0] == logged[1] > logged[2]  # the peak after the 1-step warmup, then the cosine
    info = json.loads((run / "checkpoints" / "step_0000003" / "checkpoint.json").read_text())
    assert info["step"] == 3 and info["world_size"] == 1
    assert info["config"] == to_dict(cfg)  # the config it was saved under: what a resume is checked against
    # the same command again: nothing left to train, refused in one line (it had trained anew over the run)
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 2 and again.stderr.strip() == (
        f"error: job.max_steps: one finished at step 3 already; raise job.max_steps to train on (`pretrain eval "
        f"--checkpoint {run}` evaluates it again)")
    # a resume with nothing to train is refused in one line before anything starts, the run left as it was
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: job.max_steps: one finished at step 3 already; raise "
                                               f"job.max_steps to train on (`pretrain eval --checkpoint {run}` "
                                               "evaluates it again)")
    # a copy of the run that kept no file times (`cp -r`, a sync tool; here the checkpoint copied last) is as finished
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, copy_function=shutil.copy)
    later = (copy / "backbone.pt").stat().st_mtime + 60
    for path in [copy / "checkpoints" / "step_0000003", *(copy / "checkpoints" / "step_0000003").rglob("*")]:
        os.utime(path, (later, later))
    assert torch.load(copy / "backbone.pt", weights_only=True)["step"] == 3
    assert main(["train", "--resume", str(copy), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: job.max_steps: copy finished at step 3 already")
    (copy / "backbone.pt").unlink()  # stopped after its last checkpoint, before its end: the resume finishes it...
    capsys.readouterr()
    assert main(["train", "--resume", str(copy), "--dry-run"]) == 2  # ... in an MLflow run of its own
    assert capsys.readouterr().err.strip().startswith(f"error: --resume: {copy} is a copy of {run}, whose MLflow run")
    (copy / "mlflow_run_id").unlink()
    assert main(["train", "--resume", str(copy), "--dry-run"]) == 0
    assert main(["train", "--resume", str(run), "--dry-run", "--set", "job.max_steps=2"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: job.max_steps: 2 is behind one's last checkpoint (step "
                                                      "3); raise it to train on, or take an earlier step's encoder")
    assert "max_steps: 3\n" in (run / "config.yaml").read_text()
    # ... in the MLflow run it began: a store without it is refused before anything starts (it failed in the workers)
    run_id = (run / "mlflow_run_id").read_text().strip()
    other = tmp_path / "other.db"
    for err in (f"sqlite:///{other} does not exist, so it holds no MLflow run {run_id}, which one's",
                f"sqlite:///{other} holds no MLflow run {run_id} (Run with id={run_id} not found), which one's"):
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "--dry-run", "--set", "job.max_steps=4",
                     "--set", f"tracking.uri=sqlite:///{other}"]) == 2
        assert capsys.readouterr().err.strip() == (f"error: tracking.uri: {err} metrics go on in; resume it with the "
                                                   "tracking.uri it began with")
        MLflowTracker(f"sqlite:///{other}", experiment="another").finish()  # a store, of other runs
    assert main(["train", "--resume", str(run), "--dry-run", "--set", "job.max_steps=4"]) == 0  # one step more: taken
    # on Ray: from the run's torchrun checkpoint (step 3), which Ray's record does not know (Ray had started the run
    # over from step 0 and written its rows 1-3 again)
    proc = subprocess.run([sys.executable, "-m", "pretrain.cli", "train", "--resume", str(run), "--set",
                           "job.num_workers=1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"Resumed from {run / 'checkpoints' / 'step_0000003'} at step 3" in proc.stdout + proc.stderr
    # ... and on without Ray, from Ray's checkpoint (step 4), keeping one checkpoint of its own now
    assert main(["train", "--resume", str(run), "--dry-run", "--set", "job.max_steps=5",
                 "--set", "job.keep_checkpoints=1"]) == 0
    resumed = _plain(run)
    assert re.search(rf"Resumed from {re.escape(str(run))}/checkpoint_\S+ at step 4", resumed.stdout), resumed.stdout
    from mlflow import MlflowClient

    logged = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).data  # max_steps 5 now, 3 logged
    assert logged.params["job.max_steps"] == "3" and logged.tags["resumed.job.max_steps"] == "5"
    steps = [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5]  # each step trained once
    assert sorted(list_checkpoints(run)) == [4, 5]  # torchrun's step 3 deleted past keep_checkpoints; Ray's is Ray's
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000005"]
    (run / "backbone.pt").unlink()  # as a run still training has none: eval points at its checkpoints
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --checkpoint: {run} has no backbone.pt yet (training writes it "
                                               f"at the end); `pretrain extract --checkpoint {run}` takes the encoder "
                                               "of its latest checkpoint (step 5) out as a run directory to evaluate")
    step = run / "checkpoints" / "step_0000005"  # a checkpoint itself: the command that takes its encoder out
    assert main(["eval", "--checkpoint", str(step)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --checkpoint: {step} is a training checkpoint (step 5), not "
                                               f"an encoder; `pretrain extract --checkpoint {run} --step 5` takes its "
                                               "encoder out as a run directory to evaluate")


def test_ctrl_c_of_a_plain_process_ends_in_one_line_and_the_run_killed(tmp_path):
    """Ctrl-C (SIGINT) of `python -m pretrain.train RUN` once it has checkpointed: exit 130, one line naming the latest
    checkpoint and the way on (a traceback of the step it was in had been printed), the MLflow run KILLED (it had been
    FAILED)."""
    import signal

    from mlflow import MlflowClient

    run = _dry_run(tmp_path, "ctrl-c", ["job.max_steps=100000", "job.ckpt_every=2", "job.log_every=2",
                                        "data.batch_size=32"])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.train", str(run)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list_checkpoints(run) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert list_checkpoints(run), "no checkpoint within 240 s"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out + err)[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    latest = max(list_checkpoints(run))
    assert err.strip().splitlines()[-1] == (f"Stopped by SIGINT; its latest checkpoint is step {latest}; the same "
                                            f"command goes on from there (`pretrain stop {run}` has a run checkpoint "
                                            "before it ends)")
    run_id = (run / "mlflow_run_id").read_text().strip()
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).info.status == "KILLED"


def _plain(run: Path) -> subprocess.CompletedProcess:
    """``python -m pretrain.train RUN`` as one process, without a launcher."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", str(run)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def test_a_run_asked_to_stop_checkpoints_after_its_step_and_goes_on_from_there(tmp_path, capsys):
    """`pretrain stop RUN` while 2 torchrun ranks train (only rank 0 reads the request; the ranks agree on it at every
    step): both checkpoint at the same step, long before the next logged one (it had waited for that: a run logging
    every few minutes outlasted a scheduler's grace), and end, the run's MLflow run KILLED, no encoder written; the same
    command then goes on from that step and finishes, each step trained once. A request left over from a run that was
    not training is dropped when it next starts."""
    from mlflow import MlflowClient

    run = _dry_run(tmp_path, "stop", ["job.max_steps=1000", "job.log_every=100", "job.ckpt_every=1000",
                                      "optim.warmup_steps=1", "data.batch_size=32"])
    capsys.readouterr()
    cmd = _torchrun_cmd(run)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.csv").is_file() or len(_losses(run)) < 100:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        asked_after = max(_losses(run))
        assert main(["stop", str(run)]) == 0
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    stopped = max(_losses(run))
    assert asked_after < stopped < 200, (asked_after, stopped)  # not the next logged step (200)
    assert f"Stopped at step {stopped} as asked, checkpointed; the same command goes on from there" in out
    assert sorted(list_checkpoints(run)) == [stopped] and not (run / "backbone.pt").exists()
    assert not (run / "stop_requested").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (run / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"
    assert capsys.readouterr().out.startswith(f"Asked {run} to stop: it checkpoints after the step it is on")
    # on to 4 steps past it, a stale request (this run was not training) dropped at the start
    assert main(["train", "--resume", str(run), "--dry-run", "--set", f"job.max_steps={stopped + 4}"]) == 0
    assert main(["stop", str(run)]) == 0
    assert "No `pretrain train` holds it now" in capsys.readouterr().out
    resumed = _torchrun(run)
    assert f"Resumed from {run / 'checkpoints' / f'step_{stopped:07d}'} at step {stopped}" in resumed.stdout
    assert f"Done: {run}" in resumed.stdout and (run / "backbone.pt").is_file()
    steps = [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, stopped + 5))  # each step trained once
    assert client.get_run(run_id).info.status == "FINISHED"


def test_fp16_run_resumes_with_its_loss_scale(tmp_path):
    """zero.precision fp16 under ZeRO-2 (the run's own scale, pretrain.engine.LossScale): the first step overflows at
    the initial scale of 2**16 and is skipped, the scale halves (until a step passes), and MLflow has the scale and
    the count of skipped steps at every step; killed after its step-3 checkpoint, the run resumed logs the very
    losses, scales and counts of the uninterrupted one (they come back from the checkpoint: a scale of 2**16 again
    would log another)."""
    from mlflow import MlflowClient

    whole = _dry_run(tmp_path, "whole", ["job.max_steps=5", "job.log_every=1", "job.ckpt_every=3", "zero.stage=2",
                                         "zero.precision=fp16", "optim.warmup_steps=2", "data.batch_size=32"])
    _plain(whole)
    cut = _killed_after(whole, 3)
    _plain(cut)
    assert _losses(cut) == _losses(whole) and sorted(_losses(whole)) == [1, 2, 3, 4, 5]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def logged(run: Path) -> dict[str, dict[int, float]]:
        run_id = (run / "mlflow_run_id").read_text().strip()
        return {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in
                ("loss_scale", "skipped_steps")}

    history = logged(whole)
    scales, skipped = history["loss_scale"], history["skipped_steps"]
    assert sorted(scales) == sorted(skipped) == [1, 2, 3, 4, 5]
    assert skipped[1] == 1 and skipped[5] >= 1  # the first steps skipped (2 here), then none
    assert all(scales[s] == 2.0**16 / 2 ** skipped[s] for s in scales)  # halved at each skip, not yet grown
    assert logged(cut) == {k: {s: v for s, v in h.items() if s > 3} for k, h in history.items()}


def test_sgd_run_of_two_ranks_resumes_on_one(tmp_path):
    """SimSiam's SGD under ZeRO-2, checkpointed by 2 torchrun ranks, resumed by one plain process: the checkpoint is
    converted to DeepSpeed's universal form (SGD's momentum carried under Adam's names, which DeepSpeed's converter
    alone refuses) and the run goes on to its end (tests/pretrain/test_elastic checks such a continuation exactly)."""
    run = _dry_run(tmp_path, "sgd", ["job.max_steps=2", "job.ckpt_every=2", "job.log_every=1", "data.batch_size=32",
                                     "zero.stage=2", "model.proj_hidden_dim=32", "model.proj_out_dim=32",
                                     "method.predictor_hidden_dim=8"], ROOT / "configs" / "simsiam_digits.yaml")
    _torchrun(run)
    assert main(["train", "--resume", str(run), "--dry-run", "--set", "job.max_steps=4"]) == 0
    proc = _plain(run)
    assert "holds the ZeRO-2 partitions of 2 ranks and this run has 1: converting it" in proc.stdout
    assert sorted(list_checkpoints(run)) == [2, 4] and sorted(_losses(run)) == [1, 2, 3, 4]
    assert all(np.isfinite(float(v)) for v in _losses(run).values())


def test_clip_trains_on_captions_and_scores_zero_shot(tmp_path, capsys):
    """`pretrain train --dry-run` writes the run, 2 torchrun processes train it (both ZeRO partitions checkpointed).
    CLIP through the real loop on 2 ranks: the captions ride with their images from the shards, each rank contrasts
    its pairs with both ranks' (gathered) embeddings, the loss falls, the learned logit scale is tracked, the whole
    model is kept beside the backbone, and zero-shot classification with unseen prompt wordings beats its random init
    (chance) after 60 steps; `pretrain eval` recomputes the same report from the run directory."""
    from mlflow import MlflowClient

    # the recipe's 1e-3, as half of it scaled linearly from a global batch of 64 to the 2 ranks' 128
    run = _dry_run(tmp_path, "clip", ["job.max_steps=60", "job.log_every=5", "job.ckpt_every=60",
                                      "optim.warmup_steps=5", "data.batch_size=64", "eval.enabled=true",
                                      "optim.lr=5e-4", "optim.lr_scaling=linear", "optim.base_batch_size=64"],
                   ROOT / "configs" / "clip_digits.yaml")
    assert (run / "config.yaml").is_file() and not (run / "metrics.csv").exists()  # the dry run trained nothing
    proc = _torchrun(run)
    assert "Learning rate: optim.lr 0.0005 scaled (linear) from a global batch of 64 to 128: 0.001" in proc.stdout
    files = {p.name for p in (run / "checkpoints" / "step_0000060" / "state").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files
    losses = [float(v) for v in _losses(run).values()]
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    assert (run / "model.pt").is_file() and (run / "backbone.pt").is_file()
    report = json.loads((run / "eval.json").read_text())
    assert report["zeroshot_top1"] >= report["random_init"]["zeroshot_top1"] + 0.15, report
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (run / "mlflow_run_id").read_text().strip()
    scales = [m.value for m in client.get_metric_history(run_id, "logit_scale")]
    assert len(scales) == 60 and scales[0] == pytest.approx(1 / 0.07, rel=1e-3)
    assert max(m.value for m in client.get_metric_history(run_id, "lr")) == pytest.approx(1e-3)
    assert client.get_run(run_id).data.metrics["eval/zeroshot_top1"] == pytest.approx(report["zeroshot_top1"])

    out = tmp_path / "again.json"
    assert main(["eval", "--checkpoint", str(run), "--out", str(out)]) == 0
    assert "zeroshot_top1" in capsys.readouterr().out
    again = json.loads(out.read_text())
    assert again["zeroshot_top1"] == report["zeroshot_top1"]
    assert again["random_init"]["zeroshot_top1"] == report["random_init"]["zeroshot_top1"]


def test_beit_trains_on_a_tokenizer_run_and_evaluates_without_it(tmp_path, capsys):
    """BEiT's two stages through the real loop on 2 ranks, accumulating 2 micro-batches a step. A vqvae run saves its
    whole tokenizer (model.pt)
    with a live codebook, its codebook statistics tracked; a BEiT dry run for other images is refused in one line
    naming the key; BEiT on that tokenizer trains (its loss falls from about ln 64), killed after a checkpoint and
    resumed it logs the very losses of the uninterrupted run (the same masks), and, with the tokenizer run deleted,
    `pretrain eval` still evaluates it (the tokenizer is not part of the BEiT model)."""
    from mlflow import MlflowClient

    small = "model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2, global_pool: mean}"
    # both stages accumulate 2 micro-batches of 32 a step: the codebook folds in both, a resume lines them up again
    tok = _dry_run(tmp_path, "tok", ["job.max_steps=20", "job.log_every=5", "job.ckpt_every=20",
                                     "optim.warmup_steps=2", "data.batch_size=32", "optim.accum_steps=2",
                                     "method.vocab_size=64", small],
                   ROOT / "configs" / "vqvae_digits.yaml")
    _torchrun(tok)
    assert (tok / "model.pt").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    usage = client.get_metric_history((tok / "mlflow_run_id").read_text().strip(), "code_usage")
    assert len(usage) == 20 and usage[-1].value > 0.5, [m.value for m in usage]

    beit = ROOT / "configs" / "beit_digits.yaml"
    capsys.readouterr()
    assert main(["train", "--config", str(beit), "--dry-run", "--set", f"job.out_dir={tmp_path}", "--set",
                 f"method.tokenizer={tok}", "--set", "method.vocab_size=64", "--set", "data.image_size=32"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: data.image_size: 32 differs from the "
                                                                       "tokenizer's 16")
    run = _dry_run(tmp_path, "beit", ["job.max_steps=24", "job.log_every=1", "job.ckpt_every=12",
                                      "optim.warmup_steps=2", "data.batch_size=32", "optim.accum_steps=2",
                                      "method.vocab_size=64", small, f"method.tokenizer={tok}"], beit)
    _torchrun(run)
    expected = _losses(run)
    losses = [float(v) for v in expected.values()]
    assert len(losses) == 24 and abs(losses[0] - np.log(64)) < 0.5, losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
    cut = _killed_after(run, 12)
    again = _torchrun(cut)  # the tokenizer, loaded on the first step after the resume, draws no randomness
    assert "at step 12" in again.stdout and _losses(cut) == expected
    shutil.rmtree(tok)
    capsys.readouterr()
    # with fine-tuning under MAE's layer-wise lr decay (a ViT's blocks at 0.75 ** (depth - i) of the rate)
    assert main(["eval", "--checkpoint", str(run), "--finetune-epochs", "1", "--finetune-layer-decay", "0.75"]) == 0
    assert "knn_top1" in capsys.readouterr().out and (run / "eval.json").is_file()
    report = json.loads((run / "eval.json").read_text())
    assert 0 <= report["finetune_top1"] <= 1 and 0 <= report["random_init"]["finetune_top1"] <= 1
