"""Barlow Twins (Zbontar et al., 2021) and VICReg (Bardes et al., 2022): two views, a wide projector, and a loss on
the statistics of the embedding dimensions over the global batch, with no negatives and no teacher.

Barlow Twins standardises each dimension over the batch and drives the cross-correlation matrix of the two views'
embeddings to the identity: the diagonal to 1 (invariance), the rest to 0 (redundancy reduction, weighted lambda).
VICReg keeps the views' embeddings close (invariance, mean squared error), each dimension's standard deviation above 1
(variance, a hinge) and the dimensions' covariances at 0 (covariance).

Both need the statistics of the whole global batch, as the official code computes them (a synchronised BatchNorm and an
all-reduce of the correlation matrix for Barlow Twins, an all-gather for VICReg): here every rank's embeddings are
gathered with their gradients (``gather``) and each rank computes the batch terms over all of them. Each rank's share
of the gradient comes back through the gather's backward, so the ranks' averaged gradients are those of the loss on
the whole batch in one process (tests/pretrain/test_decorrelation.py checks it on 2 ranks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.config import Config
from pretrain.heads import ProjectionHead
from pretrain.methods.base import Gather, Reduce, SSLMethod, build_method_backbone, each_view, require_two_views


def _off_diagonal_square_sum(m: Tensor) -> Tensor:
    return m.square().sum() - torch.diagonal(m).square().sum()


def barlow_twins_loss(z0: Tensor, z1: Tensor, lambd: float, eps: float = 1e-5) -> Tensor:
    """z0, z1: (N, D) embeddings of the two views of the N images of the whole batch. sum_i (1 - C_ii)^2 + lambd x
    sum_{i != j} C_ij^2, C the (D, D) cross-correlation of the dimensions standardised over the batch (the official
    code's BatchNorm without affine: biased variance, eps inside the root), in fp32."""
    n = z0.shape[0]
    a, b = z0.float(), z1.float()
    a = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + eps)
    b = (b - b.mean(0)) / torch.sqrt(b.var(0, unbiased=False) + eps)
    c = a.T @ b / n
    on_diag = (torch.diagonal(c) - 1).square().sum()
    return on_diag + lambd * _off_diagonal_square_sum(c)


def vicreg_batch_terms(z0: Tensor, z1: Tensor, eps: float = 1e-4) -> dict[str, Tensor]:
    """z0, z1: (N, D) of the whole batch. VICReg's two batch terms, unweighted, in fp32: ``variance`` (mean hinge
    1 - std of each dimension, averaged over the views; std = sqrt(unbiased var + eps)) and ``covariance`` (sum of
    squared off-diagonal covariances / D, summed over the views), as the official code."""
    a, b = z0.float(), z1.float()
    n, d = a.shape
    a, b = a - a.mean(0), b - b.mean(0)
    variance = sum(F.relu(1 - torch.sqrt(x.var(0) + eps)).mean() for x in (a, b)) / 2
    covariance = sum(_off_diagonal_square_sum(x.T @ x / (n - 1)) for x in (a, b)) / d
    return {"variance": variance, "covariance": covariance}


def vicreg_terms(z0: Tensor, z1: Tensor) -> dict[str, Tensor]:
    """z0, z1: (N, D) of the whole batch: the batch terms and ``invariance``, the views' mean squared error."""
    return {"invariance": F.mse_loss(z0.float(), z1.float()), **vicreg_batch_terms(z0, z1)}


class _GlobalBatchEmbedding(SSLMethod):
    """Two views through the backbone and a projector; the loss is computed on every rank's embeddings."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_two_views(cfg, f"{cfg.method.name} compares two views per image")

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        super().__init__()
        del reduce, rank  # every statistic is computed on the gathered batch
        self.backbone = build_method_backbone(cfg)
        self.projector = ProjectionHead(self.backbone.embed_dim, hidden_dim=cfg.model.proj_hidden_dim,
                                        out_dim=cfg.model.proj_out_dim, num_layers=cfg.model.proj_layers)
        self.gather = gather

    def embed(self, batch: dict) -> tuple[Tensor, Tensor]:
        """batch["views"]: two (B, C, H, W) -> this rank's (B, D) embeddings of each view. Each view goes through the
        networks on its own, so the BatchNorm layers normalise it by its own statistics, as the official code of both
        (``z1 = projector(backbone(y1))``, ``z2 = ...(y2)``)."""
        views = batch["views"][:2]
        z = each_view(views, self.backbone, self.projector)
        return z[: views[0].shape[0]], z[views[0].shape[0]:]

    def all_ranks(self, z: Tensor) -> Tensor:
        return z if self.gather is None else self.gather(z)


class BarlowTwins(_GlobalBatchEmbedding):
    config_keys = frozenset({"barlow_lambda"})

    def __init__(self, cfg: Config, **kwargs) -> None:
        super().__init__(cfg, **kwargs)
        self.lambd = cfg.method.barlow_lambda

    def forward(self, batch: dict) -> dict[str, Tensor]:
        z0, z1 = self.embed(batch)
        return {"loss": barlow_twins_loss(self.all_ranks(z0), self.all_ranks(z1), self.lambd)}


class VICReg(_GlobalBatchEmbedding):
    config_keys = frozenset({"vicreg_covariance", "vicreg_invariance", "vicreg_variance"})

    def __init__(self, cfg: Config, **kwargs) -> None:
        super().__init__(cfg, **kwargs)
        m = cfg.method
        self.weights = {"invariance": m.vicreg_invariance, "variance": m.vicreg_variance,
                        "covariance": m.vicreg_covariance}

    def forward(self, batch: dict) -> dict[str, Tensor]:
        z0, z1 = self.embed(batch)
        # invariance on this rank's pairs (the ranks' mean is the whole batch's), the batch terms on every rank's
        terms = {"invariance": F.mse_loss(z0.float(), z1.float()),
                 **vicreg_batch_terms(self.all_ranks(z0), self.all_ranks(z1))}
        loss = sum(self.weights[k] * v for k, v in terms.items())
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}
