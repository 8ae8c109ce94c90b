"""SimCLR (Chen et al., 2020): two views, a projection head, NT-Xent over every rank's embeddings; with
``method.decoupled`` the decoupled contrastive loss (DCL, Yeh et al., 2022) instead, each anchor's positive out of its
denominator.

The loss is the official code's ``loss_a + loss_b``: the sum over the two views of the mean NT-Xent of their anchors
(``kernels.ntxent_loss`` averages over all 2n anchors, half of it). The scale matters under the recipes' LARS: biases
and norms take plain momentum steps on the gradient, and the weight decay weighs against it in the trust ratio."""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.ntxent import ntxent_loss
from pretrain.config import Config
from pretrain.heads import ProjectionHead
from pretrain.methods.base import Gather, Reduce, SSLMethod, build_method_backbone


class SimCLR(SSLMethod):
    reads_proj_last_bn = True
    config_keys = frozenset({"decoupled", "loss_impl", "temperature"})

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.data.num_views != 2:
            raise ValueError(f"data.num_views: simclr contrasts two views per image, got {cfg.data.num_views}")
        if cfg.data.local_views:
            raise ValueError(f"data.local_views: simclr uses two views and no local crops, got {cfg.data.local_views}")

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        super().__init__()
        del reduce  # SimCLR averages nothing across ranks outside the loss
        self.backbone = build_method_backbone(cfg)
        self.projector = ProjectionHead(
            self.backbone.embed_dim,
            hidden_dim=cfg.model.proj_hidden_dim,
            out_dim=cfg.model.proj_out_dim,
            num_layers=cfg.model.proj_layers,
            last_bn=cfg.model.proj_last_bn,
            last_bn_scale=cfg.model.proj_last_bn_scale,
        )
        self.temperature = cfg.method.temperature
        self.decoupled = cfg.method.decoupled
        self.loss_impl = cfg.method.loss_impl
        self.gather = gather
        self.rank = rank

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch["views"]: two tensors (B, C, H, W)."""
        v0, v1 = batch["views"][:2]
        n = v0.shape[0]
        # One backbone pass over both views keeps BatchNorm statistics shared, as in the reference implementation.
        z = self.projector(self.backbone(torch.cat([v0, v1])))
        z0, z1 = z[:n], z[n:]
        if self.gather is None:
            loss = ntxent_loss(z0, z1, self.temperature, impl=self.loss_impl, decoupled=self.decoupled)
        else:
            loss = ntxent_loss(
                z0, z1, self.temperature,
                z0_all=self.gather(z0), z1_all=self.gather(z1), offset=self.rank * n, impl=self.loss_impl,
                decoupled=self.decoupled,
            )
        # the mean over the 2n anchors -> the sum of the two views' means (loss_a + loss_b)
        return {"loss": 2.0 * loss}
