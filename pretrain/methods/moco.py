"""MoCo v2 (Chen, Fan, Girshick & He, 2020) and MoCo v3 (Chen, Xie & He, 2021): momentum contrast.

MoCo v2 contrasts a query with a dictionary of keys: the key of the same image's other view (the positive) and a
queue of the keys of past batches (the negatives), kept over steps so that there are many more negatives than a batch
has; see :class:`MoCoV2`. MoCo v3 drops the queue for the keys of the batch:

A base encoder (backbone + projector + predictor) gives a query for each view; a momentum encoder (an EMA of backbone +
projector, no gradient) gives the keys. Each view goes through each encoder on its own (BatchNorm statistics per view),
as the official code (``q1 = predictor(base_encoder(x1))``, ``q2 = ...(x2)``, the keys likewise). Query i's positive is
the key of the other view of image i, its negatives the keys of every other image of the global batch (gathered from all
ranks, no gradient: the keys are constants). The loss is the InfoNCE cross-entropy of ``cos(q_i, k_j) / temperature``,
scaled by ``2 x temperature`` as in the official code, summed over the two directions (q of view 1 against keys of view
2, and back). It runs on the tiled row-vs-columns kernel (``kernels.contrastive_rows_loss``): the (N, N_global) logits
are never built on the Triton and chunked paths. The momentum rises from ``teacher_momentum`` to 1 along a cosine.
``backbone`` is the base encoder's, the one MoCo v3 evaluates and releases.

For ViTs the paper freezes the patch projection at its random init for stability (``model.backbone_kwargs=
{freeze_patch_embed: true}``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.contrastive import contrastive_rows_loss, decoupled_rows
from pretrain.config import Config
from pretrain.ema import cosine_momentum, ema_update_, teacher_copy
from pretrain.methods.base import (
    Gather,
    Reduce,
    SSLMethod,
    build_method_backbone,
    require_no_kernel,
    require_shared_queue,
    require_two_views,
    ring_enqueue_,
)
from pretrain.methods.byol import BYOL


def moco_v3_loss(q: Tensor, k: Tensor, temperature: float, *, k_all: Tensor | None = None, offset: int = 0,
                 impl: str = "auto", decoupled: bool = False) -> Tensor:
    """One direction of MoCo v3's loss: q (n, D) this rank's queries, k (n, D) the keys of the same images' other view;
    k_all (N, D) every rank's keys in rank order (None: k, offset 0), this rank's at rows offset..offset+n. Returns
    ``2 T x mean_i CE(cos(q_i, k_all_j) / T, j = offset + i)`` in fp32; no gradient reaches the keys. ``decoupled``:
    DCL's rows instead (``kernels.contrastive.decoupled_rows``: each query's positive key out of its denominator)."""
    if k_all is None:
        k_all, offset = k, 0
    if q.shape != k.shape or k_all.shape[1:] != k.shape[1:] or not 0 <= offset <= k_all.shape[0] - k.shape[0]:
        raise ValueError(f"moco_v3_loss: q {tuple(q.shape)}, k {tuple(k.shape)} and k_all {tuple(k_all.shape)} at "
                         f"offset {offset} do not fit")
    qn = (F.normalize(q.float(), dim=1) / temperature).to(q.dtype)
    kn = F.normalize(k_all.detach(), dim=1).to(q.dtype)  # under autocast the two towers may end in other dtypes
    pos = torch.arange(q.shape[0], device=q.device) + offset
    rows = contrastive_rows_loss(qn, kn, pos, impl=impl)
    return 2 * temperature * (decoupled_rows(rows) if decoupled else rows).mean()


class MoCoV3(BYOL):
    """BYOL's networks (``online``: the paper's base encoder with its predictor; ``target``: the momentum encoder, an
    EMA of backbone + projector) with MoCo v3's contrastive loss."""
    config_keys = BYOL.config_keys | {"decoupled", "temperature"}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_two_views(cfg, "moco_v3 contrasts two views per image")

    @staticmethod
    def predictor_last_bn(cfg: Config) -> bool:
        """With ``model.proj_last_bn`` (the official heads) a ViT's predictor ends in the projector's BatchNorm without
        affine parameters too, as the official ``MoCo_ViT``'s; ``MoCo_ResNet``'s predictor ends in a plain Linear."""
        return cfg.model.proj_last_bn and cfg.model.backbone.startswith("vit")

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        super().__init__(cfg)
        del reduce  # nothing is averaged across ranks outside the loss
        self.temperature = cfg.method.temperature
        self.loss_impl = cfg.method.loss_impl
        self.decoupled = cfg.method.decoupled
        self.gather = gather
        self.rank = rank

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch["views"]: two tensors (B, C, H, W)."""
        views = batch["views"]
        n = views[0].shape[0]
        q, k = self.predictions_and_targets(views)  # each view through each encoder on its own, as the official code
        losses = []
        for qa, kb in ((q[:n], k[n:]), (q[n:], k[:n])):  # each view's queries against the other view's keys
            if self.gather is None:
                losses.append(moco_v3_loss(qa, kb, self.temperature, impl=self.loss_impl, decoupled=self.decoupled))
            else:
                losses.append(moco_v3_loss(qa, kb, self.temperature, k_all=self.gather(kb), offset=self.rank * n,
                                           impl=self.loss_impl, decoupled=self.decoupled))
        return {"loss": losses[0] + losses[1]}


def moco_v2_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float, *, decoupled: bool = False) -> Tensor:
    """MoCo's InfoNCE (Algorithm 1 of the MoCo paper): q (n, D) queries, k (n, D) the keys of the same images' other
    view, queue (K, D) the negatives' keys, unit rows. ``mean_i CE([q_i . k_i, q_i . queue^T] / T, 0)`` over the
    L2-normalised q and k, in fp32 also under autocast (the (n, K) logits differ in the third digit); the gradient
    reaches q only. ``decoupled``: DCL's instead, each query's positive out of its denominator:
    ``mean_i (logsumexp_j(q_i . queue_j / T) - q_i . k_i / T)``."""
    if q.shape != k.shape or queue.shape[1:] != q.shape[1:]:
        raise ValueError(f"moco_v2_loss: q {tuple(q.shape)}, k {tuple(k.shape)} and queue {tuple(queue.shape)} do "
                         f"not fit")
    with torch.autocast(device_type=q.device.type, enabled=False):
        qn = F.normalize(q.float(), dim=1)
        kn = F.normalize(k.detach().float(), dim=1)
        positive = (qn * kn).sum(1) / temperature
        negatives = qn @ queue.detach().float().T / temperature
        if decoupled:
            return (torch.logsumexp(negatives, dim=1) - positive).mean()
        logits = torch.cat([positive[:, None], negatives], dim=1)
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class MoCoV2(SSLMethod):
    """MoCo v2: a query encoder (backbone + the paper's MLP head, Linear -> ReLU -> Linear, ``model.proj_*``) encodes
    view 1, the momentum encoder (an EMA of it, no gradient) view 2 into the keys. Each query's positive is its image's
    key; its negatives are the queue, the unit keys of the last ``method.queue_size`` images of the global batches
    before (every rank's, gathered in rank order, so every rank holds the same queue and a checkpoint keeps it whole),
    which this step's keys then replace, oldest first. The queue starts as random unit vectors (the official code's
    start; a fixed seed, alike on every rank). ``backbone`` is the query encoder's, the one MoCo evaluates.

    Differences from the official code: the momentum rises from ``teacher_momentum`` (the paper's constant 0.999) to 1
    along a cosine, as this project's other momentum encoders (MoCo v2+ of solo-learn does the same); no shuffled
    BatchNorm: the encoders' BatchNorm is per rank, or over all ranks with ``model.sync_bn``. As in the official code
    each encoder sees one view only, so its BatchNorm statistics are that view's."""
    config_keys = frozenset({"decoupled", "loss_impl", "queue_size", "teacher_momentum", "temperature"})

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_two_views(cfg, "moco_v2 contrasts a query view with a key view")
        require_no_kernel(cfg, "moco_v2")
        require_shared_queue(cfg, "moco_v2", "a queue of past keys as its negatives", "65,536")

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        from pretrain.heads import ProjectionHead

        super().__init__()
        del reduce, rank  # the loss is per query: only the keys cross ranks, into the queue
        mc, m = cfg.model, cfg.method
        backbone = build_method_backbone(cfg)
        head = ProjectionHead(backbone.embed_dim, hidden_dim=mc.proj_hidden_dim, out_dim=mc.proj_out_dim,
                              num_layers=mc.proj_layers, use_bn=False)
        self.online = nn.ModuleDict({"backbone": backbone, "projector": head})
        self.target = teacher_copy(self.online)
        self.base_momentum = m.teacher_momentum
        self.temperature = m.temperature
        self.decoupled = m.decoupled
        self.gather = gather
        start = torch.randn(m.queue_size, mc.proj_out_dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("queue", F.normalize(start, dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @property
    def backbone(self) -> nn.Module:  # type: ignore[override]
        return self.online["backbone"]

    @torch.no_grad()
    def enqueue(self, k: Tensor) -> None:
        """Put this step's unit keys (every rank's, in rank order) in the queue, over its oldest rows."""
        ring_enqueue_(self.queue, self.queue_ptr, k if self.gather is None else self.gather(k))

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch["views"]: two tensors (B, C, H, W): the queries' view and the keys' view."""
        v0, v1 = batch["views"]
        q = self.online["projector"](self.online["backbone"](v0))
        with torch.no_grad():
            k = F.normalize(self.target["projector"](self.target["backbone"](v1)).float(), dim=1)
        # the queue as it was before this step: enqueue() below writes into it, the backward needs the old rows
        loss = moco_v2_loss(q, k, self.queue.clone(), self.temperature, decoupled=self.decoupled)
        # how close each query is to its key (the positive's cosine, 1 at the end of a collapse)
        pos_similarity = (F.normalize(q.detach().float(), dim=1) * k).sum(1).mean()
        if self.training:
            self.enqueue(k)
        return {"loss": loss, "pos_similarity": pos_similarity}

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        ema_update_(self.target, self.online, cosine_momentum(step, max_steps, self.base_momentum))
