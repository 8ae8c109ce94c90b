"""Checkpoints of the DeepSpeed engine (``pretrain.engine``): save and load, the conversion to DeepSpeed's universal
form that lets a run resume on another number of ranks, and the whole model's state merged offline from any checkpoint.

A checkpoint is a directory that Ray (or the torchrun session) gives each report; DeepSpeed writes every rank's ZeRO
partition into its ``CKPT_TAG`` folder, and a resume on another data-parallel size adds the universal form beside it.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from pretrain.engine import deepspeed  # as the engine imports it: its accelerator chosen, MLflow kept out

CKPT_TAG = "state"
"""DeepSpeed tag inside every reported checkpoint directory (Ray gives each checkpoint its own directory)."""
UNIVERSAL_TAG = "state_universal"
"""Beside ``CKPT_TAG`` once a run resumes on another number of ranks: the same state in DeepSpeed's universal format."""
STAGE_PREFIX = "ssl-pretrain-ckpt-"
"""Start of the name of the local directory each rank writes a checkpoint in before the session copies it to the run
(``staging_dir``): ``ssl-pretrain-ckpt-<host>-<pid>-<random>`` in the temp dir."""


def staging_dir() -> tempfile.TemporaryDirectory:
    """A temporary directory for this rank to write a checkpoint in, named after this host and process. A process
    killed while its checkpoint is reported (preempted, a run aborted by Ctrl-C or SIGTERM) leaves its directory behind,
    a whole ZeRO partition on the node's local disk: each call first removes those of this host's processes that are
    gone (``remove_orphan_stages``), so a node keeps at most the stages of processes still running."""
    root = Path(tempfile.gettempdir())
    remove_orphan_stages(root)
    return tempfile.TemporaryDirectory(prefix=f"{STAGE_PREFIX}{socket.gethostname()}-{os.getpid()}-", dir=root)


