"""Loss-curve plotting."""

import math

import pytest
from PIL import Image

from pretrain.plots import plot_loss_curve, smooth


def test_writes_a_nonempty_png(tmp_path):
    """The file is a real PNG of the requested figure size."""
    steps = list(range(200))
    losses = [5.0 * math.exp(-s / 50) + 0.1 * math.sin(s) for s in steps]
    path = plot_loss_curve(steps, losses, tmp_path / "plots" / "loss.png")
    assert path == tmp_path / "plots" / "loss.png" and path.stat().st_size > 1000
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (600, 400)


def test_smoothing_is_a_debiased_ema():
    """A constant series stays constant (debiased) and a step is approached geometrically."""
    assert smooth([2.0] * 5) == pytest.approx([2.0] * 5)
    out = smooth([0.0, 1.0], weight=0.5)
    assert out == pytest.approx([0.0, 0.5 / 0.75])


def test_smoothing_skips_non_finite_values():
    """A NaN loss does not poison the smoothed curve."""
    assert smooth([1.0, float("nan"), 1.0]) == pytest.approx([1.0, 1.0, 1.0])


def test_mismatched_lengths_raise(tmp_path):
    """steps and losses of different lengths are a ValueError."""
    with pytest.raises(ValueError, match="same length"):
        plot_loss_curve([0, 1], [1.0], tmp_path / "x.png")
