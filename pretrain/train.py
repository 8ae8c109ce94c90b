"""Run the training loop without Ray: ``torchrun --nproc-per-node N -m pretrain.train RUN_DIR``.

``RUN_DIR`` holds a resolved ``config.yaml`` (write one with ``pretrain train --dry-run``). Checkpoints go to
``RUN_DIR/checkpoints/step_*``; running the same command again resumes from the latest one (a run begun on Ray, from
its latest ``checkpoint_*``); a run with nothing left to train is refused in one line. ``pretrain stop RUN_DIR`` has
every rank checkpoint after the step it is on and end there (status 0: torchrun would take another for a failure).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as td

from pretrain.cli import end_process
from pretrain.config import load_config
from pretrain.methods import METHODS
from pretrain.optim import check_fixed_lr
from pretrain.preflight import check_backbone, check_steps_left
from pretrain.steps import list_checkpoints, stopped_at
from pretrain.trainer import LocalSession, train


def main(argv: list[str] | None = None) -> int:
    """``argv`` None: this process's own command line, and the process ends with it (``pretrain.cli.end_process``)."""
    code = _run(sys.argv[1:] if argv is None else argv)
    if argv is None:
        end_process(code)
    return code


def _run(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: torchrun --nproc-per-node N -m pretrain.train RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0]).resolve()
    try:
        if not (run_dir / "config.yaml").is_file():
            raise ValueError(f"{run_dir} is not a run directory (no config.yaml; `pretrain train --dry-run` writes it)")
        if not (run_dir / "config.yaml").read_text().strip():
            raise ValueError(f"{run_dir / 'config.yaml'} is empty (damaged; the run's config is logged in MLflow)")
        cfg = load_config(run_dir / "config.yaml")
        check_steps_left(cfg, run_dir)  # a finished run, or a step's encoder (`pretrain extract`): nothing to go on
        METHODS[cfg.method.name].check_inputs(cfg)  # before the process group: one line, no traceback per rank
        check_fixed_lr(cfg)
        check_backbone(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not td.is_initialized():  # torchrun sets RANK / WORLD_SIZE / MASTER_ADDR; a plain `python -m` is one process
        if "WORLD_SIZE" not in os.environ:
            print("No launcher (torchrun sets WORLD_SIZE): training as one process", flush=True)
        _one_process_env()
        td.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        try:
            train(cfg, run_dir, LocalSession(run_dir, cfg.job.keep_checkpoints))
        except KeyboardInterrupt:  # Ctrl-C: one line (each rank's traceback had been printed), the way on named
            if td.get_rank() == 0:
                steps = list_checkpoints(run_dir)
                where = (f"its latest checkpoint is step {max(steps)}; the same command goes on from there" if steps
                         else "it has no checkpoint yet; the same command starts it again")
                print(f"Stopped by SIGINT; {where} (`pretrain stop {run_dir}` has a run checkpoint before it ends)",
                      file=sys.stderr, flush=True)
            return 130
        td.barrier()  # rank 0 has written the step it stopped at, if it was asked to stop
        if td.get_rank() == 0:
            step = stopped_at(run_dir)
            print(f"Done: {run_dir}" if step is None else f"Stopped at step {step} as asked, checkpointed; the same "
                  "command goes on from there", flush=True)
    finally:
        td.destroy_process_group()
    return 0


def _one_process_env() -> None:
    """The variables torchrun would set, for a group of one process (DeepSpeed also reads LOCAL_RANK); the store on a
    free loopback port unless MASTER_PORT says otherwise."""
    import socket

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
