"""A trained encoder in your own code: ``pretrain.load_encoder(run_dir)``.

    import pretrain
    encoder = pretrain.load_encoder("runs/simclr-20261127-190000")   # CPU, eval mode
    features = encoder(images)   # images (B, C, H, W): uint8 0..255, or float in [0, 1]; any size -> (B, F)

The encoder prepares images as evaluation and ``pretrain search`` do (``pretrain.eval.dataset.ShardImages``): the whole
image resized to the run's ``data.image_size`` (bilinear, antialiased when shrinking: PIL's resize), RGB turned grey
with PIL's weights for a one-channel run (a grey image repeated for a three-channel one), normalised with the run's
``data.aug.mean`` / ``std``; then the backbone the run released (``backbone.pt``: DINO's and iBOT's teacher, MAE's
encoder, CLIP's image tower with its projection). A CLIP run also has ``encode_text(list[str]) -> (B, E)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import Config

GREY_WEIGHTS = (0.299, 0.587, 0.114)
"""RGB -> grey as PIL's ``convert("L")`` (ITU-R 601-2 luma), which the training and evaluation views use."""


class Encoder(nn.Module):
    """A run's image encoder with its preprocessing; ``forward(images) -> (B, F)``."""

    def __init__(self, cfg: Config, image_encoder: nn.Module, text_encoder=None):
        super().__init__()
        d = cfg.data
        mean, std = d.aug.channel_stats(d.channels)
        self.config, self.image_size, self.channels = cfg, d.image_size, d.channels
        self.image_encoder = image_encoder
        self._text_encoder = text_encoder
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def preprocess(self, images: Tensor) -> Tensor:
        """``images (B, C, H, W)`` (uint8 0..255 or float in [0, 1]; C 1 or 3) -> ``(B, channels, S, S)`` float32,
        normalised, as the run's evaluation views are made."""
        if not isinstance(images, Tensor):  # a numpy array, a PIL image: say what to pass
            raise ValueError(f"images must be a torch tensor (B, C, H, W), got {type(images).__name__} (for a numpy "
                             "array: torch.from_numpy(a).permute(0, 3, 1, 2) of (B, H, W, C) uint8)")
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (B, C, H, W) with C 1 or 3, got {tuple(images.shape)}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(f"images must be uint8 (0..255) or float (in [0, 1]), got {images.dtype}")
        if images.dtype != torch.uint8 and images.numel() and not torch.compiler.is_compiling():  # exported: no checks
            low, high = torch.aminmax(images.detach())
            if not torch.isfinite(images.detach()).all():  # NaN would pass the range test and give NaN features
                raise ValueError("float images hold NaN or inf")
            if low < -1e-3 or high > 1 + 1e-3:  # 0..255 floats, or images already normalised: features of nothing
                raise ValueError(f"float images must be in [0, 1] (these span {low.item():.4g}..{high.item():.4g}); "
                                 "pass uint8 0..255 or divide by 255, without normalising them (the encoder does)")
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
        x = x.to(self.mean.device)
        if x.shape[1] == 3 and self.channels == 1:
            x = (x * torch.tensor(GREY_WEIGHTS, device=x.device).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        elif x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return (x - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        return self.image_encoder(self.preprocess(images))

    @property
    def has_text(self) -> bool:
        return self._text_encoder is not None

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """(B, E) text embeddings in the image embeddings' space (CLIP runs)."""
        if self._text_encoder is None:
            raise ValueError(f"a {self.config.method.name} run has no text tower (a clip run has)")
        if isinstance(texts, str):  # (list() would make it one text per character)
            raise ValueError("texts: a list of strings, got one string; pass [text]")
        return self._text_encoder(list(texts))


def load_encoder(run: str | Path, *, device: str | torch.device = "cpu") -> Encoder:
    """The encoder of a finished run (its directory or its ``backbone.pt``) on ``device`` ("auto": the GPU where there
    is one), in eval mode; a ValueError names what is missing."""
    from pretrain.index import load_run

    try:
        loaded = load_run(run, device)
    except ValueError as e:  # the CLI's messages name its flag
        raise ValueError(str(e).removeprefix("--checkpoint: ")) from None
    if loaded.encode_text is None:  # the backbone itself
        return Encoder(loaded.cfg, loaded.encode_image).to(loaded.device).eval()
    model = loaded.encode_image.__self__  # CLIP: bound methods of the whole model (towers and projections)
    return Encoder(loaded.cfg, _Bound(model, "encode_image"), _Bound(model, "encode_text")).to(loaded.device).eval()


class _Bound(nn.Module):
    """One method of a model as a module (so ``.to`` / ``.eval`` reach the model)."""

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.model, self.name = model, name

    def forward(self, *args):
        return getattr(self.model, self.name)(*args)
