"""SimSiam (Chen & He, 2021): a Siamese network without negatives, momentum encoder or codes.

Both views go through one encoder (backbone + projector, the projector ending in a BatchNorm without affine
parameters: ``model.proj_last_bn``) and a bottleneck predictor; each view's prediction is pulled toward the other view's
projection, which gets no gradient (the stop-gradient the paper shows to be what prevents collapse):

    L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2,    D(p, z) = -cos(p, z)

(-1 at perfect agreement). ``z_std``, logged each step, is the paper's collapse monitor: the standard deviation over
the batch of the L2-normalised projections, averaged over channels: about 1/sqrt(proj_out_dim) for spread-out outputs,
0 when every image maps to one vector. ``backbone`` is the one SimSiam evaluates and releases.

The paper's predictor keeps a fixed learning rate while the rest follows the cosine schedule (slightly better in its
ablation): that is ``optim.fixed_lr: [predictor]``, which the ImageNet recipe sets. Each view goes through the
networks on its own, so BatchNorm normalises it by its own statistics, as the official code (``z1 = encoder(x1)``,
``z2 = encoder(x2)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.config import Config
from pretrain.methods.base import (
    Gather,
    Reduce,
    SSLMethod,
    build_method_backbone,
    each_view,
    projector_and_predictor,
    require_no_kernel,
    require_two_views,
)


def simsiam_loss(p: Tensor, z: Tensor) -> Tensor:
    """p, z: (N, D) predictions and the projections they are pulled to (detached here) -> mean over rows of
    ``-cos(p_i, z_i)``, in fp32."""
    return -(F.normalize(p.float(), dim=-1) * F.normalize(z.detach().float(), dim=-1)).sum(dim=-1).mean()


class SimSiam(SSLMethod):
    reads_proj_last_bn = True
    config_keys = frozenset({"loss_impl", "predictor_hidden_dim"})

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_two_views(cfg, "simsiam predicts one view from the other")
        require_no_kernel(cfg, "simsiam")

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        super().__init__()
        del gather, reduce, rank  # the loss is per sample: nothing crosses ranks but the gradients
        self.backbone = build_method_backbone(cfg)
        self.projector, self.predictor = projector_and_predictor(cfg, self.backbone.embed_dim)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch["views"]: two tensors (B, C, H, W)."""
        views = batch["views"]
        n = views[0].shape[0]
        # each view through the networks on its own: BatchNorm statistics per view, as the official code
        z = each_view(views, self.backbone, self.projector)
        p = each_view((z[:n], z[n:]), self.predictor)
        # each view's prediction against the other view's projection, halved per direction
        loss = simsiam_loss(p, torch.cat([z[n:], z[:n]]))
        with torch.no_grad():
            z_std = F.normalize(z[:n].float(), dim=-1).std(dim=0).mean()
        return {"loss": loss, "z_std": z_std}
