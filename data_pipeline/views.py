"""Augmentation recipe: one field per op, plain types so a YAML mapping fills it.

Units follow torchvision so recipes port: colour factors are ``U(max(0, 1 - x), 1 + x)`` (contrast blends an image
with its own mean grey level, as torchvision's does), ``hue`` is a fraction of the colour circle (``[-hue, hue]``, at
most 0.5), ``translate`` is a fraction of the image side, ``mean`` / ``std`` / ``solarize_threshold`` / ``noise_std``
are on the [0, 1] pixel scale. ``mean`` / ``std`` hold one value (used for every channel) or one per channel.

An op whose probability (or strength) is zero is *absent* from the augmentation graph, not applied with an identity
parameter; ``crop_scale == (1.0, 1.0)`` replaces the random resized crop with a plain resize of the whole image.
Errors are ``ValueError("<field>: <problem>")`` without a prefix; the config loader adds ``data.aug.``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

PAIR_FIELDS = ("crop_scale", "crop_ratio", "blur_sigma", "translate", "scale")
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
"""torchvision's ColorJitter ops, in the order of its draws; each image applies them in an order of its own."""
PROB_FIELDS = ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob", "affine_prob", "noise_prob")


@dataclass(kw_only=True)
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Area fraction range of the random resized crop; (1.0, 1.0) = no crop, resize the whole image"""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Aspect ratio range of the crop"""
    flip_prob: float = 0.5
    """Horizontal flip probability"""
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    """Ignored for 1-channel output"""
    hue: float = 0.1
    """Fraction of the colour circle, <= 0.5; ignored for 1-channel output"""
    grayscale_prob: float = 0.2
    """Ignored for 1-channel output (already gray)"""
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Gaussian sigma range in output pixels"""
    solarize_prob: float = 0.0
    solarize_threshold: float = 0.5
    """Pixels >= threshold (0..1 scale) are inverted"""
    affine_prob: float = 0.0
    rotate_degrees: float = 0.0
    """Rotation angle drawn from [-rotate_degrees, rotate_degrees]"""
    translate: tuple[float, float] = (0.0, 0.0)
    """Max |shift| as a fraction of width, height"""
    scale: tuple[float, float] = (1.0, 1.0)
    """Affine zoom factor range"""
    noise_prob: float = 0.0
    noise_std: float = 0.0
    """Gaussian pixel noise std on the 0..1 scale"""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in PAIR_FIELDS:
                setattr(self, f.name, _pair(f.name, value))
            elif f.name in ("mean", "std"):
                setattr(self, f.name, _floats(f.name, value))
            else:
                setattr(self, f.name, _number(f.name, value))
        for name in PROB_FIELDS:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale: need 0 < low <= high <= 1, got {self.crop_scale}")
        for name in ("crop_ratio", "blur_sigma", "scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi:
                raise ValueError(f"{name}: need 0 < low <= high, got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation", "rotate_degrees", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue: must be in [0, 0.5], got {self.hue}")
        if not 0.0 <= self.solarize_threshold <= 1.0:
            raise ValueError(f"solarize_threshold: must be in [0, 1], got {self.solarize_threshold}")
        if not all(0.0 <= t <= 1.0 for t in self.translate):
            raise ValueError(f"translate: each must be in [0, 1], got {self.translate}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std: must be > 0, got {self.std}")

    @classmethod
    def disabled(cls, **overrides) -> AugmentConfig:
        """Every random op off: decode, resize to the output size, normalise (evaluation, tests)."""
        off = {name: 0.0 for name in PROB_FIELDS}
        return cls(**{**off, "crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), **overrides})

    def channel_stats(self, channels: int) -> tuple[list[float], list[float]]:
        """``mean``, ``std`` with one value per output channel; ValueError if their length fits neither 1 nor it."""
        out = []
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, channels):
                raise ValueError(f"{name}: has {len(values)} values for {channels} channel(s)")
            out.append(values * channels if len(values) == 1 else list(values))
        return out[0], out[1]

    def enabled_ops(self, channels: int) -> list[str]:
        """Names of the random ops this recipe puts into the graph, in application order."""
        color = channels == 3
        on = {
            "random_resized_crop": self.crop_scale != (1.0, 1.0),
            "flip": self.flip_prob > 0,
            "affine": self.affine_prob > 0
            and (self.rotate_degrees > 0 or self.translate != (0.0, 0.0) or self.scale != (1.0, 1.0)),
            "jitter": self.jitter_prob > 0 and bool(self.jitter_ops(channels)),
            "grayscale": color and self.grayscale_prob > 0,
            "blur": self.blur_prob > 0,
            "solarize": self.solarize_prob > 0,
            "noise": self.noise_prob > 0 and self.noise_std > 0,
        }
        return [name for name, enabled in on.items() if enabled]

    def jitter_ops(self, channels: int) -> list[str]:
        """The colour jitter ops this recipe turns on (saturation and hue need colour), in ``JITTER_OPS``' order."""
        return [name for name in JITTER_OPS if getattr(self, name) > 0 and (channels == 3 or name in JITTER_OPS[:2])]


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: must be a number, got {value!r}")
    return float(value)


def _pair(name: str, value) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{name}: must be a pair [low, high], got {value!r}")
    return (_number(name, value[0]), _number(name, value[1]))


def _floats(name: str, value) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) not in (1, 3):
        raise ValueError(f"{name}: must be a list of 1 or 3 numbers, got {value!r}")
    return [_number(name, v) for v in value]
