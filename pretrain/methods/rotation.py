"""RotNet (Gidaris et al., 2018): predict by how much an image was rotated.

Every image of the batch is shown at all four rotations (0, 90, 180, 270 degrees, the paper's best setting: each image
in the same batch four times), the backbone encodes each, and a head classifies the rotation. Recognising which way is
up needs the object's shape and parts, which is the representation downstream tasks use. ``backbone`` is the encoder;
the head (``model.proj_*`` layers, 4 outputs) is dropped downstream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.config import Config
from pretrain.heads import ProjectionHead
from pretrain.methods.base import Gather, Reduce, SSLMethod, build_method_backbone, require_one_view

ROTATIONS = 4


def rotate_all(images: Tensor) -> tuple[Tensor, Tensor]:
    """images (B, C, S, S) -> (4B, C, S, S) rotated by 0, 90, 180, 270 degrees (counter-clockwise, rotation-major) and
    the labels (4B,) = the number of quarter turns."""
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation needs square views (B, C, S, S), got {tuple(images.shape)}")
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


class Rotation(SSLMethod):
    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_one_view(cfg, "rotation turns")

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        super().__init__()
        del gather, reduce, rank  # a per-sample loss: nothing crosses ranks but the gradients
        self.backbone = build_method_backbone(cfg)
        self.head = ProjectionHead(self.backbone.embed_dim, hidden_dim=cfg.model.proj_hidden_dim, out_dim=ROTATIONS,
                                   num_layers=cfg.model.proj_layers)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch["views"]: one tensor (B, C, S, S)."""
        images, labels = rotate_all(batch["views"][0])
        logits = self.head(self.backbone(images))
        loss = F.cross_entropy(logits.float(), labels)
        return {"loss": loss, "accuracy": (logits.argmax(dim=1) == labels).float().mean().detach()}
