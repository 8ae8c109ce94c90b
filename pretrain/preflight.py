"""What is checked before a run starts, on the machine that starts it: the config of a new run or of one to resume, its
run directory, the method's inputs, the backbone's options, the data and the tracking store; then the run directory is
written. Each problem is a ``ConfigError`` of one line, raised before Ray, a scheduler or any worker is involved.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Iterator
from pathlib import Path

from pretrain.config import Config, ConfigError, check_optim_keys, config_from_dict, load_config, set_keys, to_dict

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "simclr_digits.yaml"
RUN_LOCK = ".pretrain.lock"
"""In a run directory: locked (flock) by the command that writes or trains the run, for as long as it does; it says
which process that is."""


def resolve_run(config: Path | None, overrides: list[str], resume: Path | None,
                from_step: int | None = None) -> tuple[Config, Path]:
    """The config and run directory of a new run (``config``, default ``DEFAULT_RECIPE``, with ``overrides``; a run
    directory that already holds a run is refused) or of a run to continue (``resume``: its own config with
    ``overrides``, refused where they change what its checkpoints hold or leave nothing to do); with ``from_step``,
    of a new run going on from that checkpoint of ``resume`` (:func:`branch_run` writes it)."""
    if from_step is not None:
        if not resume:
            raise ConfigError("--from-step: goes with --resume RUN_DIR (the run whose checkpoint to go on from)")
        if config:
            raise ConfigError("--config: a branch goes on with its run's config; change its values with --set")
        return _resolve_branch(resume.resolve(), overrides, from_step)
    if resume:
        run_dir = resume.resolve()
        if config:
            raise ConfigError(f"--config: a resumed run goes on with its own config ({run_dir / 'config.yaml'}); "
                              "change its values with --set")
        before, cfg = _saved_config(run_dir, overrides)
        for key in ("out_dir", "run_name"):  # they name the run directory, which a resume goes on in
            if getattr(before.job, key) != getattr(cfg.job, key):
                raise ConfigError(f"job.{key}: a resumed run goes on in its own directory ({run_dir}); to have it "
                                  "elsewhere, move the directory and resume it there")
        if before.tracking.experiment != cfg.tracking.experiment and (run_dir / "mlflow_run_id").is_file():
            raise ConfigError(f"tracking.experiment: a resumed run goes on in its MLflow run, of experiment "
                              f"{before.tracking.experiment!r}; `--from-step N` goes on from a checkpoint as a new "
                              "run, in an experiment of its choosing")
        check_steps_left(cfg, run_dir)
        return cfg, run_dir
    cfg = new_config(config, overrides)
    name = cfg.job.run_name or f"{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = (Path(cfg.job.out_dir).expanduser() / name).resolve()
    if _holds_files(run_dir):
        raise ConfigError(f"job.run_name: {run_dir} already holds a run; continue it with --resume {run_dir}")
    check_writable(run_dir, "job.out_dir")  # (a file there had been "<file>/<run>: Not a directory")
    return cfg, run_dir


def _saved_config(run_dir: Path, overrides: list[str]) -> tuple[Config, Config]:
    """A run's config as saved, and with ``overrides``: ConfigError for a directory that is no run, or a damaged one,
    and for overrides that change what its checkpoints hold or set keys its method does not read."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume: {run_dir} is not a run directory (no config.yaml)")
    if not saved.read_text().strip():  # a recipe's empty file means the defaults; a run's, a damaged run
        raise ConfigError(f"--resume: {saved} is empty (damaged; the run's config is logged in MLflow, as "
                          "config.yaml among its artifacts)")
    before = load_config(saved)
    cfg = load_config(saved, overrides)
    _check_same_structure(before, cfg, run_dir.name)
    changed = {k for k in _method_fields() if getattr(before.method, k) != getattr(cfg.method, k)}
    _check_method_keys(cfg, only=changed)  # (what the run began with is not refused now)
    old, new = to_dict(before)["optim"], to_dict(cfg)["optim"]
    check_optim_keys(cfg.optim, only={k for k in new if old[k] != new[k]})  # (optim.name: refused above)
    return before, cfg


