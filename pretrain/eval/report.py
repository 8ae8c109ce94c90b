"""Evaluate an encoder against two baselines (random init, raw pixels) and render / save the result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from pretrain.eval.digits import TEST_SIZE, split_indices
from pretrain.eval.protocols import METRICS, evaluate_features, small_class_notes

EXTRA_METRICS = ("finetune_top1", "zeroshot_top1")
"""Rows a report has only when asked for (fine-tuning) or for some methods (zero-shot: image-text models)."""
BASELINES = {"random_init": "random init", "raw_pixels": "raw pixels"}
"""Report keys of the baselines and their column titles."""
RAW_PIXELS_SIZE = 32
"""The raw-pixels baseline reads images larger than this (per side) area-downsampled to it."""
FEW_TEST_IMAGES = 100
"""Below this many test images the report says how coarse its accuracies are (one image is over 1 point of top-1)."""


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 512) -> np.ndarray:
    """Features ``(N, F) float32`` of ``images: (N, C, H, W)`` from ``encoder(x) -> (B, F)``.

    Runs in eval mode on the encoder's device and restores the encoder's previous train/eval mode afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    param = next(encoder.parameters(), None)
    device = param.device if param is not None else images.device
    was_training = encoder.training
    encoder.eval()
    try:
        chunks = []
        for start in range(0, images.shape[0], batch_size):
            out = encoder(images[start : start + batch_size].to(device))
            if not isinstance(out, torch.Tensor) or out.ndim != 2:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"encoder must return a (B, F) tensor, got {got}")
            chunks.append(out.float().cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(chunks).numpy()


def evaluate_encoder(
    encoder: torch.nn.Module,
    random_encoder: torch.nn.Module | None,
    images: torch.Tensor,
    labels,
    *,
    seed: int = 0,
) -> dict:
    """The protocols' metrics of ``encoder`` plus the same for ``random_encoder`` (same architecture, untrained) and
    for the flattened ``images: (N, C, H, W)`` themselves (area-downsampled to RAW_PIXELS_SIZE if larger), on a
    stratified 75/25 split of ``labels: (N,)``.

    Returns ``{metric: value, "random_init": {metric: value}, "raw_pixels": {metric: value}}``; ``random_init`` is left
    out when ``random_encoder`` is None.
    """
    labels = np.asarray(labels)
    if images.ndim < 2 or images.shape[0] != labels.shape[0]:  # before any image is encoded
        raise ValueError(f"images {tuple(images.shape)} and labels {labels.shape} must have the same first dimension")
    return report_features(frozen_features(encoder, random_encoder, images), labels, seed=seed)


def frozen_features(encoder: torch.nn.Module, random_encoder: torch.nn.Module | None,
                    images: torch.Tensor) -> dict[str, np.ndarray]:
    """``{"trained": (N, F), "random_init": (N, F) (when ``random_encoder`` is given), "raw_pixels": (N, P)}``: what
    :func:`report_features` scores, the rows those of ``images: (N, C, H, W)``."""
    features = {"trained": extract_features(encoder, images)}
    if random_encoder is not None:
        features["random_init"] = extract_features(random_encoder, images)
    pixels = images.float().cpu()
    if images.ndim == 4 and max(images.shape[-2:]) > RAW_PIXELS_SIZE:  # area-downsampled: 224x224x3 would be 150k dims
        pixels = torch.nn.functional.adaptive_avg_pool2d(pixels, RAW_PIXELS_SIZE)
    features["raw_pixels"] = pixels.reshape(images.shape[0], -1).numpy()
    return features


def report_features(features: dict[str, np.ndarray], labels, *, seed: int = 0) -> dict:
    """The report of :func:`evaluate_encoder` from :func:`frozen_features`' ``features``; ``report["notes"]``: lines on
    scores the data bounds below 1 (classes with fewer training images than kNN's voters or retrieval's k)."""
    labels = np.asarray(labels)
    if any(f.shape[0] != labels.shape[0] for f in features.values()):
        shapes = {k: f.shape for k, f in features.items()}
        raise ValueError(f"features {shapes} and labels {labels.shape} must have the same first dimension")
    train_idx, test_idx = split_indices(labels, seed=seed)

    def score(feats: np.ndarray) -> dict[str, float]:
        return evaluate_features(feats[train_idx], labels[train_idx], feats[test_idx], labels[test_idx], seed=seed)

    report: dict = score(features["trained"])
    for key in BASELINES:
        if key in features:
            report[key] = score(features[key])
    report["notes"] = small_class_notes(labels[train_idx], labels[test_idx])
    return report


def format_report(report: dict) -> str:
    """A text table: one row per metric, columns trained / random init / raw pixels (those present)."""
    columns = [("trained", report)] + [(title, report[key]) for key, title in BASELINES.items() if key in report]
    name_w = max(len(m) for m in METRICS + EXTRA_METRICS)
    header = f"{'metric':<{name_w}}" + "".join(f"  {title:>12}" for title, _ in columns)
    lines = [header, "-" * len(header)]
    if "data" in report:  # what was evaluated (pretrain.eval.dataset.EvalSet.summary)
        d = report["data"]
        skipped = f", {d['corrupt']} undecodable skipped" if d.get("corrupt") else ""
        left_out = f", {len(d['dropped_classes'])} thin classes left out" if d.get("dropped_classes") else ""
        left_out += f", {d['duplicates']} exact duplicates left out" if d.get("duplicates") else ""
        left_out += f", {d['unlabelled']} unlabelled left out" if d.get("unlabelled") else ""
        test = math.ceil(TEST_SIZE * d["samples"])  # the test part of split_indices' split, as sklearn rounds it
        coarse = (f"; only {test} test images: one image moves an accuracy by {100 / test:.1f} points" if test <
                  FEW_TEST_IMAGES else "")
        lines.insert(0, f"Evaluated on {d['dataset']}: {d['samples']} samples, {d['classes']} classes"
                        f"{skipped}{left_out}{coarse}")
    for metric in METRICS + tuple(k for k in EXTRA_METRICS if k in report):
        cells = "".join(f"  {_cell(values.get(metric)):>12}" for _, values in columns)
        lines.append(f"{metric:<{name_w}}{cells}")
    lines += [f"Note: {note}" for note in report.get("notes", ())]  # scores bounded by the data, not the features
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def write_report(report: dict, path) -> None:
    """Write ``report`` as JSON (indent=2) to ``path`` (e.g. ``<run>/eval.json``), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
