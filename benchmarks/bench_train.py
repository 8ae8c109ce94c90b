"""Training throughput: images/s per worker for a recipe, through the real stack and for the model alone.

Providers, side by side in one run:

- ``ray+deepspeed``: ``pretrain train`` (local Ray cluster, ``job.num_workers`` workers, DeepSpeed, DALI views, MLflow
  sqlite) for ``--steps`` steps; images/s per worker is the median over the steps after ``--warmup``, as logged by the
  trainer in ``metrics.csv`` (batch_size / step wall time, data loading included).
- ``model-only``: one process, the same method and optimizer on a fixed random batch (no data, no DeepSpeed,
  one thread per worker as Ray gives each worker one CPU): the compute ceiling of one worker.

Results are appended to ``benchmarks/results/train.csv`` with the machine, git sha and time; a table is printed last.
"""

from __future__ import annotations

import csv
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
from benchmarks.common import Parser, append_csv, at_least, cpu_name, csv_out, git_sha  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "train.csv"


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


def bench_ray(recipe: Path, cfg: Config, steps: int, warmup: int, overrides: list[str]) -> dict:
    """``cfg``: the recipe with the run's sets and ``overrides``, as checked before measuring."""
    with tempfile.TemporaryDirectory(prefix="bench-train-") as out:
        sets = [*_run_sets(steps, out), *overrides]
        cmd = [sys.executable, "-m", "pretrain.cli", "train", "--config", str(recipe)]
        for s in sets:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"pretrain train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with (Path(out) / "bench" / "metrics.csv").open() as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) > warmup]
    per_worker = [float(r["images_per_s"]) for r in rows]  # global images/s, logged per step
    ips = statistics.median(per_worker) / cfg.job.num_workers
    return {"provider": "ray+deepspeed", "workers": cfg.job.num_workers, "batch_per_worker": cfg.data.batch_size,
            "images_per_s_per_worker": ips, "median_step_s": cfg.data.batch_size / ips, "wall_s": wall}


def bench_model(cfg: Config, steps: int, warmup: int) -> dict:
    """``cfg``: the config checked before measuring (the run's sets included, so it is the one the run validated; the
    model-only part reads only its method, data and learning rate)."""
    from pretrain.trainer import build_method

    torch.set_num_threads(1)  # as Ray gives each worker its one CPU (OMP_NUM_THREADS=1)
    method = build_method(cfg, distributed=False)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=cfg.optim.lr)
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
        method(batch)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_step_end(i, warmup + steps)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {"provider": "model-only", "workers": 1, "batch_per_worker": b, "images_per_s_per_worker": b / step,
            "median_step_s": step, "wall_s": sum(times)}


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
    csv_out(p, "--out", args.out)
    from pretrain.preflight import check_tracking, new_config

    try:  # the recipe and overrides as the run takes them, checked before anything is measured (as `pretrain train`
        refused = owned_override(args.overrides)  # checks them: a method key the method does not read, a store that
        if refused:  # does not answer; these had failed the run ~10 s in)
            p.error(refused)
        cfg = new_config(args.config, [*_run_sets(args.steps, "/tmp"), *args.overrides])
        if cfg.tracking.uri:
            check_tracking(cfg.tracking.uri, reach=True)
    except ValueError as e:  # (ConfigError's; the tracking URI's check raises ValueError)
        p.error(str(e))

    results = [bench_model(cfg, 20, 3), bench_ray(args.config, cfg, args.steps, args.warmup, args.overrides)]
    stamp, sha, where = time.strftime("%Y-%m-%d %H:%M:%S"), git_sha(), machine()
    recipe = " ".join([args.config.name, *args.overrides])  # what was measured: the recipe and its overrides
    append_csv(args.out, [{"time": stamp, "git_sha": sha, "machine": where, "recipe": recipe, **r} for r in results])
    print(f"machine: {where}\ngit: {sha}  time: {stamp}  recipe: {recipe}")
    print(f"{'provider':<15}{'workers':>8}{'batch/worker':>14}{'img/s/worker':>14}{'step s':>9}{'wall s':>9}")
    for r in results:
        print(f"{r['provider']:<15}{r['workers']:>8}{r['batch_per_worker']:>14}{r['images_per_s_per_worker']:>14.1f}"
              f"{r['median_step_s']:>9.3f}{r['wall_s']:>9.1f}")
    print(f"Appended {len(results)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
