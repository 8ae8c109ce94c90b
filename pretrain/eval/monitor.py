"""kNN accuracy of the backbone while it trains (``eval.knn_every``): the curve to watch in MLflow beside the loss.

Each rank embeds its share of ``eval.dataset`` (``read_eval_part``: places rank, rank + world, ... of the draw) with the
live backbone; the features go to rank 0, which scores them with the end-of-run protocol: the same draw, the same
classes, the same stratified 75/25 split and the weighted kNN (k=20, T=0.07) of ``eval.json``'s ``knn_top1``. Under
ZeRO-3 a forward gathers each layer's parameters from every rank, so every rank runs the same number of batches (a
rank whose share is shorter pads with throwaway batches), and every rank uses rank 0's BatchNorm statistics (those
backbone.pt keeps). No random number is drawn: a run with the monitor trains as
one without it, and a resumed run as the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from pretrain.config import Config
from pretrain.eval.dataset import MIN_PER_CLASS, read_eval_part, score_classes
from pretrain.eval.digits import split_indices
from pretrain.eval.knn import knn_top1


class KnnMonitor:
    """Built on every rank at the start of training (decodes this rank's share once; holds it on the CPU)."""

    def __init__(self, cfg: Config, *, rank: int, world_size: int, device: torch.device,
                 autocast: torch.dtype | None = None, batch_size: int = 256) -> None:
        self.every = cfg.eval.knn_every
        self.rank, self.world = rank, world_size
        self.device, self.autocast, self.batch_size = device, autocast, batch_size
        self.part = read_eval_part(cfg, rank=rank, world_size=world_size)
        self.warned = False

    def due(self, step: int) -> bool:
        return step % self.every == 0

    @torch.no_grad()
    def __call__(self, backbone: nn.Module) -> dict[str, float] | None:
        """Every rank calls it with the live backbone; rank 0 gets ``{"knn_top1", "knn_seconds"}`` (None elsewhere, and
        on rank 0 when the decoded draw has fewer than two classes to score)."""
        start = time.perf_counter()
        feats = self._embed(backbone)
        shares = [(self.part.positions, feats, self.part.labels)]
        if self.world > 1:
            shares = [None] * self.world
            torch.distributed.all_gather_object(shares, (self.part.positions, feats, self.part.labels))
        if self.rank != 0:
            return None
        shares = [s for s in shares if len(s[0])]  # a rank may have decoded nothing
        order = np.argsort(np.concatenate([s[0] for s in shares])) if shares else np.zeros(0, dtype=np.int64)
        labels = np.concatenate([s[2] for s in shares])[order] if shares else np.zeros(0, dtype=np.int64)
        rows, labels, classes, _ = score_classes(labels, self.part.names)
        if len(classes) < 2:
            if not self.warned:
                print(f"kNN monitor: off, the decoded draw has {len(classes)} class(es) with >= {MIN_PER_CLASS} "
                      "samples", flush=True)
                self.warned = True
            return None
        train, test = split_indices(labels, seed=0)
        feats = np.concatenate([s[1] for s in shares])[order][rows]
        top1 = knn_top1(feats[train], labels[train], feats[test], labels[test])
        return {"knn_top1": top1, "knn_seconds": time.perf_counter() - start}

    def _embed(self, backbone: nn.Module) -> np.ndarray:
        """This rank's share -> features ``(n, F) float32``, in eval mode (restored after)."""
        images = self.part.images
        stack = contextlib.ExitStack()
        batches = torch.tensor([math.ceil(len(images) / self.batch_size)], device=self.device)
        if self.world > 1:  # ZeRO-3's forward is collective: every rank runs as many batches as the longest share
            torch.distributed.all_reduce(batches, op=torch.distributed.ReduceOp.MAX)
        was_training = backbone.training
        backbone.eval()
        out = []
        try:
            stack.enter_context(self._rank0_buffers(backbone))
            dtype, on = self.autocast or torch.bfloat16, self.autocast is not None
            with torch.autocast(self.device.type, dtype=dtype, enabled=on):
                for i in range(int(batches.item())):
                    x = images[i * self.batch_size : (i + 1) * self.batch_size]
                    pad = not len(x)
                    if pad:  # past the end of this rank's share: one throwaway image
                        x = images[:1] if len(images) else torch.zeros(1, *images.shape[1:])
                    y = backbone(x.to(self.device, non_blocking=True))
                    if not pad:
                        out.append(y.float().cpu())
        finally:
            stack.close()
            backbone.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)

    @contextlib.contextmanager
    def _rank0_buffers(self, backbone: nn.Module) -> Iterator[None]:
        """Rank 0's buffers (BatchNorm statistics) on every rank for a while. Each rank's statistics follow its own
        batches and no one syncs them in training; backbone.pt and the checkpoints keep rank 0's, so the end-of-run
        evaluation sees those. This rank's own come back after."""
        buffers = [b for b in backbone.buffers() if b is not None] if self.world > 1 else []
        own = [b.detach().clone() for b in buffers]
        for b in buffers:
            torch.distributed.broadcast(b, src=0)
        try:
            yield
        finally:
            for b, mine in zip(buffers, own):
                b.copy_(mine)
