"""The labelled images an encoder is evaluated on (``eval.dataset``).

``digits`` is scikit-learn's digits, resized as in ``pretrain.eval.digits``. Anything else is a labelled shard dataset:
a built-in source (``samples``) or a directory written by ``pretrain data shards`` (say from ``folder:PATH``, one
sub-folder per class), its labels and class names from the manifest. Its images are decoded whole, resized and
normalised as the run's training views are (no augmentation), the same as ``pretrain search`` embeds them; undecodable
ones are skipped and counted. At most ``eval.max_samples`` of them, a seeded draw, are held in memory.

``check_eval_dataset`` refuses, in one line and before training starts, a dataset the protocols cannot score: fewer
than two classes with ``MIN_PER_CLASS`` samples each (5-shot classification needs five in the 75% training split).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pretrain.config import Config, ConfigError

log = logging.getLogger(__name__)

MIN_PER_CLASS = 8
"""Samples a class needs to be scored: the stratified 75/25 split leaves it >= 5 for 5-shot classification."""
PROMPTS = ("a photo of a {}.", "a picture of a {}.", "an image showing a {}.")
"""Zero-shot prompt templates for a shard dataset's class names (digits has its own, pretrain.eval.zeroshot)."""


@dataclass
class EvalSet:
    name: str
    images: Tensor
    """(N, C, S, S) float32, normalised like the training views"""
    labels: np.ndarray
    """(N,) int64, indices into ``classes``"""
    classes: list[str]
    prompts: tuple[str, ...]
    """zero-shot templates, ``template.format(class name)``"""
    corrupt: int = 0
    """samples skipped as undecodable"""
    dropped: list[str] = dataclasses.field(default_factory=list)
    """classes left out for having fewer than MIN_PER_CLASS decodable samples in the draw"""

    def summary(self) -> dict:
        return {"dataset": self.name, "samples": len(self.labels), "classes": len(self.classes),
                "corrupt": self.corrupt, "dropped_classes": self.dropped}


class ShardImages:
    """Decodes samples of shards into whole images, resized and normalised as ``cfg``'s training views (no
    augmentation), in batches; ``corrupt`` counts the samples that did not decode (skipped)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.corrupt = 0

    def batches(self, shards: list[str], *, batch_size: int = 256,
                keep: set[str] | None = None) -> Iterator[tuple[list[dict], Tensor]]:
        """``(samples, images (B, C, S, S))`` over every sample of ``shards`` in shard order (those whose key is in
        ``keep``, if given); a batch holds the samples that decoded."""
        from data_pipeline.cpu import PilAugmenter
        from data_pipeline.reader import read_epoch
        from data_pipeline.views import AugmentConfig

        d = self.cfg.data
        mean, std = d.aug.channel_stats(d.channels)
        views = PilAugmenter(AugmentConfig.disabled(mean=mean, std=std), image_size=d.image_size,
                             channels=d.channels, num_views=1)
        try:
            pending: list[dict] = []
            for sample in read_epoch(shards, rank=0, world_size=1, num_workers=0):
                if keep is not None and sample["key"] not in keep:
                    continue
                pending.append(sample)
                if len(pending) == batch_size:
                    yield from self._decode(views, pending)
                    pending = []
            if pending:
                yield from self._decode(views, pending)
        finally:
            views.close()

    def _decode(self, views, batch: list[dict]) -> Iterator[tuple[list[dict], Tensor]]:
        try:
            x = views([s["image"] for s in batch])[0]
        except Exception:  # noqa: BLE001 - some image in the batch does not decode: find which, one by one
            x = None
        if x is not None:
            yield batch, x
            return
        good, xs = [], []
        for s in batch:
            try:
                xs.append(views([s["image"]])[0])
                good.append(s)
            except Exception:  # noqa: BLE001 - PIL raises several types for broken files
                self.corrupt += 1
                log.warning("skipping undecodable image %r", s["key"])
        if good:
            yield good, torch.cat(xs)


def _shards(cfg: Config) -> tuple[list[str], Path]:
    from pretrain.data import resolve_shards

    try:
        shards = resolve_shards(dataclasses.replace(cfg.data, source=cfg.eval.dataset))
    except ConfigError as e:
        raise ConfigError(str(e).replace("data.source:", "eval.dataset:", 1)) from None
    return shards, Path(shards[0]).parent


def check_eval_dataset(cfg: Config) -> None:
    """ConfigError (one line) unless ``eval.dataset`` is digits or a shard dataset with at least two classes of
    MIN_PER_CLASS samples; builds a built-in source's shards on first use."""
    if cfg.eval.dataset != "digits":
        _checked_shards(cfg)


