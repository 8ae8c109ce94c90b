"""Semantic search over a shard dataset with a trained run: embed every image, then rank them for a query.

``load_run`` rebuilds a run's encoder from its directory (``backbone.pt``; for CLIP ``model.pt``, both towers);
``embed_shards`` decodes every sample of a shard directory with the training recipe's size and normalisation (no
augmentation: the whole image, resized), skipping and counting undecodable ones; ``rank`` orders the gallery for a
query embedding. A CLIP run embeds images and texts in one space, so a caption-like text can query images; any run can
query with one of the gallery's own images (near-duplicates, same-class neighbours).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pretrain.config import Config


@dataclass
class Run:
    cfg: Config
    encode_image: object
    """images (B, C, S, S) -> (B, E)"""
    encode_text: object | None
    """texts -> (B, E), or None for a method without a text tower"""


def load_run(run_dir: str | Path) -> Run:
    """The trained encoder(s) of a finished run directory (ValueError naming what is missing)."""
    from pretrain.evaluate import load_run_files
    from pretrain.trainer import build_method

    cfg, backbone_state, method_state, _ = load_run_files(run_dir)
    method = build_method(cfg, distributed=False)
    if method_state is not None:
        method.load_state_dict(method_state)
    else:
        method.backbone.load_state_dict(backbone_state)
    method.eval()
    if hasattr(method, "encode_text"):
        return Run(cfg, method.encode_image, method.encode_text)
    return Run(cfg, method.backbone, None)


@dataclass
class Gallery:
    keys: list[str]
    labels: np.ndarray
    """(N,) int64"""
    captions: list[str | None]
    embeddings: np.ndarray
    """(N, E) float32"""
    corrupt: int
    """samples skipped as undecodable"""


@torch.no_grad()
def embed_shards(run: Run, shards: list[str], *, batch_size: int = 256) -> Gallery:
    """Every sample of ``shards`` (one pass, in shard order) embedded by ``run.encode_image``."""
    from data_pipeline.shards import read_manifest
    from pretrain.eval.dataset import ShardImages

    manifest = read_manifest(Path(shards[0]).parent).to_pylist()
    caption_of = {r["key"]: r.get("caption") for r in manifest}
    images = ShardImages(run.cfg)
    keys, labels, chunks = [], [], []
    for samples, x in images.batches(shards, batch_size=batch_size):
        chunks.append(run.encode_image(x).float().cpu().numpy())
        keys.extend(s["key"] for s in samples)
        labels.extend(s["label"] for s in samples)
    if not keys:
        raise ValueError("no decodable image in the shards")
    return Gallery(keys, np.asarray(labels, dtype=np.int64), [caption_of.get(k) for k in keys],
                   np.concatenate(chunks), images.corrupt)


def rank(gallery: Gallery, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` gallery rows nearest to ``query: (E,)`` by cosine -> [(row, similarity), ...], best first."""
    from pretrain.eval.search import search

    idx, sims = search(gallery.embeddings, query[None], min(k, len(gallery.keys)))
    return list(zip(idx[0].tolist(), sims[0].tolist()))
