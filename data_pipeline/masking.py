"""Patch masks: BEiT's and iBOT's block-wise masks (``block_masks``) and I-JEPA's context and target blocks
(``multiblock_masks``).

Block-wise masks: rectangles of patches, drawn until a sampled fraction of the grid is hidden. Per image: with
probability ``mask_prob`` a target fraction is drawn from ``ratio`` (uniform), then rectangles of at least
``min_patches`` patches with a log-uniform aspect ratio in [0.3, 1/0.3] are placed at random until the target is
reached (a rectangle may overlap earlier ones; only newly hidden patches count; ten misses in a row end the image).
The rest of the images get no mask.

Both draw from one NumPy generator seeded from torch's default generator, so they follow ``torch.manual_seed`` and a
restored torch RNG state, and cost microseconds, not a kernel launch each.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MAX_ASPECT = 1 / 0.3
MISSES = 10
CONTEXT_TRIES = 20
"""I-JEPA: context block positions tried per image before a target is dropped from what the context must avoid."""


def _torch_seeded_rng() -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))


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
    rng = _torch_seeded_rng()
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


def block_shape(grid: tuple[int, int], scale: float, aspect: float) -> tuple[int, int]:
    """(h, w) of a block covering about ``scale`` of ``grid`` with height / width ``aspect``, each side in [1, grid]."""
    gh, gw = grid
    area = scale * gh * gw
    h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    return min(max(h, 1), gh), min(max(w, 1), gw)


def _block(grid: tuple[int, int], shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    (gh, gw), (h, w) = grid, shape
    top, left = rng.integers(0, gh - h + 1), rng.integers(0, gw - w + 1)
    out = np.zeros(grid, dtype=bool)
    out[top:top + h, left:left + w] = True
    return out


def multiblock_masks(batch: int, grid: tuple[int, int], *, num_targets: int = 4,
                     target_scale: tuple[float, float] = (0.15, 0.2), target_aspect: tuple[float, float] = (0.75, 1.5),
                     context_scale: tuple[float, float] = (0.85, 1.0), min_context: int = 10
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """I-JEPA's multi-block masks -> ``(context (batch, Nc), targets (batch, num_targets, Nt))``, int64 patch indices
    (row-major, as a ViT's tokens), each row sorted, on the CPU.

    Per batch (as the reference collator, so that every image has as many tokens): one target block shape, from a
    scale in ``target_scale`` of the grid and an aspect ratio in ``target_aspect``, and one square context block shape
    from ``context_scale``. Per image: ``num_targets`` target blocks at random positions (they may overlap each other),
    then a context block at a random position, less every target patch: the context never sees what it predicts. Of
    ``CONTEXT_TRIES`` positions the one that keeps the most patches is taken if it keeps ``min_context``; otherwise the
    last target is dropped from what the context avoids and it tries again (the reference's relaxation). Every image's
    context is then cut to the batch's smallest, by a random subset (the reference keeps the first patches in raster
    order, which favours the top of the image). Scale and aspect are drawn apart (the reference reuses one draw for
    both) and a block may reach the last row and column (the reference's never does).
    """
    gh, gw = grid
    if num_targets < 1:
        raise ValueError(f"num_targets must be >= 1, got {num_targets}")
    for name, (lo, hi) in (("target_scale", target_scale), ("context_scale", context_scale)):
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {[lo, hi]}")
    if not 0.0 < target_aspect[0] <= target_aspect[1]:
        raise ValueError(f"target_aspect must satisfy 0 < low <= high, got {list(target_aspect)}")
    context_min = block_shape(grid, context_scale[0], 1.0)
    if context_min[0] * context_min[1] < min_context:
        raise ValueError(f"context_scale: its smallest block, {context_min[0]}x{context_min[1]} patches of the "
                         f"{gh}x{gw} grid, holds fewer than min_context={min_context}")
    rng = _torch_seeded_rng()
    t_shape = block_shape(grid, rng.uniform(*target_scale), rng.uniform(*target_aspect))
    c_shape = block_shape(grid, rng.uniform(*context_scale), 1.0)
    targets = np.empty((batch, num_targets, t_shape[0] * t_shape[1]), dtype=np.int64)
    contexts = []
    for i in range(batch):
        blocks = [_block(grid, t_shape, rng) for _ in range(num_targets)]
        targets[i] = [np.flatnonzero(b) for b in blocks]
        for avoid in range(num_targets, -1, -1):
            hidden = np.any(blocks[:avoid], axis=0) if avoid else np.zeros(grid, dtype=bool)
            best = max((_block(grid, c_shape, rng) & ~hidden for _ in range(CONTEXT_TRIES)), key=np.sum)
            if best.sum() >= min_context:
                break
        contexts.append(np.flatnonzero(best))
    keep = min(len(c) for c in contexts)
    context = np.stack([np.sort(rng.choice(c, keep, replace=False)) for c in contexts])
    return torch.from_numpy(context), torch.from_numpy(targets)
