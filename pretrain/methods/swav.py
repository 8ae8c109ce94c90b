"""SwAV (Caron et al., 2020): swap the cluster assignments of the views.

Every view, global and local (multi-crop), goes through the backbone and a projector, is L2-normalised and scored
against K learnable unit prototypes. For each global view, a code (a soft assignment of each image to the prototypes)
is computed from its scores by the Sinkhorn-Knopp algorithm under the constraint that the prototypes share the global
batch equally; the prototype softmax (``temperature``) of every other view of the image must predict that code. The
equal-share constraint is what prevents collapse: the codes are computed over every rank's batch, the prototype sums
averaged across ranks (``reduce``), so 2 ranks with half a batch each give the codes, loss and gradients of one
process with the whole batch. The prototypes get no gradient for the first ``freeze_last_layer_steps`` steps, as the
official code freezes them for the first epoch. ``backbone`` is the one SwAV evaluates and releases.

With a small global batch the codes are balanced over more images: ``queue_size`` embeddings of the last global
batches (every rank's, gathered, so every rank holds the same queue and a checkpoint keeps it whole), scored against
the current prototypes, join the Sinkhorn-Knopp balance from ``queue_start_steps`` on, once full, as the official
code's queue.

Difference from the official code: the prototypes are unit vectors by weight normalisation (the official code
renormalises them after each step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.config import Config
from pretrain.heads import ProjectionHead, WeightNormLinear
from pretrain.methods.base import (
    Gather,
    Reduce,
    SSLMethod,
    build_method_backbone,
    features_by_resolution,
    require_no_kernel,
)


@torch.no_grad()
def sinkhorn_codes(scores: Tensor, eps: float, iters: int, reduce: Reduce | None = None, *,
                   shared: Tensor | None = None, world: int = 1) -> Tensor:
    """scores (B, K) cosine similarities of this rank's B embeddings to the K prototypes -> codes (B, K) in fp32, each
    row a distribution over prototypes, the prototypes sharing the global batch about equally (``iters`` alternating
    normalisations of exp(scores / eps): each prototype's total over every rank's images, then each image's row).

    ``reduce`` averages a tensor over ranks (None: one process): a prototype's total is only ever divided out, so the
    mean serves as well as the sum. ``shared`` (S, K): scores of more rows that every rank holds alike (SwAV's queue
    of past global batches), in the balance but given no codes; with ``world`` ranks they count once, as in one
    process with every rank's rows. Scores are at most 1 (unit vectors), so exp((scores - 1) / eps) cannot
    overflow; an image whose every score is below 1 - 87 eps underflows in fp32 and gets a code of zeros (no loss)
    rather than NaNs."""
    q = torch.exp((scores.float() - 1.0) / eps)
    extra = None if shared is None else torch.exp((shared.float() - 1.0) / eps)
    for _ in range(iters):
        per_prototype = q.sum(dim=0)
        if reduce is not None:
            per_prototype = reduce(per_prototype)
        if extra is not None:  # per rank: the ranks' mean of their own rows plus 1/world of the shared ones
            per_prototype = per_prototype + extra.sum(dim=0) / world
            extra /= per_prototype.clamp_min(torch.finfo(torch.float32).tiny)
            extra /= extra.sum(dim=1, keepdim=True)
        q /= per_prototype.clamp_min(torch.finfo(torch.float32).tiny)  # a prototype no image comes near keeps 0s
        q /= q.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return q


def swav_loss(scores: Tensor, codes: Tensor, temperature: float) -> Tensor:
    """scores (V, B, K) of every view, codes (G, B, K) of the first G (global) views -> the swapped prediction loss:
    the cross-entropy of each code against the prototype softmax (``temperature``) of every other view of the image,
    averaged over those V - 1 views, the batch and the G codes, in fp32."""
    v, g = scores.shape[0], codes.shape[0]
    log_p = F.log_softmax(scores.float() / temperature, dim=-1)  # (V, B, K)
    others = log_p.sum(0, keepdim=True) - log_p[:g]  # each code's sum over the views that are not its own
    return -(codes * others).sum(-1).mean() / (v - 1)


class SwAV(SSLMethod):
    config_keys = frozenset({"freeze_last_layer_steps", "loss_impl", "num_prototypes", "queue_size",
                             "queue_start_steps", "sinkhorn_eps", "sinkhorn_iters", "temperature"})

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.data.num_views < 2:
            raise ValueError(f"data.num_views: swav swaps the codes of at least 2 global views, got "
                             f"{cfg.data.num_views}")
        require_no_kernel(cfg, "swav")

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        super().__init__()
        del rank  # the codes need only the prototypes' totals over ranks (and the queue every rank's embeddings)
        m, mc = cfg.method, cfg.model
        self.backbone = build_method_backbone(cfg)
        self.projector = ProjectionHead(self.backbone.embed_dim, hidden_dim=mc.proj_hidden_dim,
                                        out_dim=mc.proj_out_dim, num_layers=mc.proj_layers)
        self.prototypes = WeightNormLinear(mc.proj_out_dim, m.num_prototypes, fixed_norm=True)
        self.n_global = cfg.data.num_views
        self.reduce = reduce
        self.cfg = m
        self._freeze = m.freeze_last_layer_steps > 0
        self.gather = gather
        # the embeddings of the last global batches, newest first, per global view; how many rows hold one
        self.register_buffer("queue", torch.zeros(self.n_global, m.queue_size, mc.proj_out_dim))
        self.register_buffer("queue_filled", torch.zeros(1, dtype=torch.long))
        self._queue_on = m.queue_size > 0 and m.queue_start_steps == 0

    def on_step_start(self, step: int, max_steps: int) -> None:
        self._freeze = step < self.cfg.freeze_last_layer_steps
        self._queue_on = self.cfg.queue_size > 0 and step >= self.cfg.queue_start_steps

    def _codes(self, scores: Tensor, z: Tensor, weight: Tensor) -> Tensor:
        """Codes (G, B, K) of the global views' scores (G, B, K); z (G, B, D) their embeddings. With the queue on, a
        full queue joins the balance; then (in training) the global batch's embeddings go in front of it."""
        m = self.cfg
        if not self._queue_on:
            return torch.stack([sinkhorn_codes(s.detach(), m.sinkhorn_eps, m.sinkhorn_iters, self.reduce)
                                for s in scores])
        rows = [zi.detach().float() if self.gather is None else self.gather(zi.detach().float()) for zi in z]
        world = rows[0].shape[0] // z.shape[1]  # 1 when the queue holds this rank's own embeddings only
        full = int(self.queue_filled) >= m.queue_size
        codes = torch.stack([
            sinkhorn_codes(s.detach(), m.sinkhorn_eps, m.sinkhorn_iters, self.reduce, world=world,
                           shared=self.queue[i] @ weight.detach().float().T if full else None)
            for i, s in enumerate(scores)])
        if self.training:
            for i, r in enumerate(rows):
                self.queue[i].copy_(torch.cat([r, self.queue[i]])[: m.queue_size])
            self.queue_filled.fill_(min(m.queue_size, int(self.queue_filled) + rows[0].shape[0]))
        return codes

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch["views"]: ``n_global`` tensors (B, C, H, W), then any local crops (B, C, h, w)."""
        views = batch["views"]
        n, g = views[0].shape[0], self.n_global
        z = F.normalize(self.projector(features_by_resolution(self.backbone, views)), dim=1)
        weight = self.prototypes.weight
        scores = F.linear(z, weight.detach() if self._freeze else weight).view(len(views), n, -1)
        codes = self._codes(scores[:g], z.view(len(views), n, -1)[:g], weight)
        loss = swav_loss(scores, codes, self.cfg.temperature)
        # how sure the codes are: 1 = each image on one prototype, 0 = spread over all K
        confidence = codes.max(dim=-1).values.mean()
        return {"loss": loss, "code_confidence": confidence}
