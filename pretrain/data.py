"""Where a run's shards come from: a built-in source (digits, samples) cached on first use, or a directory with a
manifest."""

from __future__ import annotations

from pathlib import Path

from data_pipeline.shards import BUILTIN_VERSIONS, count_captions, ensure_builtin_shards, list_shards
from pretrain.config import ConfigError, DataConfig


def resolve_shards(cfg: DataConfig, *, captions: bool = False) -> list[str]:
    """Shard paths for ``data.source``; builds a built-in source's shards on first use (atomically, so racing ranks are
    safe).

    ``captions``: the method trains on image-text pairs (CLIP); a dataset without a single caption is refused here,
    before any worker starts (samples that lack one among captioned ones are skipped and counted as corrupt).
    """
    if cfg.source in BUILTIN_VERSIONS:
        if captions and cfg.source != "digits":
            raise ConfigError(f"data.source: the built-in {cfg.source!r} images have no captions, and the method "
                              "trains on image-text pairs")
        return ensure_builtin_shards(Path(cfg.cache_dir).expanduser(), cfg.source, shard_size=cfg.shard_size)
    path = Path(cfg.source).expanduser()
    if not (path / "manifest.parquet").is_file():
        raise ConfigError(
            f"data.source: {path} has no manifest.parquet (write shards with `pretrain data shards --out {path}`)"
        )
    if captions and count_captions(path) == 0:
        raise ConfigError(f"data.source: {path} has no captions, and the method trains on image-text pairs (put a "
                          "<image stem>.txt caption beside each image and write the shards again)")
    return list_shards(path)