def _resolve_branch(source: Path, overrides: list[str], step: int) -> tuple[Config, Path]:
    """``resolve_run`` of ``--resume SOURCE --from-step STEP``: the new run's directory is ``<source>-from-<step>``
    beside it, where it is now (``job.out_dir`` / ``job.run_name`` where --set gives them), which the default MLflow
    store (``mlflow.db`` in the runs' directory) follows."""
    from pretrain.steps import check_ray_record, cut_short, list_checkpoints

    before, cfg = _saved_config(source, overrides)
    try:
        check_ray_record(source)
        unrecorded = False
    except ValueError:  # Ray's record is gone: which checkpoint_* are whole is unknown; the chosen one is checked
        unrecorded = True
    steps = list_checkpoints(source)
    if step not in steps:
        have = ", ".join(map(str, sorted(steps))) or "none"
        raise ConfigError(f"--from-step: {source.name} has no checkpoint of step {step} (its checkpoints: {have})")
    if damaged := cut_short(steps[step]):
        raise ConfigError(f"--from-step: the checkpoint of step {step} of {source.name} is damaged: "
                          f"{damaged[0].relative_to(source)} is cut short")
    if unrecorded and steps[step].name.startswith("checkpoint_"):
        _check_every_rank(steps[step], source, step)
    _check_saved_config(cfg, source, steps[step])
    if cfg.job.max_steps <= step:
        raise ConfigError(f"job.max_steps: {cfg.job.max_steps} leaves nothing to train after step {step}; raise it")
    given = {o.split("=", 1)[0].strip() for o in overrides}  # (a name given equal to the source's is refused below)
    if "job.run_name" not in given:
        cfg.job.run_name = f"{source.name}-from-{step}"
    if "job.out_dir" not in given:  # beside the run wherever it is now (moved; out_dir relative to a cwd)
        cfg.job.out_dir = str(source.parent)
    run_dir = (Path(cfg.job.out_dir).expanduser() / cfg.job.run_name).resolve()
    if _holds_files(run_dir):
        raise ConfigError(f"job.run_name: {run_dir} already holds a run; continue it with --resume {run_dir}, or "
                          "name another with --set job.run_name=NAME")
    check_writable(run_dir, "job.out_dir")
    return cfg, run_dir


