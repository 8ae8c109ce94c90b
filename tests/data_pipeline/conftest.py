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


def undecodable_png(seed: int = 0) -> bytes:
    """A PNG whose header reads (a 16x16 image, as `data shards` checks it) and whose pixels do not decode: what a copy
    cut short or a flipped disk block leaves, which training and evaluation skip and count."""
    import io

    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") + 4  # its chunks as they were, the compressed pixels garbage
    data[start : start + 64] = rng.bytes(64)
    return bytes(data)


def corrupt_jpeg(path: Path) -> None:
    """Cut a JPEG short after its header (up to its scan's header, which `data shards` reads): no pixels, which PIL
    and DALI fail to decode. (Its first 200 bytes and random ones after them had stopped inside the header; random
    pixel data after a whole header decodes, into noise.)"""
    data = path.read_bytes()
    scan = data.index(b"\xff\xda")
    path.write_bytes(data[: scan + 2 + int.from_bytes(data[scan + 2 : scan + 4], "big")])


@pytest.fixture
def image_tree():
    """Factory fixture for ``make_image_tree``."""
    return make_image_tree


@pytest.fixture
def corrupt():
    """Factory fixture for ``corrupt_jpeg``."""
    return corrupt_jpeg
