"""Evaluate a pretrained backbone on frozen features: at the end of training and as ``pretrain eval``."""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.config import Config, config_from_dict
from pretrain.eval.digits import digits_eval_set
from pretrain.eval.report import evaluate_encoder, format_report, write_report


def random_init_backbone(cfg: Config) -> torch.nn.Module:
    """The backbone exactly as training started from it (same seed, same construction order)."""
    from pretrain.trainer import build_method

    return build_method(cfg, distributed=False).backbone


def evaluate_backbone_state(cfg: Config, state_dict: dict, out_path: str | Path | None = None, *, echo: bool = True):
    """kNN / linear / few-shot / KMeans on digits for the trained weights, the random init and raw pixels."""
    trained = random_init_backbone(cfg)
    trained.load_state_dict(state_dict)
    images, labels = digits_eval_set(
        image_size=cfg.data.image_size, channels=cfg.data.channels, mean=cfg.data.aug.mean, std=cfg.data.aug.std
    )
    report = evaluate_encoder(trained, random_init_backbone(cfg), images, labels, seed=0)
    if out_path is not None:
        write_report(report, out_path)
    if echo:
        print(format_report(report), flush=True)
    return report


def evaluate_checkpoint(path: str | Path, *, dataset: str = "digits", out_path: str | Path | None = None) -> dict:
    """``path``: a ``backbone.pt`` written at the end of training, or the run directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / "backbone.pt"
    if not path.is_file():
        raise ValueError(f"--checkpoint: {path} does not exist (expected a run directory or its backbone.pt)")
    if dataset != "digits":
        raise ValueError(f"--dataset: only 'digits' is supported, got {dataset!r}")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    cfg = config_from_dict(saved["config"])
    if out_path is None:
        out_path = path.parent / "eval.json"
    return evaluate_backbone_state(cfg, saved["state_dict"], out_path)
