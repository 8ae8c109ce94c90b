"""Evaluate a pretrained backbone on frozen features: at the end of training and as ``pretrain eval``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pretrain.config import Config, ConfigError, config_from_dict
from pretrain.eval.dataset import load_eval_set
from pretrain.eval.digits import split_indices
from pretrain.eval.finetune import finetune_top1
from pretrain.eval.report import BASELINES, format_report, frozen_features, report_features, write_report
from pretrain.eval.zeroshot import cut_prompt_notes, zeroshot_top1
from pretrain.methods import METHODS
from pretrain.preflight import check_writable
from pretrain.steps import MODEL_FILE, saved_step


def random_init_backbone(cfg: Config) -> torch.nn.Module:
    """The backbone exactly as training started from it (same seed, same construction order)."""
    from pretrain.trainer import build_method

    return build_method(cfg, distributed=False).backbone


def map_path(report: str | Path) -> Path:
    """Where the embedding map of the report ``report`` goes: beside it, ``eval.json`` -> ``eval-map.png``."""
    report = Path(report)
    return report.with_name(f"{report.stem}-map.png")


def evaluate_backbone_state(cfg: Config, state_dict: dict, out_path: str | Path | None = None, *, echo: bool = True,
                            method_state: dict | None = None, embedding_map: str | Path | None = None):
    """The frozen-feature protocols (pretrain.eval.protocols) on ``eval.dataset`` (pretrain.eval.dataset) for the
    trained weights, the random init and raw pixels; with ``eval.finetune_epochs`` also fine-tuning of both; with
    ``method_state`` (the whole trained CLIP) also zero-shot top-1 on the test split, trained and at random init (a
    method with a text tower), the dataset's class names in its prompt templates. The encoders run on the GPU where
    there is one. ``report["data"]`` says what was
    evaluated: dataset, samples, classes, undecodable samples skipped, classes left out. With ``embedding_map`` (a
    PNG path) and ``eval.embedding_map`` on, the test split's features of the three drawn there in 2-D
    (pretrain.eval.embedding_map)."""
    from pretrain.trainer import build_method

    data = load_eval_set(cfg)  # first: a dataset it refuses is refused before anything is built
    if embedding_map is not None and Path(embedding_map).exists():
        Path(embedding_map).unlink()  # a map left by an evaluation that died is not this one's
    images, labels = data.images, data.labels
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # on a GPU node, its (current) GPU
    trained = random_init_backbone(cfg)
    trained.load_state_dict(state_dict)
    trained.to(device)
    random_init = random_init_backbone(cfg).to(device)
    features = frozen_features(trained, random_init, images)
    report = report_features(features, labels, seed=0)
    if cfg.eval.finetune_epochs:
        report["finetune"] = {"epochs": cfg.eval.finetune_epochs, "layer_decay": cfg.eval.finetune_layer_decay}
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
        report["notes"] += cut_prompt_notes(data.classes, data.prompts, cfg.method.context_length - 2)
    report["data"] = data.summary()
    if embedding_map is not None and cfg.eval.embedding_map:
        from pretrain.eval.embedding_map import embedding_map as draw

        test = split_indices(labels, seed=0)[1]
        panels = {f"{title}: kNN top-1 {scores['knn_top1']:.3f}": features[key][test]
                  for key, title, scores in (("trained", "trained", report),
                                             *((k, t, report[k]) for k, t in BASELINES.items()))}
        draw(panels, labels[test], data.classes, embedding_map,
             title=f"t-SNE of the frozen features of the {len(test)} test images of {data.name}")
    if out_path is not None:
        write_report(report, out_path)
    if echo:
        print(format_report(report), flush=True)
    return report


def load_run_files(path: str | Path) -> tuple[Config, dict, dict | None, Path]:
    """``path``: a run directory or its ``backbone.pt`` -> (config, backbone state, the whole method's state from a
    ``model.pt`` beside it (CLIP) or None, the backbone.pt path). ValueError naming what is missing."""
    path = Path(path)
    if path.is_dir() and not (path / "backbone.pt").is_file() and (path / "checkpoint.json").is_file():
        from pretrain.steps import checkpoint_info

        run = next((p for p in path.parents if (p / "config.yaml").is_file()), None)
        step = checkpoint_info(path).get("step", "N")
        raise ValueError(f"--checkpoint: {path} is a training checkpoint (step {step}), not an encoder; `pretrain "
                         f"extract --checkpoint {run or 'RUN_DIR'} --step {step}` takes its encoder out as a run "
                         "directory to evaluate")
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
    cfg = config_from_dict(saved["config"])
    _warn_if_trained_on(path, saved.get("step"))
    whole = path.parent / MODEL_FILE
    if not whole.is_file() and METHODS[cfg.method.name].saves_model:  # a random text tower and projections otherwise
        raise ValueError(f"--checkpoint: {path} is a {cfg.method.name} run's, which is used with the {MODEL_FILE} "
                         f"written beside it, and {path.parent} has none; give the run directory, or copy its "
                         f"{MODEL_FILE} beside the backbone.pt")
    method_state = torch.load(whole, map_location="cpu", weights_only=True)["state_dict"] if whole.is_file() else None
    return cfg, saved["state_dict"], method_state, path


def _warn_if_trained_on(backbone: Path, step: int | None) -> None:
    """A warning line where the run beside ``backbone`` has checkpoints past the step it holds (resumed to train on,
    and stopped before its end writes a new one): the encoder used is not the run's latest."""
    from pretrain.steps import list_checkpoints

    try:
        steps = list_checkpoints(backbone.parent) if step is not None else {}
    except ValueError:  # a damaged checkpoint record: not this command's to report
        return
    if steps and max(steps) > step:
        print(f"Warning: {backbone} is the encoder of step {step}; the run has trained on to its checkpoint of step "
              f"{max(steps)} since (resumed, and stopped before its end): `pretrain extract --checkpoint "
              f"{backbone.parent}` takes that step's", flush=True)


