"""Colorization (Zhang et al., 2016): predict an image's colours from its lightness.

Views are converted to CIE Lab; the encoder sees only the lightness L (``backbone`` wraps the network so it still takes
the data's normalised RGB and reads L from it: downstream it works on colour and grey images alike). A 1x1-conv head on
the encoder's feature map (``forward_dense``: the ConvNet's and ResNet's last map, the ViT's patch grid) classifies
each cell's chroma into a ``color_bins`` x ``color_bins`` grid of (a, b) bins over [-110, 110]^2, the target being the
cell's mean (a, b) (Zhang et al. predict 313 in-gamut bins at a quarter of the resolution; this keeps their
classification loss; their class rebalancing is ``method.color_rebalance``, with the bin frequencies estimated while
training instead of over ImageNet beforehand, unsmoothed). ``accuracy`` is the share of cells whose bin is right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import Config
from pretrain.methods.base import Gather, Reduce, SSLMethod, StepMean, build_method_backbone, require_one_view

AB_RANGE = 110.0
PRIOR_DECAY = 0.99
"""EMA decay of the running bin frequencies (about the last hundred steps)."""
_RGB_TO_XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                            [0.2126729, 0.7151522, 0.0721750],
                            [0.0193339, 0.1191920, 0.9503041]])
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB (B, 3, H, W) in [0, 1] -> CIE Lab (B, 3, H, W) under D65: L in [0, 100], a and b about [-110, 110], fp32.

    Computed in fp32 also under bf16 autocast: the targets and the encoder's input must not round to bf16's 3 digits.
    """
    with torch.autocast(device_type=rgb.device.type, enabled=False):
        return _rgb_to_lab(rgb.float())


def _rgb_to_lab(rgb: Tensor) -> Tensor:
    rgb = rgb.clamp(0.0, 1.0)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,bjhw->bihw", _RGB_TO_XYZ.to(rgb.device), linear)
    t = xyz / _WHITE_D65.to(rgb.device).view(1, 3, 1, 1)
    delta = 6.0 / 29.0
    f = torch.where(t > delta**3, t.clamp_min(1e-12) ** (1.0 / 3.0), t / (3 * delta**2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def rebalance_weights(prior: Tensor, mix: float) -> Tensor:
    """Zhang et al.'s class weights: ((1 - mix) * prior + mix / Q)^-1, scaled so that their mean under ``prior`` is 1
    (rare colours weigh more; ``mix`` 1 gives equal weights)."""
    w = 1.0 / ((1.0 - mix) * prior + mix / prior.numel())
    return w / (prior * w).sum()


def ab_bins(ab: Tensor, bins: int) -> Tensor:
    """ab (B, 2, h, w) -> (B, h, w) int64 bin index ``a_bin * bins + b_bin`` on a grid over [-110, 110]^2."""
    idx = ((ab + AB_RANGE) / (2 * AB_RANGE) * bins).floor().long().clamp(0, bins - 1)
    return idx[:, 0] * bins + idx[:, 1]


class LumaEncoder(nn.Module):
    """The encoder of a colorization model: normalised RGB (B, 3, H, W) -> its lightness -> the wrapped network.

    L / 100 is normalised with mean 0.5 and std 0.25 before the network; ``forward`` and ``forward_dense`` are the
    network's on that one channel.
    """

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = net
        self.embed_dim = net.embed_dim
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def lab(self, x: Tensor) -> Tensor:
        return rgb_to_lab(x.float() * self.std + self.mean)

    def luma(self, lab: Tensor) -> Tensor:
        return (lab[:, :1] / 100.0 - 0.5) / 0.25

    def forward_dense(self, x: Tensor) -> Tensor:
        return self.net.forward_dense(self.luma(self.lab(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.luma(self.lab(x)))


class Colorization(SSLMethod):
    config_keys = frozenset({"color_bins", "color_rebalance"})

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_one_view(cfg, "colorization predicts the colours of")
        if cfg.data.channels != 3:
            raise ValueError(f"data.channels: colorization needs colour images (3 channels), got {cfg.data.channels}")

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        super().__init__()
        del gather, rank  # a per-sample loss: nothing crosses ranks but the gradients (and the bin frequencies)
        self.reduce = reduce
        mean, std = cfg.data.aug.channel_stats(3)
        self.backbone = LumaEncoder(build_method_backbone(cfg, in_chans=1), mean, std)
        self.bins = cfg.method.color_bins
        hidden = cfg.model.proj_hidden_dim
        self.head = nn.Sequential(nn.Conv2d(self.backbone.embed_dim, hidden, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(hidden, self.bins**2, 1))
        self.rebalance = cfg.method.color_rebalance
        # the running bin frequencies over all ranks (an EMA over steps, from uniform); rebalancing weighs by them
        self.register_buffer("bin_prior", torch.full((self.bins**2,), 1.0 / self.bins**2))
        self._freq = StepMean()

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch["views"]: one tensor (B, 3, S, S) of normalised RGB."""
        enc = self.backbone
        lab = enc.lab(batch["views"][0])
        logits = self.head(enc.net.forward_dense(enc.luma(lab)))  # (B, bins^2, h, w)
        target = ab_bins(F.adaptive_avg_pool2d(lab[:, 1:], logits.shape[-2:]), self.bins)
        if self.rebalance is None:
            loss = F.cross_entropy(logits.float(), target)
        else:
            weight = rebalance_weights(self.bin_prior, self.rebalance)[target]
            loss = (weight * F.cross_entropy(logits.float(), target, reduction="none")).mean()
        if self.training:
            self._freq.add(torch.bincount(target.reshape(-1), minlength=self.bins**2).float() / target.numel())
        return {"loss": loss, "accuracy": (logits.argmax(dim=1) == target).float().mean().detach()}

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        if (freq := self._freq.pop()) is not None:
            freq = self.reduce(freq) if self.reduce is not None else freq
            self.bin_prior.mul_(PRIOR_DECAY).add_(freq, alpha=1.0 - PRIOR_DECAY)

