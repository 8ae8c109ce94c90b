"""BYOL (Grill et al., 2020): bootstrap your own latent.

An online network (backbone + projector + predictor) predicts, from one view, the projection a target network gives
of the other view; the target is an EMA of the online backbone + projector and gets no gradient. The loss is the
normalised mean squared error ``2 - 2 cos(prediction, target)`` averaged over the batch, summed over the two directions
(view 1 predicting view 2 and back), as the paper's ``L + L~`` and the official code's (0 at perfect agreement, 8 at
worst; the scale matters under the recipes' LARS, whose biases and norms take plain momentum steps on the gradient).
Each view goes through each network on its own, so every BatchNorm layer normalises it by its own statistics, as the
official code (``self.net(inputs['view1'])``, then ``view2``). The target momentum rises from ``teacher_momentum`` to 1
along a cosine, a function of the step alone. ``backbone`` is the online backbone, the network BYOL evaluates and
releases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import Config
from pretrain.ema import cosine_momentum, ema_update_, teacher_copy
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


def byol_loss(pred: Tensor, target: Tensor) -> Tensor:
    """pred, target: (N, D) -> mean over rows of ``2 - 2 cos(pred_i, target_i)``, in fp32 (target detached)."""
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(target.detach().float(), dim=-1)
    return 2.0 - 2.0 * (p * t).sum(dim=-1).mean()


class BYOL(SSLMethod):
    reads_proj_last_bn = True
    config_keys = frozenset({"loss_impl", "predictor_hidden_dim", "teacher_momentum"})

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_two_views(cfg, "byol predicts one view from the other")
        require_no_kernel(cfg, "byol")

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        super().__init__()
        del gather, reduce, rank  # the loss is per sample: nothing crosses ranks but the gradients
        backbone = build_method_backbone(cfg)
        projector, self.predictor = projector_and_predictor(cfg, backbone.embed_dim,
                                                            predictor_last_bn=self.predictor_last_bn(cfg))
        self.online = nn.ModuleDict({"backbone": backbone, "projector": projector})
        self.target = teacher_copy(self.online)
        self.base_momentum = cfg.method.teacher_momentum

    @staticmethod
    def predictor_last_bn(cfg: Config) -> bool:
        """Whether the predictor ends in a BatchNorm without affine parameters: not BYOL's."""
        return False

    @property
    def backbone(self) -> nn.Module:  # type: ignore[override]
        return self.online["backbone"]

    def predictions_and_targets(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        """views: two (B, C, H, W) -> the online predictions and the target projections, each (2B, D) in the views'
        order. Each view goes through each network on its own (BatchNorm statistics per view), as the official code."""
        pred = each_view(views, self.online["backbone"], self.online["projector"], self.predictor)
        with torch.no_grad():
            target = each_view(views, self.target["backbone"], self.target["projector"])
        return pred, target

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch["views"]: two tensors (B, C, H, W)."""
        views = batch["views"]
        n = views[0].shape[0]
        pred, target = self.predictions_and_targets(views)
        # each view's prediction against the target's projection of the other view, the two directions summed
        loss = byol_loss(pred[:n], target[n:]) + byol_loss(pred[n:], target[:n])
        return {"loss": loss}

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        ema_update_(self.target, self.online, cosine_momentum(step, max_steps, self.base_momentum))
