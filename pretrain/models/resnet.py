"""ResNets: ResNet-18 (BasicBlocks [2, 2, 2, 2], widths 64..512 -> 512 features) and ResNet-50 (Bottlenecks
[3, 4, 6, 3], widths 64..512 x 4 -> 2048 features), with either stem: ``cifar`` (3x3 conv, stride 1, no max-pool:
8x8..32x32 images keep their spatial extent; ResNet-18's default) or ``imagenet`` (7x7 conv, stride 2, 3x3 max-pool: a
224 px image leaves a 7x7 map; ResNet-50's default, torchvision's layout).

``zero_init_residual``: the last norm of every residual block starts with a zero gain, so that each block starts as
its shortcut (Goyal et al. 2017; torchvision's option, which the official SimSiam, Barlow Twins and VICReg code set).

``forward(x: (B, C, H, W)) -> (B, embed_dim)`` after global average pooling. ``grad_checkpointing``: each residual
block's activations are recomputed in the backward instead of kept (activation memory of about one block instead of
all, for about a third more compute), its BatchNorm statistics updated once per step all the same (the recomputation
restores them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .convnet import NORMS, norm2d


def _shortcut(c_in: int, c_out: int, stride: int, norm: str) -> nn.Module:
    """Identity, or a strided 1x1 projection where the block changes the shape."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm2d(norm, c_out))


class BasicBlock(nn.Module):
    """Two 3x3 conv-norm layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm2d(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm2d(norm, c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(c_in, c_out, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with an identity (or 1x1 projection) shortcut (ResNet v1.5: the
    stride on the 3x3, as torchvision)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int, norm: str) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = norm2d(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm2d(norm, width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = norm2d(norm, c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(c_in, c_out, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


BasicBlock.expansion = 1
STEMS = ("cifar", "imagenet")


@contextlib.contextmanager
def _statistics_kept(block: nn.Module) -> Iterator[None]:
    """The BatchNorm statistics of ``block`` as they were before, after the body: a checkpointed block's forward runs
    twice (the step, the backward's recomputation) and must move its running statistics once."""
    buffers = [b for m in block.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in zip(buffers, saved):
                buf.copy_(value)


class ResNet(nn.Module):
    """Stem (``cifar`` or ``imagenet``), four stages of ``block``, global average pool -> (B, embed_dim)."""

    def __init__(
        self,
        *,
        in_chans: int = 3,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        norm: str = "bn",
        block: type[nn.Module] = BasicBlock,
        stem: str = "cifar",
        grad_checkpointing: bool = False,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(in_chans, int) or in_chans <= 0:
            raise ValueError(f"ResNet in_chans must be a positive int, got {in_chans!r}")
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"ResNet layers {layers} and widths {widths} must be non-empty and of equal length")
        if norm not in NORMS:
            raise ValueError(f"ResNet norm must be one of {NORMS}, got {norm!r}")
        if stem not in STEMS:
            raise ValueError(f"ResNet stem must be one of {STEMS}, got {stem!r}")
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False),
                                      norm2d(norm, widths[0]), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 7, stride=2, padding=3, bias=False),
                                      norm2d(norm, widths[0]), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        stages: list[nn.Module] = []
        c_in = widths[0]
        for i, (n, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(block(c_in, width, stride if j == 0 else 1, norm))
                c_in = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.embed_dim = c_in
        self.grad_checkpointing = grad_checkpointing
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:  # each block starts as its shortcut (Goyal et al.; torchvision's option)
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.bn3.weight if isinstance(m, Bottleneck) else m.bn2.weight)

    def forward_dense(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, embed_dim, H/8, W/8) (cifar stem; H/32, W/32 with the imagenet one), the last stage's
        map before pooling (dense pretext tasks)."""
        x = self.stem(x)
        if not (self.grad_checkpointing and self.training and torch.is_grad_enabled()):
            return self.stages(x)
        for stage in self.stages:
            for block in stage:
                x = torch.utils.checkpoint.checkpoint(
                    block, x, use_reentrant=False,
                    context_fn=lambda block=block: (contextlib.nullcontext(), _statistics_kept(block)))
        return x

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, embed_dim), globally average-pooled."""
        return self.forward_dense(x).mean(dim=(2, 3))


def resnet18(*, image_size: int = 32, in_chans: int = 3, patch_size: int = 16, **kwargs: Any) -> ResNet:
    """Registry factory for ResNet-18 (embed_dim 512; cifar stem unless ``stem``); ``image_size``/``patch_size`` are
    accepted and not used."""
    del image_size, patch_size
    return ResNet(in_chans=in_chans, layers=(2, 2, 2, 2), **kwargs)


def resnet50(*, image_size: int = 224, in_chans: int = 3, patch_size: int = 16, **kwargs: Any) -> ResNet:
    """Registry factory for ResNet-50 (embed_dim 2048, about 23.5M parameters; imagenet stem unless ``stem``)."""
    del image_size, patch_size
    kwargs.setdefault("stem", "imagenet")
    return ResNet(in_chans=in_chans, layers=(3, 4, 6, 3), block=Bottleneck, **kwargs)
