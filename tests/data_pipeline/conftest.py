"""Real shard fixtures for the data-pipeline tests: digits shards (built once per session) and small image folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.shards import digits_dir_name, ensure_digits_shards


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """Digits written once as 8 shards of 256 samples (the last one 5)."""
    cache = tmp_path_factory.mktemp("cache")
    ensure_digits_shards(cache, shard_size=256)
    return cache / digits_dir_name(256)


@pytest.fixture
def digits_copy(digits_dir, tmp_path) -> Path:
    """A private copy of the digits shards that a test may damage."""
    return Path(shutil.copytree(digits_dir, tmp_path / "digits"))


def make_image_tree(root: Path, *, classes: dict[str, int], size: tuple[int, int] = (24, 32), seed: int = 0) -> Path:
    """ImageFolder tree: ``root/<class>/<i>.{jpg,png}`` (alternating), random RGB noise images of ``size`` (H, W)."""
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            fmt, ext = ("JPEG", "jpg") if i % 2 == 0 else ("PNG", "png")
            Image.fromarray(pixels).save(root / name / f"{i}.{ext}", format=fmt)
    return root


def corrupt_jpeg(path: Path, seed: int = 0) -> None:
    """Keep a JPEG's first 200 bytes (valid header), replace the rest with random garbage."""
    data = path.read_bytes()
    path.write_bytes(data[:200] + np.random.default_rng(seed).bytes(len(data) - 200))


@pytest.fixture
def image_tree():
    """Factory fixture for ``make_image_tree``."""
    return make_image_tree


@pytest.fixture
def corrupt():
    """Factory fixture for ``corrupt_jpeg``."""
    return corrupt_jpeg
