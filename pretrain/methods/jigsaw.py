"""Jigsaw puzzles (Noroozi & Favaro, 2016): put shuffled tiles of an image back in order.

A view is cut into a ``g x g`` grid of cells; from each cell a tile a little smaller than the cell is cropped at a
random offset (the gap keeps the net from solving the puzzle by matching edges, as in the paper), the tiles are
shuffled by one of a fixed set of permutations, and a context-free network (the backbone on each tile alone, the
features concatenated in shuffled order) classifies which permutation it was. The set holds every permutation of a 2x2
grid; for larger grids ``jigsaw_permutations`` of them, chosen greedily for a large minimum Hamming distance (the
paper's maximal set) from a fixed seed, so every rank and every resume uses the same set. ``backbone`` is the tile
encoder; downstream it encodes whole images.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.config import Config
from pretrain.heads import ProjectionHead
from pretrain.methods.base import Gather, Reduce, SSLMethod, build_method_backbone, require_one_view


def permutation_set(tiles: int, count: int, seed: int = 0) -> np.ndarray:
    """(count, tiles) int64 permutations of range(tiles), pairwise far apart: all of them when tiles! <= count (in
    lexicographic order), else a greedy max-min-Hamming selection from a seeded start (about a second for 3x3,
    computed once per process and setting)."""
    return _permutation_set(tiles, count, seed).copy()


@functools.lru_cache(maxsize=4)
def _permutation_set(tiles: int, count: int, seed: int) -> np.ndarray:
    total = math.factorial(tiles)
    if count >= total:
        return np.array(list(itertools.permutations(range(tiles))), dtype=np.int64)
    if tiles > 10:
        raise ValueError(f"jigsaw: a grid of {tiles} tiles is too large for a permutation set")
    rng = np.random.default_rng(seed)
    pool = np.array(list(itertools.permutations(range(tiles))), dtype=np.int8)  # 9! x 9 = 3.3 MB for 3x3
    chosen = [int(rng.integers(total))]
    dist = (pool != pool[chosen[0]]).sum(axis=1)  # Hamming distance of every candidate to the set so far
    for _ in range(count - 1):
        best = np.flatnonzero(dist == dist.max())
        pick = int(best[rng.integers(best.size)])
        chosen.append(pick)
        dist = np.minimum(dist, (pool != pool[pick]).sum(axis=1))
    return pool[chosen].astype(np.int64)


def cut_tiles(images: Tensor, grid: int, gap: int) -> Tensor:
    """images (B, C, S, S) -> (B, grid*grid, C, t, t) tiles, t = S // grid - gap, each cropped at a random offset in
    [0, gap] inside its cell (row-major cells; offsets from the torch generator of the images' device)."""
    b, c, s, _ = images.shape
    cell = s // grid
    t = cell - gap
    offsets = torch.randint(0, gap + 1, (b, grid * grid, 2), device=images.device)
    cells = torch.arange(grid * grid, device=images.device)
    top = (cells // grid) * cell + offsets[..., 0]  # (B, T)
    left = (cells % grid) * cell + offsets[..., 1]
    ar = torch.arange(t, device=images.device)
    rows = (top[..., None] + ar)[..., :, None]  # (B, T, t, 1)
    cols = (left[..., None] + ar)[..., None, :]  # (B, T, 1, t)
    bidx = torch.arange(b, device=images.device)[:, None, None, None]
    tiles = images.permute(0, 2, 3, 1)[bidx, rows, cols]  # (B, T, t, t, C)
    return tiles.permute(0, 1, 4, 2, 3).contiguous()


def normalize_tiles(tiles: Tensor, eps: float = 1e-5) -> Tensor:
    """Each tile (and channel) to zero mean and unit variance on its own, as the paper does: brightness and contrast
    that run across the image would otherwise tell neighbouring tiles apart without looking at their content."""
    mean = tiles.mean(dim=(-2, -1), keepdim=True)
    var = tiles.var(dim=(-2, -1), keepdim=True, unbiased=False)
    return (tiles - mean) / (var + eps).sqrt()


class Jigsaw(SSLMethod):
    config_keys = frozenset({"jigsaw_gap", "jigsaw_grid", "jigsaw_normalize_tiles", "jigsaw_permutations"})

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        d, m = cfg.data, cfg.method
        require_one_view(cfg, "jigsaw shuffles the tiles of")
        cell = d.image_size // m.jigsaw_grid
        if d.image_size % m.jigsaw_grid or cell - m.jigsaw_gap < 1:
            raise ValueError(f"method.jigsaw_grid: data.image_size {d.image_size} must split into {m.jigsaw_grid} "
                             f"equal cells larger than jigsaw_gap={m.jigsaw_gap}")
        if cfg.model.backbone.startswith("vit") and (cell - m.jigsaw_gap) % cfg.model.patch_size:
            raise ValueError(f"method.jigsaw_gap: tiles of {cell - m.jigsaw_gap} px (cell {cell} - gap "
                             f"{m.jigsaw_gap}) must be a multiple of model.patch_size {cfg.model.patch_size}")
        if m.jigsaw_grid ** 2 > 9 and math.factorial(m.jigsaw_grid ** 2) > m.jigsaw_permutations:
            raise ValueError(f"method.jigsaw_grid: at most 3 (a {m.jigsaw_grid}x{m.jigsaw_grid} permutation set is "
                             "too large to choose)")

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        super().__init__()
        del gather, reduce, rank  # a per-sample loss: nothing crosses ranks but the gradients
        m = cfg.method
        self.grid, self.gap, self.normalize = m.jigsaw_grid, m.jigsaw_gap, m.jigsaw_normalize_tiles
        # A function of the config: rebuilt identically everywhere, so not part of the state dict.
        self.register_buffer("perms", torch.from_numpy(permutation_set(self.grid ** 2, m.jigsaw_permutations)),
                             persistent=False)
        self.backbone = build_method_backbone(cfg)
        self.head = ProjectionHead(self.backbone.embed_dim * self.grid ** 2, hidden_dim=cfg.model.proj_hidden_dim,
                                   out_dim=self.perms.shape[0], num_layers=cfg.model.proj_layers)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch["views"]: one tensor (B, C, S, S)."""
        images = batch["views"][0]
        tiles = cut_tiles(images, self.grid, self.gap)  # (B, T, C, t, t)
        if self.normalize:
            tiles = normalize_tiles(tiles)
        b, n = tiles.shape[:2]
        labels = torch.randint(0, self.perms.shape[0], (b,), device=images.device)
        order = self.perms[labels]  # (B, T): position i shows tile order[i]
        shuffled = tiles[torch.arange(b, device=images.device)[:, None], order]
        feats = self.backbone(shuffled.flatten(0, 1)).reshape(b, -1)  # context-free: each tile alone, then concat
        logits = self.head(feats)
        loss = F.cross_entropy(logits.float(), labels)
        return {"loss": loss, "accuracy": (logits.argmax(dim=1) == labels).float().mean().detach()}
