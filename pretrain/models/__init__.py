"""Backbones: a plain dict registry and one builder.

Every backbone has ``embed_dim: int`` and ``forward(x: (B, C, H, W)) -> (B, embed_dim)``, the pooled representation that
heads and evaluations use. Every factory takes ``image_size``, ``in_chans`` and ``patch_size`` (non-ViTs ignore the last
two) plus model-specific keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .convnet import ConvNet, convnet
from .resnet import ResNet, resnet18, resnet50
from .vit import VisionTransformer, interpolate_pos_embed, vit_base, vit_huge, vit_large, vit_small, vit_tiny

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "vit_base": vit_base,
    "vit_large": vit_large,
    "vit_huge": vit_huge,
    "convnet": convnet,
    "resnet18": resnet18,
    "resnet50": resnet50,
}

# Options each backbone accepts beyond image_size / in_chans / patch_size, checked up front so a typo in a config fails
# with one line naming the key instead of a TypeError deep inside a constructor.
_VIT_OPTIONS = {"embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "drop_path_rate", "use_mask_token",
                "global_pool", "grad_checkpointing", "freeze_patch_embed",
                "pos_embed", "layer_scale", "num_registers", "drop_path_uniform"}
OPTIONS: dict[str, set[str]] = {
    "vit_tiny": _VIT_OPTIONS,
    "vit_small": _VIT_OPTIONS,
    "vit_base": _VIT_OPTIONS,
    "vit_large": _VIT_OPTIONS,
    "vit_huge": _VIT_OPTIONS,
    "convnet": {"width", "norm"},
    "resnet18": {"widths", "norm", "stem", "grad_checkpointing", "zero_init_residual"},
    "resnet50": {"widths", "norm", "stem", "grad_checkpointing", "zero_init_residual"},
}


def check_backbone_options(name: str, kwargs: dict) -> None:
    """ValueError (one line) naming the options of ``kwargs`` that backbone ``name`` does not take (a backbone
    registered elsewhere, without an entry in OPTIONS, is left to its factory)."""
    allowed = OPTIONS.get(name)
    if allowed is not None and set(kwargs) - allowed:
        unknown = sorted(set(kwargs) - allowed)
        raise ValueError(f"backbone {name!r} got unknown option(s) {unknown}; allowed: {sorted(allowed)}")


def build_backbone(name: str, *, image_size: int, in_chans: int, patch_size: int = 16, **kwargs: Any) -> nn.Module:
    """Build ``BACKBONES[name]`` for ``(B, in_chans, image_size, image_size)`` inputs.

    Raises ValueError (one line) for an unknown name, an unknown keyword, or a size that does not fit (ViT:
    ``image_size % patch_size != 0``).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"backbone image_size must be a positive int, got {image_size!r}")
    if not isinstance(in_chans, int) or in_chans <= 0:
        raise ValueError(f"backbone in_chans must be a positive int, got {in_chans!r}")
    check_backbone_options(name, kwargs)
    model = BACKBONES[name](image_size=image_size, in_chans=in_chans, patch_size=patch_size, **kwargs)
    if not isinstance(getattr(model, "embed_dim", None), int):
        raise ValueError(f"backbone {name!r} has no int attribute embed_dim")
    return model


def num_params(model: nn.Module) -> int:
    """Total parameter count, trainable or not."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "BACKBONES",
    "build_backbone",
    "num_params",
    "OPTIONS",
    "VisionTransformer",
    "ConvNet",
    "ResNet",
    "interpolate_pos_embed",
]
