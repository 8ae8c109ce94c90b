"""SimMIM (Xie et al., 2022): a simple framework for masked image modeling.

The ViT sees the whole image with a random share of it masked: the image is cut into square mask units of
``method.mask_patch_size`` pixels (a multiple of the patch size: SimMIM's 32 px units are 2 x 2 patches of ViT-B/16),
exactly ``ceil(units x mask_ratio)`` of them are hidden per image (the official ``MaskGenerator``), and each hidden
patch's embedding becomes the mask token (``kernels.mask_token_replace``) before the positions are added. A linear
head (the official 1x1 convolution and pixel shuffle, one patch at a time) predicts the raw pixels of every hidden
patch from the encoder's final patch token, gathered from the masked positions only (``kernels.packed_gather``); the
loss is the L1 distance to the normalised input pixels, averaged over the hidden pixels and channels. There is no
decoder and no target network: the encoder sees every token, mask tokens included. ``backbone`` is the ViT.

The masks are drawn as MAE's (``pretrain.methods.mae``): from the torch generator of the rank's device, which a resumed
run restores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.masked_gather import packed_gather
from pretrain.config import Config
from pretrain.methods.base import (
    Gather,
    Reduce,
    SSLMethod,
    build_method_backbone,
    built_size_view,
    require_one_view,
    require_vit,
)
from pretrain.methods.mae import IMPLS


def unit_masks(batch: int, grid: tuple[int, int], unit: int, mask_ratio: float, device: torch.device | str) -> Tensor:
    """SimMIM's masks: (B, gh, gw) patch grid cut into ``unit`` x ``unit`` blocks of patches, exactly
    ``ceil(blocks x mask_ratio)`` of them hidden per image, uniformly at random -> (B, gh * gw) bool, True = hidden."""
    gh, gw = grid[0] // unit, grid[1] // unit
    hidden = math.ceil(gh * gw * mask_ratio)
    order = torch.rand(batch, gh * gw, device=device).argsort(dim=1)
    mask = order.argsort(dim=1) < hidden  # the first `hidden` of a random order
    mask = mask.reshape(batch, gh, gw).repeat_interleave(unit, dim=1).repeat_interleave(unit, dim=2)
    return mask.reshape(batch, grid[0] * grid[1])


def simmim_loss(pred: Tensor, target: Tensor) -> Tensor:
    """pred, target: (M, p*p*C) pixels of the M hidden patches (every image hides at least one: check_config) -> the
    mean L1 distance per hidden pixel and channel, in fp32 (the official loss: the masked sum of |x - x_rec| over the
    masked pixels, over the channels)."""
    return F.l1_loss(pred.float(), target.float())


class SimMIM(SSLMethod):
    config_keys = frozenset({"loss_impl", "mask_patch_size", "mask_ratio"})

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        m, d, p = cfg.method, cfg.data, cfg.model.patch_size
        require_vit(cfg, "simmim masks patch tokens of")
        if m.loss_impl not in IMPLS:
            raise ValueError(f"method.loss_impl: simmim takes one of {', '.join(IMPLS)} (the masking kernels), got "
                             f"{m.loss_impl!r}")
        require_one_view(cfg, "simmim reconstructs")
        if m.mask_patch_size % p or d.image_size % m.mask_patch_size:
            raise ValueError(f"method.mask_patch_size: {m.mask_patch_size} px must be a multiple of model.patch_size "
                             f"{p} and divide data.image_size {d.image_size}")
        units = (d.image_size // m.mask_patch_size) ** 2
        if not 0 < math.ceil(units * m.mask_ratio) < units:
            raise ValueError(f"method.mask_ratio: {m.mask_ratio} of {units} mask units of {m.mask_patch_size} px hides "
                             f"{math.ceil(units * m.mask_ratio)}; need at least one hidden and one visible")

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        super().__init__()
        del gather, reduce, rank  # per-sample losses: nothing crosses ranks but the gradients
        m = cfg.method
        self.backbone = build_method_backbone(cfg, masks=True)
        enc = self.backbone
        enc.mask_impl = m.loss_impl
        self.head = nn.Linear(enc.embed_dim, enc.patch_size ** 2 * enc.in_chans)  # the official 1x1 conv, per patch
        self.unit = m.mask_patch_size // enc.patch_size
        self.mask_ratio = m.mask_ratio

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch["views"]: one tensor (B, C, H, W) at the built image size."""
        enc = self.backbone
        imgs = built_size_view(batch, enc, "simmim", "its mask units tile the built grid")
        mask = unit_masks(imgs.shape[0], enc.grid_size, self.unit, self.mask_ratio, imgs.device)
        tokens = enc.patch_tokens(enc.forward_features(imgs, mask))
        pred = self.head(packed_gather(tokens, mask, impl=enc.mask_impl))
        target = enc.patchify(imgs)[mask]  # the same row-major order
        return {"loss": simmim_loss(pred, target)}
