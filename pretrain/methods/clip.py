"""CLIP (Radford et al., 2021): contrast images with their captions.

The image tower is the configured backbone with a projection (``model.proj_*``; CLIP's is one Linear), the text tower
a causal transformer over byte tokens (``pretrain.models.text``), both into a ``model.proj_out_dim`` joint space. The
loss is the symmetric cross-entropy of ``exp(logit_scale) * cos(image_i, text_j)`` with the pairs on the diagonal
(``kernels.clip_loss``: tiled, never the full logits matrix on the Triton and chunked paths), over every rank's pairs
when ``method.gather_distributed``. ``logit_scale`` is learned, starts at ``method.logit_scale_init`` (ln 1/0.07) and
is capped at ``method.logit_scale_max`` (ln 100) in the forward (:func:`capped_logit_scale`), so the cap holds under any
ZeRO stage; as the official clamp after each step, a scale at the cap still comes down when the loss asks for it.

``backbone`` is the image encoder; ``encode_image`` / ``encode_text`` give the joint embeddings that zero-shot
classification and text-to-image search use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kernels.clip import clip_loss
from pretrain.config import Config
from pretrain.heads import ProjectionHead
from pretrain.methods.base import Gather, Reduce, SSLMethod, build_method_backbone, require_one_view
from pretrain.models.text import ByteTokenizer, TextTransformer


class _CappedLogitScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cap: float) -> Tensor:
        ctx.save_for_backward(x > cap)  # a mask, not the parameter (which ZeRO-3 may have released by the backward)
        return x.clamp(max=cap)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (above,) = ctx.saved_tensors
        # above the cap only a gradient that lowers the scale (positive: descent steps down) passes
        return torch.where(above & (grad <= 0), torch.zeros_like(grad), grad), None


def capped_logit_scale(logit_scale: Tensor, cap: float) -> Tensor:
    """``min(logit_scale, cap)``, with the gradient of the official code's clamp after each optimizer step: the
    parameter, once a step carries it above the cap, gets no gradient that would raise it further (it cannot run away),
    but does get one that lowers it (a plain clamp in the forward would hold it above the cap, without gradient, for
    the rest of the run)."""
    return _CappedLogitScale.apply(logit_scale, cap)


class CLIP(SSLMethod):
    config_keys = frozenset({"context_length", "logit_scale_init", "logit_scale_max", "loss_impl", "text_depth",
                             "text_heads", "text_width"})
    needs_text = True
    saves_model = True

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        m = cfg.method
        require_one_view(cfg, "clip pairs each caption with")
        if m.text_width % m.text_heads:
            raise ValueError(f"method.text_width: {m.text_width} is not divisible by method.text_heads={m.text_heads}")
        if m.logit_scale_init > m.logit_scale_max:
            raise ValueError(f"method.logit_scale_init: {m.logit_scale_init} is above method.logit_scale_max="
                             f"{m.logit_scale_max}")

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        super().__init__()
        del reduce  # nothing is averaged across ranks outside the loss
        m = cfg.method
        self.backbone = build_method_backbone(cfg)
        self.image_proj = ProjectionHead(self.backbone.embed_dim, hidden_dim=cfg.model.proj_hidden_dim,
                                         out_dim=cfg.model.proj_out_dim, num_layers=cfg.model.proj_layers)
        self.text = TextTransformer(context_length=m.context_length, width=m.text_width, depth=m.text_depth,
                                    num_heads=m.text_heads, out_dim=cfg.model.proj_out_dim)
        self.tokenizer = ByteTokenizer(m.context_length)
        # (1,), not 0-d: DeepSpeed's parameter broadcast at initialize cannot take a 0-d tensor
        self.logit_scale = nn.Parameter(torch.full((1,), float(m.logit_scale_init)))
        self.logit_scale_max = float(m.logit_scale_max)
        self.loss_impl = m.loss_impl
        self.gather = gather
        self.rank = rank

    def encode_image(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) -> (B, E) joint embeddings (not normalised)."""
        return self.image_proj(self.backbone(images))

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """texts (B strings) -> (B, E) joint embeddings (not normalised), on the text tower's device."""
        return self.text(self.tokenizer(texts).to(self.logit_scale.device))

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch["views"]: one tensor (B, C, H, W); batch["text"]: B captions."""
        images, texts = batch["views"][0], batch["text"]
        if len(texts) != images.shape[0]:
            raise ValueError(f"clip: {images.shape[0]} images but {len(texts)} captions")
        img = self.encode_image(images)
        txt = self.encode_text(texts).to(img.dtype)
        scale = capped_logit_scale(self.logit_scale, self.logit_scale_max)
        if self.gather is None:
            loss = clip_loss(img, txt, scale, impl=self.loss_impl)
        else:
            loss = clip_loss(img, txt, scale, img_all=self.gather(img), txt_all=self.gather(txt),
                             offset=self.rank * img.shape[0], impl=self.loss_impl)
        return {"loss": loss, "logit_scale": scale.detach().exp().reshape(())}
