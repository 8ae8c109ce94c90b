"""MoCo v3 (Chen, Xie & He, 2021): contrast each view's query with the momentum encoder's keys of the batch.

A base encoder (backbone + projector + predictor) gives a query for each view; a momentum encoder (an EMA of backbone +
projector, no gradient) gives the keys. Query i's positive is the key of the other view of image i, its negatives the
keys of every other image of the global batch (gathered from all ranks, no gradient: the keys are constants). The
loss is the InfoNCE cross-entropy of ``cos(q_i, k_j) / temperature``, scaled by ``2 x temperature`` as in the official
code, summed over the two directions (q of view 1 against keys of view 2, and back). It runs on the tiled row-vs-
columns kernel (``kernels.contrastive_rows_loss``): the (N, N_global) logits are never built on the Triton and chunked
paths. The momentum rises from ``teacher_momentum`` to 1 along a cosine. ``backbone`` is the base encoder's, the one
MoCo v3 evaluates and releases.

For ViTs the paper freezes the patch projection at its random init for stability (``model.backbone_kwargs=
{freeze_patch_embed: true}``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.contrastive import contrastive_rows_loss
from pretrain.config import Config
from pretrain.methods.base import Gather, Reduce, require_two_views
from pretrain.methods.byol import BYOL


def moco_v3_loss(q: Tensor, k: Tensor, temperature: float, *, k_all: Tensor | None = None, offset: int = 0,
                 impl: str = "auto") -> Tensor:
    """One direction of MoCo v3's loss: q (n, D) this rank's queries, k (n, D) the keys of the same images' other view;
    k_all (N, D) every rank's keys in rank order (None: k, offset 0), this rank's at rows offset..offset+n. Returns
    ``2 T x mean_i CE(cos(q_i, k_all_j) / T, j = offset + i)`` in fp32; no gradient reaches the keys."""
    if k_all is None:
        k_all, offset = k, 0
    if q.shape != k.shape or k_all.shape[1:] != k.shape[1:] or not 0 <= offset <= k_all.shape[0] - k.shape[0]:
        raise ValueError(f"moco_v3_loss: q {tuple(q.shape)}, k {tuple(k.shape)} and k_all {tuple(k_all.shape)} at "
                         f"offset {offset} do not fit")
    qn = (F.normalize(q.float(), dim=1) / temperature).to(q.dtype)
    kn = F.normalize(k_all.detach(), dim=1).to(q.dtype)  # under autocast the two towers may end in other dtypes
    pos = torch.arange(q.shape[0], device=q.device) + offset
    return 2 * temperature * contrastive_rows_loss(qn, kn, pos, impl=impl).mean()


class MoCoV3(BYOL):
    """BYOL's networks (``online``: the paper's base encoder with its predictor; ``target``: the momentum encoder, an
    EMA of backbone + projector) with MoCo v3's contrastive loss."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_two_views(cfg, "moco_v3 contrasts two views per image")

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        super().__init__(cfg)
        del reduce  # nothing is averaged across ranks outside the loss
        self.temperature = cfg.method.temperature
        self.loss_impl = cfg.method.loss_impl
        self.gather = gather
        self.rank = rank

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch["views"]: two tensors (B, C, H, W)."""
        v0, v1 = batch["views"]
        n = v0.shape[0]
        views = torch.cat([v0, v1])  # one pass: BatchNorm statistics over both views, as the official code's
        q = self.predictor(self.online["projector"](self.online["backbone"](views)))
        with torch.no_grad():
            k = self.target["projector"](self.target["backbone"](views))
        losses = []
        for qa, kb in ((q[:n], k[n:]), (q[n:], k[:n])):  # each view's queries against the other view's keys
            if self.gather is None:
                losses.append(moco_v3_loss(qa, kb, self.temperature, impl=self.loss_impl))
            else:
                losses.append(moco_v3_loss(qa, kb, self.temperature, k_all=self.gather(kb), offset=self.rank * n,
                                           impl=self.loss_impl))
        return {"loss": losses[0] + losses[1]}
