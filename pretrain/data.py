"""Where a run's shards come from: the digits cache built on first use, or a directory with a manifest."""

from __future__ import annotations

from pathlib import Path

from data_pipeline.shards import ensure_digits_shards, list_shards
from pretrain.config import ConfigError, DataConfig


def digits_cache(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() / f"digits-{cfg.shard_size}"


def resolve_shards(cfg: DataConfig) -> list[str]:
    """Shard paths for ``data.source``; builds the digits shards on first use (atomically, so racing ranks are safe)."""
    if cfg.source == "digits":
        return ensure_digits_shards(digits_cache(cfg), shard_size=cfg.shard_size)
    path = Path(cfg.source).expanduser()
    if not (path / "manifest.parquet").is_file():
        raise ConfigError(
            f"data.source: {path} has no manifest.parquet (write shards with `pretrain data shards --out {path}`)"
        )
    return list_shards(path)
