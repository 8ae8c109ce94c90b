"""The training loop, top to bottom: one function every launcher (Ray, torchrun, Slurm) ends up calling.

It sees plain torch, the DeepSpeed engine (through ``pretrain.engine`` and ``pretrain.checkpoint``) and a
:class:`Session` that the launcher provides for where checkpoints come from and go to. Ray is never imported here.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from data_pipeline.loader import make_train_stream
from pretrain import dist
from pretrain.checkpoint import (
    UNIVERSAL_TAG,
    full_state_dict,
    load_checkpoint,
    save_checkpoint,
    staging_dir,
    to_universal,
)
from pretrain.config import Config, dump_config, to_dict
from pretrain.data import resolve_shards
from pretrain.engine import build_engine
from pretrain.methods import METHODS
from pretrain.steps import CHECKPOINT_INFO, STOP_FILE, checkpoint_info
from pretrain.sync_bn import convert_sync_bn
from pretrain.tracking import UNSENT_FILE, default_artifact_location, default_tracking_uri, make_tracker

RUN_ID_FILE = "mlflow_run_id"
RUN_DIR_TAG = "run_dir"
"""The MLflow tag naming the run directory the run is trained in (a copy of the directory is told by it)."""
BRANCH_FILE = "branched_from.json"
"""In a run begun by ``--from-step`` (``pretrain.preflight.branch_run``): the run, step and MLflow run it went on
from."""
HISTORY_FILE = "metrics.csv"
RANK_STATE_DIR = "ranks"
"""Checkpoint sub-directory with one file per rank: its data position and RNG states (``rank_00000.pt``, ...)"""
OUTSIDE_THE_STEPS = frozenset({
    "eval.enabled", "eval.dataset", "eval.max_samples", "eval.embedding_map", "eval.finetune_epochs",
    "eval.finetune_layer_decay", "job.log_every", "job.ckpt_every", "job.keep_checkpoints", "job.max_failures",
    "job.progress", "tracking.system_metrics_s",
})
"""Config keys that a resume may change and still train the steps again as they were (each step is logged with its
own values, whatever the logging interval): what is evaluated at the end, how often the run logs and checkpoints and
how many checkpoints it keeps, its restarts, its progress bar and system metrics. (``eval.knn_every`` logs points of
its own at steps; ``job.max_steps`` moves the schedules.)"""


class Session(Protocol):
    """What a launcher gives the loop: the checkpoint to resume from, and where reported checkpoints go."""

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]: ...

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None: ...


class LocalSession:
    """Checkpoints under ``<run_dir>/checkpoints/step_XXXXXXX`` (torchrun or a single process); a run begun on Ray
    goes on from its latest checkpoint of either layout (``pretrain.steps.list_checkpoints``).

    Every rank copies its files into ``step_XXXXXXX.partial``, which rank 0 renames once all have: a job killed while
    copying leaves a ``.partial`` directory that no resume picks up, never a half-written ``step_`` one. Past ``keep``
    (``job.keep_checkpoints``; 0 keeps all) rank 0 then deletes the oldest, as Ray's ``num_to_keep`` does for its own.
    """

    def __init__(self, run_dir: Path, keep: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep = keep

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        from pretrain.steps import list_checkpoints

        found = list_checkpoints(self.run_dir)
        yield found[max(found)] if found else None

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is None:
            return
        import shutil

        dest = self.root / f"step_{int(metrics['step']):07d}"
        partial = dest.with_name(dest.name + ".partial")
        dist.barrier()
        if dist.rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)  # left by a job killed while copying
            partial.mkdir(parents=True)
        dist.barrier()
        shutil.copytree(checkpoint_dir, partial, dirs_exist_ok=True)  # each rank adds its own ZeRO partition
        dist.barrier()
        if dist.rank() == 0:
            old = dest.with_name(dest.name + ".replaced")
            if dest.exists():  # the same step saved again by a rerun: keep one complete copy at every moment
                dest.rename(old)
            partial.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
            if self.keep:
                saved = sorted((p for p in self.root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()),
                               key=lambda p: int(p.name[5:]))
                for stale in saved[: -self.keep]:  # renamed first: a job killed while deleting leaves no step_ half
                    shutil.rmtree(stale.rename(stale.with_name(stale.name + ".stale")), ignore_errors=True)
        dist.barrier()


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_method(cfg: Config, *, distributed: bool):
    """The method at its seeded initialisation (the same init gives the 'random init' baseline of the evaluation)."""
    seed_everything(cfg.job.seed)
    gather = dist.gather_with_grad if distributed and cfg.method.gather_distributed else None
    reduce = dist.all_reduce_mean if distributed else None
    method = METHODS[cfg.method.name](cfg, gather=gather, reduce=reduce, rank=dist.rank())
    if not (distributed and cfg.model.sync_bn):
        return method
    return convert_sync_bn(method, dist.consecutive_group(cfg.model.sync_bn_group))


def train(cfg: Config, run_dir: str | Path, session: Session) -> dict[str, float]:
    """Train ``cfg`` on this process's rank; rank 0 tracks, plots and evaluates. Returns the last metrics."""
    run_dir = Path(run_dir)
    rank, world = dist.rank(), dist.world_size()
    device = torch.device(f"cuda:{dist.local_rank()}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    method = build_method(cfg, distributed=world > 1).to(device)
    step, epoch, resume = 0, 0, None
    with session.latest_checkpoint() as ckpt:
        saved_world = int(checkpoint_info(ckpt)["world_size"]) if ckpt is not None else world
        universal = saved_world != world and cfg.zero.stage > 0
        if universal:
            _prepare_universal(ckpt, cfg.zero.stage, saved_world, world, rank)
        engine = build_engine(method, cfg, universal=universal)
        # Every rank built the same init from the same seed; from here each draws its own randomness (MAE's masks,
        # stochastic depth), as the reference implementations seed each rank apart. A resume restores these streams.
        seed_everything(cfg.job.seed * 1000 + 1 + rank)
        if ckpt is not None:
            state = load_checkpoint(engine, ckpt, universal=universal)
            step, epoch = int(state["step"]), int(state["epoch"])
            if engine.fp16_scale is not None and "loss_scale" in state:  # else (saved without fp16) from the start
                engine.fp16_scale.load_state_dict(state["loss_scale"])
            # a data position and random streams are a rank's own: under another number of ranks, each reads its new
            # share of the epoch from the start
            resume = _load_rank_state(ckpt, rank) if saved_world == world else None
            if rank == 0:
                where = ("its data position" if resume else "the start of that epoch " + (
                    "(no data position saved)" if saved_world == world else
                    f"(written by {saved_world} ranks, now split over {world}: its samples read so far come again)"))
                print(f"Resumed from {ckpt} at step {step} (epoch {epoch}), reading on from {where}.", flush=True)

    resumed_at = step
    stop_file = run_dir / STOP_FILE
    if rank == 0:
        stop_file.unlink(missing_ok=True)  # asked of an earlier start (the request it ended on, or one it never saw)
    tracker, changed = _open_tracker(cfg, run_dir, rank)
    if rank == 0 and cfg.optim.lr_scaling != "none":
        from pretrain.engine import peak_lr

        batch = cfg.data.batch_size * world * cfg.optim.accum_steps
        print(f"Learning rate: optim.lr {cfg.optim.lr:g} scaled ({cfg.optim.lr_scaling}) from a global batch of "
              f"{cfg.optim.base_batch_size} to {batch}: {peak_lr(cfg, world):g}", flush=True)
    history = _History(run_dir / HISTORY_FILE, enabled=rank == 0)
    # the steps since the checkpoint that the interrupted run had logged: not logged again where they come again as
    # they were (rank 0; -1 elsewhere and on a new run)
    exact = resume is not None and not set(changed) - OUTSIDE_THE_STEPS
    replayed = _replayed(tracker, history, step, exact=exact) if rank == 0 else -1
    needs_text = METHODS[cfg.method.name].needs_text
    stream = make_train_stream(
        resolve_shards(cfg.data, captions=needs_text),
        batch_size=cfg.data.batch_size,
        aug=cfg.data.aug,
        image_size=cfg.data.image_size,
        channels=cfg.data.channels,
        rank=rank,
        world_size=world,
        num_workers=cfg.data.num_loader_workers,
        dali_threads=cfg.data.dali_threads,
        shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.job.seed,
        start_epoch=epoch,
        num_views=cfg.data.num_views,
        local_views=cfg.data.local_views,
        local_size=cfg.data.local_size,
        local_crop_scale=cfg.data.local_crop_scale,
        view_augs=cfg.data.view_augments(),
        local_aug=cfg.data.local_augment() if cfg.data.local_aug else None,  # None: the same, by default
        text=needs_text,
        device=device.type,
        resume=resume["data"] if resume else None,
    )
    if resume:
        _set_rng_state(resume["rng"])  # after the seeded init: draws continue as in the interrupted run
    monitor = _knn_monitor(cfg, rank, world, device)
    bar = _progress(cfg, step, enabled=rank == 0)
    # (step, loss and the method's other logged values, seconds, epoch, the step's learning rate): .item() only when
    # logging
    pending: list[tuple[int, dict[str, torch.Tensor], float, int, float]] = []
    metrics: dict[str, float] = {}
    stopping = False  # asked to stop (STOP_FILE): checkpointed at this step, the loop left
    engine.train()
    system = None
    try:
        # asked to stop (rank 0 reads STOP_FILE at every step): every rank learns it at the step after, without
        # waiting for it
        stop = dist.LaggedAny()
        system = _system_metrics(cfg, run_dir, tracker, rank, world)
        if monitor is not None and step == 0:  # the curve starts at the initialisation
            _watch(monitor, engine, tracker, 0, replayed)
        t_last = time.perf_counter()
        batches = iter(stream)
        while step < cfg.job.max_steps:
            lr = schedule_lr(engine)  # the rate of this step's update (the scheduler moves on in engine.step())
            out, epoch = optimizer_step(engine, batches, step, cfg.job.max_steps, cfg.optim.accum_steps)
            step += 1
            if rank == 0 and stream.skipped and step == resumed_at + 1:
                n, seconds = stream.skipped
                print(f"Data: re-read {n} samples of epoch {epoch} up to the saved position in {seconds:.1f} s "
                      "(read, not decoded).", flush=True)
            now = time.perf_counter()
            pending.append((step, out, now - t_last, epoch, lr))
            t_last = now

            last = step == cfg.job.max_steps
            stopping = stop(rank == 0 and stop_file.exists()) and not last  # every rank at the same step
            checkpoint = step % cfg.job.ckpt_every == 0 or last or stopping
            if step % cfg.job.log_every == 0 or checkpoint:  # flushed before a checkpoint: a non-finite loss stops
                # the run before it
                metrics = _flush(pending, cfg, world, tracker, history, stream.stats, replayed=replayed)
                pending.clear()
                if bar is not None:
                    _show_progress(bar, step, metrics)
            if monitor is not None and monitor.due(step):  # before the checkpoint: a resume after it has this point
                _watch(monitor, engine, tracker, step, replayed)
                t_last = time.perf_counter()  # the monitor's time is not the next step's
            if checkpoint:
                tracker.flush()  # what MLflow has reaches this checkpoint: a restart from it loses no point
                _checkpoint(engine, session, {**metrics, "step": step, "epoch": epoch}, world, stream, rank, cfg)
            if stopping:
                break
        stop.close()
    except BaseException as e:  # Ctrl-C (a process run without Ray): stopped, not failed, as Ray's driver marks it
        tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if system is not None:
            system.finish()
        stream.close()
        if bar is not None:
            bar.close()

    if stopping:
        tracker.finish("KILLED")  # as a run stopped by a signal: the next start of the run goes on in it
        if rank == 0:
            stop_file.write_text(f"{step}\n")
            print(f"Stopped at step {step} as asked ({stop_file}): checkpointed", flush=True)
        return metrics
    backbone_state = full_state_dict(engine, engine.module.backbone)  # collective under ZeRO-3: every rank calls it
    # A method used downstream whole (CLIP's text tower, a tokenizer) saves all of itself too.
    method_state = full_state_dict(engine, engine.module) if METHODS[cfg.method.name].saves_model else None
    if rank == 0:
        _finish_run(cfg, run_dir, backbone_state, tracker, history, method_state)
    return metrics


def optimizer_step(engine, batches: Iterator[dict], step: int, max_steps: int,
                   accum_steps: int = 1) -> tuple[dict[str, torch.Tensor], int]:
    """Step ``step`` of the method in ``engine``: its schedules set, ``accum_steps`` micro-batches from ``batches``
    forward and backward (DeepSpeed steps the optimizer after the last, on the mean of their gradients; under fp16 the
    loss scale moves then), then its EMA and centers. Returns (the micro-batches' mean of what the method logs,
    detached, and under fp16 the loss scale and the count of skipped steps so far; the last batch's epoch)."""
    engine.module.on_step_start(step, max_steps)
    micro = []
    for _ in range(accum_steps):
        batch = next(batches)
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()
        micro.append({k: v.detach() for k, v in out.items()})
    scale = engine.fp16_scale
    if scale is not None:
        scale.update()
    engine.module.on_step_end(step, max_steps)
    if len(micro) > 1:
        micro = [{k: torch.stack([m[k] for m in micro]).mean(0) for k in micro[0]}]
    if scale is not None:  # beside the loss, on its device: _flush stacks them all
        device = micro[0]["loss"].device
        micro[0].update(loss_scale=torch.tensor(scale.scale, device=device),
                        skipped_steps=torch.tensor(float(scale.skipped), device=device))
    return micro[0], batch.get("epoch", 0)


# --- helpers of the loop ------------------------------------------------------------------------------------------


def _open_tracker(cfg: Config, run_dir: Path, rank: int):
    """Rank 0's MLflow run (a new one, or a resumed run's), and the config's params changed since that run's last
    start (a NullTracker and none elsewhere)."""
    out_dir = run_dir.parent
    uri = cfg.tracking.uri or default_tracking_uri(out_dir)
    id_file = run_dir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    tracker = make_tracker(
        rank=rank,
        tracking_uri=uri,
        experiment=cfg.tracking.experiment,
        run_name=run_dir.name,
        run_id=run_id,
        artifact_location=None if cfg.tracking.uri else default_artifact_location(out_dir),
        unsent_file=run_dir / UNSENT_FILE,
    )
    changed = {}
    if rank == 0:
        if run_id is None:
            id_file.write_text(tracker.run_id + "\n")
            tracker.log_params(to_dict(cfg))
            tracker.log_artifact(run_dir / "config.yaml")
            tracker.set_tags(_branch_tags(run_dir / BRANCH_FILE, uri))
        else:
            changed = tracker.changed_since_last_start(to_dict(cfg))
            if tracker.log_resumed_params(to_dict(cfg)):  # resumed with --set: what it goes on with
                tracker.log_artifact(run_dir / "config.yaml")
        tracker.set_tags({RUN_DIR_TAG: str(run_dir), **_job_tags()})
        print(f"MLflow: {uri} run {tracker.run_id}", flush=True)
    return tracker, changed


def _replayed(tracker, history, resumed_at: int, *, exact: bool) -> int:
    """The last step a resume from step ``resumed_at`` trains again that the interrupted run had logged (to MLflow or
    to ``history``), where it is ``exact`` (at its saved data position and random streams, under the config of the
    run's last start): those steps come again as they were (bitwise on a CPU; a GPU's nondeterministic kernels may
    move the last digits), so their points, already logged, are not logged again (-1: every step is logged). Where the
    resume is not exact, they are logged again beside the earlier ones, and one line says so."""
    in_mlflow, in_history = tracker.last_logged_step(), history.last_step()
    logged = max(in_mlflow, in_history)
    if logged <= resumed_at:
        return -1
    steps = f"Steps {resumed_at + 1}-{logged}"
    if not exact:
        print(f"{steps}, logged before, are trained again otherwise (another config or number of ranks): MLflow and "
              f"{history.path.name} keep both values of each", flush=True)
        return -1
    print(f"{steps}, logged before, are trained again as they were: not logged twice", flush=True)
    history.skip_through = in_history  # each its own: MLflow's last points may have been lost in the buffer
    return in_mlflow


def _system_metrics(cfg: Config, run_dir: Path, tracker, rank: int, world: int):
    """MLflow's system metrics of this node, sampled by its local rank 0 (None elsewhere, or when off): names
    ``system/...`` on one node, ``system/<host>/...`` on several."""
    every = cfg.tracking.system_metrics_s
    if not every:
        return None
    run_id = [tracker.run_id]
    if world > 1:  # rank 0 opened (or reopened) the run: every node's sampler logs into it
        torch.distributed.broadcast_object_list(run_id, src=0)
    if dist.local_rank() != 0:
        return None
    import socket

    from pretrain.tracking import start_system_metrics

    one_node = int(os.environ.get("LOCAL_WORLD_SIZE", world)) >= world
    uri = cfg.tracking.uri or default_tracking_uri(run_dir.parent)
    return start_system_metrics(run_id[0], uri, every_s=every, node=None if one_node else socket.gethostname())


def _branch_tags(record: Path, uri: str) -> dict[str, str]:
    """A branch's link to the run it went on from, as MLflow tags (nested under that run in the UI where both are in
    one store); none for another run."""
    if not record.is_file():
        return {}
    source = json.loads(record.read_text())
    tags = {"branched_from.run_dir": source["run_dir"], "branched_from.step": str(source["step"])}
    if source.get("mlflow_run_id"):
        tags["branched_from.mlflow_run_id"] = source["mlflow_run_id"]
        if source.get("tracking_uri") == uri:
            tags["mlflow.parentRunId"] = source["mlflow_run_id"]
    return tags


def _job_tags() -> dict[str, str]:
    """The batch job this start of the run belongs to (Slurm, or Kubernetes through the variables `pretrain submit k8s`
    sets in its pods, which Ray's processes inherit), as MLflow tags: from the UI to the job's log."""
    if "PRETRAIN_K8S_JOB" in os.environ:  # the pod of rank 0: its name changes with every start of the pod
        names = {"PRETRAIN_K8S_JOB": "k8s.job", "POD_NAMESPACE": "k8s.namespace", "POD_NAME": "k8s.pod"}
        return {tag: os.environ[var] for var, tag in names.items() if var in os.environ}
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    names = {"SLURM_JOB_ID": "slurm.job_id", "SLURM_JOB_NODELIST": "slurm.nodelist",
             "SLURM_JOB_PARTITION": "slurm.partition", "SLURM_RESTART_COUNT": "slurm.restart_count"}
    tags = {"slurm.restart_count": "0"}  # Slurm sets SLURM_RESTART_COUNT only once a job has been requeued
    tags.update({tag: os.environ[var] for var, tag in names.items() if var in os.environ})
    return tags


def schedule_lr(engine) -> float:
    """The schedule's full rate in the optimizer now (layer-wise decay lowers some groups'; optim.fixed_lr's groups
    keep their peak)."""
    groups = engine.optimizer.param_groups
    return max(g["lr"] for g in [g for g in groups if not g.get("fixed_lr")] or groups)


def _flush(pending, cfg: Config, world: int, tracker, history, data_stats, replayed: int = -1) -> dict[str, float]:
    """The ``pending`` steps' values logged (but those of steps up to ``replayed``, logged before: see
    :func:`_replayed`); returns the last step's metrics. Collective: every rank calls it at the same steps."""
    # one host transfer for every value of every pending step (the method's parts of the loss, e.g. iBOT's cls_loss and
    # patch_loss, go to MLflow beside the loss)
    values = torch.stack([torch.stack([v.float() for v in p[1].values()]) for p in pending]).cpu().tolist()
    names = list(pending[0][1])
    _check_finite(pending, [row[names.index("loss")] for row in values], world)
    for (step, _, seconds, epoch, lr), row in zip(pending, values):
        per_worker = cfg.data.batch_size * cfg.optim.accum_steps / max(seconds, 1e-9)
        metrics = {
            **dict(zip(names, row)),
            "lr": lr,
            "step_time_s": seconds,
            "images_per_s": per_worker * world,
            "images_per_s_per_worker": per_worker,
            "epoch": float(epoch),
        }
        if step > replayed:
            tracker.log_metrics(metrics, step=step)
        history.add(step, metrics)  # which skips its own (_History.skip_through)
    if pending[-1][0] > replayed:
        tracker.log_metrics({f"data_{k}": float(v) for k, v in data_stats.items()}, step=pending[-1][0])
    return metrics


def _knn_monitor(cfg: Config, rank: int, world: int, device: torch.device):
    """``eval.knn_every``'s monitor (each rank's share of eval.dataset decoded once, here), or None when it is off."""
    if not cfg.eval.knn_every:
        return None
    from pretrain.engine import autocast_dtype
    from pretrain.eval.monitor import KnnMonitor

    t0 = time.perf_counter()
    monitor = KnnMonitor(cfg, rank=rank, world_size=world, device=device, autocast=autocast_dtype(cfg))
    if rank == 0:
        print(f"kNN monitor: every {cfg.eval.knn_every} steps on {cfg.eval.dataset}, {monitor.part.drawn} samples "
              f"(this rank's {len(monitor.part.labels)} decoded in {time.perf_counter() - t0:.1f} s)", flush=True)
    return monitor


def _watch(monitor, engine, tracker, step: int, replayed: int = -1) -> None:
    """The monitor on every rank (collective); rank 0 logs its kNN top-1 at ``step`` (unless logged before: up to
    ``replayed``) and prints it."""
    scores = monitor(engine.module.backbone)
    if scores is None:
        return
    if step > replayed:
        tracker.log_metrics(scores, step=step)
    print(f"step {step}: kNN top-1 {scores['knn_top1']:.4f} ({scores['knn_seconds']:.1f} s)", flush=True)


class NonFiniteLoss(RuntimeError):
    """The loss stopped being a finite number; the run stops before it checkpoints that state."""


def _check_finite(pending, losses: list[float], world: int) -> None:
    """NonFiniteLoss on every rank (one all-reduce: the ranks stop together, none left waiting in a collective) if any
    rank's loss of the ``pending`` steps is inf or NaN, naming the first such step."""
    import math

    first = next((p[0] for p, loss in zip(pending, losses) if not math.isfinite(loss)), None)
    never = pending[-1][0] + 1
    bad = torch.tensor([first or never], dtype=torch.int64, device=pending[0][1]["loss"].device)
    if world > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
    bad = int(bad.item())
    if bad != never:
        mine = losses[bad - pending[0][0]]
        raise NonFiniteLoss(f"the loss is not finite at step {bad} (rank {dist.rank()}'s: {mine}); the run stopped "
                            "before checkpointing that state: resume from its last checkpoint with a lower optim.lr "
                            "or more optim.warmup_steps")


def _checkpoint(engine, session: Session, metrics: dict[str, float], world: int, stream, rank: int,
                cfg: Config) -> None:
    with staging_dir() as tmp:
        state = {"step": int(metrics["step"]), "epoch": int(metrics["epoch"]), "world_size": world}
        scale = {"loss_scale": engine.fp16_scale.state_dict()} if engine.fp16_scale is not None else {}
        save_checkpoint(engine, tmp, {**state, **scale})
        ranks = Path(tmp) / RANK_STATE_DIR
        ranks.mkdir()
        torch.save({"data": stream.state_dict(), "rng": _rng_state()}, ranks / f"rank_{rank:05d}.pt")
        if rank == 0:  # what pretrain.steps lists it by, without opening the partitions; the config it was saved
            # under, which a resume is checked against (config.yaml may have been edited by hand)
            (Path(tmp) / CHECKPOINT_INFO).write_text(json.dumps({**state, "config": to_dict(cfg)}) + "\n")
        session.report(metrics, Path(tmp))


def _prepare_universal(ckpt: Path, stage: int, saved_world: int, world: int, rank: int) -> None:
    """Checkpoint ``ckpt`` holds the ZeRO partitions of ``saved_world`` ranks and this run has ``world``: rank 0
    converts it to DeepSpeed's universal form (once: a later resume finds it), which engines of any size load; the
    others wait for it. ZeRO-0 checkpoints hold every parameter whole and load under any number of ranks as they are."""
    error = None
    if rank == 0:
        print(f"Checkpoint {ckpt.name} holds the ZeRO-{stage} partitions of {saved_world} ranks and this run has "
              f"{world}: converting it to DeepSpeed's universal checkpoint ...", flush=True)
        try:
            out, seconds = to_universal(ckpt, stage)
            print(f"Universal checkpoint {out} " + (f"written in {seconds:.1f} s." if seconds else "already there."),
                  flush=True)
        except RuntimeError as e:
            error = e
    dist.barrier()
    if error is not None:
        raise error
    if not (ckpt / UNIVERSAL_TAG).is_dir():
        raise RuntimeError(f"rank {rank} does not see {ckpt / UNIVERSAL_TAG}, which rank 0 wrote: every rank must "
                           "see the run directory (shared storage)")


def _load_rank_state(ckpt: Path, rank: int) -> dict | None:
    """This rank's data position and RNG states, or None for a checkpoint that has none (older runs)."""
    path = ckpt / RANK_STATE_DIR / f"rank_{rank:05d}.pt"
    return torch.load(path, weights_only=False) if path.is_file() else None  # our own file: bytes, numpy state


def _rng_state() -> dict:
    import random

    import numpy as np

    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _finish_run(cfg: Config, run_dir: Path, backbone_state: dict, tracker, history,
                method_state: dict | None = None) -> None:
    from pretrain.plots import plot_loss_curve
    from pretrain.steps import MODEL_FILE

    weights = run_dir / "backbone.pt"
    torch.save({"config": to_dict(cfg), "step": cfg.job.max_steps, "state_dict": backbone_state}, weights)
    tracker.log_artifact(weights)
    if method_state is not None:
        torch.save({"config": to_dict(cfg), "state_dict": method_state}, run_dir / MODEL_FILE)
        tracker.log_artifact(run_dir / MODEL_FILE)
    steps, losses = history.read()
    if steps:
        tracker.log_artifact(plot_loss_curve(steps, losses, run_dir / "loss_curve.png"))
    if cfg.eval.enabled:
        # sklearn & co: only where a run is evaluated
        from pretrain.evaluate import evaluate_backbone_state, map_path, publish_report, staged_map

        report_path = run_dir / "eval.json"
        report = evaluate_backbone_state(cfg, backbone_state, method_state=method_state,
                                         embedding_map=staged_map(report_path))
        report["step"] = cfg.job.max_steps  # the step scored: a resume tells a finished run by it
        publish_report(report, report_path)  # a run that finished before and trained on: its report and map stay
        tracker.log_metrics({f"eval/{k}": v for k, v in report.items() if isinstance(v, float)}, step=cfg.job.max_steps)
        tracker.log_metrics(
            {f"eval_random_init/{k}": v for k, v in report["random_init"].items()}, step=cfg.job.max_steps
        )
        tracker.log_artifact(report_path)
        if map_path(report_path).is_file():
            tracker.log_artifact(map_path(report_path))
    (run_dir / STOP_FILE).unlink(missing_ok=True)  # asked at the last step: there is nothing left to stop
    tracker.finish("FINISHED")


class _History:
    """Rank 0's step metrics in ``metrics.csv`` beside the run, kept across resumes (for the loss curve)."""

    FIELDS = ("step", "loss", "lr", "images_per_s", "step_time_s", "epoch")

    def __init__(self, path: Path, *, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.skip_through = -1  # rows of steps up to this one are in the file already (see _replayed)

    def add(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled or step <= self.skip_through:
            return
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(self.FIELDS)
            writer.writerow([step] + [metrics[k] for k in self.FIELDS[1:]])

    def read(self) -> tuple[list[int], list[float]]:
        if not self.path.exists():
            return [], []
        rows = {}
        with self.path.open() as f:
            for row in csv.DictReader(f):
                rows[int(row["step"])] = float(row["loss"])  # a resumed run may repeat steps: the later value wins
        steps = sorted(rows)
        return steps, [rows[s] for s in steps]

    def last_step(self) -> int:
        """The file's last step (-1: none, or not rank 0's)."""
        if not (self.enabled and self.path.exists()):
            return -1
        with self.path.open() as f:
            return max((int(row["step"]) for row in csv.DictReader(f)), default=-1)


def _progress(cfg: Config, start: int, *, enabled: bool):
    if not (enabled and cfg.job.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.job.max_steps, initial=start, desc="train", unit="step", file=sys.stdout, mininterval=2.0,
                dynamic_ncols=True)


def _show_progress(bar, step: int, metrics: dict[str, float]) -> None:
    """The bar at ``step`` with its loss and rate, in one write: two (update, then set_postfix) had written each state
    twice, the first with the last log's values, which a log collector cutting the \\r-separated writes into lines
    (Ray's) showed side by side."""
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", ips=f"{metrics['images_per_s']:.0f}", refresh=False)
    bar.update(step - bar.n)


def write_run_files(cfg: Config, run_dir: Path) -> None:
    """The resolved config beside the run (before any worker starts)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")

