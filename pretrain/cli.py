"""``pretrain``: one console script, subcommands ``train``, ``eval`` and ``data``.

Every check that can fail on user input runs here, before Ray or any worker starts; a problem is one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pretrain.config import Config, ConfigError, load_config

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "simclr_digits.yaml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain", description="Self-supervised pretraining of visual encoders.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="pretrain an encoder with Ray Train + DeepSpeed, tracked in MLflow, evaluated at the end",
        description="Pretrain with the recipe in --config on a Ray cluster (a private local one unless --address). "
        "The run directory <job.out_dir>/<job.run_name> receives config.yaml, Ray's checkpoints, metrics.csv, "
        "backbone.pt, loss_curve.png and eval.json.",
    )
    t.add_argument("--config", type=Path, help=f"YAML recipe (default: {DEFAULT_RECIPE.name})")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    t.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue RUN_DIR from its latest checkpoint, with its config (plus --set overrides)")
    t.add_argument("--address", help="join this Ray cluster (e.g. 10.0.0.1:6379 or 'auto') instead of starting one")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<job.out_dir>/mlflow.db)")
    t.add_argument("--dry-run", action="store_true",
                   help="validate, build the shards, write the run directory and config, then stop")

    e = sub.add_parser("eval", help="evaluate a pretrained backbone on frozen features",
                       description="kNN, linear probe, 1/5-shot and KMeans NMI/ARI of a backbone, next to the same "
                       "encoder at random init and raw pixels; writes eval.json beside the checkpoint.")
    e.add_argument("--checkpoint", type=Path, required=True, help="a run directory or its backbone.pt")
    e.add_argument("--dataset", default="digits", choices=["digits"])
    e.add_argument("--out", type=Path, help="where to write the report (default: eval.json beside the checkpoint)")

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("shards", help="write WebDataset tar shards + a Parquet manifest + checksums",
                        description="Write WebDataset shards from a source: 'digits' (scikit-learn) or "
                        "'folder:PATH' (an ImageFolder-style tree of JPEG/PNG, class = sub-folder).")
    s.add_argument("--source", required=True, help="digits | folder:PATH")
    s.add_argument("--out", type=Path, required=True, help="output directory (must not hold shards already)")
    s.add_argument("--shard-size", type=int, default=256, help="samples per shard (default 256)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _resolve_train_config(args) -> tuple[Config, Path]:
    overrides = list(args.overrides)
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.resume:
        run_dir = args.resume.resolve()
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume: {run_dir} is not a run directory (no config.yaml)")
        before = load_config(saved)
        cfg = load_config(saved, overrides)
        if cfg.job.num_workers != before.job.num_workers:
            raise ConfigError(
                f"job.num_workers: the checkpoints of {run_dir.name} are ZeRO partitions of {before.job.num_workers} "
                f"workers and cannot be loaded by {cfg.job.num_workers}"
            )
        return cfg, run_dir
    cfg = load_config(args.config or DEFAULT_RECIPE, overrides)
    name = cfg.job.run_name or f"{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = (Path(cfg.job.out_dir).expanduser() / name).resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"job.run_name: {run_dir} already holds a run; continue it with --resume {run_dir}")
    return cfg, run_dir


def cmd_train(args) -> int:
    cfg, run_dir = _resolve_train_config(args)
    from pretrain.data import resolve_shards
    from pretrain.tracking import check_tracking_uri

    if cfg.tracking.uri:
        check_tracking_uri(cfg.tracking.uri)
    shards = resolve_shards(cfg.data)  # builds the digits shards on first use
    from pretrain.trainer import write_run_files

    if not args.resume:
        write_run_files(cfg, run_dir)
    elif args.overrides:
        write_run_files(cfg, run_dir)  # the resumed run goes on with the overridden config: keep it beside the run
    print(f"Run directory: {run_dir}  ({len(shards)} shards, {cfg.job.num_workers} workers)", flush=True)
    if args.dry_run:
        return 0

    from pretrain.engine import prebuild_ops

    prebuild_ops()
    from cluster.ray_launcher import TrainingFailed, run_ray

    try:
        result = run_ray(cfg, run_dir, address=args.address)
    except TrainingFailed as e:
        print(f"error: {e}; resume with --resume {run_dir}", file=sys.stderr)
        return 1
    if result.error is not None:
        print(f"error: training failed: {result.error}; resume with --resume {run_dir}", file=sys.stderr)
        return 1
    print(f"Done: {run_dir}", flush=True)
    if (run_dir / "eval.json").is_file():
        print(f"Evaluation report: {run_dir / 'eval.json'}", flush=True)
    return 0


def cmd_eval(args) -> int:
    from pretrain.evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, dataset=args.dataset, out_path=args.out)
    return 0


def cmd_data(args) -> int:
    from data_pipeline.shards import write_shards

    if args.shard_size <= 0:
        raise ConfigError(f"--shard-size: must be > 0, got {args.shard_size}")
    manifest = write_shards(args.source, args.out, shard_size=args.shard_size, progress=not args.no_progress)
    print(f"Wrote shards and {manifest}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"train": cmd_train, "eval": cmd_eval, "data": cmd_data}[args.command]
    try:
        return handler(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:  # user input; programming errors keep their traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
