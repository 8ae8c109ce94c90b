"""Training throughput: images/s per worker for a recipe, through the real stack and for the model alone.

Providers, side by side in one run:

- ``ray+deepspeed``: ``pretrain train`` (local Ray cluster, ``job.num_workers`` workers, DeepSpeed, DALI views, MLflow
  sqlite) for ``--steps`` steps; images/s per worker is the median over the steps after ``--warmup``, as logged by the
  trainer in ``metrics.csv`` (batch_size / step wall time, data loading included).
- ``model-only``: one process, the same method, optimizer (``optim.name`` over the engine's param groups) and
  ``optim.accum_steps`` micro-batches per step on a fixed random batch (no data, no DeepSpeed, one thread per worker as
  Ray gives each worker one CPU): the compute ceiling of one worker.

``batch/worker`` is the images one worker trains per optimizer step (``data.batch_size`` x ``optim.accum_steps``). The
recipe, the overrides and its data are checked as ``pretrain train`` checks them before anything is measured; the run's
``data_corrupt`` / ``data_truncated_shards`` counts are reported (a warning line where they are not 0). Ctrl-C (or
SIGTERM) is passed on to the run, which stops its workers; the benchmark then exits 130 (143).

Results are appended to ``benchmarks/results/train.csv`` with the machine, git sha and time; a table is printed last.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pretrain.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    Parser,
    Stopped,
    append_csv,
    at_least,
    cpu_name,
    csv_out,
    git_sha,
    plural,
    stop_on_signals,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "train.csv"
FIELDS = ["time", "git_sha", "machine", "recipe", "provider", "workers", "batch_per_worker", "images_per_s_per_worker",
          "median_step_s", "wall_s", "data_corrupt", "data_truncated_shards"]
"""The CSV's columns (``batch_per_worker``: images per optimizer step and worker; the data counts: the run's, empty for
model-only)."""


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_name()}, {gpu}"


def _run_sets(steps: int, out: str) -> list[str]:
    """What the measured run sets over the recipe (the user's overrides go on top; ``OWNED`` refuses those that would
    set these keys again)."""
    return [f"job.max_steps={steps}", f"job.out_dir={out}", "job.run_name=bench", "eval.enabled=false",
            "job.log_every=5", f"job.ckpt_every={steps}", "optim.warmup_steps=1", "job.progress=false"]


OWNED = {
    "job.max_steps": "the benchmark sets it from --steps (give --steps instead)",
    "job.out_dir": "the benchmark runs in a temporary folder and reads the run's metrics.csv from it",
    "job.run_name": "the benchmark names its own run and reads that run's metrics.csv",
    "eval.enabled": "the benchmark turns evaluation off and measures training steps alone",
    "job.log_every": "the benchmark sets it to 5",
    "job.ckpt_every": "the benchmark sets it to --steps (one checkpoint, at the end)",
    "optim.warmup_steps": "the benchmark sets 1, so that a few --steps make a valid run",
    "job.progress": "the benchmark turns the progress bar off",
}
"""The keys ``_run_sets`` sets, and why a ``--set`` of them is refused: on top of the benchmark's own they would break
the run (a run name or folder it does not read its metrics from) or change what is measured."""


_MISSING = object()


def owned_override(overrides: list[str]) -> str | None:
    """The first ``OWNED`` key that ``overrides`` set, dotted or through their section (``job={run_name: x}``), as a
    one-line refusal naming the key; None when they set none. A malformed override raises ConfigError."""
    from pretrain.config import apply_overrides

    user = apply_overrides({}, overrides)  # only what the user set, nested as the recipe would be
    for key, why in OWNED.items():
        node = user
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            return f"{key}: {why}; drop this --set"
    return None


def _data_counts(run_dir: Path) -> dict:
    """The run's cumulative ``data_corrupt`` / ``data_truncated_shards`` as the trainer logged them to its MLflow store
    (the sqlite one beside the run; empty where the run logged elsewhere)."""
    db = run_dir.parent / "mlflow.db"
    counts = {"data_corrupt": "", "data_truncated_shards": ""}
    if db.is_file():
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            for key, value in con.execute("SELECT key, MAX(value) FROM latest_metrics WHERE key IN (?, ?) GROUP BY key",
                                          tuple(counts)):
                counts[key] = int(value)
    return counts


def _forwarding(proc: subprocess.Popen):
    """SIGINT and SIGTERM passed on to ``proc`` (it stops its Ray workers on its own) and remembered; the benchmark
    waits for it, then raises ``Stopped``. (subprocess.run had SIGKILLed it on Ctrl-C, leaving Ray's agents alive.)"""
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    return received, {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}


def bench_ray(recipe: Path, cfg: Config, steps: int, warmup: int, overrides: list[str]) -> dict:
    """``cfg``: the recipe with the run's sets and ``overrides``, as checked before measuring. The run starts in this
    process's directory, so that relative paths in ``overrides`` and the recipe resolve as they did for the checks."""
    with tempfile.TemporaryDirectory(prefix="bench-train-") as out:
        sets = [*_run_sets(steps, out), *overrides]
        cmd = [sys.executable, "-m", "pretrain.cli", "train", "--config", str(recipe)]
        for s in sets:
            cmd += ["--set", s]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        log = Path(out) / "train.log"
        t0 = time.perf_counter()
        with log.open("w") as f:  # its own session: a terminal's Ctrl-C reaches it once, through ``_forwarding``
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        received, saved = _forwarding(proc)
        try:
            proc.wait()
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
        wall = time.perf_counter() - t0
        if received:
            raise Stopped(received[0])
        if proc.returncode != 0:
            raise SystemExit(f"pretrain train failed (exit status {proc.returncode}); the end of its log:\n"
                             f"{log.read_text(errors='replace')[-3000:]}")
        with (Path(out) / "bench" / "metrics.csv").open() as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) > warmup]
        counts = _data_counts(Path(out) / "bench")
    per_worker = [float(r["images_per_s"]) for r in rows]  # global images/s, logged per step
    ips = statistics.median(per_worker) / cfg.job.num_workers
    images = cfg.data.batch_size * cfg.optim.accum_steps  # the trainer's images/s counts every micro-batch
    return {"provider": "ray+deepspeed", "workers": cfg.job.num_workers, "batch_per_worker": images,
            "images_per_s_per_worker": ips, "median_step_s": images / ips, "wall_s": wall, **counts}