def remove_orphan_stages(root: Path) -> list[Path]:
    """Remove the ``staging_dir`` directories under ``root`` of this host whose process no longer runs; returns them.
    Those of other hosts (a temp dir shared between hosts) and of live processes are left."""
    host, removed = socket.gethostname(), []
    for path in root.glob(f"{STAGE_PREFIX}*"):
        named = path.name[len(STAGE_PREFIX):].rsplit("-", 2)  # the host's name may hold '-', the random part never
        if len(named) != 3 or named[0] != host or not named[1].isdigit() or _running(int(named[1])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def save_checkpoint(engine, directory: str | Path, client_state: dict) -> None:
    """Every rank writes its ZeRO partition into ``directory``/state."""
    engine.save_checkpoint(str(directory), tag=CKPT_TAG, client_state=client_state)


def load_checkpoint(engine, directory: str | Path, *, universal: bool = False) -> dict:
    """Restore module, optimizer, scheduler; returns the client state saved with it. ``universal``: from the universal
    form ``to_universal`` wrote (the engine built with ``universal=True``), whatever the number of ranks now."""
    tag = UNIVERSAL_TAG if universal else CKPT_TAG
    built = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    path, client_state = engine.load_checkpoint(str(directory), tag=tag)
    if path is None:
        raise RuntimeError(f"no DeepSpeed checkpoint under {directory}/{tag}")
    if universal:
        _repair_universal_load(engine, built)
        _momentum_back(engine)
        _restore_untrained(engine, Path(directory) / UNIVERSAL_TAG / UNTRAINED_FILE)
    engine.lr_scheduler.follow_config()  # after the optimizer's state, which ZeRO loads last
    return client_state


UNTRAINED_FILE = "module.pt"
"""In a universal checkpoint: the whole model's state, for what DeepSpeed's universal load leaves out."""


def _repair_universal_load(engine, built: list[dict]) -> None:
    """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal load (found by tests/pretrain/test_elastic.py, harmless
    elsewhere): it gives every param group the first one's settings, so a group that takes no weight decay would decay
    like the first: each group's own flags (``built``: the groups as the engine was built) and such a group's zero
    come back; and it hands every group's optimizer state one shared ``step`` tensor, which Adam then advances once
    per group and step, skewing its bias correction: each gets its own."""
    for group, own in zip(engine.optimizer.param_groups, built):
        group.update({k: own[k] for k in ("decay", "matrix", "fixed_lr", "lars", "lr_mult") if k in own})
        if not own.get("decay"):
            group["weight_decay"] = own["weight_decay"]
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _restore_untrained(engine, saved_file: Path) -> None:
    """DeepSpeed's universal load restores what the optimizer holds (the trained parameters and their moments) and
    nothing else: the module's buffers (DINO's center, BatchNorm statistics, a SwAV queue) and its frozen parameters
    (an EMA teacher, which ZeRO-3 partitions without training it) come from ``saved_file`` here."""
    saved = torch.load(saved_file, map_location="cpu", weights_only=True, mmap=True)
    module = engine.module
    with torch.no_grad():
        for name, buf in module.named_buffers():
            buf.copy_(saved[name])
        frozen = [(name, p) for name, p in module.named_parameters() if not p.requires_grad]
        # under ZeRO-3 each rank holds a partition: gathered whole, set (alike on every rank), partitioned again
        with deepspeed.zero.GatheredParameters([p for _, p in frozen], modifier_rank=0,
                                               enabled=engine.zero_optimization_stage() == 3):
            for name, p in frozen:
                p.copy_(saved[name])


def to_universal(directory: str | Path, stage: int) -> tuple[Path, float]:
    """Convert the ZeRO-``stage`` partitions of checkpoint ``directory`` (``CKPT_TAG``, stage 1-3, any number of
    ranks) into DeepSpeed's universal checkpoint beside them (``UNIVERSAL_TAG``: each trained parameter whole, with
    its fp32 master copy and optimizer moments; plus the whole model's state, for the buffers and frozen parameters
    that DeepSpeed's universal load leaves out), which an engine of any data-parallel size loads. Returns (its path,
    seconds taken; 0 when it was there already).

    Offline, on the CPU, with DeepSpeed's ``ds_to_universal``. Written under a ``.partial`` name and renamed when
    complete: an interrupted conversion leaves the checkpoint as it was and is redone. Nothing of the ZeRO form is
    changed. RuntimeError (one line, DeepSpeed's last words) if the conversion fails.

    DeepSpeed 0.19's converter and ZeRO-3 loader know Adam's moments only (``exp_avg``, ``exp_avg_sq``): SGD's and
    LARS's momentum makes the trip under Adam's names (``_momentum_as_adam``), and ``load_checkpoint`` gives it its
    own back."""
    import argparse
    import contextlib
    import io
    import shutil

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    directory = Path(directory)
    out = directory / UNIVERSAL_TAG
    if out.is_dir():
        return out, 0.0
    partial, staged = (directory / (UNIVERSAL_TAG + suffix) for suffix in (".partial", ".input"))
    for leftover in (partial, staged):
        shutil.rmtree(leftover, ignore_errors=True)
    workers = max(1, min(4, os.cpu_count() or 1))
    log = io.StringIO()
    start = time.perf_counter()
    try:
        source = staged if _momentum_as_adam(directory / CKPT_TAG, staged, stage) else directory / CKPT_TAG
        args = argparse.Namespace(input_folder=str(source), output_folder=str(partial), num_extract_workers=workers,
                                  num_merge_workers=workers, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # a line per step and progress bars
            ds_to_universal(args)
        torch.save(consolidated_state_dict(directory, stage), partial / UNTRAINED_FILE)
    except Exception as e:  # noqa: BLE001 - DeepSpeed raises what it raises; the user gets it on one line
        shutil.rmtree(partial, ignore_errors=True)
        raise RuntimeError(f"converting {directory} to a universal checkpoint failed: {type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    partial.rename(out)
    return out, time.perf_counter() - start


def _momentum_as_adam(source: Path, staged: Path, stage: int) -> bool:
    """Where the ZeRO-``stage`` checkpoint files in ``source`` hold a momentum optimizer's state (SGD's, LARS's:
    ``momentum_buffer``, no Adam moments), write a copy of them into ``staged`` that names the momentum as Adam's
    ``exp_avg`` and ``exp_avg_sq`` (one tensor saved once under both names; under ZeRO-3 with the ``step`` its loader
    reads), the model states linked, for DeepSpeed's converter; True if it did. Each rank's optimizer file is loaded
    whole, one at a time, as the converter itself loads them."""
    optim_files = sorted(source.glob("*_optim_states.pt"))

    def base_states(sd: dict) -> dict:
        optim = sd["optimizer_state_dict"]
        return (optim["optimizer_state_dict"] if stage == 3 else optim["base_optimizer_state"])["state"]

    def flat_partitions(sd: dict) -> list[torch.Tensor]:
        optim = sd["optimizer_state_dict"]
        return optim["fp32_flat_groups"] if stage == 3 else optim["single_partition_of_fp32_groups"]

    first = torch.load(optim_files[0], map_location="cpu", weights_only=False)
    if any("exp_avg" in state for state in base_states(first).values()):
        return False
    staged.mkdir()
    for path in source.iterdir():
        if path not in optim_files:
            (staged / path.name).symlink_to(path.resolve())
            continue
        sd = first if path == optim_files[0] else torch.load(path, map_location="cpu", weights_only=False)
        states = base_states(sd)
        for i, flat in enumerate(flat_partitions(sd)):
            state = states.setdefault(i, {})
            momentum = state.pop("momentum_buffer", None)  # none where it never stepped (or SGD without momentum)
            state["exp_avg"] = state["exp_avg_sq"] = torch.zeros_like(flat) if momentum is None else momentum
            if stage == 3:
                state["step"] = torch.tensor(0.0)
        torch.save(sd, staged / path.name)
        del sd
    return True


def _momentum_back(engine) -> None:
    """After a universal load into a momentum optimizer (SGD, LARS): the momentum ``_momentum_as_adam`` carried as
    Adam's ``exp_avg`` becomes its ``momentum_buffer`` again; the rest of Adam's names go."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
        return
    for state in inner.state.values():
        if "exp_avg" in state:
            state["momentum_buffer"] = state.pop("exp_avg")
            for name in ("exp_avg_sq", "step"):
                state.pop(name, None)


def full_state_dict(engine, module: nn.Module) -> dict[str, torch.Tensor]:
    """A full state dict of ``module`` (a submodule of the engine's model) on CPU, its floating tensors in fp32 and
    the others (BatchNorm's step counts) as they are, as :func:`consolidated_state_dict` gives them; collective under
    ZeRO-3."""
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=engine.zero_optimization_stage() == 3):
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                for k, v in module.state_dict().items()}


def consolidated_state_dict(directory: str | Path, stage: int) -> dict[str, torch.Tensor]:
    """The whole model's fp32 state dict (parameters, frozen ones such as an EMA teacher too, and buffers) from a
    checkpoint ``save_checkpoint`` wrote under ZeRO ``stage``, offline, on the CPU, whatever the world size that wrote
    it (DeepSpeed's zero_to_fp32 merges the ranks' partitions of the trained parameters).

    Under ZeRO 0-2 every rank holds the whole module, which the first rank's model states keep: the frozen parameters
    come from there (zero_to_fp32 leaves them out under ZeRO-1, whose checkpoints do not list them), the trained ones
    from the fp32 partitions (the same numbers: the module trains in fp32)."""
    whole = {}
    if stage < 3:
        module = torch.load(Path(directory) / CKPT_TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)["module"]
        whole = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    if stage == 0:  # no partitions
        return whole
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # a line per file, a progress bar
        whole.update(get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=CKPT_TAG))
    return whole
