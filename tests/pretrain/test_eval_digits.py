"""The digits evaluation set and its stratified split."""

import numpy as np
import pytest
import torch

from data_pipeline.sources import digits_uint8
from pretrain.eval import digits_eval_set, split_indices


def test_shape_dtype_and_labels():
    """(1797, C, S, S) float32 images and the 1797 digit labels."""
    images, labels = digits_eval_set(image_size=16, channels=3, mean=[0.1, 0.2, 0.3], std=[0.5, 0.5, 0.5])
    assert images.shape == (1797, 3, 16, 16) and images.dtype == torch.float32
    assert np.array_equal(labels, digits_uint8()[1])


def test_native_size_is_pixels_over_255():
    """At 8x8 with mean 0 / std 1 the images are exactly the uint8 digits / 255."""
    images, _ = digits_eval_set(image_size=8, channels=1, mean=[0.0], std=[1.0])
    expected = torch.from_numpy(digits_uint8()[0]).float().unsqueeze(1) / 255.0
    assert torch.equal(images, expected)


def test_normalisation_is_per_channel_and_channels_repeat():
    """Undoing (x - mean) / std per channel gives the same [0, 1] image in every channel."""
    mean, std = [0.2, 0.5, 0.7], [0.3, 0.25, 0.1]
    images, _ = digits_eval_set(image_size=12, channels=3, mean=mean, std=std)
    raw = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    torch.testing.assert_close(raw[:, 0], raw[:, 1])
    torch.testing.assert_close(raw[:, 0], raw[:, 2])
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5 and raw.max() > 0.9


def test_resize_matches_bilinear_interpolate():
    """Resizing is F.interpolate bilinear, align_corners=False, no antialias."""
    images, _ = digits_eval_set(image_size=20, channels=1, mean=[0.0], std=[1.0])
    src = torch.from_numpy(digits_uint8()[0][:5]).float().unsqueeze(1) / 255.0
    expected = torch.nn.functional.interpolate(src, size=(20, 20), mode="bilinear", align_corners=False)
    torch.testing.assert_close(images[:5], expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 0, "channels": 1, "mean": [0.0], "std": [1.0]}, "image_size"),
        ({"image_size": 8, "channels": 3, "mean": [0.0], "std": [1.0]}, "mean and std"),
        ({"image_size": 8, "channels": 1, "mean": [0.0], "std": [0.0]}, "std"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    """Bad size, wrong number of mean/std entries and non-positive std are one-line ValueErrors."""
    with pytest.raises(ValueError, match=match):
        digits_eval_set(**kwargs)


def test_split_is_stratified_75_25():
    """Each class is split 75/25 (within one example) and the two parts partition the data."""
    labels = digits_uint8()[1]
    train_idx, test_idx = split_indices(labels)
    assert np.array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(labels.size))
    assert test_idx.size == int(np.ceil(0.25 * labels.size))
    per_class = np.bincount(labels)
    assert np.all(np.abs(np.bincount(labels[test_idx]) - 0.25 * per_class) <= 1)


def test_split_is_deterministic_per_seed():
    """Same seed, same split; another seed, another split."""
    labels = digits_uint8()[1]
    a, b = split_indices(labels, seed=0), split_indices(labels, seed=0)
    assert np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], split_indices(labels, seed=1)[1])
