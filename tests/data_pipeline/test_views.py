"""AugmentConfig: validation messages, YAML-shaped input, enabled ops."""

from __future__ import annotations

import pytest

from data_pipeline.views import AugmentConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"flip_prob": 1.5}, "flip_prob: must be in [0, 1], got 1.5"),
        ({"crop_scale": (0.5, 0.2)}, "crop_scale: need 0 < low <= high <= 1"),
        ({"crop_ratio": [1.0]}, "crop_ratio: must be a pair [low, high]"),
        ({"hue": 0.7}, "hue: must be in [0, 0.5]"),
        ({"std": [0.0]}, "std: must be > 0"),
        ({"blur_sigma": (0.0, 1.0)}, "blur_sigma: need 0 < low <= high"),
        ({"noise_std": "big"}, "noise_std: must be a number"),
        ({"mean": [0.1, 0.2]}, "mean: must be a list of 1 or 3 numbers"),
    ],
)
def test_bad_values_name_the_field_without_prefix(kwargs, message):
    """A bad value raises ValueError starting with the bare field name."""
    with pytest.raises(ValueError) as err:
        AugmentConfig(**kwargs)
    assert str(err.value).startswith(message)


def test_yaml_lists_become_tuples():
    """Lists (as YAML gives them) are accepted for pair fields and stored as float tuples."""
    cfg = AugmentConfig(crop_scale=[0.2, 1], translate=[0, 0.1], mean=[0.5], std=[0.5])
    assert cfg.crop_scale == (0.2, 1.0) and cfg.translate == (0.0, 0.1)
    assert cfg.channel_stats(3) == ([0.5] * 3, [0.5] * 3)


def test_disabled_has_no_ops_and_gray_skips_colour():
    """disabled() enables nothing; colour-only ops are off for 1 channel."""
    assert AugmentConfig.disabled().enabled_ops(3) == []
    ops = AugmentConfig(brightness=0, contrast=0).enabled_ops(1)
    assert "jitter" not in ops and "grayscale" not in ops and "random_resized_crop" in ops
