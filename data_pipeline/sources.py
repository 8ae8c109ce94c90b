"""Image sources that shards are written from.

Every source yields ``(key, encoded_bytes, extension, label)``; the shard writer never needs to know where images
came from.

Source specs (strings, so they fit a YAML recipe or a CLI flag):

- ``"digits"``: scikit-learn's 1797 digits, each an 8x8 grayscale PNG, label = the digit.
- ``"folder:PATH"``: an ImageFolder-style tree ``PATH/<class>/<image>.{jpg,jpeg,png}``; labels are indices into the
  sorted list of class (sub-folder) names. Files are stored as they are (no re-encoding).

``resolve_source`` checks a spec completely (unknown kind, missing / unreadable / empty folder) and raises a one-line
``ValueError`` before anything is written.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as 8-bit grayscale.

    Returns images ``(1797, 8, 8) uint8`` (the 0..16 intensities scaled to 0..255) and labels ``(1797,) int64``.
    Shards and the evaluation set both go through this function, so training and evaluation see the same pixels.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of ``image``: (H, W) uint8 grayscale or (H, W, 3) uint8 RGB."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Source:
    """A resolved source: ``len(source)`` samples, ``classes[label]`` names a label, ``iter(source)`` yields samples."""

    spec: str
    classes: list[str]
    _items: list[tuple[str, object, str, int]] = field(repr=False)
    """(key, payload, ext, label); payload is a Path (read lazily) or encoded bytes."""

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[tuple[str, bytes, str, int]]:
        for key, payload, ext, label in self._items:
            data = Path(payload).read_bytes() if isinstance(payload, Path) else payload
            yield key, data, ext, label


def _digits_source() -> Source:
    images, labels = digits_uint8()
    items = [(f"digits_{i:05d}", encode_png(img), "png", int(y)) for i, (img, y) in enumerate(zip(images, labels))]
    return Source("digits", [str(d) for d in range(10)], items)


def _folder_source(spec: str, root_str: str) -> Source:
    if not root_str:
        raise ValueError(f"source {spec!r}: empty folder path (expected 'folder:PATH')")
    root = Path(root_str).expanduser()
    if not root.is_dir():
        raise ValueError(f"source {spec!r}: {root} is not a directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise ValueError(f"source {spec!r}: {root} is not readable")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                if not os.access(path, os.R_OK):
                    raise ValueError(f"source {spec!r}: {path} is not readable")
                files.append((path, label))
    if not files:
        raise ValueError(f"source {spec!r}: no .jpg/.jpeg/.png images in class sub-folders of {root}")
    # Key = index in sorted order: unique, dot-free (webdataset splits member names at the first dot) and stable.
    items = [(f"{i:08d}", path, IMAGE_SUFFIXES[path.suffix.lower()], label) for i, (path, label) in enumerate(files)]
    return Source(spec, classes, items)


def resolve_source(spec: str) -> Source:
    """Parse and check a source spec; raise a one-line ``ValueError`` naming the problem."""
    if not isinstance(spec, str):
        raise ValueError(f"source spec must be a string, got {type(spec).__name__}")
    if spec == "digits":
        return _digits_source()
    if spec.startswith("folder:"):
        return _folder_source(spec, spec[len("folder:"):])
    raise ValueError(f"unknown source {spec!r}: expected 'digits' or 'folder:PATH'")
