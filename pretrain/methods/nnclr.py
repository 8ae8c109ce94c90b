"""NNCLR (Dwibedi et al., 2021): nearest-neighbour contrastive learning.

SimCLR's two views through a backbone, a projector and a predictor (each view on its own, so BatchNorm normalises it
by its own statistics, as solo-learn's implementation; SimCLR passes both at once), with one change that the method is
named for: the positive of view 1's prediction is not view 2's embedding but its nearest neighbour in a support set,
the L2-normalised projections of view 1 of the last ``queue_size`` images of the global batches before (a FIFO queue
of every rank's, gathered in rank order, so every rank holds the same one and a checkpoint keeps it whole). A
neighbour is another image that looks like this one to the network: more semantic variation than an augmentation
gives.

The loss of one direction is InfoNCE with the neighbours as queries and the other view's predictions as keys:

    L_i = -log exp(nn(z_i) . p'_i / T) / sum_k exp(nn(z_i) . p'_k / T)

over the keys of the global batch (every rank's predictions, gathered with gradients), symmetrised over the views and
averaged. The neighbours are constants (the support set gets no gradient); the predictions carry it. It runs on the
tiled row-vs-columns kernel (``kernels.contrastive_rows_loss``), so the (n, N_global) logits are never built on the
Triton and chunked paths. ``backbone`` is the one NNCLR evaluates and releases.

Until the support set holds anything (the first step) each embedding is its own neighbour: the loss of that step is
SimCLR's pairing of the views, not a pairing with random vectors (the initial queue of solo-learn's implementation).
After that, the lookup runs over the rows filled so far.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.contrastive import contrastive_rows_loss, decoupled_rows
from pretrain.config import Config
from pretrain.methods.base import (
    Gather,
    Reduce,
    SSLMethod,
    build_method_backbone,
    each_view,
    projector_and_predictor,
    require_shared_queue,
    require_two_views,
    ring_enqueue_,
)


@torch.no_grad()
def nearest_neighbours(z: Tensor, support: Tensor) -> Tensor:
    """z (n, D) unit rows, support (S, D) unit rows -> (n, D): each row's most similar support row (cosine), fp32 (also
    under bf16 autocast: a neighbour is picked by similarities that differ in the third digit). An empty support set
    returns z itself."""
    if support.shape[0] == 0:
        return z.float()
    with torch.autocast(device_type=z.device.type, enabled=False):
        return support[(z.float() @ support.float().T).argmax(dim=1)].float()


def nnclr_loss(neighbours: Tensor, p: Tensor, temperature: float, *, p_all: Tensor | None = None, offset: int = 0,
               impl: str = "auto", decoupled: bool = False) -> Tensor:
    """One direction: neighbours (n, D) of this rank's images' view-a embeddings (constants), p (n, D) the
    predictions of their view b; p_all (N, D) every rank's predictions in rank order (None: p, offset 0), this rank's
    at rows offset..offset+n. Returns ``mean_i CE(cos(nn_i, p_all_j) / T, j = offset + i)`` in fp32; the gradient
    reaches the predictions only. ``decoupled``: DCL's rows instead (``kernels.contrastive.decoupled_rows``: each
    neighbour's positive prediction out of its denominator; DCL's paper pairs it with NNCLR)."""
    if p_all is None:
        p_all, offset = p, 0
    if neighbours.shape != p.shape or p_all.shape[1:] != p.shape[1:] or not 0 <= offset <= p_all.shape[0] - p.shape[0]:
        raise ValueError(f"nnclr_loss: neighbours {tuple(neighbours.shape)}, p {tuple(p.shape)} and p_all "
                         f"{tuple(p_all.shape)} at offset {offset} do not fit")
    q = (F.normalize(neighbours.detach().float(), dim=1) / temperature).to(p_all.dtype)
    k = F.normalize(p_all, dim=1)
    pos = torch.arange(p.shape[0], device=p.device) + offset
    rows = contrastive_rows_loss(q, k, pos, impl=impl)
    return (decoupled_rows(rows) if decoupled else rows).mean()


class NNCLR(SSLMethod):
    reads_proj_last_bn = True
    config_keys = frozenset({"decoupled", "loss_impl", "predictor_hidden_dim", "queue_size", "temperature"})

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_two_views(cfg, "nnclr contrasts two views per image")
        require_shared_queue(cfg, "nnclr", "a support set of past embeddings to look up neighbours in", "98,304")

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        super().__init__()
        del reduce  # nothing is averaged across ranks outside the loss
        mc, m = cfg.model, cfg.method
        self.backbone = build_method_backbone(cfg)
        self.projector, self.predictor = projector_and_predictor(cfg, self.backbone.embed_dim)
        self.temperature = m.temperature
        self.loss_impl = m.loss_impl
        self.decoupled = m.decoupled
        self.gather = gather
        self.rank = rank
        # the support set: a ring of unit rows, the next row to write, and how many rows hold an embedding
        self.register_buffer("queue", torch.zeros(m.queue_size, mc.proj_out_dim))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros(1, dtype=torch.long))

    @property
    def support(self) -> Tensor:
        """The rows of the support set that hold an embedding."""
        return self.queue[: int(self.queue_filled)]

    @torch.no_grad()
    def enqueue(self, z: Tensor) -> None:
        """Put this step's view-1 embeddings (every rank's, in rank order) in the support set, over its oldest rows."""
        written = ring_enqueue_(self.queue, self.queue_ptr, z if self.gather is None else self.gather(z))
        self.queue_filled.fill_(min(self.queue.shape[0], int(self.queue_filled) + written))

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch["views"]: two tensors (B, C, H, W)."""
        views = batch["views"]
        n = views[0].shape[0]
        # each view through the networks on its own: BatchNorm statistics per view, as solo-learn's (unlike SimCLR's)
        z = each_view(views, self.backbone, self.projector)
        p = each_view((z[:n], z[n:]), self.predictor)
        zn = F.normalize(z.detach().float(), dim=1)
        support = self.support
        nn0, nn1 = nearest_neighbours(zn[:n], support), nearest_neighbours(zn[n:], support)
        losses = []
        for nb, pb in ((nn0, p[n:]), (nn1, p[:n])):  # each view's neighbours against the other view's predictions
            if self.gather is None:
                losses.append(nnclr_loss(nb, pb, self.temperature, impl=self.loss_impl, decoupled=self.decoupled))
            else:
                losses.append(nnclr_loss(nb, pb, self.temperature, p_all=self.gather(pb), offset=self.rank * n,
                                         impl=self.loss_impl, decoupled=self.decoupled))
        # how near the neighbours are: the mean cosine of view 1's embeddings to theirs (1 while each is its own)
        similarity = (nn0 * zn[:n]).sum(1).mean()
        if self.training:
            self.enqueue(zn[:n])
        return {"loss": (losses[0] + losses[1]) / 2, "nn_similarity": similarity}
