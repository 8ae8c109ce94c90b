"""Evaluation on a labelled shard dataset (``eval.dataset``): the digits written as an image folder score as the
built-in digits do, a draw of ``max_samples``, undecodable images counted, thin classes left out, zero-shot with the
dataset's class names, the built-in samples source, and one-line refusals before anything is decoded or written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from data_pipeline.shards import write_shards
from data_pipeline.sources import DIGIT_WORDS, digits_uint8
from pretrain.cli import main
from pretrain.config import ConfigError
from pretrain.eval.protocols import METRICS
from pretrain.evaluate import evaluate_checkpoint
from tests.data_pipeline.conftest import undecodable_png
from tests.util import write_run

ROOT = Path(__file__).resolve().parents[2]
SMALL = "model.backbone_kwargs={width: 0.25}"


def _folder(root: Path, counts: dict[str, int] | None = None, broken: bool = False) -> Path:
    """scikit-learn's digits as an image folder, a sub-folder per class named by its word (``counts``: only the first
    n images of those classes); ``broken``: plus one image that does not decode."""
    images, labels = digits_uint8()
    for i, (im, y) in enumerate(zip(images, labels)):
        name = DIGIT_WORDS[y]
        if counts is not None and (name not in counts or (root / name).is_dir()
                                   and len(list((root / name).iterdir())) >= counts[name]):
            continue
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / name / f"{i:04d}.png")
    if broken:
        (root / "zero" / "broken.png").write_bytes(undecodable_png())
    return root


def _shards(tmp: Path, name: str, **kw) -> Path:
    out = tmp / f"{name}-shards"
    write_shards(f"folder:{_folder(tmp / name, **kw)}", out, shard_size=400, progress=False)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("evaldata")
    write_run(tmp / "simclr", "simclr_digits.yaml", tmp / "cache", SMALL)
    _shards(tmp, "digits", broken=True)
    return tmp


def test_digits_as_a_folder_score_as_the_builtin_digits(data):
    """The same 1797 digits through the shard path (PIL decode and resize) and the built-in one (torch resize): the
    same samples and classes, and scores within 0.02 of each other; the broken file is counted and skipped."""
    builtin = evaluate_checkpoint(data / "simclr", out_path=data / "builtin.json")
    shards = evaluate_checkpoint(data / "simclr", dataset=str(data / "digits-shards"), out_path=data / "shards.json")
    assert builtin["data"] == {"dataset": "digits", "samples": 1797, "classes": 10, "corrupt": 0,
                               "dropped_classes": [], "duplicates": 0, "unlabelled": 0}
    assert shards["data"] == {"dataset": str(data / "digits-shards"), "samples": 1797, "classes": 10, "corrupt": 1,
                              "dropped_classes": [], "duplicates": 0, "unlabelled": 0}
    for section in ("random_init", "raw_pixels"):
        for key in ("knn_top1", "linear_top1", "fewshot_5"):
            assert shards[section][key] == pytest.approx(builtin[section][key], abs=0.02), (section, key)
    assert json.loads((data / "shards.json").read_text())["data"]["corrupt"] == 1


def test_images_without_a_label_are_counted_as_left_out(data, tmp_path, capsys):
    """A table whose label field is empty for some images: those are not scored, and the report says how many were
    left out (it had said nothing of them)."""
    from pretrain.config import load_config
    from pretrain.eval.dataset import load_eval_set

    images, labels = digits_uint8()
    rows = ["image,label"]
    for i in range(60):
        Image.fromarray(images[i]).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png," + (str(labels[i] % 2) if i < 40 else ""))
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "table-shards"
    write_shards(f"table:{tmp_path / 'labels.csv'}", out, progress=False)
    capsys.readouterr()
    evalset = load_eval_set(load_config(ROOT / "configs" / "simclr_digits.yaml", [f"eval.dataset={out}"]))
    assert evalset.summary()["samples"] == 40 and evalset.summary()["unlabelled"] == 20
    assert "Evaluation: left out 20 sample(s) without a label" in capsys.readouterr().out


def test_a_draw_of_max_samples(data):
    """max_samples draws that many samples (seeded: twice the same report), every metric still in [0, 1]."""
    first, again = (evaluate_checkpoint(data / "simclr", dataset=str(data / "digits-shards"), max_samples=300,
                                        out_path=data / f"draw{i}.json") for i in range(2))
    summary = first["data"]
    assert summary["samples"] + summary["corrupt"] == 300 and summary["classes"] == 10
    assert first == again
    for section in (first, first["random_init"], first["raw_pixels"]):
        assert all(0.0 <= section[k] <= 1.0 for k in METRICS)


def test_thin_classes_are_left_out(tmp_path, capsys):
    """A class with fewer than 8 decodable samples is left out (named in the report and printed), one left with none
    (its one image a copy of another class's, which the evaluation leaves out) too; the rest score."""
    import shutil

    root = _folder(tmp_path / "thin", counts={"one": 40, "seven": 40, "four": 3})
    (root / "copy").mkdir()
    shutil.copy(next((root / "one").iterdir()), root / "copy" / "dup.png")  # (it had gone unnamed)
    write_shards(f"folder:{root}", tmp_path / "thin-shards", shard_size=400, progress=False)
    write_run(tmp_path / "run", "simclr_digits.yaml", tmp_path / "cache", SMALL)
    report = evaluate_checkpoint(tmp_path / "run", dataset=str(tmp_path / "thin-shards"))
    assert report["data"]["classes"] == 2 and report["data"]["samples"] == 80 and report["data"]["duplicates"] == 1
    assert report["data"]["dropped_classes"] == ["copy", "four"]
    assert "left out 2 class(es) with fewer than 8 decodable samples: copy, four" in capsys.readouterr().out


def test_exact_duplicates_are_evaluated_once(tmp_path, capsys):
    """Copies of images (the manifest's digest: the same bytes) would sit on both sides of the 75/25 split, each the
    other's nearest neighbour: the evaluation (and the kNN monitor, which draws the same way) takes each image once
    and says how many it left out."""
    import dataclasses
    import shutil

    import torch

    from pretrain.config import load_config
    from pretrain.eval.dataset import load_eval_set

    root = _folder(tmp_path / "dups", counts={"one": 30, "seven": 30})
    for i, image in enumerate(sorted((root / "one").iterdir())[:6]):  # 6 copies: 3 in their class, 3 in the other
        shutil.copy(image, root / ("one" if i % 2 else "seven") / f"copy-{image.name}")
    write_shards(f"folder:{root}", tmp_path / "dups-shards", shard_size=400, progress=False)
    cfg = load_config(ROOT / "configs" / "simclr_digits.yaml", [f"eval.dataset={tmp_path / 'dups-shards'}"])
    evalset = load_eval_set(cfg)
    assert evalset.summary()["samples"] == 60 and evalset.summary()["duplicates"] == 6
    assert len(torch.unique(evalset.images.flatten(1), dim=0)) == 60  # every image evaluated is another
    drawn = load_eval_set(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_samples=40)))
    assert len(drawn.labels) == 40 and len(torch.unique(drawn.images.flatten(1), dim=0)) == 40  # a draw of the rest
    write_run(tmp_path / "run", "simclr_digits.yaml", tmp_path / "cache", SMALL)
    report = evaluate_checkpoint(tmp_path / "run", dataset=str(tmp_path / "dups-shards"), out_path=tmp_path / "a.json")
    assert report["data"]["duplicates"] == 6
    assert "60 samples, 2 classes, 6 exact duplicates left out" in capsys.readouterr().out


