"""The training data stream the trainer consumes: shards -> reader workers -> DALI views, endless, full batches only.

Per epoch: the DataLoader workers (``data_pipeline.reader``) deliver this rank's share of the shards in chunks; the main
process re-batches them into exactly ``batch_size`` samples (the partial remainder of an epoch is dropped), runs the
DALI graph (``data_pipeline.dali``) and yields the views. When the share is exhausted the stream goes on with
``epoch + 1``, whose shard order and shuffle buffer are reshuffled from ``(seed, epoch)``. Augmentation randomness
continues the DALI seed stream (seeded by ``seed`` and ``rank``) across epochs.

Resuming. ``state_dict()`` (taken between two batches) is this rank's position: the epoch, how many of the epoch's
samples the batches have used (or dropped as corrupt), how many reader chunks were already counted, the cumulative
``stats`` and the DALI random state. A stream made with ``resume=`` that state reads the epoch again, drops the used
samples without decoding them and restores the DALI state, so it yields exactly the batches (samples, order and
augmentations) the saved stream would have yielded next: a preempted run neither repeats nor skips data. A state saved
under other data settings (batch size, recipe, shards, readers, seed, device) cannot be continued: the stream warns
and starts the saved epoch afresh.

``stats`` (cumulative): ``samples`` = samples yielded in batches, ``corrupt`` = samples dropped as undecodable or
malformed (by the workers or by DALI), ``truncated_shards`` = truncated/unreadable shards met (once per shard and
epoch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Iterator

import torch

from data_pipeline.reader import ShardStream, check_shard_list, make_loader, read_epoch
from data_pipeline.views import AugmentConfig

log = logging.getLogger(__name__)

__all__ = ["TrainStream", "make_train_stream", "read_epoch"]


class TrainStream:
    """Iterable of ``{"views": [Tensor (B, C, S, S) float32] * num_views + [Tensor (B, C, s, s)] * local_views,
    "label": LongTensor (B,), "epoch": int, "keys": list[str] (B)}`` plus, with ``text``, ``"text": list[str] (B)``
    (the captions; samples without one are skipped as corrupt); views and label live on the stream's device."""

    def __init__(self, shards: list[str], *, batch_size: int, aug: AugmentConfig, image_size: int, channels: int,
                 rank: int, world_size: int, num_workers: int, shuffle_buffer: int, seed: int, start_epoch: int,
                 num_views: int, device: str, dali_threads: int = 2, local_views: int = 0, local_size: int = 0,
                 local_crop_scale: tuple[float, float] = (0.05, 0.4), view_augs: list[AugmentConfig] | None = None,
                 local_aug: AugmentConfig | None = None, text: bool = False, resume: dict | None = None):
        from data_pipeline.dali import DaliAugmenter  # DALI only when a stream is made

        # dali_threads is left out: DALI draws per sample, so its outputs and state do not depend on the thread count.
        self._fingerprint = _fingerprint(shards, batch_size=batch_size, aug=dataclasses.asdict(aug),
                                         image_size=image_size, channels=channels, rank=rank, world_size=world_size,
                                         num_workers=num_workers, shuffle_buffer=shuffle_buffer, seed=seed,
                                         num_views=num_views, device=device,
                                         # only with local crops, so runs without them keep their fingerprint
                                         **({"local": (local_views, local_size, tuple(local_crop_scale))}
                                            if local_views else {}),
                                         **({"text": True} if text else {}),
                                         # only when views differ, likewise
                                         **({"view_augs": [dataclasses.asdict(a) for a in view_augs]}
                                            if view_augs else {}),
                                         **({"local_aug": dataclasses.asdict(local_aug)} if local_aug else {}))
        resume = self._usable(resume)
        self.batch_size = batch_size
        self.text = text
        self.epoch = int(resume["epoch"]) if resume else start_epoch
        self.stats = dict(resume["stats"]) if resume else {"samples": 0, "corrupt": 0, "truncated_shards": 0}
        # Position in the current epoch: batches yielded, reader samples used by them (or dropped as corrupt), reader
        # chunks received (whose problem counts are in stats). On resume, the first epoch re-reads up to there.
        self._batches, self._taken, self._chunks = ((int(resume[k]) for k in ("batches", "taken", "chunks"))
                                                    if resume else (0, 0, 0))
        self._shards = ShardStream(shards, rank=rank, world_size=world_size, num_workers=num_workers,
                                   shuffle_buffer=shuffle_buffer, seed=seed, epoch=self.epoch, text=text)
        self._loader = make_loader(self._shards)
        local = torch.cuda.current_device() if device == "cuda" else None
        self._augment = DaliAugmenter(aug, batch_size=batch_size, image_size=image_size, channels=channels,
                                      num_views=num_views, local_views=local_views, local_size=local_size,
                                      local_crop_scale=local_crop_scale, view_augs=view_augs, local_aug=local_aug,
                                      device=device, device_id=local,
                                      num_threads=dali_threads,
                                      seed=seed * 1_000_003 + rank, state=resume["augment"] if resume else None)
        self._iterating = False
        self.skipped: tuple[int, float] | None = None
        """After a resume: (samples re-read and dropped to reach the saved position, seconds it took)"""

    def _usable(self, resume: dict | None) -> dict | None:
        if resume is None:
            return None
        if resume.get("fingerprint") != self._fingerprint:
            log.warning("the saved data position was taken under other data settings (batch size, recipe, shards, "
                        "readers, seed or device); epoch %s is read again from its start", resume.get("epoch"))
            return None
        return resume

    def state_dict(self) -> dict:
        """This rank's position after the last yielded batch (see the module docstring); plain types and bytes."""
        return {"epoch": self.epoch, "batches": self._batches, "taken": self._taken, "chunks": self._chunks,
                "stats": dict(self.stats), "augment": self._augment.state_dict(), "fingerprint": self._fingerprint}

    def __iter__(self) -> Iterator[dict]:
        from data_pipeline.dali import CorruptBatch

        if self._iterating:
            raise RuntimeError("TrainStream supports one iterator at a time")
        self._iterating = True
        try:
            while True:
                self._shards.epoch.value = self.epoch  # read by the (persistent) workers at the start of iter()
                skip, counted = self._taken, self._chunks  # non-zero only in a resumed epoch
                skip_from = (skip, time.perf_counter()) if skip else None
                pending: deque[dict] = deque()
                chunks = 0
                for chunk in self._loader:
                    chunks += 1
                    if chunks > counted:
                        self.stats["corrupt"] += chunk["corrupt"]
                        self.stats["truncated_shards"] += chunk["truncated"]
                        self._chunks = chunks
                    samples = chunk["samples"]
                    if skip:  # used before the saved position: drop without decoding
                        n = min(skip, len(samples))
                        samples, skip = samples[n:], skip - n
                        if skip == 0:
                            self.skipped = (skip_from[0], time.perf_counter() - skip_from[1])
                    pending.extend(samples)
                    while len(pending) >= self.batch_size:
                        batch = [pending.popleft() for _ in range(self.batch_size)]
                        try:
                            views = self._augment([s["image"] for s in batch])
                        except CorruptBatch as bad:
                            for i in bad.bad:
                                log.warning("skipping undecodable image %r", batch[i]["key"])
                            self.stats["corrupt"] += len(bad.bad)
                            self._taken += len(bad.bad)
                            drop = set(bad.bad)
                            pending.extendleft(reversed([s for i, s in enumerate(batch) if i not in drop]))
                            continue
                        self.stats["samples"] += self.batch_size
                        self._batches += 1
                        self._taken += self.batch_size
                        label = torch.tensor([s["label"] for s in batch], dtype=torch.long, device=views[0].device)
                        out = {"views": views, "label": label, "epoch": self.epoch, "keys": [s["key"] for s in batch]}
                        if self.text:
                            out["text"] = [s["text"] for s in batch]
                        yield out
                if self._batches == 0:
                    raise RuntimeError(f"epoch {self.epoch}: this rank's shard share gave no full batch of "
                                       f"{self.batch_size} (too few samples, or all of them corrupt or unreadable: "
                                       "see the warnings above)")
                self.epoch += 1
                self._batches, self._taken, self._chunks = 0, 0, 0
        finally:
            self._iterating = False

    def close(self) -> None:
        """Stop the reader workers and release the DALI pipeline."""
        it = getattr(self._loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._loader = None
        self._augment = None

    def __enter__(self) -> TrainStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_train_stream(shards: list[str], *, batch_size: int, aug: AugmentConfig, image_size: int, channels: int,
                      rank: int, world_size: int, num_workers: int = 2, shuffle_buffer: int = 1000, seed: int = 0,
                      start_epoch: int = 0, num_views: int = 2, device: str = "cpu", dali_threads: int = 2,
                      local_views: int = 0, local_size: int = 0, local_crop_scale: tuple[float, float] = (0.05, 0.4),
                      view_augs: list[AugmentConfig] | None = None, local_aug: AugmentConfig | None = None,
                      text: bool = False, resume: dict | None = None) -> TrainStream:
    """Endless stream of augmented batches of this rank's share of ``shards`` (see the module docstring).

    ``view_augs``: one recipe per global view (asymmetric views) instead of ``aug`` for each; ``local_aug``: the local
    crops' recipe (default: ``aug`` with ``local_crop_scale`` as its crop range). Every view is normalised with
    ``aug``'s mean and std. ``text``: yield each sample's caption too (CLIP); samples without one are skipped as
    corrupt. ``resume``: a ``TrainStream.state_dict()`` of this rank; the stream continues right after it
    (``start_epoch`` is then ignored, unless the state does not fit these settings).
    """
    for name, value, low in (("batch_size", batch_size, 1), ("image_size", image_size, 1), ("num_views", num_views, 1),
                             ("num_workers", num_workers, 0), ("shuffle_buffer", shuffle_buffer, 0),
                             ("dali_threads", dali_threads, 1), ("local_views", local_views, 0),
                             ("start_epoch", start_epoch, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: must be an int >= {low}, got {value!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels: must be 1 or 3, got {channels!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' asked for but CUDA is not available")
    shards = check_shard_list(shards)
    if view_augs is not None and len(view_augs) != num_views:
        raise ValueError(f"view_augs: {len(view_augs)} recipes for num_views={num_views}")
    aug.channel_stats(channels)  # mean/std length vs channels, before any worker starts
    if local_views:
        if isinstance(local_size, bool) or not isinstance(local_size, int) or local_size < 1:
            raise ValueError(f"local_size: must be an int >= 1 with local_views={local_views}, got {local_size!r}")
        dataclasses.replace(aug, crop_scale=tuple(local_crop_scale))  # the local crop range, checked as crop_scale
    return TrainStream(list(shards), batch_size=batch_size, aug=aug, image_size=image_size, channels=channels,
                       rank=rank, world_size=world_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                       seed=seed, start_epoch=start_epoch, num_views=num_views, device=device,
                       dali_threads=dali_threads, local_views=local_views, local_size=local_size,
                       local_crop_scale=local_crop_scale, view_augs=view_augs, local_aug=local_aug, text=text,
                       resume=resume)


def _fingerprint(shards: list[str], **settings) -> str:
    """Digest of everything that decides which samples come in which order with which augmentation."""
    names = sorted(os.path.basename(s) for s in shards)  # the run dir may move: names, not paths
    return hashlib.sha256(repr((names, sorted(settings.items()))).encode()).hexdigest()[:16]
