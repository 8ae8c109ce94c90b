"""Where a run's shards come from: the digits cache built on first use, or a directory with a manifest."""

from __future__ import annotations

from pathlib import Path

from data_pipeline.shards import count_captions, digits_dir_name, ensure_digits_shards, list_shards
from pretrain.config import ConfigError, DataConfig


def digits_cache(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() / digits_dir_name(cfg.shard_size)


def resolve_shards(cfg: DataConfig, *, captions: bool = False) -> list[str]:
    """Shard paths for ``data.source``; builds the digits shards on first use (atomically, so racing ranks are safe).

    ``captions``: the method trains on image-text pairs (CLIP); a dataset without a single caption is refused here,
    before any worker starts (samples that lack one among captioned ones are skipped and counted as corrupt).
    """
    if cfg.source == "digits":
        return ensure_digits_shards(digits_cache(cfg), shard_size=cfg.shard_size)
    path = Path(cfg.source).expanduser()
    if not (path / "manifest.parquet").is_file():
        raise ConfigError(
            f"data.source: {path} has no manifest.parquet (write shards with `pretrain data shards --out {path}`)"
        )
    if captions and count_captions(path) == 0:
        raise ConfigError(f"data.source: {path} has no captions, and the method trains on image-text pairs (put a "
                          "<image stem>.txt caption beside each image and write the shards again)")
    return list_shards(path)
