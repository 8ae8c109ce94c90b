"""The digits evaluation set: sklearn's 1797 8x8 digits, shaped and normalised like the training views."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from data_pipeline.sources import digits_uint8


def digits_eval_set(
    *, image_size: int, channels: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor, np.ndarray]:
    """Images ``(1797, channels, image_size, image_size) float32`` and labels ``(1797,) int64``.

    Pixels are ``uint8 / 255``, bilinearly resized (``align_corners=False``, no antialias), repeated to ``channels`` and
    normalised per channel as ``(x - mean) / std``.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need {channels} entries (one per channel), got {len(mean)} and {len(std)}")
    if min(std) <= 0:
        raise ValueError(f"std entries must be > 0, got {list(std)}")
    images, labels = digits_uint8()
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)  # (N, 1, 8, 8)
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=False)
    x = x.repeat(1, channels, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1)
    return ((x - mean_t) / std_t).contiguous(), labels


TEST_SIZE = 0.25
"""The share of the labelled images every evaluation holds out for testing (a stratified split)."""


def split_indices(labels, *, test_size: float = TEST_SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified ``(train_idx, test_idx)`` into ``labels: (N,)``, each sorted; deterministic for a given ``seed``."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    train_idx, test_idx = train_test_split(
        np.arange(labels.shape[0]), test_size=test_size, stratify=labels, random_state=seed
    )
    return np.sort(train_idx), np.sort(test_idx)
