"""The labelled images an encoder is evaluated on (``eval.dataset``).

``digits`` is scikit-learn's digits, resized as in ``pretrain.eval.digits``. Anything else is a labelled shard dataset:
a built-in source (``samples``) or a directory written by ``pretrain data shards`` (say from ``folder:PATH``, one
sub-folder per class), its labels and class names from the manifest. Its images are decoded whole, resized and
normalised as the run's training views are (no augmentation), the same as ``pretrain search`` embeds them; undecodable
ones are skipped and counted. At most ``eval.max_samples`` of them, a seeded draw, are held in memory (of digits, a
stratified one).

``check_eval_dataset`` refuses, in one line and before training starts, a dataset the protocols cannot score: fewer
than two classes with ``MIN_PER_CLASS`` samples each (5-shot classification needs five in the 75% training split).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pretrain.config import Config, ConfigError

log = logging.getLogger(__name__)

MIN_PER_CLASS = 8
"""Samples a class needs to be scored: the stratified 75/25 split leaves it >= 5 for 5-shot classification."""
NAMED_UNDECODABLE = 20
"""Undecodable images named one line each (``ShardImages``); past that they are only counted: a dataset of broken
files had printed a line per image."""
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
    duplicates: int = 0
    """samples left out as exact duplicates of another (``EvalPart.duplicates``)"""
    unlabelled: int = 0
    """samples of the draw left out for having no label (a table's empty label field)"""

    def summary(self) -> dict:
        return {"dataset": self.name, "samples": len(self.labels), "classes": len(self.classes),
                "corrupt": self.corrupt, "dropped_classes": self.dropped, "duplicates": self.duplicates,
                "unlabelled": self.unlabelled}


class ShardImages:
    """Decodes samples of shards into whole images, resized and normalised as ``cfg``'s training views (no
    augmentation), in batches; ``corrupt`` counts the samples that did not decode (skipped)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.corrupt = 0

    def batches(self, shards: list[str], *, batch_size: int = 256,
                keep: set[str] | None = None) -> Iterator[tuple[list[dict], Tensor]]:
        """``(samples, images (B, C, S, S))`` over every sample of ``shards`` in shard order (those whose key is in
        ``keep``, if given); a batch holds the samples that decoded. A key of two samples (tars indexed from two crawls
        that both count from 0) names the first one read: evaluation, search, embed and attention take that one."""
        from data_pipeline.cpu import PilAugmenter
        from data_pipeline.reader import read_epoch
        from data_pipeline.views import AugmentConfig

        d = self.cfg.data
        mean, std = d.aug.channel_stats(d.channels)
        views = PilAugmenter(AugmentConfig.disabled(mean=mean, std=std), image_size=d.image_size,
                             channels=d.channels, num_views=1)
        try:
            pending: list[dict] = []
            seen: set[str] = set()
            for sample in read_epoch(shards, rank=0, world_size=1, num_workers=0):
                if (keep is not None and sample["key"] not in keep) or sample["key"] in seen:
                    continue
                seen.add(sample["key"])
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
                if self.corrupt <= NAMED_UNDECODABLE:
                    log.warning("skipping undecodable image %r", s["key"])
                if self.corrupt == NAMED_UNDECODABLE:
                    log.warning("further undecodable images are skipped without a line each; the count is reported")
        if good:
            yield good, torch.cat(xs)


def _shards(cfg: Config) -> tuple[list[str], str]:
    from data_pipeline.shards import dataset_dir
    from pretrain.data import resolve_shards

    try:
        shards = resolve_shards(dataclasses.replace(cfg.data, source=cfg.eval.dataset))
    except ConfigError as e:
        raise ConfigError(str(e).replace("data.source", "eval.dataset")) from None  # (its hints name it too)
    return shards, dataset_dir(shards[0])


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


@dataclass
class EvalPart:
    """One rank's share of ``eval.dataset``'s draw, before the classes to score are chosen (``score_classes``)."""

    positions: np.ndarray
    """(n,) int64: each sample's place in the whole draw (digits' order; the manifest's order of a shard dataset)"""
    images: Tensor
    """(n, C, S, S) float32, normalised like the training views"""
    labels: np.ndarray
    """(n,) int64 labels as stored (the manifest's; -1 unlabelled)"""
    names: list[str]
    """class names, index = stored label"""
    drawn: int
    """samples in the whole draw (of every rank)"""
    corrupt: int = 0
    """this rank's samples skipped as undecodable"""
    duplicates: int = 0
    """samples of the dataset left out before the draw as exact duplicates of an earlier one (the manifest's digest)"""
    available: int | None = None
    """samples the draw was taken from (``drawn`` of them: fewer where eval.max_samples cut it); None: ``drawn``"""


def read_eval_part(cfg: Config, *, rank: int = 0, world_size: int = 1) -> EvalPart:
    """Rank ``rank``'s share of the draw of ``cfg.eval.dataset``: the samples at places ``rank, rank + world_size,
    ...`` of the whole draw, decoded at the run's image size, channels and normalisation. The shares of every rank
    together are the draw ``load_eval_set`` reads whole (the kNN monitor embeds them apart, on every rank)."""
    d = cfg.data
    if cfg.eval.dataset == "digits":
        from pretrain.eval.digits import digits_eval_set

        mean, std = d.aug.channel_stats(d.channels)  # one value serves every channel, as for the training views
        images, labels = digits_eval_set(image_size=d.image_size, channels=d.channels, mean=mean, std=std)
        drawn = np.arange(len(labels))
        if len(labels) > cfg.eval.max_samples:  # a stratified draw, seeded: each digit keeps its share
            from sklearn.model_selection import train_test_split

            drawn = np.sort(train_test_split(drawn, train_size=cfg.eval.max_samples, stratify=labels,
                                             random_state=cfg.job.seed)[0])
        mine = np.arange(rank, len(drawn), world_size)
        return EvalPart(mine, images[torch.from_numpy(drawn[mine])].contiguous(), labels[drawn[mine]],
                        [str(c) for c in range(10)], len(drawn), available=len(labels))
    from data_pipeline.shards import class_indices, read_classes

    shards, data_dir, manifest = _checked_shards(cfg)
    all_keys = manifest.column("key").to_pylist()
    digests = manifest.column("digest").to_pylist() if "digest" in manifest.column_names else [None] * len(all_keys)
    keys, seen_keys, seen_digests, duplicates = [], set(), set(), 0
    for key, digest in zip(all_keys, digests):
        if key in seen_keys:  # a key twice (tars indexed from two crawls): its first sample only, below
            continue
        seen_keys.add(key)
        if digest is not None and digest in seen_digests:  # each image once: a copy would sit on both sides of the
            duplicates += 1  # split, its own nearest neighbour
            continue
        seen_digests.add(digest)
        keys.append(key)
    available = len(keys)
    if len(keys) > cfg.eval.max_samples:
        pick = np.sort(np.random.default_rng(cfg.job.seed).choice(len(keys), size=cfg.eval.max_samples, replace=False))
        keys = [keys[i] for i in pick]
    place = {key: i for i, key in enumerate(keys)}
    keep = set(keys[rank::world_size])
    decoder = ShardImages(cfg)
    chunks, labels, positions = [], [], []
    for samples, x in decoder.batches(shards, keep=keep):
        chunks.append(x)
        labels.extend(s["label"] for s in samples)
        positions.extend(place[s["key"]] for s in samples)
    s = d.image_size
    images = torch.cat(chunks) if chunks else torch.empty(0, d.channels, s, s)
    order = np.argsort(positions, kind="stable")  # shards may be read in another order than the manifest lists them
    names = read_classes(data_dir)
    labels = class_indices(labels, manifest.schema.metadata)[order]
    names = names or [str(c) for c in range(int(labels.max(initial=0)) + 1)]
    return EvalPart(np.asarray(positions, dtype=np.int64)[order], images[torch.from_numpy(order)].contiguous(),
                    labels, names, len(keys), decoder.corrupt, duplicates, available)


def score_classes(labels: np.ndarray, names: list[str]) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """The classes the protocols score: those with >= MIN_PER_CLASS samples among ``labels: (N,)`` (stored labels;
    unlabelled -1 samples are not scored). Returns ``(rows kept, their labels renumbered 0..C-1, the C class names,
    the names of the classes left out)``."""
    counts = np.bincount(labels[labels >= 0], minlength=len(names))  # a class of no sample too (all its images
    scored = np.flatnonzero(counts >= MIN_PER_CLASS)  # copies of others', or undecodable), which had gone unnamed
    rows = np.flatnonzero(np.isin(labels, scored))
    remap = np.searchsorted(scored, labels[rows]).astype(np.int64)  # scored is sorted: a monotone renumbering
    return rows, remap, [names[c] for c in scored], [names[c] for c in np.flatnonzero(counts < MIN_PER_CLASS)]


def load_eval_set(cfg: Config) -> EvalSet:
    """The evaluation images of ``cfg.eval.dataset`` at the run's image size, channels and normalisation: the whole
    draw (``read_eval_part`` on one rank), the classes it can score."""
    part = read_eval_part(cfg)
    if cfg.eval.dataset == "digits":
        from pretrain.eval.zeroshot import DIGIT_PROMPTS

        prompts = DIGIT_PROMPTS
    else:
        prompts = PROMPTS
    if not len(part.labels):
        raise ConfigError(f"eval.dataset: none of the {part.corrupt} images of {cfg.eval.dataset} drawn decodes "
                          f"(`pretrain data verify {cfg.eval.dataset} --decode` lists them)")
    rows, labels, classes, dropped = score_classes(part.labels, part.names)
    if len(classes) < 2:
        cut = (f" of its {part.available} (eval.max_samples {cfg.eval.max_samples}: more may give more classes)"
               if part.available is not None and part.available > part.drawn else "")
        raise ConfigError(f"eval.dataset: {cfg.eval.dataset} has {len(classes)} class(es) with >= {MIN_PER_CLASS} "
                          f"decodable samples in the draw of {part.drawn}{cut}; the evaluation needs at least 2")
    if dropped:
        print(f"Evaluation: left out {len(dropped)} class(es) with fewer than {MIN_PER_CLASS} decodable samples: "
              + ", ".join(dropped[:10]) + (" ..." if len(dropped) > 10 else ""), flush=True)
    unlabelled = int((part.labels < 0).sum())
    if unlabelled:
        print(f"Evaluation: left out {unlabelled} sample(s) without a label", flush=True)
    return EvalSet(str(cfg.eval.dataset), part.images[torch.from_numpy(rows)].contiguous(), labels, classes, prompts,
                   part.corrupt, dropped, part.duplicates, unlabelled)
