"""A small plain ConvNet for tiny images (e.g. 8x8 or 16x16 digits), the SimCLR reference backbone of this project.

Six 3x3 conv layers (widths 32-32-64-64-128-128 times ``width``), each conv -> norm -> ReLU, stride 2 on the 3rd and 5th
layer, then global average pooling: ``forward(x: (B, C, H, W)) -> (B, embed_dim)``, ``embed_dim = round(128*width)``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

NORMS = ("bn", "gn")


def norm2d(norm: str, channels: int) -> nn.Module:
    """BatchNorm2d ("bn", SimCLR's choice) or GroupNorm ("gn", batch-independent, up to 8 groups)."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class ConvNet(nn.Module):
    """Six conv-norm-ReLU layers with two stride-2 downsamplings and global average pooling."""

    WIDTHS = (32, 32, 64, 64, 128, 128)
    STRIDES = (1, 1, 2, 1, 2, 1)

    def __init__(self, *, in_chans: int = 3, width: float = 1.0, norm: str = "bn") -> None:
        super().__init__()
        if not isinstance(in_chans, int) or in_chans <= 0:
            raise ValueError(f"ConvNet in_chans must be a positive int, got {in_chans!r}")
        if width <= 0:
            raise ValueError(f"ConvNet width must be > 0, got {width}")
        if norm not in NORMS:
            raise ValueError(f"ConvNet norm must be one of {NORMS}, got {norm!r}")
        layers: list[nn.Module] = []
        c_in = in_chans
        for w, s in zip(self.WIDTHS, self.STRIDES):
            c_out = max(1, round(w * width))
            conv = nn.Conv2d(c_in, c_out, 3, stride=s, padding=1, bias=False)
            layers += [conv, norm2d(norm, c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.embed_dim = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_dense(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, embed_dim, H/4, W/4), the feature map before pooling (dense pretext tasks)."""
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, embed_dim), globally average-pooled."""
        return self.forward_dense(x).mean(dim=(2, 3))


def convnet(*, image_size: int = 16, in_chans: int = 3, patch_size: int = 16, **kwargs: Any) -> ConvNet:
    """Registry factory; ``image_size`` and ``patch_size`` are accepted for a uniform signature and not used."""
    del image_size, patch_size
    return ConvNet(in_chans=in_chans, **kwargs)
