"""Where a run's shards come from: a built-in source (digits, samples) cached on first use, or a directory with a
manifest, or the URL of one served over HTTP(S) (data_pipeline.remote)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from data_pipeline.remote import is_url
from data_pipeline.shards import BUILTIN_VERSIONS, count_captions, ensure_builtin_shards, list_shards, read_manifest
from pretrain.config import ConfigError, DataConfig


def resolve_shards(cfg: DataConfig, *, captions: bool = False, ranks: int | None = None) -> list[str]:
    """Shard paths for ``data.source``; builds a built-in source's shards on first use (atomically, so racing ranks are
    safe).

    ``captions``: the method trains on image-text pairs (CLIP); a dataset without a single caption is refused here,
    before any worker starts (samples that lack one among captioned ones are skipped and counted as corrupt).
    ``ranks``: the ranks that will share the samples; a dataset with fewer samples than ``data.batch_size`` x ranks
    is refused (some rank would never fill a batch, and would fail only after the cluster started).
    """
    if cfg.source in BUILTIN_VERSIONS:
        shards = ensure_builtin_shards(Path(cfg.cache_dir).expanduser(), cfg.source, shard_size=cfg.shard_size)
        data_dir, hint = Path(shards[0]).parent, ""
    elif is_url(cfg.source):  # served over HTTP(S): the manifest must answer now, before any worker starts
        data_dir, shards, hint = cfg.source.rstrip("/"), None, ""
    else:
        data_dir, shards = Path(cfg.source).expanduser(), None
        if not (data_dir / "manifest.parquet").is_file():
            raise ConfigError(f"data.source: {data_dir} {_not_shards(data_dir)}")
        hint = " (put a <image stem>.txt caption beside each image and write the shards again)"
    try:  # read once (a URL's is fetched once) for every check below and the shard list
        table = read_manifest(data_dir, columns=None if captions else ["shard"])
    except ValueError as e:
        raise ConfigError(f"data.source: {e}") from None
    if captions and count_captions(data_dir, table=table) == 0:
        raise ConfigError(f"data.source: {cfg.source} has no captions, and the method trains on image-text pairs{hint}")
    if ranks is not None and table.num_rows < cfg.batch_size * ranks:
        raise ConfigError(f"data.batch_size: {cfg.batch_size} images a rank x {ranks} ranks is more than the "
                          f"{table.num_rows} samples of {cfg.source}; every rank needs a full batch from its share of "
                          "them")
    if ranks is not None:
        from collections import Counter

        from data_pipeline.reader import smallest_rank_share

        sizes = list(Counter(table.column("shard").to_pylist()).values())
        share = smallest_rank_share(sizes, world_size=ranks, num_workers=cfg.num_loader_workers)
        if share < cfg.batch_size:
            how = ("data.shard_size, which a built-in source is written with" if cfg.source in BUILTIN_VERSIONS else
                   "`pretrain data shards --shard-size`")
            raise ConfigError(f"data.batch_size: {cfg.batch_size} images a rank is more than the {share} samples a "
                              f"rank may get in an epoch (the {len(sizes)} shards of {cfg.source} go whole to "
                              f"{ranks} ranks x {max(1, cfg.num_loader_workers)} loader reader(s)); write smaller "
                              f"shards ({how}), or lower data.batch_size or job.num_workers")
    if shards is not None:
        return shards
    shards = list_shards(data_dir, table=table)
    if not is_url(data_dir):  # a shard gone: every epoch would have failed its ranks' share, after the cluster started
        there = {d: set(os.listdir(d)) for d in {os.path.dirname(s) for s in shards} if os.path.isdir(d)}
        if missing := [s for s in shards if os.path.basename(s) not in there.get(os.path.dirname(s), ())]:
            more = f" (nor {len(missing) - 1} more of its {len(shards)})" if len(missing) > 1 else ""
            raise ConfigError(f"data.source: shard {os.path.relpath(missing[0], data_dir)} of {data_dir}'s manifest is "
                              f"not there{more}; `pretrain data verify {data_dir}` checks a dataset whole")
    return shards


def _not_shards(path: Path) -> str:
    """What a data directory without a manifest is, and the command that makes it a dataset."""
    from data_pipeline.sources import IMAGE_SUFFIXES

    if not path.exists():
        if kind := re.search(r"(?:^|/)(images|folder|table):(.*)", str(path)):  # a source of `data shards`
            return (f"does not exist: data.source takes a shard dataset; write one from those files first, `pretrain "
                    f"data shards --source {kind.group(1)}:{kind.group(2)} --out <a new directory>`")
        if any(c in path.name for c in "*?[{"):  # a glob or brace pattern of shards, as webdataset takes them
            above = path.parent if (path.parent / "manifest.parquet").is_file() else None
            return ("does not exist: data.source takes a dataset directory (the one with manifest.parquet), not a "
                    "pattern of its shards" + (f": {above}" if above else ""))
        return "does not exist"
    if not path.is_dir():
        if (path.parent / "manifest.parquet").is_file():  # one of its shards, or a list of them beside it
            return f"is a file of the dataset {path.parent}: data.source takes the dataset directory"
        return "is not a directory of shards (data.source takes a dataset directory with a manifest.parquet)"
    if (path / "config.yaml").is_file() and ((path / "metrics.csv").exists() or (path / "mlflow_run_id").exists()):
        return ("is a training run's directory, not a dataset (its config.yaml names the data it trained on; a "
                "shard directory is taken here)")  # (its PNG plots had made it "images, not shards")
    if any(path.glob("*.tar")):
        return f"has no manifest.parquet (WebDataset tars of another tool: `pretrain data index {path}`)"
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
        classes = all(p.is_dir() for p in path.iterdir() if not p.name.startswith("."))
        return (f"holds images, not shards: write them as shards first, `pretrain data shards --source images:{path} "
                "--out <a new directory>` (unlabelled" + (f"; folder:{path} if each sub-folder is a class)" if classes
                                                            else ")"))
    return "has no manifest.parquet (write shards with `pretrain data shards --source ... --out <a new directory>`)"
