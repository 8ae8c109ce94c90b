"""data_pipeline.masking: block masks hide the drawn fraction in rectangles, follow torch's seed, check their input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from data_pipeline.masking import block_masks


def test_fraction_and_probability():
    """About mask_prob of the images are masked; a masked one hides a fraction within the ratio range (up to the
    rounding of one block), and over many images the mean hidden fraction is mask_prob x mean ratio."""
    torch.manual_seed(0)
    masks = block_masks(2000, (14, 14), ratio=(0.1, 0.5), mask_prob=0.5)
    assert masks.shape == (2000, 196) and masks.dtype == torch.bool
    frac = masks.float().mean(1)
    masked = frac > 0
    assert 0.45 < masked.float().mean() < 0.55
    assert frac[masked].min() >= 0.1 - 0.03 and frac[masked].max() <= 0.5 + 1e-9
    assert 0.25 < frac[masked].mean() < 0.32  # uniform(0.1, 0.5) has mean 0.3; a few images stop short
    assert block_masks(10, (4, 4), mask_prob=0.0).sum() == 0


def test_masks_are_blocks_not_scattered_patches():
    """Hidden patches form few connected rectangles: far fewer components than a random scatter of the same count."""
    torch.manual_seed(1)
    masks = block_masks(200, (14, 14), ratio=(0.3, 0.3), mask_prob=1.0).view(200, 14, 14).numpy()
    blocks = np.mean([ndimage.label(m)[1] for m in masks])
    rng = np.random.default_rng(0)
    scatter = [rng.permutation(196) < m.sum() for m in masks]
    scattered = np.mean([ndimage.label(s.reshape(14, 14))[1] for s in scatter])
    assert blocks < 4 and scattered > 3 * blocks


def test_follows_torch_seed():
    torch.manual_seed(5)
    a = block_masks(16, (4, 4), mask_prob=1.0)
    torch.manual_seed(5)
    b = block_masks(16, (4, 4), mask_prob=1.0)
    c = block_masks(16, (4, 4), mask_prob=1.0)
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ratio=(0.5, 0.2)), "mask ratio range"),
    (dict(ratio=(0.1, 1.0)), "mask ratio range"),
    (dict(mask_prob=1.5), "mask_prob"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        block_masks(2, (4, 4), **kwargs)