def evaluate_checkpoint(path: str | Path, *, dataset: str | None = None, out_path: str | Path | None = None,
                        finetune_epochs: int | None = None, max_samples: int | None = None,
                        finetune_layer_decay: float | None = None, embedding_map: bool | None = None) -> dict:
    """``path``: a ``backbone.pt`` written at the end of training, or the run directory holding it (a ``model.pt``
    beside it, as CLIP runs write, adds zero-shot classification). ``dataset`` / ``max_samples`` / ``finetune_epochs`` /
    ``finetune_layer_decay`` / ``embedding_map``: instead of the run's eval.dataset / eval.max_samples /
    eval.finetune_epochs / eval.finetune_layer_decay / eval.embedding_map; ``finetune_layer_decay`` without fine-tuning
    (``finetune_epochs`` or the run's eval.finetune_epochs) is refused, as it would change nothing. The report goes to
    ``out_path`` (refused if it exists, or its map, :func:`map_path`, where one is drawn) or else the run's eval.json,
    the one there kept as eval-<its time>.json (and its eval-map.png as eval-<its time>-map.png). Bad input is a
    one-line ConfigError before any image is decoded; errors of the data name ``--dataset`` and ``--max-samples`` where
    they were given. The report is written before it is printed."""
    if out_path is not None and Path(out_path).exists():
        raise ConfigError(f"--out: {out_path} already exists; eval overwrites nothing")
    cfg, backbone_state, method_state, path = load_run_files(path)
    overrides = {k: v for k, v in (("dataset", dataset), ("max_samples", max_samples),
                                   ("finetune_epochs", finetune_epochs),
                                   ("finetune_layer_decay", finetune_layer_decay), ("embedding_map", embedding_map))
                 if v is not None}
    if overrides:
        try:
            cfg.eval = dataclasses.replace(cfg.eval, **overrides)
        except ValueError as e:  # "max_samples: must be ..." from EvalConfig's checks
            key, _, problem = str(e).partition(": ")
            raise ConfigError(f"--{key.replace('_', '-')}: {problem}") from None
    if out_path is not None and cfg.eval.embedding_map and map_path(out_path).exists():  # only a map to be drawn
        raise ConfigError(f"--out: {map_path(out_path)} already exists; eval overwrites nothing (--no-map draws none)")
    if cfg.eval.finetune_layer_decay != 1 and not cfg.model.backbone.startswith("vit"):
        raise ConfigError(f"--finetune-layer-decay: {cfg.eval.finetune_layer_decay} needs a ViT backbone, and "
                          f"{path} is a {cfg.model.backbone}")
    if finetune_layer_decay is not None and not cfg.eval.finetune_epochs:  # it would change nothing, silently
        raise ConfigError("--finetune-layer-decay: goes with --finetune-epochs N (fine-tuning is off: the run's "
                          "eval.finetune_epochs is 0); add --finetune-epochs N to fine-tune with it")
    report_path = Path(out_path) if out_path is not None else path.parent / "eval.json"
    check_writable(report_path, "--out" if out_path is not None else "--checkpoint")  # before the work, not after
    try:
        report = evaluate_backbone_state(cfg, backbone_state, method_state=method_state,
                                         embedding_map=staged_map(report_path), echo=False)
    except ConfigError as e:  # what is wrong with the data, said of the options typed (the run's keys otherwise)
        message = str(e)
        if dataset is not None:
            message = message.replace("eval.dataset", "--dataset")
        if max_samples is not None:
            message = message.replace("eval.max_samples", "--max-samples", 1)
        raise ConfigError(message) from None
    step = saved_step(path)
    if step is not None:
        report["step"] = step  # the step of the encoder scored
    publish_report(report, report_path)  # only now: an evaluation that fails leaves eval.json where it was
    print(format_report(report), flush=True)  # after: a reader that stops early (`| head`) costs no report
    return report


def staged_map(report: Path) -> Path:
    """Where the embedding map is drawn before :func:`publish_report` puts it beside ``report``."""
    return map_path(report).with_name(map_path(report).name + ".partial")


def publish_report(report: dict, path: Path) -> None:
    """Write ``report`` to ``path`` and move its staged embedding map (if one was drawn) to :func:`map_path`; a report
    and map already there are kept aside first (:func:`keep_previous_report`)."""
    keep_previous_report(path)
    write_report(report, path)
    if staged_map(path).is_file():
        staged_map(path).replace(map_path(path))


def keep_previous_report(report: Path) -> Path | None:
    """A run's eval.json about to be written again: the one there moves aside to ``eval-<its time>.json`` (a number
    added should that exist), its embedding map ``eval-map.png`` with it to ``eval-<its time>-map.png``, so the newest
    report is eval.json and none is lost. Returns where the report went."""
    import time

    if not report.is_file():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(report.stat().st_mtime))
    kept, n = report.with_name(f"{report.stem}-{stamp}{report.suffix}"), 1
    while kept.exists() or map_path(kept).exists():
        n += 1
        kept = report.with_name(f"{report.stem}-{stamp}-{n}{report.suffix}")
    report.rename(kept)
    if map_path(report).is_file():
        map_path(report).rename(map_path(kept))
    print(f"Previous report kept as {kept}", flush=True)
    return kept
