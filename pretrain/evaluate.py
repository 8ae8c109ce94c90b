"""Evaluate a pretrained backbone on frozen features: at the end of training and as ``pretrain eval``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pretrain.config import Config, ConfigError, config_from_dict
from pretrain.eval.dataset import load_eval_set
from pretrain.eval.digits import split_indices
from pretrain.eval.finetune import finetune_top1
from pretrain.eval.report import evaluate_encoder, format_report, write_report
from pretrain.eval.zeroshot import zeroshot_top1
from pretrain.methods import METHODS
from pretrain.steps import MODEL_FILE


def random_init_backbone(cfg: Config) -> torch.nn.Module:
    """The backbone exactly as training started from it (same seed, same construction order)."""
    from pretrain.trainer import build_method

    return build_method(cfg, distributed=False).backbone


def evaluate_backbone_state(cfg: Config, state_dict: dict, out_path: str | Path | None = None, *, echo: bool = True,
                            method_state: dict | None = None):
    """The frozen-feature protocols (pretrain.eval.protocols) on ``eval.dataset`` (pretrain.eval.dataset) for the
    trained weights, the random init and raw pixels; with ``eval.finetune_epochs`` also fine-tuning of both; with
    ``method_state`` (the whole trained CLIP) also zero-shot top-1 on the test split, trained and at random init (a
    method with a text tower), the dataset's class names in its prompt templates. The encoders run on the GPU where
    there is one. ``report["data"]`` says what was
    evaluated: dataset, samples, classes, undecodable samples skipped, classes left out."""
    from pretrain.trainer import build_method

    data = load_eval_set(cfg)  # first: a dataset it refuses is refused before anything is built
    images, labels = data.images, data.labels
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # on a GPU node, its (current) GPU
    trained = random_init_backbone(cfg)
    trained.load_state_dict(state_dict)
    trained.to(device)
    random_init = random_init_backbone(cfg).to(device)
    report = evaluate_encoder(trained, random_init, images, labels, seed=0)
    if cfg.eval.finetune_epochs:
        train, test = split_indices(labels, seed=0)
        for scores, encoder in ((report, trained), (report["random_init"], random_init)):
            scores["finetune_top1"] = finetune_top1(encoder, images[train], labels[train], images[test], labels[test],
                                                    epochs=cfg.eval.finetune_epochs,
                                                    layer_decay=cfg.eval.finetune_layer_decay, seed=0)
    if method_state is not None and METHODS[cfg.method.name].needs_text:
        test = split_indices(labels, seed=0)[1]
        model = build_method(cfg, distributed=False).to(device)
        report["random_init"]["zeroshot_top1"] = zeroshot_top1(model, images[test], labels[test], data.classes,
                                                               data.prompts)
        model.load_state_dict(method_state)
        report["zeroshot_top1"] = zeroshot_top1(model, images[test], labels[test], data.classes, data.prompts)
    report["data"] = data.summary()
    if out_path is not None:
        write_report(report, out_path)
    if echo:
        print(format_report(report), flush=True)
    return report


def load_run_files(path: str | Path) -> tuple[Config, dict, dict | None, Path]:
    """``path``: a run directory or its ``backbone.pt`` -> (config, backbone state, the whole method's state from a
    ``model.pt`` beside it (CLIP) or None, the backbone.pt path). ValueError naming what is missing."""
    path = Path(path)
    if path.is_dir():
        from pretrain.steps import list_checkpoints

        steps = sorted(list_checkpoints(path)) if not (path / "backbone.pt").is_file() else []
        if steps:  # a run still training, or stopped before its end: its checkpoints hold the encoder
            raise ValueError(f"--checkpoint: {path} has no backbone.pt yet (training writes it at the end); `pretrain "
                             f"extract --checkpoint {path}` takes the encoder of its latest checkpoint (step "
                             f"{steps[-1]}) out as a run directory to evaluate")
        path = path / "backbone.pt"
    if not path.is_file():
        raise ValueError(f"--checkpoint: {path} does not exist (expected a finished run directory or its backbone.pt)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a file it cannot read
        raise ValueError(f"--checkpoint: {path} is not a backbone.pt that training writes ({type(e).__name__} reading "
                         "it); give a finished run directory or its backbone.pt") from None
    if not (isinstance(saved, dict) and {"config", "state_dict"} <= saved.keys()):
        raise ValueError(f"--checkpoint: {path} is not a backbone.pt that training writes (no config and state_dict "
                         "in it); give a finished run directory or its backbone.pt")
    whole = path.parent / MODEL_FILE
    method_state = torch.load(whole, map_location="cpu", weights_only=True)["state_dict"] if whole.is_file() else None
    return config_from_dict(saved["config"]), saved["state_dict"], method_state, path


def evaluate_checkpoint(path: str | Path, *, dataset: str | None = None, out_path: str | Path | None = None,
                        finetune_epochs: int | None = None, max_samples: int | None = None,
                        finetune_layer_decay: float | None = None) -> dict:
    """``path``: a ``backbone.pt`` written at the end of training, or the run directory holding it (a ``model.pt``
    beside it, as CLIP runs write, adds zero-shot classification). ``dataset`` / ``max_samples`` / ``finetune_epochs`` /
    ``finetune_layer_decay``: instead of the run's eval.dataset / eval.max_samples / eval.finetune_epochs /
    eval.finetune_layer_decay. The report goes to ``out_path`` (refused if it exists) or else the run's eval.json,
    the one there kept as eval-<its time>.json. Bad input is a one-line ConfigError before any image is decoded."""
    if out_path is not None and Path(out_path).exists():
        raise ConfigError(f"--out: {out_path} already exists; eval overwrites nothing")
    cfg, backbone_state, method_state, path = load_run_files(path)
    overrides = {k: v for k, v in (("dataset", dataset), ("max_samples", max_samples),
                                   ("finetune_epochs", finetune_epochs),
                                   ("finetune_layer_decay", finetune_layer_decay)) if v is not None}
    if overrides:
        try:
            cfg.eval = dataclasses.replace(cfg.eval, **overrides)
        except ValueError as e:  # "max_samples: must be ..." from EvalConfig's checks
            key, _, problem = str(e).partition(": ")
            raise ConfigError(f"--{key.replace('_', '-')}: {problem}") from None
    if cfg.eval.finetune_layer_decay != 1 and not cfg.model.backbone.startswith("vit"):
        raise ConfigError(f"--finetune-layer-decay: {cfg.eval.finetune_layer_decay} needs a ViT backbone, and "
                          f"{path} is a {cfg.model.backbone}")
    report = evaluate_backbone_state(cfg, backbone_state, method_state=method_state)
    if out_path is None:
        out_path = path.parent / "eval.json"
        keep_previous_report(out_path)  # only now: an evaluation that fails leaves eval.json where it was
    write_report(report, out_path)
    return report


def keep_previous_report(report: Path) -> Path | None:
    """A run's eval.json about to be written again: the one there moves aside to ``eval-<its time>.json`` (a number
    added should that exist), so the newest report is eval.json and none is lost. Returns where it went."""
    import time

    if not report.is_file():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(report.stat().st_mtime))
    kept, n = report.with_name(f"{report.stem}-{stamp}{report.suffix}"), 1
    while kept.exists():
        n += 1
        kept = report.with_name(f"{report.stem}-{stamp}-{n}{report.suffix}")
    report.rename(kept)
    print(f"Previous report kept as {kept}", flush=True)
    return kept
