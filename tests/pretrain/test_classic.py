"""The classic pretext tasks, rotation (RotNet) and jigsaw: their inputs and labels, their losses, their permutation
set, and a short training on real digits views that must beat chance by far."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipeline.loader import make_train_stream
from pretrain.config import load_config
from pretrain.methods.jigsaw import cut_tiles, permutation_set
from pretrain.methods.rotation import rotate_all
from pretrain.trainer import build_method
from tests.util import config_error, train_steps

ROOT = Path(__file__).resolve().parents[2]
ROTATION = ROOT / "configs" / "rotation_digits.yaml"
JIGSAW = ROOT / "configs" / "jigsaw_digits.yaml"
SMALL = ["model.proj_hidden_dim=32", "model.backbone_kwargs={width: 0.25}"]


def test_rotate_all_turns_each_image_four_times():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    rotated, labels = rotate_all(x)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    torch.testing.assert_close(rotated[:2], x)
    # one counter-clockwise quarter turn: the top row becomes the left column, read bottom-up
    assert rotated[2, 0, :, 0].tolist() == x[0, 0, 0].flip(0).tolist()
    torch.testing.assert_close(rotated[4], x[0].flip(1).flip(2))  # half turn
    with pytest.raises(ValueError, match="square"):
        rotate_all(torch.zeros(1, 1, 3, 4))


def test_rotation_loss_is_cross_entropy_over_the_four_turns():
    method = build_method(load_config(ROTATION, SMALL), distributed=False).eval()
    x = torch.randn(3, 1, 16, 16)
    out = method({"views": [x]})
    with torch.no_grad():
        rotated, labels = rotate_all(x)
        logits = method.head(method.backbone(rotated))
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, labels))
    assert out["accuracy"].item() == pytest.approx((logits.argmax(1) == labels).float().mean().item())


def test_permutation_sets():
    assert sorted(map(tuple, permutation_set(4, 100).tolist())) == list(itertools.permutations(range(4)))
    p = permutation_set(9, 30, seed=0)
    assert p.shape == (30, 9) and all(sorted(row) == list(range(9)) for row in p.tolist())
    hamming = (p[:, None] != p[None]).sum(-1) + 10 * np.eye(30, dtype=int)
    assert hamming.min() >= 6  # far apart: random pairs of 9-permutations differ in 8 places on average, some in 2
    assert np.array_equal(permutation_set(9, 30, seed=0), p)


def test_tiles_are_cropped_inside_their_cells():
    """Each tile is a (cell - gap)^2 window of its own cell, at an offset within [0, gap]."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 12, 12)
    tiles = cut_tiles(x, grid=3, gap=1)
    assert tiles.shape == (2, 9, 1, 3, 3)
    offsets = set()
    for b in range(2):
        for k in range(9):
            r0, c0 = (k // 3) * 4, (k % 3) * 4
            match = [(dr, dc) for dr in (0, 1) for dc in (0, 1)
                     if torch.equal(tiles[b, k], x[b, :, r0 + dr : r0 + dr + 3, c0 + dc : c0 + dc + 3])]
            assert match, (b, k)
            offsets.add(match[0])
    assert len(offsets) > 1  # the offsets vary
    assert torch.equal(cut_tiles(x, grid=2, gap=0)[0, 3], x[0, :, 6:, 6:])


def test_jigsaw_loss_is_cross_entropy_of_the_drawn_permutation():
    method = build_method(load_config(JIGSAW, SMALL), distributed=False).eval()
    x = torch.randn(4, 1, 24, 24)
    torch.manual_seed(3)
    out = method({"views": [x]})
    torch.manual_seed(3)  # draw the same tile offsets and permutations again
    tiles = cut_tiles(x, 3, 1)
    mean, std = tiles.mean(dim=(-2, -1), keepdim=True), tiles.std(dim=(-2, -1), keepdim=True, unbiased=False)
    tiles = (tiles - mean) / (std**2 + 1e-5).sqrt()  # each tile normalised on its own
    labels = torch.randint(0, 100, (4,))
    with torch.no_grad():
        shuffled = torch.stack([tiles[b, method.perms[labels[b]]] for b in range(4)])
        logits = method.head(method.backbone(shuffled.flatten(0, 1)).reshape(4, -1))
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, labels))


def test_config_errors():
    assert "data.num_views: rotation turns one view per image" in config_error(ROTATION, ["data.num_views=2"])
    assert "data.num_views: jigsaw shuffles the tiles of one view per image" in config_error(JIGSAW,
                                                                                             ["data.num_views=2"])
    assert "method.jigsaw_grid: data.image_size 16 must split into 3" in config_error(JIGSAW, ["data.image_size=16"])
    assert "method.jigsaw_gap: tiles of 7 px" in config_error(JIGSAW, ["model.backbone=vit_tiny",
                                                                        "model.patch_size=4"])
    assert "method.jigsaw_grid: at most 3" in config_error(JIGSAW, ["method.jigsaw_grid=4", "data.image_size=32"])


# (chance, floor): 40 steps gave 0.63 for rotation (0, 1 and 8 look alike upside down) and 0.67 for jigsaw
@pytest.mark.parametrize("recipe, chance, floor", [(ROTATION, 0.25, 0.45), (JIGSAW, 0.01, 0.2)],
                         ids=["rotation", "jigsaw"])
def test_short_training_on_digits_beats_chance(digits_shards, recipe, chance, floor):
    """40 AdamW steps on real DALI views of the digits shards: the pretext accuracy on fresh batches is far above
    chance (the task is learnable from these inputs and the gradients reach every part)."""
    cfg = load_config(recipe, ["model.backbone_kwargs={width: 0.5}"])
    method = build_method(cfg, distributed=False)
    d = cfg.data
    with make_train_stream(digits_shards, batch_size=64, aug=d.aug, image_size=d.image_size, channels=d.channels,
                           rank=0, world_size=1, num_workers=1, num_views=1) as stream:
        batches = iter(stream)
        train_steps(method, batches, 40, cfg.optim.lr)
        method.eval()
        with torch.no_grad():
            acc = np.mean([method(next(batches))["accuracy"].item() for _ in range(3)])
    assert acc > floor > 1.5 * chance, acc
