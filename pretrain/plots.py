"""Training plots rendered straight to PNG with matplotlib's Agg canvas (no pyplot, no global backend switch)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); non-finite values are skipped, not averaged in."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            avg = weight * avg + (1.0 - weight) * v
            norm = weight * norm + (1.0 - weight)
        out.append(avg / norm if norm > 0 else float("nan"))
    return out


def plot_loss_curve(steps: Sequence[int], losses: Sequence[float], path) -> Path:
    """Write a PNG of ``losses`` against ``steps`` (raw, faint, plus an EMA-smoothed line) to ``path``; returns it."""
    steps, losses = list(steps), [float(v) for v in losses]
    if len(steps) != len(losses):
        raise ValueError(f"steps and losses must have the same length, got {len(steps)} and {len(losses)}")
    if not steps:
        raise ValueError("no loss values to plot")
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    ax.plot(steps, smooth(losses), color="tab:blue", linewidth=2, label="loss (EMA 0.9)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


SHEET_MAX = 100
"""The most images a contact sheet draws (20 rows of 5): at --k 100000 it had taken 41 s for a 79,240 px tall PNG."""


def contact_sheet(shards: Sequence[str], keys: Sequence[str], notes: Sequence[str], title: str, path,
                  digests: Sequence[str | None] | None = None) -> Path:
    """Write a PNG grid of the images ``keys`` of ``shards`` (in that order), each captioned with its key and note.
    ``digests``: what each image must be (``image_digest`` of its bytes; None where unknown); a ValueError (one line)
    where the shards no longer hold a key, or hold another image under it (they were written again since)."""
    from data_pipeline.reader import read_epoch
    from data_pipeline.sources import image_digest, open_image

    if not keys or len(keys) != len(notes):
        raise ValueError(f"contact sheet needs one note per key and at least one key, got {len(keys)} and {len(notes)}")
    wanted = set(keys)
    found: dict[str, bytes] = {}
    for s in read_epoch(list(shards), rank=0, world_size=1, num_workers=0):
        if s["key"] in wanted:
            found.setdefault(s["key"], s["image"])  # a key of two samples: the first read, as everywhere
    for key, digest in zip(keys, digests or [None] * len(keys)):
        if key not in found:
            raise ValueError(f"the shards hold no decodable sample with key {key!r}")
        if digest is not None and image_digest(found[key]) != digest:
            raise ValueError(f"the image with key {key!r} in the shards is another than the one embedded")
    cols = min(5, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(2 * cols, 2.2 * rows + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, (key, note) in enumerate(zip(keys, notes)):
        ax = fig.add_subplot(rows, cols, i + 1)
        image = open_image(found[key])  # upright, 16-bit grey made visible: as the encoder saw it
        ax.imshow(image, cmap="gray" if image.mode in ("L", "I", "1") else None, interpolation="nearest")
        ax.set_title(f"{i + 1}. {key}\n{note}", fontsize=7)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