def test_zeroshot_uses_the_dataset_class_names(data):
    """A CLIP run scores zero-shot on a shard dataset, prompting with its class names (here the digit words, sorted
    as their folders) in the generic templates: the very score of zeroshot_top1 called with those."""
    import dataclasses

    from pretrain.eval.dataset import PROMPTS, load_eval_set
    from pretrain.eval.digits import split_indices
    from pretrain.eval.zeroshot import zeroshot_top1
    from pretrain.index import load_run

    write_run(data / "clip", "clip_digits.yaml", data / "cache", SMALL, "method.text_width=32", "method.text_depth=1")
    report = evaluate_checkpoint(data / "clip", dataset=str(data / "digits-shards"), max_samples=400)
    run = load_run(data / "clip")
    cfg = dataclasses.replace(run.cfg, eval=dataclasses.replace(run.cfg.eval, dataset=str(data / "digits-shards"),
                                                                max_samples=400))
    evalset = load_eval_set(cfg)
    assert evalset.classes == sorted(DIGIT_WORDS) and evalset.prompts == PROMPTS
    test = split_indices(evalset.labels, seed=0)[1]
    model = run.encode_image.__self__
    expected = zeroshot_top1(model, evalset.images[test], evalset.labels[test], evalset.classes, PROMPTS)
    assert report["zeroshot_top1"] == expected
    assert 0.0 <= report["random_init"]["zeroshot_top1"] <= 1.0