def _checked_shards(cfg: Config):
    """``check_eval_dataset`` for a shard dataset -> (its shards, its directory, its manifest table)."""
    from data_pipeline.shards import read_manifest

    shards, data_dir = _shards(cfg)
    manifest = read_manifest(data_dir)
    labels = np.asarray(manifest.column("label").to_pylist(), dtype=np.int64)
    if (labels < 0).all():
        raise ConfigError(f"eval.dataset: {cfg.eval.dataset} is unlabelled (written from images:PATH); evaluate on "
                          "digits, samples or shards of labelled images (folder:PATH, a sub-folder per class)")
    classes, counts = np.unique(labels[labels >= 0], return_counts=True)
    if (counts >= MIN_PER_CLASS).sum() < 2:
        raise ConfigError(f"eval.dataset: {cfg.eval.dataset} has {len(classes)} class(es), "
                          f"{int((counts >= MIN_PER_CLASS).sum())} of them with >= {MIN_PER_CLASS} samples; the "
                          "evaluation needs 2 (labels are from the manifest: with folder:PATH, a sub-folder per class)")
    return shards, data_dir, manifest


def load_eval_set(cfg: Config) -> EvalSet:
    """The evaluation images of ``cfg.eval.dataset`` at the run's image size, channels and normalisation."""
    d = cfg.data
    if cfg.eval.dataset == "digits":
        from pretrain.eval.digits import digits_eval_set
        from pretrain.eval.zeroshot import DIGIT_PROMPTS

        images, labels = digits_eval_set(image_size=d.image_size, channels=d.channels, mean=d.aug.mean, std=d.aug.std)
        return EvalSet("digits", images, labels, [str(c) for c in range(10)], DIGIT_PROMPTS)
    from data_pipeline.shards import read_classes

    shards, data_dir, manifest = _checked_shards(cfg)
    keys = manifest.column("key").to_pylist()
    keep = None
    if len(keys) > cfg.eval.max_samples:
        pick = np.random.default_rng(cfg.job.seed).choice(len(keys), size=cfg.eval.max_samples, replace=False)
        keep = {keys[i] for i in pick}
    decoder = ShardImages(cfg)
    chunks, labels = [], []
    for samples, x in decoder.batches(shards, keep=keep):
        chunks.append(x)
        labels.extend(s["label"] for s in samples)
    if not chunks:
        raise ConfigError(f"eval.dataset: no decodable image in {cfg.eval.dataset}")
    images, labels = torch.cat(chunks), np.asarray(labels, dtype=np.int64)
    names = read_classes(data_dir) or [str(c) for c in range(int(labels.max()) + 1)]
    present, counts = np.unique(labels[labels >= 0], return_counts=True)  # unlabelled samples (-1) are not scored
    scored = present[counts >= MIN_PER_CLASS]
    dropped = [names[c] for c in present[counts < MIN_PER_CLASS]]
    if len(scored) < 2:
        raise ConfigError(f"eval.dataset: {cfg.eval.dataset} has {len(scored)} class(es) with >= {MIN_PER_CLASS} "
                          f"decodable samples in the draw of {len(keys) if keep is None else len(keep)}; the "
                          "evaluation needs at least 2")
    if dropped:
        print(f"Evaluation: left out {len(dropped)} class(es) with fewer than {MIN_PER_CLASS} decodable samples: "
              + ", ".join(dropped[:10]) + (" ..." if len(dropped) > 10 else ""), flush=True)
    rows = np.flatnonzero(np.isin(labels, scored))
    remap = {int(c): i for i, c in enumerate(scored)}
    return EvalSet(str(cfg.eval.dataset), images[torch.from_numpy(rows)].contiguous(),
                   np.asarray([remap[int(c)] for c in labels[rows]], dtype=np.int64), [names[c] for c in scored],
                   PROMPTS, decoder.corrupt, dropped)
