"""BEiT (Bao et al., 2022): BERT pre-training of image transformers, by predicting visual tokens.

A tokenizer turns each image into a grid of discrete visual tokens, one per patch (``method.tokenizer``: a finished
``vqvae`` run of ``pretrain.methods.vqvae``, trained on the same kind of images at the same size and patch grid). The
ViT sees the image with block-masked patches (``data_pipeline.masking``; each masked patch's embedding becomes the mask
token, ``kernels.mask_token_replace``) and a linear head over its final patch tokens classifies, at every masked
position only (``kernels.packed_gather``), which of the tokenizer's ``vocab_size`` tokens the hidden patch had (the
run's ``method.vocab_size`` must be the tokenizer's). Every image is masked (``method.mask_prob`` must be 1; the paper
hides 40% of the patches: ``mask_ratio_range: [0.4, 0.4]``).
``accuracy`` is the share of masked patches whose token is right. ``backbone`` is the ViT.

The tokenizer is loaded on the first step, onto the step's device, frozen: it is not part of the module (no optimizer
state, no ZeRO partition, not in checkpoints), and evaluating a finished run does not need it. Its construction draws
nothing from the RNGs, so a resumed run masks exactly as the interrupted one would have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.masking import block_masks
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
from pretrain.methods.vqvae import VQVAE, load_tokenizer, read_tokenizer


class BEiT(SSLMethod):
    config_keys = frozenset({"loss_impl", "mask_prob", "mask_ratio_range", "tokenizer", "vocab_size"})

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        m = cfg.method
        require_vit(cfg, "beit masks patch tokens of")
        if m.loss_impl not in IMPLS:
            raise ValueError(f"method.loss_impl: beit takes one of {', '.join(IMPLS)} (the masking kernels), got "
                             f"{m.loss_impl!r}")
        require_one_view(cfg, "beit masks")
        if m.mask_prob != 1.0:
            raise ValueError(f"method.mask_prob: beit masks every image (set 1.0; the fraction hidden is "
                             f"mask_ratio_range), got {m.mask_prob}")
        if m.mask_ratio_range[1] <= 0:
            raise ValueError(f"method.mask_ratio_range: beit needs masked patches to predict, got "
                             f"{list(m.mask_ratio_range)}")
        if m.tokenizer is None:
            raise ValueError("method.tokenizer: beit predicts the visual tokens of a trained tokenizer: set it to a "
                             "finished vqvae run directory (configs/vqvae_digits.yaml trains one)")

    @classmethod
    def check_inputs(cls, cfg: Config) -> None:
        """The tokenizer run exists, is a vqvae, and tokenizes this run's images on this run's patch grid."""
        tok, _ = read_tokenizer(cfg.method.tokenizer, mmap=True)
        mine, theirs = cfg.data, tok.data
        pairs = (("data.image_size", mine.image_size, theirs.image_size),
                 ("data.channels", mine.channels, theirs.channels),
                 ("model.patch_size", cfg.model.patch_size, tok.model.patch_size),
                 ("method.vocab_size", cfg.method.vocab_size, tok.method.vocab_size),
                 ("data.aug.mean", list(mine.aug.mean), list(theirs.aug.mean)),
                 ("data.aug.std", list(mine.aug.std), list(theirs.aug.std)))
        for key, a, b in pairs:
            if a != b:
                raise ValueError(f"{key}: {a} differs from the tokenizer's {b} ({cfg.method.tokenizer}); the targets "
                                 "must be its tokens, each of the same patch, normalised the same way")

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        super().__init__()
        del gather, reduce, rank  # per-sample losses: nothing crosses ranks but the gradients
        m = cfg.method
        self.backbone = build_method_backbone(cfg, masks=True)
        self.backbone.mask_impl = m.loss_impl
        self.head = nn.Linear(self.backbone.embed_dim, m.vocab_size)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.tokenizer_path = m.tokenizer
        self.mask_ratio_range, self.mask_prob = m.mask_ratio_range, m.mask_prob
        self._tokenizer: tuple[VQVAE] | None = None  # a tuple: not a submodule (no parameters, state or partitions)

    def tokenizer(self, device: torch.device) -> VQVAE:
        if self._tokenizer is None:
            self._tokenizer = (load_tokenizer(self.tokenizer_path)[1],)
        tok = self._tokenizer[0]
        if tok.quantizer.codebook.device != device:
            tok.to(device)
        return tok

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch["views"]: one tensor (B, C, H, W) at the built image size."""
        imgs = built_size_view(batch, self.backbone, "beit", "the tokenizer's grid")
        targets = self.tokenizer(imgs.device).tokenize(imgs)  # (B, L)
        mask = block_masks(imgs.shape[0], self.backbone.grid_size, self.mask_ratio_range,
                           self.mask_prob).to(imgs.device)
        tokens = self.backbone.patch_tokens(self.backbone.forward_features(imgs, mask))
        logits = self.head(packed_gather(tokens, mask, impl=self.backbone.mask_impl)).float()
        labels = targets[mask]
        if labels.numel() == 0:  # a draw that hid nothing (rare on tiny grids): no prediction, a zero that still
            loss = logits.sum() * 0.0  # reaches every parameter
            accuracy = torch.zeros((), device=imgs.device)
        else:
            loss = F.cross_entropy(logits, labels)
            accuracy = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}