def bench_model(cfg: Config, steps: int, warmup: int) -> dict:
    """``cfg``: the config checked before measuring (the run's sets included, so it is the one the run validated; the
    model-only part reads its method, data and optimizer). One step: ``optim.accum_steps`` forward + backward passes,
    then the optimizer's step, as the engine takes it (peak learning rate, no schedule)."""
    from pretrain.engine import optimizer_hyper, peak_lr
    from pretrain.optim import build_optimizer, config_param_groups
    from pretrain.trainer import build_method

    torch.set_num_threads(1)  # as Ray gives each worker its one CPU (OMP_NUM_THREADS=1)
    method = build_method(cfg, distributed=False)
    hyper = {k: v for k, v in optimizer_hyper(cfg).items() if k != "fused"}  # fused: ZeRO-Offload's CPU partitions
    opt = build_optimizer(config_param_groups(method, cfg.optim), cfg.optim.name, peak_lr(cfg, cfg.job.num_workers),
                          **hyper)
    accum = cfg.optim.accum_steps
    b, c, s, d = cfg.data.batch_size, cfg.data.channels, cfg.data.image_size, cfg.data
    batch = {"views": [torch.randn(b, c, s, s) for _ in range(d.num_views)]
             + [torch.randn(b, c, d.local_size, d.local_size) for _ in range(d.local_views)]}
    if method.needs_text:  # CLIP: the digits captions, as the shards hold them
        from data_pipeline.sources import digit_caption

        batch["text"] = [digit_caption(i % 10, i) for i in range(b)]
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        method.on_step_start(i, warmup + steps)
        for _ in range(accum):
            (method(batch)["loss"] / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_step_end(i, warmup + steps)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {"provider": "model-only", "workers": 1, "batch_per_worker": b * accum,
            "images_per_s_per_worker": b * accum / step, "median_step_s": step, "wall_s": sum(times),
            "data_corrupt": "", "data_truncated_shards": ""}


def preflight(cfg: Config) -> None:
    """``pretrain train``'s own checks of a new run (``--dry-run`` runs them): the tracking store answers, the method's
    inputs, the backbone, the optimizer, the data (data.source there, built-in shards built on first use, enough
    samples for a batch on every worker) and the local GPUs; ConfigError in one line. (A missing data.source had failed
    the run after the model-only measurement; a recipe's missing dataset, after a ResNet-50 step.)"""
    from pretrain.preflight import check_local_gpus, prepare_run

    check_local_gpus(cfg)
    with tempfile.TemporaryDirectory(prefix="bench-train-check-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        prepare_run(cfg, Path(tmp) / "bench", write=False, reach_tracking=True)  # writes nothing; prints its shards


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "simclr_digits.yaml",
                   help="the recipe to measure (default configs/simclr_digits.yaml)")
    p.add_argument("--steps", type=at_least(2), default=60, help="training steps of the ray+deepspeed run (default 60)")
    p.add_argument("--warmup", type=at_least(0), default=10,
                   help="its first steps left out of the median (default 10; fewer than --steps)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override, as `pretrain train --set` takes it (repeatable)")
    p.add_argument("--out", type=Path, default=RESULTS, help="the CSV to append the rows to (default "
                   "benchmarks/results/train.csv)")
    args = p.parse_args(argv)
    if args.warmup >= args.steps:
        p.error(f"--warmup: {args.warmup} leaves none of the {args.steps} --steps to measure")
    args.config = args.config.expanduser().absolute()  # the user's file, for the checks and for the run alike
    csv_out(p, "--out", args.out, FIELDS)
    from pretrain.preflight import new_config

    try:  # the recipe and overrides as the run takes them, checked before anything is measured (as `pretrain train`
        refused = owned_override(args.overrides)  # checks them: a method key the method does not read, a store that
        if refused:  # does not answer; these had failed the run ~10 s in)
            p.error(refused)
        cfg = new_config(args.config, [*_run_sets(args.steps, "/tmp"), *args.overrides])
        preflight(cfg)
    except ValueError as e:  # (ConfigError's; the tracking URI's check raises ValueError)
        p.error(str(e))

    try:
        with stop_on_signals():
            results = [bench_model(cfg, 20, 3)]
            results.append(bench_ray(args.config, cfg, args.steps, args.warmup, args.overrides))
    except Stopped as e:
        print(f"Stopped by {e}: nothing appended to {args.out}", file=sys.stderr)
        return 128 + e.signum
    stamp, sha, where = time.strftime("%Y-%m-%d %H:%M:%S"), git_sha(), machine()
    recipe = " ".join([args.config.name, *args.overrides])  # what was measured: the recipe and its overrides
    append_csv(args.out, [{"time": stamp, "git_sha": sha, "machine": where, "recipe": recipe, **r} for r in results],
               FIELDS)
    print(f"machine: {where}\ngit: {sha}  time: {stamp}  recipe: {recipe}")
    print(f"{'provider':<15}{'workers':>8}{'batch/worker':>14}{'img/s/worker':>14}{'step s':>9}{'wall s':>9}")
    for r in results:
        print(f"{r['provider']:<15}{r['workers']:>8}{r['batch_per_worker']:>14}{r['images_per_s_per_worker']:>14.1f}"
              f"{r['median_step_s']:>9.3f}{r['wall_s']:>9.1f}")
    ray = results[-1]
    if ray["data_corrupt"] or ray["data_truncated_shards"]:
        print(f"warning: the run skipped {plural(ray['data_corrupt'], 'corrupt sample')} and met "
              f"{plural(ray['data_truncated_shards'], 'truncated or unreadable shard')}: its images/s are not "
              "those of the whole dataset")
    print(f"Appended {plural(len(results), 'row')} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
