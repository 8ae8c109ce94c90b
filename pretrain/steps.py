"""A run's encoder at any checkpointed step: ``pretrain extract`` turns a training checkpoint into what a finished run
leaves (``backbone.pt``, and ``model.pt`` for a method used whole), in ``<run>/steps/step_XXXXXXX``.

The checkpoints are the ones training writes for resuming: Ray's ``<run>/checkpoint_*`` directories, or
``<run>/checkpoints/step_XXXXXXX`` under torchrun, each holding every rank's ZeRO partitions. They are merged
offline on the CPU (``pretrain.checkpoint.consolidated_state_dict``), whatever the number of ranks that wrote them, and
loaded into the run's method, so a step's directory is read by ``pretrain eval``, ``embed``, ``search``, ``export`` and
``pretrain.load_encoder`` as a finished run is: a run still training, or stopped for good, has usable weights, and the
best point of the kNN monitor's curve can be taken instead of the last.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain.config import Config, config_from_dict, dump_config, load_config, to_dict

STEPS_DIR = "steps"
CHECKPOINT_INFO = "checkpoint.json"
"""Written by the trainer into each checkpoint: {"step", "epoch", "world_size"}."""
MODEL_FILE = "model.pt"
"""Beside backbone.pt, for a method used downstream whole (CLIP: both towers): {"config", "state_dict"}."""


STOP_FILE = "stop_requested"
"""Written into a training run's directory by ``pretrain stop`` (and by a Slurm job at its time-limit warning): the run
checkpoints after the step it is on and ends there, its rank 0 writing that step into the file (:func:`stopped_at`).
A start of the run removes one left over; a run that finishes removes one that came at its last step."""
STOPPED_EXIT = 75
"""``pretrain train``'s exit status where the run stopped as asked (sysexits' EX_TEMPFAIL: to be run again)."""

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train's record of a run's checkpoints, written once every rank has reported one."""


def _ray_registered(run_dir: Path) -> set[str] | None:
    """Names of the ``checkpoint_*`` directories Ray registered (each rank's files in them), or None for a run without
    a readable record of Ray's (older Ray, or torchrun's layout)."""
    try:
        results = json.loads((run_dir / RAY_SNAPSHOT).read_text())["checkpoint_results"]
        return {r["checkpoint_dir_name"] for r in results}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_ray_record(run_dir: str | Path) -> None:
    """ValueError (one line) where ``run_dir`` holds Ray's ``checkpoint_*`` folders without a readable record of them:
    never written (the run was stopped before Ray recorded its first checkpoint), deleted, or left empty by a disk
    that filled while Ray wrote it. Ray would start the run over from step 0 (or fail to start), and which of them
    are complete is unknown: a branch (``--from-step``) checks the one it takes."""
    run_dir = Path(run_dir)
    folders = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    if folders and _ray_registered(run_dir) is None:
        why = ("is unreadable (a disk that filled while it was written?)" if (run_dir / RAY_SNAPSHOT).exists() else
               "is missing (the run was stopped before Ray recorded its first checkpoint, or it was deleted)")
        raise ValueError(f"--resume: {run_dir} holds {len(folders)} Ray checkpoint(s) (checkpoint_*) but Ray's record "
                         f"of them, {RAY_SNAPSHOT}, {why}: Ray would start the run over; {unrecorded_way_on(run_dir)}")


def unrecorded_way_on(run_dir: Path) -> str:
    """How a run whose Ray checkpoints Ray has no record of goes on, as the end of a sentence."""
    steps = ", ".join(map(str, sorted(list_checkpoints(run_dir)))) or "none"
    return (f"go on from one as a new run with `--resume {run_dir} --from-step N`, which checks it holds every rank's "
            f"files (steps on disk: {steps})")


def cut_short(checkpoint: str | Path) -> list[Path]:
    """The files of ``checkpoint`` (torch.save's, each a zip archive) that do not end as a zip archive ends (its
    end-of-central-directory record in the last 22 bytes): cut short by a disk that filled or a job stopped mid-write.
    Read from each file's last bytes only."""
    bad = []
    for path in sorted(Path(checkpoint).rglob("*.pt")):
        try:
            with path.open("rb") as f:
                f.seek(max(0, path.stat().st_size - 22))
                if not f.read(4).startswith(b"PK\x05\x06"):
                    bad.append(path)
        except OSError:
            bad.append(path)
    return bad


