"""Image sources that shards are written from.

Every source yields ``(key, encoded_bytes, extension, label)``; the shard writer never needs to know where images came from.
"""

from __future__ import annotations

import numpy as np


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as 8-bit grayscale.

    Returns images ``(1797, 8, 8) uint8`` (the 0..16 intensities scaled to 0..255) and labels ``(1797,) int64``.
    Shards and the evaluation set both go through this function, so training and evaluation see the same pixels.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)
