"""The colour ops of the training views (DALI) mean what torchvision's, and the PIL augmenter's, mean: recipes ported
from SimCLR, BYOL or DINO must jitter as they did there."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.cpu import PilAugmenter
from data_pipeline.dali import DaliAugmenter
from data_pipeline.views import AugmentConfig

SIZE, BATCH = 24, 16


def _dark_low_contrast_png(channels: int) -> tuple[bytes, np.ndarray]:
    """A dark image of grey levels 40..90 (mean ~65, far from mid-grey 128), so that a contrast factor in [0.5, 1.5]
    never clips it: PNG bytes and its pixels (H, W) or (H, W, 3)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(40, 91, (SIZE, SIZE) if channels == 1 else (SIZE, SIZE, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue(), pixels


def _augmenters(aug: AugmentConfig, channels: int):
    dali = DaliAugmenter(aug, batch_size=BATCH, image_size=SIZE, channels=channels, num_views=1, seed=1)
    pil = PilAugmenter(aug, image_size=SIZE, channels=channels, num_views=1, seed=1)
    return {"dali": dali, "pil": pil}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("path", ["dali", "pil"])
def test_contrast_blends_with_the_images_own_mean_grey(channels, path):
    """Contrast jitter alone (no resize, no crop) is torchvision's: each pixel moves to mean + c * (pixel - mean), the
    mean being the image's own grey level, so the view keeps its mean and every pixel's offset from it scales by one
    factor c per view. (DALI's contrast centres on mid-grey, 128: a dark image's views came out up to 31 levels
    brighter or darker, the contrast jitter turned into a brightness jitter the recipe never asked for.)"""
    data, pixels = _dark_low_contrast_png(channels)
    grey = pixels if channels == 1 else pixels.astype(np.float64) @ [0.299, 0.587, 0.114]
    aug = AugmentConfig.disabled(
        jitter_prob=1.0, brightness=0.0, contrast=0.5, saturation=0.0, hue=0.0, mean=[0.0], std=[1 / 255]
    )
    views = _augmenters(aug, channels)[path]([data] * BATCH)[0].double()  # (B, C, S, S), 0..255
    source = torch.from_numpy(pixels.astype(np.float64)).reshape(SIZE, SIZE, channels).permute(2, 0, 1)
    offset = source - float(grey.mean())
    factors = (views - float(grey.mean())).mul(offset).sum((1, 2, 3)) / offset.square().sum()  # least squares, (B,)
    assert ((factors > 0.5 - 0.02) & (factors < 1.5 + 0.02)).all(), factors
    assert factors.std() > 0.05, "the contrast factor does not vary: the op is not applied"
    view_means = views.mean((1, 2, 3))
    assert (view_means - source.mean()).abs().max() < 1.5, view_means - source.mean()
    fitted = float(grey.mean()) + factors.view(-1, 1, 1, 1) * offset
    assert (views - fitted).abs().max() < 1.5  # rounding to whole grey levels only


def test_brightness_then_contrast_match_between_dali_and_pil():
    """Brightness and contrast on together, the DALI views and the PIL views are the same distribution: the mean and
    spread of the views' mean grey level and of their contrast (pixel std) agree."""
    data, _ = _dark_low_contrast_png(3)
    aug = AugmentConfig.disabled(
        jitter_prob=1.0, brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0, mean=[0.0], std=[1 / 255]
    )
    stats = {}
    for name, augment in _augmenters(aug, 3).items():
        views = torch.cat([augment([data] * BATCH)[0] for _ in range(8)]).double()  # 128 views
        means, spreads = views.mean((1, 2, 3)), views.std((1, 2, 3))
        stats[name] = torch.stack([means.mean(), means.std(), spreads.mean(), spreads.std()])
    assert (stats["dali"] - stats["pil"]).abs().max() < 3.0, stats
