"""ResNet-18 with a CIFAR-style stem (3x3 conv, stride 1, no max-pool), so 8x8..32x32 images keep spatial extent.

``forward(x: (B, C, H, W)) -> (B, 512)`` after global average pooling; BasicBlocks [2, 2, 2, 2], widths 64..512.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .convnet import NORMS, norm2d


class BasicBlock(nn.Module):
    """Two 3x3 conv-norm layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm2d(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm2d(norm, c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm2d(norm, c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: stem conv3x3/1, four stages of BasicBlocks, global average pool -> (B, widths[-1])."""

    def __init__(
        self,
        *,
        in_chans: int = 3,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        norm: str = "bn",
    ) -> None:
        super().__init__()
        if not isinstance(in_chans, int) or in_chans <= 0:
            raise ValueError(f"ResNet in_chans must be a positive int, got {in_chans!r}")
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"ResNet layers {layers} and widths {widths} must be non-empty and of equal length")
        if norm not in NORMS:
            raise ValueError(f"ResNet norm must be one of {NORMS}, got {norm!r}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False),
            norm2d(norm, widths[0]),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        c_in = widths[0]
        for i, (n, c_out) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(c_in, c_out, stride, norm)] + [BasicBlock(c_out, c_out, 1, norm) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.embed_dim = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_dense(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, embed_dim, H/8, W/8), the last stage's map before pooling (dense pretext tasks)."""
        return self.stages(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, embed_dim), globally average-pooled."""
        return self.forward_dense(x).mean(dim=(2, 3))


def resnet18(*, image_size: int = 32, in_chans: int = 3, patch_size: int = 16, **kwargs: Any) -> ResNet:
    """Registry factory for ResNet-18 (embed_dim 512); ``image_size``/``patch_size`` are accepted and not used."""
    del image_size, patch_size
    return ResNet(in_chans=in_chans, layers=(2, 2, 2, 2), **kwargs)
