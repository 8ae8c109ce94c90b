"""Block-wise patch masks (BEiT, iBOT): rectangles of patches, drawn until a sampled fraction of the grid is hidden.

Per image: with probability ``mask_prob`` a target fraction is drawn from ``ratio`` (uniform), then rectangles of at
least ``min_patches`` patches with a log-uniform aspect ratio in [0.3, 1/0.3] are placed at random until the target is
reached (a rectangle may overlap earlier ones; only newly hidden patches count; ten misses in a row end the image).
The rest of the images get no mask. The draws come from one NumPy generator seeded from torch's default generator, so
they follow ``torch.manual_seed`` and a restored torch RNG state, and cost microseconds, not a kernel launch each.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MAX_ASPECT = 1 / 0.3
MISSES = 10


def _place(mask: np.ndarray, rng: np.random.Generator, budget: int, min_patches: int) -> int:
    """Hide one rectangle of at most ``budget`` new patches in ``mask`` (gh, gw); the number newly hidden."""
    gh, gw = mask.shape
    for _ in range(MISSES):
        area = rng.uniform(min_patches, max(budget, min_patches))
        aspect = math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT)))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if not (0 < h <= gh and 0 < w <= gw):
            continue
        top, left = rng.integers(0, gh - h + 1), rng.integers(0, gw - w + 1)
        block = mask[top:top + h, left:left + w]
        new = h * w - int(block.sum())
        if 0 < new <= budget:
            block[:] = True
            return new
    return 0


def block_masks(batch: int, grid: tuple[int, int], ratio: tuple[float, float] = (0.1, 0.5), mask_prob: float = 0.5,
                min_patches: int = 4) -> torch.Tensor:
    """(batch, gh * gw) bool, True = hidden patch, in row-major patch order (as a ViT's tokens), on the CPU."""
    lo, hi = ratio
    if not 0.0 <= lo <= hi < 1.0:
        raise ValueError(f"mask ratio range must satisfy 0 <= low <= high < 1, got {list(ratio)}")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    gh, gw = grid
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
    out = np.zeros((batch, gh, gw), dtype=bool)
    for i in range(batch):
        if rng.random() >= mask_prob:
            continue
        target = round(rng.uniform(lo, hi) * gh * gw)
        count = 0
        while count < target:
            added = _place(out[i], rng, target - count, min(min_patches, target - count))
            if added == 0:
                break
            count += added
    return torch.from_numpy(out.reshape(batch, gh * gw))
