"""I-JEPA (Assran et al., 2023): self-supervised learning from images with a joint-embedding predictive architecture.

One view per image, no hand-made augmentations beyond the crop. Its patches are split by ``multiblock_masks`` into a
few target blocks and a large context block that avoids them. A target encoder (an EMA of the context encoder, no
gradient) encodes the whole image; its final patch features, layer-normed without affine, at the target blocks are
what is predicted. The context encoder (``encoder``, a ViT) sees only the context patches, picked by
``kernels.masked_gather`` (no mask tokens in the encoder). A narrow predictor (a ViT of ``decoder_depth`` blocks,
``decoder_dim`` wide) takes the encoded context plus, per target block, a shared mask token at each target position
(fixed sin-cos positions on both) and predicts the target features. The loss is the smooth L1 between prediction and
target over every target patch. The target momentum rises linearly from ``teacher_momentum`` to 1, as the reference.

Prediction happens in feature space, not pixels (MAE) nor a teacher's prototype distributions (iBOT): no pixel
details to spend capacity on, no augmentation invariance to hand-pick. The cls token and any registers join the context
encoder's sequence but get no objective of their own. ``backbone``, what downstream tasks use, is the target encoder:
the one that sees whole images in training, as downstream it will (the context encoder only ever sees a quarter or so
of the patches), and the EMA of the two, as DINO's teacher; pooled over its patch tokens (``global_pool: mean``,
required), as the paper's linear probes average them.

The masks come from torch's default generator (through ``multiblock_masks``), so a resumed run, which restores it,
draws the masks the interrupted run would have drawn.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.masking import block_shape, multiblock_masks
from kernels.masked_gather import masked_gather
from pretrain.config import Config
from pretrain.ema import ema_update_, linear_momentum, teacher_copy
from pretrain.methods.base import (
    Gather,
    Reduce,
    SSLMethod,
    build_method_backbone,
    built_size_view,
    require_one_view,
    require_vit,
)
from pretrain.methods.mae import IMPLS, check_decoder, encode_patches
from pretrain.models.vit import Block, sincos_pos_embed_2d


class IJEPAPredictor(nn.Module):
    """Encoded context patches (B, Nc, D_enc) at ``context`` (B, Nc) -> predicted features (B, M, Nt, D_enc) at the
    ``targets`` (B, M, Nt) positions, one pass per target block (the context repeated for each)."""

    def __init__(self, embed_dim: int, grid: tuple[int, int], *, dim: int, depth: int, num_heads: int) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim))
        # fixed, derived from the grid: not in the state dict, not trained
        self.register_buffer("pos_embed", sincos_pos_embed_2d(grid, dim), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads, 4.0, True, 0.0) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, embed_dim)
        # the reference's init: trunc_normal(0.02) weights, zero biases, each block's output projections scaled down by
        # sqrt(2 * its depth)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            for i, block in enumerate(self.blocks):
                block.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                block.mlp[2].weight.div_(math.sqrt(2.0 * (i + 1)))

    def forward(self, x: Tensor, context: Tensor, targets: Tensor) -> Tensor:
        b, m, nt = targets.shape
        nc = context.shape[1]
        x = self.embed(x) + self.pos_embed[context].to(x.dtype)  # (B, Nc, dim)
        queries = self.mask_token.to(x.dtype) + self.pos_embed[targets].to(x.dtype)  # (B, M, Nt, dim)
        x = torch.cat([x.unsqueeze(1).expand(b, m, nc, -1), queries], dim=2).flatten(0, 1)  # (B*M, Nc+Nt, dim)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x)[:, nc:]).view(b, m, nt, -1)


class IJEPA(SSLMethod):
    config_keys = frozenset({"context_scale", "decoder_depth", "decoder_dim", "decoder_heads", "loss_impl",
                             "min_context_patches", "num_target_blocks", "target_aspect", "target_scale",
                             "teacher_momentum"})

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        m, d = cfg.method, cfg.data
        require_vit(cfg, "ijepa predicts the patch features of")
        require_one_view(cfg, "ijepa predicts within")
        if m.loss_impl not in IMPLS:
            raise ValueError(f"method.loss_impl: ijepa takes one of {', '.join(IMPLS)}, got {m.loss_impl!r}")
        pool = cfg.model.backbone_kwargs.get("global_pool", "cls")
        if pool != "mean":
            raise ValueError(f"model.backbone_kwargs.global_pool: ijepa trains the patch tokens only (its cls token "
                             f"has no objective), so its backbone is pooled over them: set mean, got {pool!r}")
        check_decoder(cfg)  # the predictor's width, heads and sin-cos positions
        side = d.image_size // cfg.model.patch_size
        h, w = block_shape((side, side), m.context_scale[0], 1.0)
        if h * w < m.min_context_patches:
            raise ValueError(f"method.context_scale: its smallest context block, {h}x{w} of the {side}x{side} patch "
                             f"grid, holds fewer than min_context_patches={m.min_context_patches}")

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        super().__init__()
        del gather, reduce, rank  # the loss is per sample: nothing crosses ranks but the gradients
        m = cfg.method
        self.encoder = build_method_backbone(cfg)
        self.target = teacher_copy(self.encoder)
        enc = self.encoder
        self.predictor = IJEPAPredictor(enc.embed_dim, enc.grid_size, dim=m.decoder_dim, depth=m.decoder_depth,
                                        num_heads=m.decoder_heads)
        self.masking = dict(num_targets=m.num_target_blocks, target_scale=tuple(m.target_scale),
                            target_aspect=tuple(m.target_aspect), context_scale=tuple(m.context_scale),
                            min_context=m.min_context_patches)
        self.base_momentum = m.teacher_momentum
        self.impl = m.loss_impl

    @property
    def backbone(self) -> nn.Module:  # type: ignore[override]
        return self.target

    def encode_context(self, imgs: Tensor, context: Tensor) -> Tensor:
        """imgs (B, C, H, W), context (B, Nc) -> (B, Nc, D): the context patches through the context encoder (with the
        cls token and any registers, which are then dropped)."""
        return self.encoder.patch_tokens(encode_patches(self.encoder, imgs, context, self.impl))

    @torch.no_grad()
    def target_features(self, imgs: Tensor, targets: Tensor) -> Tensor:
        """imgs (B, C, H, W), targets (B, M, Nt) -> (B, M, Nt, D) fp32: the target encoder's final patch features of
        the whole image, layer-normed without affine, at the target blocks."""
        h = self.target.patch_tokens(self.target.forward_features(imgs)).float()
        h = F.layer_norm(h, h.shape[-1:])
        # target blocks may overlap, so a row's indices may repeat: fine for a gather without a backward
        return masked_gather(h, targets.flatten(1), impl=self.impl).view(*targets.shape, -1)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch["views"]: one tensor (B, C, H, W) at the built image size."""
        imgs = built_size_view(batch, self.encoder, "ijepa", "the masks are drawn on its patch grid")
        context, targets = multiblock_masks(imgs.shape[0], self.encoder.grid_size, **self.masking)
        context, targets = context.to(imgs.device), targets.to(imgs.device)
        target = self.target_features(imgs, targets)
        pred = self.predictor(self.encode_context(imgs, context), context, targets)
        loss = F.smooth_l1_loss(pred.float(), target)
        return {"loss": loss, "context_patches": torch.tensor(float(context.shape[1]), device=loss.device)}

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        ema_update_(self.target, self.encoder, linear_momentum(step, max_steps, self.base_momentum))
