"""Heads that sit on a backbone's pooled features: the SimCLR/BYOL projection (and predictor) MLP and DINO's head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"head {key} must be a positive int, got {value!r}")


class ProjectionHead(nn.Module):
    """MLP ``in_dim -> hidden_dim -> ... -> out_dim`` with ``num_layers`` Linear layers (SimCLR / BYOL / MoCo v3).

    Hidden layers are Linear -> BatchNorm1d -> ReLU (Linear -> ReLU without ``use_bn``); the last layer is a bare
    Linear, or with ``last_bn`` a bias-free Linear -> BatchNorm1d without affine parameters (MoCo v3's projector),
    and with ``last_bn_scale`` too a learned per-channel scale after it, no shift (SimCLR's official head:
    ``batch_norm_relu(..., center=False)``). ``num_layers=1`` is a single Linear. BYOL's predictor is the same module
    with ``in_dim == out_dim``.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, num_layers: int = 2, use_bn: bool = True,
        last_bn: bool = False, last_bn_scale: bool = False,
    ) -> None:
        super().__init__()
        _positive(in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim, num_layers=num_layers)
        if last_bn_scale and not last_bn:
            raise ValueError("head last_bn_scale scales the last BatchNorm: it needs last_bn")
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(num_layers - 1):
            # the bias is redundant before BatchNorm
            layers.append(nn.Linear(d, hidden_dim, bias=not use_bn))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            d = hidden_dim
        layers.append(nn.Linear(d, out_dim, bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        if last_bn_scale:
            layers.append(ChannelScale(out_dim))
        self.mlp = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_dim) -> (B, out_dim)."""
        return self.mlp(x)


class ChannelScale(nn.Module):
    """``x * weight``, a learned gain per channel starting at 1: a BatchNorm's scale without its shift."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class WeightNormLinear(nn.Module):
    """Bias-free Linear whose rows are ``g * v / ||v||`` (weight normalisation, Salimans & Kingma 2016).

    Written out instead of ``torch.nn.utils.parametrizations.weight_norm`` so ``weight_g`` / ``weight_v`` are plain
    parameters: EMA teachers, ZeRO-3 partitioning and checkpoints see ordinary tensors. With ``fixed_norm`` the gain
    stays at 1 and is frozen (DINO's ``norm_last_layer=True``), so every prototype is a unit vector.
    """

    def __init__(self, in_dim: int, out_dim: int, fixed_norm: bool = True) -> None:
        super().__init__()
        v = nn.Linear(in_dim, out_dim, bias=False).weight.detach()  # PyTorch's default init, as DINO's last layer
        self.weight_v = nn.Parameter(v.clone())
        # 1-D, like a norm's weight: a gain gets no weight decay (pretrain.optim.param_groups), so frozen prototypes
        # (zero gradient, zero Adam moments) stay exactly as they are under any optimizer
        self.weight_g = nn.Parameter(torch.ones(out_dim), requires_grad=not fixed_norm)

    @property
    def weight(self) -> Tensor:
        """(out_dim, in_dim) effective weight."""
        return self.weight_g[:, None] * F.normalize(self.weight_v, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_dim) -> (B, out_dim)."""
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """DINO head: MLP (GELU) -> bottleneck -> L2-normalise -> weight-normalised Linear to ``out_dim`` prototypes.

    As in the official DINO ``DINOHead``: ``num_layers`` Linear layers down to ``bottleneck_dim`` (optional BatchNorm),
    trunc_normal(0.02) init, then ``last_layer`` without bias. Methods freeze ``last_layer`` for the first steps through
    ``forward(x, freeze_last_layer=True)``; that schedule belongs to the method, not here.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        _positive(in_dim=in_dim, out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                  num_layers=num_layers)
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(num_layers - 1):
            # No bias before BatchNorm: it is redundant there, and its gradient, zero up to rounding, would be scaled
            # by Adam into full-size random steps (that also differ with the reduction order of each ZeRO stage).
            layers.append(nn.Linear(d, hidden_dim, bias=not use_bn))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            d = hidden_dim
        layers.append(nn.Linear(d, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)
        self.out_dim = out_dim

    def forward(self, x: Tensor, freeze_last_layer: bool = False) -> Tensor:
        """x: (B, in_dim) -> (B, out_dim) prototype logits (before temperature / softmax).

        ``freeze_last_layer``: the prototypes enter as constants, so they get no gradient (DINO's first steps). Under
        ZeRO the optimizer sees a zero gradient: AdamW's decoupled decay then shrinks ``weight_v``, which the
        normalisation cancels, and the gain (no decay) stays: the prototypes stay exactly where they were."""
        z = F.normalize(self.mlp(x), dim=-1)
        if freeze_last_layer:
            return F.linear(z, self.last_layer.weight.detach())
        return self.last_layer(z)