def list_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """``{step: checkpoint directory}`` of the complete checkpoints of ``run_dir`` (Ray's or torchrun's layout).

    A job stopped while its ranks were writing a checkpoint leaves a directory with some ranks' files only: Ray's
    ``checkpoint_*`` that its record does not name (it resumes from the last one it does), torchrun's
    ``step_XXXXXXX.partial``; neither is listed."""
    from pretrain.checkpoint import CKPT_TAG

    run_dir = Path(run_dir)
    registered = _ray_registered(run_dir)
    found = [p for p in run_dir.glob("checkpoint_*") if p.is_dir() and (registered is None or p.name in registered)]
    found += [p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return {int(checkpoint_info(p)["step"]): p for p in sorted(found) if (p / CKPT_TAG).is_dir()}


def checkpoint_info(checkpoint: str | Path) -> dict:
    """``{"step", "epoch", "world_size"}`` of a checkpoint: its ``checkpoint.json``, or for a checkpoint of an older
    version the client state in the first rank's DeepSpeed model states (the world size: DeepSpeed's own record)."""
    info = Path(checkpoint) / CHECKPOINT_INFO
    if info.is_file():
        try:
            return json.loads(info.read_text())
        except ValueError:  # (UnicodeDecodeError too)
            raise ValueError(f"{info} is not JSON (empty or damaged): the checkpoint's record of its step") from None
    from pretrain.checkpoint import CKPT_TAG

    state = Path(checkpoint) / CKPT_TAG  # ZeRO 0-2 name their first rank's file the one way, ZeRO-3 the other
    first = next((p for p in (state / "mp_rank_00_model_states.pt", state / "zero_pp_rank_0_mp_rank_00_model_states.pt")
                  if p.is_file()), None)
    if first is None:
        raise ValueError(f"{checkpoint} holds no {CHECKPOINT_INFO} and no DeepSpeed model states")
    states = torch.load(first, map_location="cpu", weights_only=False, mmap=True)
    return {"step": int(states["step"]), "epoch": int(states.get("epoch", 0)),
            "world_size": int(states.get("world_size", states["dp_world_size"]))}


def saved_step(path: str | Path) -> int | None:
    """The training step a finished run's ``backbone.pt`` or ``eval.json`` holds or scored (their ``"step"``, which
    the trainer and ``extract`` write), or None for one written before they recorded it, or unreadable."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            step = json.loads(path.read_text()).get("step")
        else:  # memory-mapped: the step, not the weights, is read
            step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("step")
    except Exception:  # noqa: BLE001 - torch.load and json raise many types for a file they cannot read
        return None
    return int(step) if isinstance(step, int) else None


def stopped_at(run_dir: str | Path) -> int | None:
    """The step a run checkpointed and stopped at as asked (:data:`STOP_FILE`), the request then removed; None where
    its training did not stop so (it finished, failed, or never saw the request)."""
    path = Path(run_dir) / STOP_FILE
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():  # asked, not (yet) acted on
        return None
    path.unlink(missing_ok=True)
    return int(text)


def check_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path; ValueError (one line, naming --checkpoint) unless it is a run directory (config.yaml)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"--checkpoint: {run_dir} " + ("is not a run directory (no config.yaml)" if run_dir.exists()
                                                       else "does not exist"))
    return run_dir


def saved_config(checkpoint: str | Path) -> Config | None:
    """The config ``checkpoint`` was saved under (its checkpoint.json holds it; the run's config.yaml may have been
    edited or damaged since), or None for a checkpoint of an older version or fields."""
    saved = checkpoint_info(checkpoint).get("config")
    try:
        return config_from_dict(saved) if saved is not None else None
    except (ValueError, TypeError):
        return None


def _run_of(backbone: Path) -> str | None:
    """The run an extracted ``backbone.pt`` came from (its ``"run"``), or None."""
    try:
        return torch.load(backbone, map_location="cpu", weights_only=True, mmap=True).get("run")
    except Exception:  # noqa: BLE001 - torch.load raises many types for a file it cannot read
        return None


def _first_line(e: BaseException) -> str:
    """``type: message`` of ``e``, its first line and sentence only (torch's run on for lines)."""
    return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / STEPS_DIR / f"step_{step:07d}"


def extract_step(run_dir: str | Path, step: int | None = None, out: str | Path | None = None) -> tuple[int, Path]:
    """Write the encoder of checkpoint ``step`` (default: the latest) of ``run_dir`` as a run directory ``out``
    (default ``<run>/steps/step_XXXXXXX``): its config.yaml, backbone.pt (+ model.pt). Returns (step, out).
    ValueError (one line) for a run without that checkpoint or an ``out`` that already holds weights."""
    from pretrain.checkpoint import consolidated_state_dict
    from pretrain.trainer import build_method

    run_dir = check_run_dir(run_dir)
    found = list_checkpoints(run_dir)
    if not found and (run_dir / "backbone.pt").is_file():
        came = _run_of(run_dir / "backbone.pt")
        raise ValueError(f"--checkpoint: {run_dir} holds an encoder and no training checkpoint"
                         + (f" (a step extracted from {came}: give that run)" if came else ""))
    if not found:
        raise ValueError(f"--checkpoint: {run_dir} has no checkpoint yet (they are written every job.ckpt_every steps)")
    given, step = step is not None, max(found) if step is None else step
    if step not in found:
        raise ValueError(f"--step: {run_dir} has no checkpoint of step {step}; it has steps "
                         + ", ".join(str(s) for s in sorted(found)))
    out = step_dir(run_dir, step) if out is None else Path(out)
    if (out / "backbone.pt").exists():
        raise ValueError(f"--out: {out} already holds an encoder; extract overwrites nothing")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out: {out} exists and is not an empty directory; extract writes a new one and overwrites "
                         "nothing")
    what = "--step" if given else "--checkpoint"
    cfg = saved_config(found[step]) or load_config(run_dir / "config.yaml")
    method = build_method(cfg, distributed=False)
    try:
        state = consolidated_state_dict(found[step], cfg.zero.stage)
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # torch.load's and DeepSpeed's, of a file cut short
        raise ValueError(f"{what}: checkpoint {found[step]} (step {step}) does not load ({_first_line(e)}): "
                         "damaged (a job stopped or a disk filled while it was written?); `--list` names the others"
                         ) from None
    try:
        method.load_state_dict(state)
    except RuntimeError as e:  # a checkpoint of an older version (no config of its own) against an edited config.yaml
        raise ValueError(f"{what}: checkpoint {found[step]} (step {step}) does not fit the model of "
                         f"{run_dir / 'config.yaml'} (edited since?): {_first_line(e)}") from None
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    saved = {"config": to_dict(cfg), "step": step, "run": str(run_dir.resolve())}
    if method.saves_model:
        torch.save({**saved, "state_dict": method.state_dict()}, out / MODEL_FILE)
    torch.save({**saved, "state_dict": method.backbone.state_dict()}, out / "backbone.pt")  # last: marks it whole
    return step, out