def test_builtin_samples_source(data, capsys):
    """`pretrain eval --dataset samples` (the two photos cut into colour crops, built on first use): two classes,
    which even the untrained network's features tell apart better than chance."""
    assert main(["eval", "--checkpoint", str(data / "simclr"), "--dataset", "samples", "--out",
                 str(data / "samples.json")]) == 0
    assert "Evaluated on samples: 456 samples, 2 classes" in capsys.readouterr().out
    report = json.loads((data / "samples.json").read_text())
    assert report["data"]["classes"] == 2 and report["data"]["samples"] == 456
    assert report["random_init"]["knn_top1"] > 0.6 and report["raw_pixels"]["knn_top1"] > 0.6


def test_eval_again_keeps_the_previous_report(tmp_path, capsys):
    """`pretrain eval` into the run's eval.json moves the report there aside (eval-<time>.json, as it was, its map
    eval-map.png with it as eval-<time>-map.png) and writes the new one as eval.json beside its new map (an evaluation
    that fails moves nothing); an --out that exists, or whose map does, is refused in one line before anything is
    decoded, and stays; --no-map draws none."""
    run = tmp_path / "run"
    write_run(run, "simclr_digits.yaml", tmp_path / "cache", SMALL)
    (run / "eval.json").write_text('{"from": "training"}\n')
    assert main(["eval", "--checkpoint", str(run), "--dataset", "samples", "--max-samples", "100"]) == 0
    kept = [p for p in run.glob("eval-*.json")]
    assert len(kept) == 1 and kept[0].read_text() == '{"from": "training"}\n'
    assert f"Previous report kept as {kept[0]}" in capsys.readouterr().out
    assert json.loads((run / "eval.json").read_text())["data"]["dataset"] == "samples"
    first_map = (run / "eval-map.png").read_bytes()
    assert first_map.startswith(b"\x89PNG") and sorted(p.name for p in run.glob("*.png*")) == ["eval-map.png"]
    assert main(["eval", "--checkpoint", str(run), "--dataset", "samples", "--max-samples", "100"]) == 0
    assert len(list(run.glob("eval-*.json"))) == 2
    second = max(run.glob("eval-*.json"), key=lambda p: p.stat().st_mtime_ns)  # the report of the first eval
    assert (run / f"{second.stem}-map.png").read_bytes() == first_map  # moved with it
    assert (run / "eval-map.png").is_file() and len(list(run.glob("*.png*"))) == 2
    latest = (run / "eval.json").read_text()
    assert main(["eval", "--checkpoint", str(run), "--dataset", str(tmp_path / "nope")]) == 2  # fails: nothing moves
    assert (run / "eval.json").read_text() == latest and len(list(run.glob("eval-*.json"))) == 2
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--out", str(kept[0])]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out: {kept[0]} already exists; eval overwrites nothing"
    assert kept[0].read_text() == '{"from": "training"}\n'
    (tmp_path / "mine-map.png").write_bytes(b"a picture of mine")
    assert main(["eval", "--checkpoint", str(run), "--out", str(tmp_path / "mine.json")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --out: {tmp_path / 'mine-map.png'} already exists; eval "
                                               "overwrites nothing (--no-map draws none)")
    assert main(["eval", "--checkpoint", str(run), "--dataset", "samples", "--max-samples", "100", "--no-map", "--out",
                 str(tmp_path / "plain.json")]) == 0
    assert (tmp_path / "plain.json").is_file() and not list(tmp_path.glob("plain*.png*"))
    # no map drawn, none to refuse: a map of that name beside the report stays as it is
    assert main(["eval", "--checkpoint", str(run), "--dataset", "samples", "--max-samples", "100", "--no-map", "--out",
                 str(tmp_path / "mine.json")]) == 0
    assert (tmp_path / "mine.json").is_file() and (tmp_path / "mine-map.png").read_bytes() == b"a picture of mine"
    assert main(["eval", "--checkpoint", str(run), "--out", str(tmp_path / "report.csv")]) == 2
    assert capsys.readouterr().err.strip() == ("error: --out: eval writes a JSON report; give it a name ending in "
                                               ".json, got 'report.csv'")


def test_training_that_ends_again_keeps_the_first_report(tmp_path, capsys):
    """A finished run resumed with more steps ends again: its end (pretrain.trainer._finish_run, as every rank 0 runs
    it) moves the first end's eval.json and eval-map.png aside as `pretrain eval` does, then writes the new ones."""
    import dataclasses

    import torch

    from pretrain.config import config_from_dict
    from pretrain.tracking import NullTracker
    from pretrain.trainer import _finish_run, _History

    run = tmp_path / "run"
    write_run(run, "simclr_digits.yaml", tmp_path / "cache", SMALL)
    (run / "eval.json").write_text('{"from": "the first end"}\n')
    (run / "eval-map.png").write_bytes(b"the first end's map")
    saved = torch.load(run / "backbone.pt", weights_only=True)
    cfg = config_from_dict(saved["config"])
    cfg.eval = dataclasses.replace(cfg.eval, enabled=True, dataset="samples", max_samples=100)
    state = saved["state_dict"]
    _finish_run(cfg, run, state, NullTracker(), _History(run / "metrics.csv", enabled=False))
    kept = list(run.glob("eval-*.json"))
    assert len(kept) == 1 and kept[0].read_text() == '{"from": "the first end"}\n'
    assert (run / f"{kept[0].stem}-map.png").read_bytes() == b"the first end's map"
    assert f"Previous report kept as {kept[0]}" in capsys.readouterr().out
    assert json.loads((run / "eval.json").read_text())["data"]["dataset"] == "samples"
    with Image.open(run / "eval-map.png") as png:  # this end's map: trained, random init and raw pixels, a legend
        assert png.size == (round((4.2 * 3 + 1.0) * 100), 460)


def test_refusals_are_one_line(tmp_path, data, capsys):
    """A dataset that is not shards, one with a single class, an unlabelled one, or a max_samples below 16: a one-line
    error before anything is decoded, naming the option given (the run's key where the run's own dataset is meant);
    `pretrain train` refuses before writing the run directory (also when only the kNN monitor would read it)."""
    one = _shards(tmp_path, "one", counts={"one": 30})
    with pytest.raises(ConfigError, match=r"^--dataset: .*nope does not exist$"):
        evaluate_checkpoint(data / "simclr", dataset=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"^--dataset: .* has 1 class\(es\), 1 of them with >= 8 samples"):
        evaluate_checkpoint(data / "simclr", dataset=str(one))
    unlabelled = tmp_path / "unlabelled-shards"
    write_shards(f"images:{tmp_path / 'one'}", unlabelled, progress=False)
    with pytest.raises(ConfigError, match=r"^--dataset: .* is unlabelled \(written from images:PATH\)"):
        evaluate_checkpoint(data / "simclr", dataset=str(unlabelled))
    with pytest.raises(ConfigError, match=r"^--max-samples: must be >= 16, got 3"):
        evaluate_checkpoint(data / "simclr", dataset=str(one), max_samples=3)
    with pytest.raises(ConfigError, match=r"^--finetune-layer-decay: must be in \(0, 1\], got 0"):
        evaluate_checkpoint(data / "simclr", finetune_layer_decay=0)
    with pytest.raises(ConfigError, match=r"^--finetune-layer-decay: 0.75 needs a ViT backbone, and .* is a convnet"):
        evaluate_checkpoint(data / "simclr", finetune_layer_decay=0.75)
    assert main(["train", "--config", str(ROOT / "configs" / "simclr_digits.yaml"), "--dry-run", "--set",
                 f"eval.dataset={one}", "--set", f"job.out_dir={tmp_path / 'runs'}", "--set", "job.run_name=r",
                 "--set", f"data.cache_dir={data / 'cache'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: eval.dataset: {one} has 1 class(es), 1 of them with >= 8 samples; the evaluation needs 2 (labels are "
        "from the manifest: with folder:PATH, a sub-folder per class)"]
    assert not (tmp_path / "runs" / "r").exists()
    # the kNN monitor reads eval.dataset too: checked even with the end-of-run evaluation off
    assert main(["train", "--config", str(ROOT / "configs" / "simclr_digits.yaml"), "--dry-run", "--set",
                 f"eval.dataset={one}", "--set", "eval.enabled=false", "--set", "eval.knn_every=50", "--set",
                 f"job.out_dir={tmp_path / 'runs'}", "--set", "job.run_name=r", "--set",
                 f"data.cache_dir={data / 'cache'}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: eval.dataset: {one} has 1 class(es)")
    assert not (tmp_path / "runs" / "r").exists()
    assert main(["eval", "--checkpoint", str(data / "simclr"), "--dataset", str(tmp_path / "nope")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def _eval_cfg(run: Path, **eval_keys):
    import dataclasses

    from pretrain.evaluate import load_run_files

    cfg = load_run_files(run)[0]
    cfg.eval = dataclasses.replace(cfg.eval, **eval_keys)
    return cfg


def test_rank_shares_make_the_whole_draw(data):
    """What the kNN monitor's ranks decode apart (read_eval_part of 3 ranks) is the draw load_eval_set reads whole:
    the same samples at the same places, the broken one counted once."""
    import numpy as np
    import torch

    from pretrain.eval.dataset import read_eval_part

    cfg = _eval_cfg(data / "simclr", dataset=str(data / "digits-shards"), max_samples=700)
    whole = read_eval_part(cfg)
    assert list(whole.positions) == sorted(whole.positions) and whole.drawn == 700
    parts = [read_eval_part(cfg, rank=r, world_size=3) for r in range(3)]
    assert all(set(p.positions % 3) <= {r} for r, p in enumerate(parts))  # rank r: places r, r + 3, ...
    order = np.argsort(np.concatenate([p.positions for p in parts]))
    assert np.array_equal(np.concatenate([p.positions for p in parts])[order], whole.positions)
    assert np.array_equal(np.concatenate([p.labels for p in parts])[order], whole.labels)
    assert torch.equal(torch.cat([p.images for p in parts])[torch.from_numpy(order)], whole.images)
    assert sum(p.corrupt for p in parts) == whole.corrupt and len(whole.labels) + whole.corrupt == 700


def test_knn_monitor_scores_as_the_end_of_run_evaluation(tmp_path):
    """On one rank the monitor's kNN top-1 is eval.json's knn_top1 (same draw, same classes: the thin one left out,
    same split), in tiny batches; the backbone is left in training mode."""
    import torch

    from pretrain.eval.monitor import KnnMonitor
    from pretrain.evaluate import load_run_files, random_init_backbone

    shards = _shards(tmp_path, "thin", counts={"one": 30, "seven": 30, "two": 30, "four": 3})
    write_run(tmp_path / "run", "simclr_digits.yaml", tmp_path / "cache", SMALL)
    report = evaluate_checkpoint(tmp_path / "run", dataset=str(shards))
    cfg = _eval_cfg(tmp_path / "run", dataset=str(shards), knn_every=5)
    backbone = random_init_backbone(cfg)
    backbone.load_state_dict(load_run_files(tmp_path / "run")[1])
    monitor = KnnMonitor(cfg, rank=0, world_size=1, device=torch.device("cpu"), batch_size=7)
    scores = monitor(backbone.train())
    assert report["data"]["dropped_classes"] == ["four"] and 0.4 < report["knn_top1"] < 1.0
    assert scores["knn_top1"] == report["knn_top1"] and backbone.training
    assert monitor.due(10) and not monitor.due(12)


def test_builtin_digits_take_one_mean_and_std_for_every_channel():
    """data.aug.mean / std of one value with data.channels: 3 (the digits recipes' values on colour data) serve every
    channel of the built-in digits as of the training views (the kNN monitor read them at the first step)."""
    import torch

    from pretrain.config import load_config
    from pretrain.eval.dataset import read_eval_part
    from pretrain.eval.digits import digits_eval_set

    cfg = load_config(ROOT / "configs" / "simclr_digits.yaml", ["data.channels=3", "data.image_size=16"])
    assert list(cfg.data.aug.mean) == [0.3] and list(cfg.data.aug.std) == [0.38]
    part = read_eval_part(cfg, rank=1, world_size=2)
    images, _ = digits_eval_set(image_size=16, channels=3, mean=[0.3] * 3, std=[0.38] * 3)
    assert part.images.shape == (898, 3, 16, 16) and torch.equal(part.images, images[1::2])


def test_max_samples_draws_from_the_builtin_digits(data):
    """--max-samples on digits draws that many (stratified, seeded: each digit keeps its share; the same draw twice),
    where it had been ignored; the kNN monitor's draw (read_eval_part) is the same."""
    import numpy as np

    from pretrain.eval.dataset import load_eval_set, read_eval_part

    report = evaluate_checkpoint(data / "simclr", max_samples=300, embedding_map=False, out_path=data / "d300.json")
    assert report["data"]["samples"] == 300 and report["data"]["classes"] == 10
    cfg = _eval_cfg(data / "simclr", max_samples=300)
    first, again = load_eval_set(cfg), load_eval_set(cfg)
    counts = np.bincount(first.labels, minlength=10)
    share = 300 * np.bincount(digits_uint8()[1], minlength=10) / 1797  # each digit's share of the whole
    assert counts.sum() == 300 and (abs(counts - share) < 1).all()
    assert (first.images == again.images).all() and (first.labels == again.labels).all()
    part = read_eval_part(cfg, rank=1, world_size=2)
    assert (part.images == first.images[1::2]).all() and part.drawn == 300


def test_finetune_options_and_what_the_report_records(tmp_path):
    """--finetune-layer-decay without fine-tuning is refused in one line (it had been ignored silently); with
    --finetune-epochs the report records the epochs and the layer decay it fine-tuned with."""
    run = tmp_path / "vit"
    write_run(run, "dino_vit_digits.yaml", tmp_path / "cache", "model.backbone_kwargs={embed_dim: 32, depth: 2, "
              "num_heads: 2}")
    with pytest.raises(ConfigError) as e:
        evaluate_checkpoint(run, finetune_layer_decay=0.75)
    assert str(e.value) == ("--finetune-layer-decay: goes with --finetune-epochs N (fine-tuning is off: the run's "
                            "eval.finetune_epochs is 0); add --finetune-epochs N to fine-tune with it")
    assert not (run / "eval.json").exists()
    report = evaluate_checkpoint(run, finetune_epochs=1, finetune_layer_decay=0.75, max_samples=160,
                                 embedding_map=False)
    assert report["finetune"] == {"epochs": 1, "layer_decay": 0.75}
    assert 0.0 <= report["finetune_top1"] <= 1.0 and "finetune_top1" in report["random_init"]
    assert json.loads((run / "eval.json").read_text())["finetune"] == {"epochs": 1, "layer_decay": 0.75}


def test_errors_name_the_options_typed(tmp_path, data, capsys):
    """What is wrong with --dataset is said of --dataset (not of the run's key eval.dataset), and a draw that leaves
    too few classes names --max-samples; the run's own eval.dataset keeps its key."""
    few = _shards(tmp_path, "few", counts={"one": 40, "seven": 8})
    cases = [(["--dataset", str(tmp_path / "nope")], f"error: --dataset: {tmp_path / 'nope'} does not exist"),
             (["--dataset", str(few), "--max-samples", "20"],
              f"error: --dataset: {few} has 1 class(es) with >= 8 decodable samples in the draw of 20 of its 48 "
              "(--max-samples 20: more may give more classes); the evaluation needs at least 2"),
             (["--max-samples", "16"],
              "error: eval.dataset: digits has 0 class(es) with >= 8 decodable samples in the draw of 16 of its 1797 "
              "(--max-samples 16: more may give more classes); the evaluation needs at least 2"),
             (["--dataset", ""], "error: --dataset: must not be empty (digits, samples or a shard directory)"),
             (["--dataset", f"folder:{tmp_path}"],  # its hint names the option typed too (it had said data.source)
              f"error: --dataset: {Path.cwd()}/folder:{tmp_path} does not exist: --dataset takes a shard dataset; "
              f"write one from those files first, `pretrain data shards --source folder:{tmp_path} --out <a new "
              "directory>`")]
    for extra, line in cases:
        assert main(["eval", "--checkpoint", str(data / "simclr"), "--out", str(tmp_path / "r.json"), *extra]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [line]
    assert not (tmp_path / "r.json").exists()


def test_a_reader_that_stops_early_costs_no_report(data, tmp_path):
    """`pretrain eval ... | head -1`: the report is written before the table is printed, and a closed stdout ends the
    command quietly with status 0 (it had been `error: Broken pipe`, status 1, and no report)."""
    import subprocess
    import sys

    out = tmp_path / "q.json"
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.cli", "eval", "--checkpoint", str(data / "simclr"),
                             "--max-samples", "200", "--no-map", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read()
    assert proc.wait(timeout=600) == 0, err
    assert "error" not in err and "Traceback" not in err, err
    assert json.loads(out.read_text())["data"]["samples"] == 200