def _check_every_rank(checkpoint: Path, source: Path, step: int) -> None:
    """ConfigError unless Ray checkpoint ``checkpoint`` holds the files of every rank that saved it (its data position
    and RNG states; its ZeRO partitions): without Ray's record of which are whole, a job stopped while its ranks
    wrote one leaves some ranks' files only."""
    from pretrain.checkpoint import CKPT_TAG
    from pretrain.steps import checkpoint_info
    from pretrain.trainer import RANK_STATE_DIR

    info = checkpoint_info(checkpoint)
    zero = (info.get("config") or {}).get("zero", {}).get("stage", 0)
    for rank in range(int(info["world_size"])):
        need = [checkpoint / RANK_STATE_DIR / f"rank_{rank:05d}.pt"]
        if zero:
            need.append(checkpoint / CKPT_TAG / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        if missing := next((p for p in need if not p.is_file()), None):
            raise ConfigError(f"--from-step: Ray's record of {source.name}'s checkpoints is missing, and its "
                              f"checkpoint of step {step} lacks {missing.relative_to(source)}, so it is not whole; "
                              "take another step")
    print(f"Ray's record of {source.name}'s checkpoints is missing; its checkpoint of step {step} holds every rank's "
          "files", flush=True)


def branch_run(source: Path, step: int, run_dir: Path) -> None:
    """Start run ``run_dir`` at checkpoint ``step`` of run ``source``, which is left as it is: the checkpoint (hard
    links where the disk allows: nothing in a checkpoint is written over) and ``source``'s metric rows up to it. The
    run then goes on from it under any launcher, as a resumed one (same data position, random state, schedules), in
    an MLflow run of its own. Call it under ``run_lock(run_dir, new=True)``."""
    import csv
    import json
    import shutil

    from pretrain.steps import list_checkpoints
    from pretrain.tracking import default_tracking_uri
    from pretrain.trainer import BRANCH_FILE, HISTORY_FILE, RUN_ID_FILE

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another disk, or a file system without hard links
            shutil.copy2(src, dst)

    dest = run_dir / "checkpoints" / f"step_{step:07d}"
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(list_checkpoints(source)[step], partial, copy_function=link_or_copy)
    partial.rename(dest)
    history = source / HISTORY_FILE
    if history.is_file():
        with history.open(newline="") as f:
            rows = list(csv.reader(f))
        kept = {int(r[0]): r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step}  # a repeat: the later
        with (run_dir / HISTORY_FILE).open("w", newline="") as f:
            csv.writer(f).writerows([rows[0], *(kept[s] for s in sorted(kept))])
    source_cfg = load_config(source / "config.yaml")
    record = {"run_dir": str(source), "step": step,
              "tracking_uri": source_cfg.tracking.uri or default_tracking_uri(source.parent),
              "mlflow_run_id": (source / RUN_ID_FILE).read_text().strip() if (source / RUN_ID_FILE).is_file() else None}
    (run_dir / BRANCH_FILE).write_text(json.dumps(record, indent=1) + "\n")  # the trainer tags the MLflow run with it
    print(f"Branched from {source} at step {step} (that run is left as it is)", flush=True)


def _holds_files(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.name != RUN_LOCK for p in run_dir.iterdir())


@contextlib.contextmanager
def run_lock(run_dir: Path, *, new: bool) -> Iterator[None]:
    """Hold ``run_dir``'s lock (:data:`RUN_LOCK`) for the body: ConfigError (one line, naming the process) where
    another command holds it, a training or a submission writing the run (two at once had trained into one directory
    and one MLflow run, their checkpoints and metrics interleaved); for a ``new`` run, also where another has written
    it meanwhile. A directory the body left empty (refused by a check) is removed again."""
    import fcntl
    import socket

    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # the run's, out_dir's: removed if left empty
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / RUN_LOCK
    with lock.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ConfigError(f"{run_dir} is in use by {holder}: one training at a time writes a run; wait for it to "
                              "end, or stop it") from None
        try:
            if new and _holds_files(run_dir):
                raise ConfigError(f"job.run_name: {run_dir} already holds a run (written just now by another "
                                  f"command); continue it with --resume {run_dir}")
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
            yield
        finally:
            f.seek(0)
            f.truncate()  # held by nobody now: it names no process
            if not _holds_files(run_dir):  # nothing written: leave no trace
                lock.unlink(missing_ok=True)
                for folder in created:
                    with contextlib.suppress(OSError):  # another command's run may be in it by now
                        folder.rmdir()


def check_steps_left(cfg: Config, run_dir: Path) -> None:
    """ConfigError for a resume that has nothing to do: ``job.max_steps`` behind the run's last checkpoint, or at it
    with the run finished there (its backbone.pt, and eval.json where it evaluates, of that step: by the step they
    record, so that a copy of the run without its files' times is judged as the run is).
    At it and unfinished (stopped between its last checkpoint and its end), the resume finishes the run."""
    from pretrain.steps import check_ray_record, cut_short, list_checkpoints, saved_step

    try:
        check_ray_record(run_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    steps = list_checkpoints(run_dir)
    if not steps and (run_dir / "backbone.pt").is_file():  # every run checkpoints its last step
        raise ConfigError(f"--resume: {run_dir} holds an encoder and no checkpoint to go on from (as `pretrain "
                          "extract` writes a step's encoder); resuming would train anew over it")
    if not steps:
        return
    last = max(steps)
    if damaged := cut_short(steps[last]):
        whole = next((s for s in sorted(steps, reverse=True)[1:] if not cut_short(steps[s])), None)
        raise ConfigError(f"--resume: the latest checkpoint of {run_dir.name} (step {last}) is damaged: "
                          f"{damaged[0].relative_to(run_dir)} is cut short (a disk that filled or a job stopped while "
                          "it was written?); the run cannot go on from it"
                          + (f"; `--from-step {whole}` goes on from its last whole one as a new run, `pretrain extract "
                             f"--checkpoint {run_dir} --step {whole}` takes that one's encoder" if whole is not None
                             else ""))
    _check_saved_config(cfg, run_dir, steps[last])
    if cfg.job.max_steps < last:
        raise ConfigError(f"job.max_steps: {cfg.job.max_steps} is behind {run_dir.name}'s last checkpoint (step "
                          f"{last}); raise it to train on, or take an earlier step's encoder with `pretrain extract "
                          f"--checkpoint {run_dir} --step N`")
    since = steps[last].stat().st_mtime

    def done(end: Path) -> bool:  # of this step: as it says, or (written before it said so) written after the step
        step = saved_step(end) if end.is_file() else None
        return end.is_file() and (step == last if step is not None else end.stat().st_mtime >= since)

    ends = [run_dir / "backbone.pt"] + ([run_dir / "eval.json"] if cfg.eval.enabled else [])
    if cfg.job.max_steps == last and all(done(p) for p in ends):
        raise ConfigError(f"job.max_steps: {run_dir.name} finished at step {last} already; raise job.max_steps to "
                          f"train on (`pretrain eval --checkpoint {run_dir}` evaluates it again)")


def _method_fields() -> list[str]:
    import dataclasses

    from pretrain.config import MethodConfig

    return [f.name for f in dataclasses.fields(MethodConfig)]


def new_config(config: Path | None, overrides: list[str]) -> Config:
    """The config of a new run: recipe ``config`` (default ``DEFAULT_RECIPE``) with ``overrides``; ConfigError too for
    a method or optimizer key that the recipe or the overrides set and the method or optimizer does not read."""
    cfg = load_config(config or DEFAULT_RECIPE, overrides)
    _check_method_keys(cfg, only=set_keys(config or DEFAULT_RECIPE, overrides, "method"))
    check_optim_keys(cfg.optim, only=set_keys(config or DEFAULT_RECIPE, overrides, "optim"))
    return cfg


def _check_method_keys(cfg: Config, only: set[str] | None = None) -> None:
    from pretrain.methods import check_method_keys

    try:
        check_method_keys(cfg.method, only)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_saved_config(cfg: Config, run_dir: Path, checkpoint: Path) -> None:
    """:func:`_check_same_structure` against the config the latest checkpoint was saved under (its checkpoint.json
    holds it), which a config.yaml edited by hand does not change: a ZeRO stage or model changed there failed in the
    workers. Checkpoints of an older version hold none, and are not checked."""
    from pretrain.steps import saved_config

    before = saved_config(checkpoint)  # (None: a config of another version of the fields, not comparable here)
    if before is not None:
        _check_same_structure(before, cfg, run_dir.name)


def _check_same_structure(before: Config, cfg: Config, name: str) -> None:
    """ConfigError for a resume override that changes what the checkpoints hold (the method, the model, the ZeRO
    stage, the optimizer and its param groups; the accumulation, which DeepSpeed counts in micro-steps): they would
    not load or would not line up, and the workers would fail only after starting."""
    old, new = to_dict(before), to_dict(cfg)
    keys = [("method", "name"), ("zero", "stage"), ("optim", "name"), ("optim", "accum_steps"),
            ("optim", "layer_decay"), ("optim", "patch_embed_lr_mult"), ("optim", "norm_bias_lr_mult"),
            ("optim", "fixed_lr"), ("optim", "decay_norms_and_biases")]  # these five: the optimizer's param groups
    same = ("sync_bn", "sync_bn_group", "compile")
    keys += [("model", k) for k in sorted(old["model"]) if k not in same]  # same weights either way
    # a method key that shapes the method's weights or buffers (DINO's and SwAV's prototypes, MAE's decoder, a queue)
    changed = [k for k in sorted(old["method"]) if k != "name" and old["method"][k] != new["method"].get(k)]
    keys += [("method", k) for k in changed if _changes_state(before, old, k, new["method"][k])]
    for section, key in keys:
        was, now = old[section].get(key), new[section].get(key)
        if was != now:
            raise ConfigError(f"{section}.{key}: the checkpoints of {name} were saved with {was!r}, and {now!r} cannot "
                              "load them; start a new run for it")
    # any other change that reshapes the weights: data.channels (a stem's input), data.image_size (a ViT's positions)
    changed = [f"data.{k}" for k in sorted(old["data"]) if old["data"][k] != new["data"].get(k)]
    if changed:
        was, now = _state_shapes(before), _state_shapes(cfg)
        if was is not None and now is not None and was != now:
            param = next((k for k in was if was[k] != now.get(k)), None) or next(k for k in now if k not in was)
            raise ConfigError(f"{', '.join(changed)}: the checkpoints of {name} hold {param} of shape "
                              f"{was.get(param)}, and the new value makes it {now.get(param)}; start a new run for it")


def _changes_state(before: Config, old: dict, key: str, value) -> bool:
    """Whether setting ``method.<key>`` to ``value`` in ``before`` changes the names or shapes of the method's state
    (parameters and buffers), both built on the meta device (no memory, no initialisation: milliseconds). False
    where either cannot be built there (the worker reports it)."""
    trial = copy.deepcopy(old)
    trial["method"][key] = value
    try:
        trial_cfg = config_from_dict(trial)
    except Exception:  # noqa: BLE001 - a key valid only with another: the worker reports it
        return False
    was, now = _state_shapes(before), _state_shapes(trial_cfg)
    return was is not None and now is not None and was != now


def _state_shapes(cfg: Config) -> dict[str, tuple[int, ...]] | None:
    """``{name: shape}`` of the method's state built from ``cfg`` on the meta device; None where it cannot be built
    there (a BEiT tokenizer that the meta device cannot load)."""
    import torch

    from pretrain.methods import METHODS

    try:
        with torch.device("meta"):
            method = METHODS[cfg.method.name](cfg)
    except Exception:  # noqa: BLE001 - the worker reports what it cannot build
        return None
    return {k: tuple(v.shape) for k, v in method.state_dict().items()}


def prepare_run(cfg: Config, run_dir: Path, *, write: bool, reach_tracking: bool = False) -> None:
    """Check the tracking URI (``reach_tracking``: an MLflow server must answer from here, as it must from a run
    started here, and hold a resumed run's MLflow run; a scheduler's nodes may see servers and files the submitting
    host does not), the method's inputs, the backbone's options and the data (building built-in shards on first use),
    then write the run directory (``write``: a new run, or a resumed one whose config was overridden: it goes on with
    the new config, written beside the old)."""
    from pretrain.data import resolve_shards
    from pretrain.methods import METHODS
    from pretrain.optim import check_fixed_lr
    if cfg.tracking.uri:
        check_tracking(cfg.tracking.uri, reach=reach_tracking)
    METHODS[cfg.method.name].check_inputs(cfg)
    check_backbone(cfg)
    check_fixed_lr(cfg)
    # builds the digits shards on first use; refuses data without captions for a method that needs them, or too few
    # samples for a batch on every rank
    shards = resolve_shards(cfg.data, captions=METHODS[cfg.method.name].needs_text, ranks=cfg.job.num_workers)
    if cfg.eval.reads_dataset:
        from pretrain.eval.dataset import check_eval_dataset

        check_eval_dataset(cfg)  # a shard dataset to evaluate on exists and has classes to score
    from pretrain.trainer import RUN_ID_FILE, write_run_files  # DeepSpeed's import, only once everything above passed

    if reach_tracking and (run_dir / RUN_ID_FILE).is_file():  # a resume goes on in its MLflow run
        from pretrain.tracking import DeletedRun, check_holds_run, default_tracking_uri

        try:
            run = check_holds_run(cfg.tracking.uri or default_tracking_uri(run_dir.parent),
                                  (run_dir / RUN_ID_FILE).read_text().strip())
        except DeletedRun as e:
            raise ConfigError(f"tracking.uri: {e}") from None
        except ValueError as e:
            raise ConfigError(f"tracking.uri: {e}, which {run_dir.name}'s metrics go on in; resume it with the "
                              "tracking.uri it began with") from None
        _check_not_a_copy(run, run_dir)
    if write:
        write_run_files(cfg, run_dir)
    workers = f"{cfg.job.num_workers} worker" + ("s" if cfg.job.num_workers != 1 else "")
    print(f"Run directory: {run_dir}  ({len(shards)} shards, {workers})", flush=True)


def check_tracking(uri: str, *, reach: bool) -> None:
    """ValueError (one line) for a tracking URI MLflow cannot use, and where ``reach``, ConfigError for a server that
    does not answer from here, or a database store whose driver is not installed here or whose host does not take a
    connection."""
    from pretrain.tracking import check_database, check_reachable, check_tracking_uri

    check_tracking_uri(uri)
    scheme = uri.partition("://")[0].split("+")[0]
    if reach and scheme in ("http", "https", "postgresql", "mysql", "mssql"):
        try:
            (check_reachable if scheme.startswith("http") else check_database)(uri)
        except ConnectionError as e:
            raise ConfigError(f"tracking.uri: {e}") from None


def _check_not_a_copy(run, run_dir: Path) -> None:
    """ConfigError where ``run_dir`` is a copy of the run directory that MLflow run ``run`` began in (its tag
    ``run_dir``), which still holds it: both would log into one MLflow run (a moved run, whose old directory is gone,
    goes on in it)."""
    from pretrain.trainer import RUN_DIR_TAG, RUN_ID_FILE

    began = Path(run.data.tags[RUN_DIR_TAG]) if run is not None and RUN_DIR_TAG in run.data.tags else None
    if began is None or began == run_dir or not (began / RUN_ID_FILE).is_file():
        return
    if (began / RUN_ID_FILE).read_text().strip() == run.info.run_id:
        raise ConfigError(f"--resume: {run_dir} is a copy of {began}, whose MLflow run {run.info.run_id} it would log "
                          f"into as well; delete {run_dir / RUN_ID_FILE} to have the copy go on in an MLflow run of "
                          "its own, or resume the original")


def check_backbone(cfg: Config) -> None:
    """ConfigError for backbone options it cannot be built with (a misspelt name; a value: heads that do not divide the
    width, a depth of 0, an unknown pool): built on the meta device (no memory, milliseconds), as each worker will
    build it, which would otherwise fail in every worker after the cluster (or the queued job) started."""
    import torch

    from pretrain.methods.base import build_method_backbone

    try:
        with torch.device("meta"):
            build_method_backbone(cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.backbone_kwargs: {str(e).splitlines()[0]}") from None


def check_writable(path: Path, key: str) -> None:
    """ConfigError (one line, naming ``key``) unless ``path`` can be made: the nearest folder of it that exists is a
    folder this process may write in (a read-only mount, a folder of another user, a file where a folder would be are
    refused before the work, not after it)."""
    path = Path(path).absolute()
    ancestor = next(p for p in path.parents if p.exists())
    if not ancestor.is_dir():
        raise ConfigError(f"{key}: {ancestor} is a file, so {path} cannot be written")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {path} cannot be written: {ancestor} is not writable here (its permissions, or a "
                          "read-only file system)")


def check_local_gpus(cfg: Config) -> None:
    """ConfigError when ``job.use_gpu: true`` asks the private local cluster for more GPUs than this machine has (Ray
    would wait for them forever), or method.loss_impl: triton where it has none (the workers would fail on their first
    step); a cluster joined with --address may add GPU nodes as it scales."""
    import torch

    found = torch.cuda.device_count()
    if cfg.method.loss_impl == "triton" and cfg.job.use_gpu != "true" and not found and \
            os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("method.loss_impl: triton runs its kernels on CUDA tensors, and this machine has no GPU; set "
                          "method.loss_impl=auto (PyTorch on CPU), or TRITON_INTERPRET=1 for Triton's interpreter "
                          "(slow)")
    if cfg.job.use_gpu != "true":
        return
    if found < cfg.job.num_workers:
        raise ConfigError(f"job.use_gpu: true gives each of the {cfg.job.num_workers} workers a GPU, and this machine "
                          f"has {found}; set job.use_gpu=auto (GPUs where there are), fewer job.num_workers, or join a "
                          "cluster that has them with --address")
