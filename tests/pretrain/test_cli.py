"""The `pretrain` console script: data shards and argument errors (the process itself where its exit status and
streams are the point, `pretrain.cli.main` in this process elsewhere)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pretrain.cli import main
from tests.util import write_run

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_data_shards_digits(tmp_path, capsys):
    """`pretrain data shards --source digits` writes every digit once, in shards of the requested size, and says
    so."""
    out = tmp_path / "digits"
    assert main(["data", "shards", "--source", "digits", "--out", str(out), "--shard-size", "500",
                 "--no-progress"]) == 0
    assert capsys.readouterr().out == f"Wrote 1797 images (10 classes) in 4 shards: {out / 'manifest.parquet'}\n"
    table = pq.read_table(out / "manifest.parquet")
    assert table.num_rows == 1797 and len(set(table.column("key").to_pylist())) == 1797
    assert sorted(p.name for p in out.glob("*.tar")) == [f"shard-{i:06d}.tar" for i in range(4)]


def test_data_shards_says_what_it_left_out(tmp_path, capsys):
    """Images beside a folder source's class sub-folders and zero-byte files (of any source) are left out of the
    shards, each kind named in a line (and kept in the manifest's metadata), below the line of the exact repeats among
    the images written."""
    from PIL import Image

    root = tmp_path / "imgs"
    for d in ("cat", "dog"):
        (root / d).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0) if d == "cat" else (0, 40 * i, 9)).save(root / d / f"{i}.png")
    Image.new("RGB", (8, 8)).save(root / "stray.jpg")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "ds"
    assert main(["data", "shards", "--source", f"folder:{root}", "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"Wrote 6 images (2 classes) in 1 shard: {out / 'manifest.parquet'}",
        f"Left out: 1 empty (zero-byte) file(s), e.g. {root / 'dog' / 'empty.jpg'}",
        f"Left out: 1 image(s) at the top of {root}, outside any class sub-folder (images:{root} takes every image, "
        "unlabelled)"]
    table = pq.read_table(out / "manifest.parquet")
    assert sorted(Path(p).name for p in table.column("path").to_pylist()) == ["0.png"] * 2 + ["1.png"] * 2 + \
        ["2.png"] * 2
    shutil.copy(root / "cat" / "0.png", root / "copy.png")  # told of after the line of what was written, not below
    assert main(["data", "shards", "--source", f"images:{root}", "--out", str(tmp_path / "all"), "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [  # the left-out lines (it had read as of the left-out files)
        "Of them 1 repeat an earlier image exactly (the same bytes); --dedup writes each image once",
        f"Left out: 1 empty (zero-byte) file(s), e.g. {root / 'dog' / 'empty.jpg'}"]
    assert pq.read_table(tmp_path / "all" / "manifest.parquet").num_rows == 8
    (root / "copy.png").unlink()
    table = tmp_path / "t.csv"  # a table's rows naming an empty file: the same
    table.write_text("image,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted(root.rglob("*.*"))))
    assert main(["data", "shards", "--source", f"table:{table}", "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"Left out: 1 empty (zero-byte) file(s), e.g. {root / 'dog' / 'empty.jpg'}"]
    assert pq.read_table(tmp_path / "t" / "manifest.parquet").num_rows == 7


def test_data_shards_refuses_existing_output(tmp_path, capsys):
    """Writing shards over an existing dataset is refused in one line; the old files stay."""
    out = tmp_path / "digits"
    assert main(["data", "shards", "--source", "digits", "--out", str(out), "--no-progress"]) == 0
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    capsys.readouterr()
    assert main(["data", "shards", "--source", "digits", "--out", str(out), "--no-progress"]) == 2
    assert _one_line_error(capsys) == (f"error: --out: {out} already holds files; a dataset is written into a new (or "
                                       "empty) directory, over nothing")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before


def test_bad_shard_options_are_one_line(tmp_path, capsys):
    """--shard-size or --workers below 1: one line, nothing written."""
    for option, problem in (("--shard-size", "must be > 0, got 0"), ("--workers", "must be >= 1, got 0")):
        assert main(["data", "shards", "--source", "digits", "--out", str(tmp_path / "x"), option, "0"]) == 2
        assert _one_line_error(capsys) == f"error: {option}: {problem}"
    assert not (tmp_path / "x").exists()


def test_bad_source_is_one_line(tmp_path):
    """An unknown source spec: the process exits 2 with one line on stderr naming it."""
    proc = _run("data", "shards", "--source", "imagenet", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "imagenet" in proc.stderr


def test_eval_missing_checkpoint(tmp_path, capsys):
    """`pretrain eval` on a path without backbone.pt says so in one line."""
    assert main(["eval", "--checkpoint", str(tmp_path)]) == 2
    assert "backbone.pt" in _one_line_error(capsys)


def test_resume_of_a_non_run(tmp_path, capsys):
    """--resume of a directory without config.yaml is refused before anything starts."""
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in _one_line_error(capsys)


def test_batch_larger_than_the_ranks_share_is_refused(tmp_path, capsys):
    """More images a batch than each rank's share of the dataset holds: one line before anything is written (the
    workers would fail only after the cluster started); the same batch fits one rank."""
    sets = ["--set", f"job.out_dir={tmp_path}", "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set",
            "data.batch_size=1000"]
    assert main(["train", "--dry-run", *sets, "--set", "job.run_name=two", "--set", "job.num_workers=2"]) == 2
    assert _one_line_error(capsys) == ("error: data.batch_size: 1000 images a rank x 2 ranks is more than the 1797 "
                                       "samples of digits; every rank needs a full batch from its share of them")
    assert not (tmp_path / "two").exists()
    assert main(["train", "--dry-run", *sets, "--set", "job.run_name=one", "--set", "job.num_workers=1"]) == 0


def test_a_batch_some_rank_cannot_fill_in_some_epoch_is_refused(tmp_path, capsys):
    """The dataset holds a batch for every rank, but its shards go whole to the ranks: digits in shards of 600 (600,
    600, 597) give one of 2 ranks a single shard, 597 samples, less than a batch of 700 (its worker had failed once
    the cluster started, "gave no full batch"); one line before anything is written, naming what writes smaller shards
    of a built-in source (data.shard_size, not `data shards`)."""
    sets = ["--set", f"job.out_dir={tmp_path}", "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set",
            "data.shard_size=600", "--set", "job.num_workers=2", "--set", "job.run_name=r"]
    assert main(["train", "--dry-run", *sets, "--set", "data.batch_size=700"]) == 2
    assert _one_line_error(capsys) == ("error: data.batch_size: 700 images a rank is more than the 597 samples a rank "
                                       "may get in an epoch (the 3 shards of digits go whole to 2 ranks x 1 loader "
                                       "reader(s)); write smaller shards (data.shard_size, which a built-in source "
                                       "is written with), or lower data.batch_size or job.num_workers")
    assert not (tmp_path / "r").exists()
    assert main(["train", "--dry-run", *sets, "--set", "data.batch_size=597"]) == 0


def test_existing_run_dir_is_not_overwritten(tmp_path, capsys):
    """A new run into an existing run directory is refused; its files stay untouched."""
    run = tmp_path / "r1"
    run.mkdir()
    (run / "config.yaml").write_text("keep: me\n")
    assert main(["train", "--set", f"job.out_dir={tmp_path}", "--set", "job.run_name=r1"]) == 2
    assert "--resume" in _one_line_error(capsys)
    assert (run / "config.yaml").read_text() == "keep: me\n"


def test_help_lists_subcommands():
    """--help explains each subcommand."""
    proc = _run("--help")
    assert proc.returncode == 0
    for word in ("train", "stop", "eval", "search", "embed", "data", "submit"):
        assert word in proc.stdout


def test_resume_that_changes_the_methods_weights_is_refused(tmp_path, capsys):
    """A method key that changes the shapes of the method's weights or buffers (SwAV's prototypes, its queue) is
    refused on resume in one line naming it; one that does not (the temperature) is taken."""
    swav = str(Path(__file__).resolve().parents[2] / "configs" / "swav_digits.yaml")
    sets = ["--set", f"job.out_dir={tmp_path}", "--set", "job.run_name=s", "--set", f"data.cache_dir={tmp_path}"]
    assert main(["train", "--config", swav, "--dry-run", *sets]) == 0
    run = tmp_path / "s"
    capsys.readouterr()
    for override, message in [("method.num_prototypes=32", "method.num_prototypes: the checkpoints of s were saved "
                                                           "with 64, and 32 cannot load them"),
                              ("method.queue_size=512", "method.queue_size: the checkpoints of s were saved with 0")]:
        assert main(["train", "--resume", str(run), "--dry-run", "--set", override]) == 2
        assert _one_line_error(capsys).startswith(f"error: {message}")
    assert main(["train", "--resume", str(run), "--dry-run", "--set", "method.temperature=0.2",
                 "--set", "method.queue_start_steps=5"]) == 0
    assert "temperature: 0.2" in (run / "config.yaml").read_text()


def test_resume_that_changes_what_the_checkpoints_hold_is_refused(tmp_path, capsys):
    """A resume override of the method, the model, the ZeRO stage or the optimizer is refused in one line before
    anything starts (the checkpoints would not load); the run's config stays as it was. Other overrides are taken."""
    sets = ["--set", f"job.out_dir={tmp_path}", "--set", "job.run_name=r", "--set", f"data.cache_dir={tmp_path}"]
    assert main(["train", "--dry-run", *sets]) == 0
    run = tmp_path / "r"
    saved = (run / "config.yaml").read_text()
    capsys.readouterr()
    for override, message in [("zero.stage=3", "zero.stage: the checkpoints of r were saved with 2, and 3 cannot load "
                                               "them; start a new run for it"),
                              ("method.name=byol", "method.name: the checkpoints of r were saved with 'simclr'"),
                              ("model.proj_out_dim=64", "model.proj_out_dim: the checkpoints of r were saved with"),
                              ("optim.accum_steps=2", "optim.accum_steps: the checkpoints of r were saved with 1")]:
        assert main(["train", "--resume", str(run), "--dry-run", "--set", override]) == 2
        assert _one_line_error(capsys).startswith(f"error: {message}")
        assert (run / "config.yaml").read_text() == saved
    assert main(["train", "--resume", str(run), "--dry-run", "--set", "optim.lr=1e-4", "--set", "model.compile=true",
                 "--set", "zero.offload=cpu"]) == 0
    assert all(line in (run / "config.yaml").read_text() for line in ("lr: 0.0001", "compile: true", "offload: cpu"))
    # the optimizer (its state is in the checkpoints)
    assert main(["train", "--resume", str(run), "--dry-run", "--set", "optim.name=lars"]) == 2
    assert _one_line_error(capsys).startswith("error: optim.name: the checkpoints of r were saved with 'adamw', and "
                                              "'lars' cannot load them")
    # the optimizer's param groups: layer-wise lr decay and the patch projection's multiplier (a ViT run)
    vit = ["--set", "model.backbone=vit_tiny", "--set", "model.patch_size=4"]
    assert main(["train", "--dry-run", *sets[:2], "--set", "job.run_name=rv", *sets[4:], *vit]) == 0
    capsys.readouterr()
    for override in ("optim.layer_decay=0.9", "optim.patch_embed_lr_mult=0.2"):
        assert main(["train", "--resume", str(tmp_path / "rv"), "--dry-run", "--set", override]) == 2
        assert _one_line_error(capsys).startswith(f"error: {override.split('=')[0]}: the checkpoints of rv were "
                                                  "saved with 1.0")
    for override, was in (("optim.fixed_lr=[head]", "[]"), ("optim.decay_norms_and_biases=true", "False")):
        assert main(["train", "--resume", str(tmp_path / "rv"), "--dry-run", "--set", override]) == 2
        assert _one_line_error(capsys).startswith(f"error: {override.split('=')[0]}: the checkpoints of rv were "
                                                  f"saved with {was}")
    # data keys that reshape the weights: a ViT's positions (image_size), a stem's input channels
    saved = (tmp_path / "rv" / "config.yaml").read_text()
    assert main(["train", "--resume", str(tmp_path / "rv"), "--dry-run", "--set", "data.image_size=32"]) == 2
    assert _one_line_error(capsys) == ("error: data.image_size: the checkpoints of rv hold backbone.pos_embed of shape "
                                       "(1, 17, 192), and the new value makes it (1, 65, 192); start a new run for it")
    assert main(["train", "--resume", str(run), "--dry-run", "--set", "data.channels=3", "--set",
                 "data.aug.mean=[0.5, 0.5, 0.5]", "--set", "data.aug.std=[0.5, 0.5, 0.5]"]) == 2
    assert _one_line_error(capsys).startswith("error: data.aug, data.channels: the checkpoints of r hold backbone.")
    assert (tmp_path / "rv" / "config.yaml").read_text() == saved
    assert main(["train", "--resume", str(run), "--dry-run", "--set", "data.batch_size=16"]) == 0  # same weights


def test_fixed_lr_must_name_the_methods_parameters(tmp_path, capsys):
    """optim.fixed_lr names parameters by whole dotted components of their names: SimSiam's predictor is taken, a
    misspelt prefix or a partial component is refused in one line naming the method's modules, before anything is
    written."""
    simsiam = str(Path(__file__).resolve().parents[2] / "configs" / "simsiam_digits.yaml")
    sets = ["--set", f"job.out_dir={tmp_path}", "--set", f"data.cache_dir={tmp_path}"]
    for prefix in ("predictr", "pred", "predictor.", "backbone.nothing"):
        assert main(["train", "--config", simsiam, "--dry-run", *sets, "--set", "job.run_name=bad",
                     "--set", f"optim.fixed_lr=[{prefix}]"]) == 2
        line = _one_line_error(capsys)
        assert line.startswith("error: optim.fixed_lr: "), line
        if prefix != "predictor.":  # a trailing dot: the config's own check
            assert "names no trainable parameter of the model (its top-level modules with trainable parameters: " \
                   "backbone, predictor, projector)" in line
        assert not (tmp_path / "bad").exists()
    assert main(["train", "--config", simsiam, "--dry-run", *sets, "--set", "job.run_name=ok",
                 "--set", "optim.fixed_lr=[predictor, backbone.features]"]) == 0
    assert "fixed_lr:\n  - predictor\n  - backbone.features" in (tmp_path / "ok" / "config.yaml").read_text()


def test_resume_takes_no_other_config(tmp_path, capsys):
    """--resume with --config, or with a job.out_dir / job.run_name of another directory (the run stays in its own;
    they had been written into its config.yaml): refused in one line (the run keeps its own config; --set changes
    it), the config left as it was."""
    sets = ["--set", f"job.out_dir={tmp_path}", "--set", "job.run_name=r", "--set", f"data.cache_dir={tmp_path}"]
    assert main(["train", "--dry-run", *sets]) == 0
    capsys.readouterr()
    before = (tmp_path / "r" / "config.yaml").read_text()
    for key, value in (("out_dir", tmp_path / "elsewhere"), ("run_name", "zzz")):
        assert main(["train", "--resume", str(tmp_path / "r"), "--dry-run", "--set", f"job.{key}={value}"]) == 2
        assert _one_line_error(capsys) == (f"error: job.{key}: a resumed run goes on in its own directory "
                                           f"({tmp_path / 'r'}); to have it elsewhere, move the directory and resume "
                                           "it there")
    assert main(["train", "--resume", str(tmp_path / "r"), "--config", str(ROOT / "configs" / "mae_digits.yaml")]) == 2
    assert _one_line_error(capsys) == (f"error: --config: a resumed run goes on with its own config ({tmp_path / 'r'}/"
                                       "config.yaml); change its values with --set")
    assert (tmp_path / "r" / "config.yaml").read_text() == before


@pytest.mark.parametrize("argv, message", [
    (["submit", "slurm", "--join-timeout", "1.5"], "argument --join-timeout: invalid int value: '1.5' (`pretrain "
                                                   "submit slurm --help` lists the options)"),
    (["trian"], "argument command: invalid choice: 'trian' (choose from "),
    (["data", "shards", "--out", "x"], "the following arguments are required: --source (`pretrain data shards --help`"),
])
def test_an_option_argparse_refuses_is_one_line(capsys, argv, message):
    """What argparse itself refuses (a type, a choice, a missing option) is one line, as the commands' own refusals
    are (its usage block, a dozen lines for `submit slurm`, had come first), exit status 2."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err


def test_the_tracking_uri_flag_is_taken_as_given(tmp_path, capsys):
    """--tracking-uri is the store's URI exactly as given, not YAML: a '#' in a path had begun a comment (the run then
    tracked into another file, silently), and 'file:' had been a mapping."""
    uri = f"sqlite:///{tmp_path / 'a #1.db'}"
    sets = ["--set", f"job.out_dir={tmp_path}", "--set", "job.run_name=r", "--set", f"data.cache_dir={tmp_path}"]
    assert main(["train", "--dry-run", *sets, "--tracking-uri", uri]) == 0
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["tracking"]["uri"] == uri
    assert main(["train", "--dry-run", *sets, "--set", "job.run_name=s", "--tracking-uri", "file:"]) == 2
    assert "a file store" in _one_line_error(capsys)


def test_a_resume_that_changes_the_config_says_what_it_wrote(tmp_path, capsys):
    """A resume's --set values are written into the run's config.yaml, which it (or torchrun after a dry run) goes
    on with: the command names each value it changed, old and new (a dry run had rewritten the config silently); one
    that changes nothing says nothing and leaves the file as it was."""
    sets = ["--set", f"job.out_dir={tmp_path}", "--set", "job.run_name=r", "--set", f"data.cache_dir={tmp_path}"]
    assert main(["train", "--dry-run", *sets]) == 0
    capsys.readouterr()
    resume = ["train", "--resume", str(tmp_path / "r"), "--dry-run"]
    before = (tmp_path / "r" / "config.yaml").read_text()
    assert main([*resume, "--set", "job.max_steps=700", "--set", "data.batch_size=256"]) == 0  # the recipe's values
    assert "written with" not in capsys.readouterr().out
    assert (tmp_path / "r" / "config.yaml").read_text() == before
    assert main([*resume, "--set", "job.max_steps=900", "--set", "data.aug.crop_scale=[0.3, 1.0]"]) == 0
    assert f"{tmp_path / 'r' / 'config.yaml'}: written with data.aug.crop_scale [0.5, 1.0] -> [0.3, 1.0], " \
        "job.max_steps 700 -> 900 (the run goes on with them)\n" in capsys.readouterr().out
    assert "max_steps: 900" in (tmp_path / "r" / "config.yaml").read_text()


def test_gpus_the_local_machine_lacks_are_refused(tmp_path, capsys):
    """job.use_gpu: true for more workers than this machine has GPUs: one line before the local Ray cluster starts
    (Ray would wait for them forever), nothing written; a dry run (for torchrun elsewhere) is not refused."""
    import torch

    workers = torch.cuda.device_count() + 1
    sets = ["--set", f"job.out_dir={tmp_path}", "--set", "job.run_name=g", "--set", f"data.cache_dir={tmp_path}",
            "--set", "job.use_gpu=true", "--set", f"job.num_workers={workers}"]
    assert main(["train", *sets]) == 2
    assert _one_line_error(capsys) == (f"error: job.use_gpu: true gives each of the {workers} workers a GPU, and this "
                                       f"machine has {workers - 1}; set job.use_gpu=auto (GPUs where there are), "
                                       "fewer job.num_workers, or join a cluster that has them with --address")
    assert not (tmp_path / "g").exists()
    assert main(["train", "--dry-run", *sets]) == 0


def test_triton_kernels_without_a_gpu_or_the_interpreter_are_refused(tmp_path, capsys, monkeypatch):
    """method.loss_impl: triton on a machine without a GPU, its interpreter off: one line before the local Ray cluster
    starts (every worker failed on its first step), nothing written; with TRITON_INTERPRET=1 (or on a GPU) it is
    taken."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a machine with a GPU runs the kernels")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sets = ["--set", f"job.out_dir={tmp_path}", "--set", "job.run_name=t", "--set", f"data.cache_dir={tmp_path}",
            "--set", "method.loss_impl=triton"]
    assert main(["train", *sets]) == 2
    assert _one_line_error(capsys) == ("error: method.loss_impl: triton runs its kernels on CUDA tensors, and this "
                                       "machine has no GPU; set method.loss_impl=auto (PyTorch on CPU), or "
                                       "TRITON_INTERPRET=1 for Triton's interpreter (slow)")
    assert not (tmp_path / "t").exists()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["train", "--dry-run", *sets]) == 0


def test_data_that_is_not_shards_says_how_to_make_it_shards(tmp_path, capsys):
    """data.source naming a folder of images (unlabelled, or a sub-folder per class), a missing path, a source of
    `data shards` (images:PATH) or WebDataset tars without a manifest: one line naming the command that makes it a
    dataset; a dataset missing some of its shards: one line naming the first."""
    from PIL import Image

    loose, classes, tars = tmp_path / "loose", tmp_path / "classes", tmp_path / "tars"
    for d in (loose / "deep", classes / "cat", tars):
        d.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(loose / "deep" / "a.jpg")
    Image.new("RGB", (8, 8)).save(loose / "top.jpg")
    Image.new("RGB", (8, 8)).save(classes / "cat" / "b.png")
    (tars / "shard-0.tar").write_bytes(b"")
    sets = ["--set", f"job.out_dir={tmp_path / 'runs'}", "--set", "job.run_name=x"]
    expected = {
        loose: f"holds images, not shards: write them as shards first, `pretrain data shards --source images:{loose} "
               "--out <a new directory>` (unlabelled)",
        classes: f"holds images, not shards: write them as shards first, `pretrain data shards --source images:"
                 f"{classes} --out <a new directory>` (unlabelled; folder:{classes} if each sub-folder is a class)",
        tars: f"has no manifest.parquet (WebDataset tars of another tool: `pretrain data index {tars}`)",
        tmp_path / "nope": "does not exist"}
    # a dataset's shards named instead of its directory (a pattern as webdataset takes them, or one shard), a file
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "manifest.parquet").write_bytes(b"")
    (ds / "shard-000000.tar").write_bytes(b"")
    expected.update({
        ds / "shard-{000000..000009}.tar": "does not exist: data.source takes a dataset directory (the one with "
                                           f"manifest.parquet), not a pattern of its shards: {ds}",
        ds / "shard-000000.tar": f"is a file of the dataset {ds}: data.source takes the dataset directory",
        loose / "top.jpg": "is not a directory of shards (data.source takes a dataset directory with a "
                           "manifest.parquet)"})
    run = tmp_path / "a-run"  # a training run's directory, its PNG plots beside its config (it had been "images")
    run.mkdir()
    for name in ("config.yaml", "metrics.csv", "loss.png"):
        (run / name).write_text("x")
    expected[run] = ("is a training run's directory, not a dataset (its config.yaml names the data it trained on; "
                     "a shard directory is taken here)")
    for source, message in expected.items():
        assert main(["train", "--dry-run", *sets, "--set", f"data.source={source}"]) == 2
        assert _one_line_error(capsys) == f"error: data.source: {source} {message}"
    # a file:// URL is its path (it had become <cwd>/file:/...)
    assert main(["train", "--dry-run", *sets, "--set", f"data.source=file://{tmp_path / 'nope'}"]) == 2
    assert _one_line_error(capsys) == f"error: data.source: {tmp_path / 'nope'} does not exist"
    # a source of `data shards` (it had been "<cwd>/images:... does not exist")
    for kind in ("images", "folder"):
        assert main(["train", "--dry-run", *sets, "--set", f"data.source={kind}:{loose}"]) == 2
        assert _one_line_error(capsys).endswith(
            f"{kind}:{loose} does not exist: data.source takes a shard dataset; write one from those files first, "
            f"`pretrain data shards --source {kind}:{loose} --out <a new directory>`")
    # a dataset whose manifest names shards that are gone (its ranks had failed each epoch, the cluster started)
    digits = tmp_path / "digits"
    assert main(["data", "shards", "--source", "digits", "--out", str(digits), "--no-progress"]) == 0
    capsys.readouterr()
    for n, more in ((1, ""), (3, " (nor 2 more of its 8)")):
        for i in range(n):
            (digits / f"shard-00000{2 * i + 1}.tar").unlink(missing_ok=True)
        assert main(["train", "--dry-run", *sets, "--set", f"data.source={digits}"]) == 2
        assert _one_line_error(capsys) == (f"error: data.source: shard shard-000001.tar of {digits}'s manifest is not "
                                           f"there{more}; `pretrain data verify {digits}` checks a dataset whole")
    assert not (tmp_path / "runs").exists()


def test_a_misspelt_backbone_option_is_refused_before_anything_starts(tmp_path, capsys):
    """model.backbone_kwargs with an option the backbone does not take: one line naming it, from `pretrain train`
    (also --dry-run, which `submit` and torchrun runs start from) and from `python -m pretrain.train` on a run whose
    config holds it; nothing written."""
    sets = ["--set", f"job.out_dir={tmp_path}", "--set", "job.run_name=w", "--set", f"data.cache_dir={tmp_path}"]
    message = ("error: model.backbone_kwargs: backbone 'convnet' got unknown option(s) ['widht']; allowed: ['norm', "
               "'width']")
    assert main(["train", "--dry-run", *sets, "--set", "model.backbone_kwargs.widht=0.5"]) == 2
    assert _one_line_error(capsys) == message
    # values it cannot be built with, too: the backbone is built on the meta device, as each worker will build it
    vit = ["--config", str(ROOT / "configs" / "dino_vit_digits.yaml")]
    for option, problem in (("norm=xx", "ConvNet norm must be one of ('bn', 'gn'), got 'xx'"),
                            ("width=-1", "ConvNet width must be > 0, got -1")):
        assert main(["train", "--dry-run", *sets, "--set", f"model.backbone_kwargs.{option}"]) == 2
        assert _one_line_error(capsys) == f"error: model.backbone_kwargs: {problem}"
    for option, problem in (("num_heads=5", "ViT embed_dim=96 is not divisible by num_heads=5"),
                            ("depth=0", "ViT depth must be a positive int, got 0"),
                            ("global_pool=max", "ViT global_pool must be 'cls' or 'mean', got 'max'")):
        assert main(["train", "--dry-run", *vit, *sets, "--set", f"model.backbone_kwargs.{option}"]) == 2
        assert _one_line_error(capsys) == f"error: model.backbone_kwargs: {problem}"
    assert not (tmp_path / "w").exists()
    assert main(["train", "--dry-run", *sets]) == 0
    config = tmp_path / "w" / "config.yaml"
    config.write_text(config.read_text().replace("backbone_kwargs: {}", "backbone_kwargs:\n    widht: 0.5"))
    assert "widht" in config.read_text()
    from pretrain.train import main as train_main

    capsys.readouterr()
    assert train_main([str(tmp_path / "w")]) == 2
    assert _one_line_error(capsys) == message
    assert train_main([str(tmp_path / "nope")]) == 2  # had been a traceback
    assert _one_line_error(capsys) == (f"error: {tmp_path / 'nope'} is not a run directory (no config.yaml; `pretrain "
                                       "train --dry-run` writes it)")


def test_a_command_ends_its_process_as_the_interpreter_would_without_its_teardown(tmp_path):
    """`end_process` (how `pretrain` and `python -m pretrain.train` end): the command's exit status, output still in
    Python's buffers flushed, atexit handlers run, a non-daemon thread joined, and, with Triton loaded (the training
    loop's kernels), none of the reference-leak report that nanobind prints when a teardown skips its objects."""
    done = tmp_path / "thread_done"
    code = (
        "import atexit, sys, threading, time\n"
        "import kernels, triton\n"
        "atexit.register(lambda: sys.stdout.write('atexit ran'))\n"
        f"threading.Thread(target=lambda: (time.sleep(1), open({str(done)!r}, 'w').close())).start()\n"
        "sys.stdout.write('buffered, no newline; ')\n"
        "from pretrain.cli import end_process\n"
        "end_process(3)\n"
        "print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout == "buffered, no newline; atexit ran" and done.is_file()
    assert "nanobind" not in proc.stderr and "leaked" not in proc.stderr, proc.stderr[-2000:]
    # the other way to skip the teardown's collections (gc.freeze, then the interpreter's own exit) gets that report
    frozen = subprocess.run([sys.executable, "-c", "import gc, kernels, triton; gc.freeze()"], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert frozen.returncode == 0 and "nanobind: leaked" in frozen.stderr


def test_a_tracking_store_that_cannot_take_the_run_is_refused_before_anything_starts(tmp_path, capsys):
    """An MLflow server that does not answer (a closed port on 127.0.0.1) and MLflow 3's file store: one line from
    `pretrain train` (also with --dry-run), nothing written; `submit` takes an unreachable server, which the
    scheduler's nodes may see where the submitting host does not."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        sets = ["--set", f"job.out_dir={tmp_path}", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
        assert main(["train", "--dry-run", *sets, "--set", "job.run_name=h", "--tracking-uri",
                     f"http://127.0.0.1:{port}"]) == 2
        assert _one_line_error(capsys).startswith(f"error: tracking.uri: tracking server http://127.0.0.1:{port} is "
                                                  "not reachable (")
    # submit does not probe it: the scheduler's nodes may see a server the submitting host does not (a name that
    # resolves nowhere here: a loopback address is refused for a job's nodes, tests/cluster/test_slurm.py)
    assert main(["submit", "slurm", "--dry-run", *sets, "--set", "job.run_name=s", "--tracking-uri",
                 "http://mlflow.invalid:5000"]) == 0
    assert main(["train", "--dry-run", *sets, "--set", "job.run_name=f", "--tracking-uri", "file:///tmp/mlruns"]) == 2
    assert _one_line_error(capsys) == ("error: tracking URI 'file:///tmp/mlruns' is a file store, which "
                                       "MLflow 3 keeps in maintenance mode and refuses runs on; use "
                                       "sqlite:////<dir>/mlflow.db (on a shared disk for a cluster)")
    assert not (tmp_path / "h").exists() and not (tmp_path / "f").exists()


def test_outputs_that_cannot_be_written_are_refused_before_the_work(tmp_path, capsys):
    """An --out on a read-only file system (or below a file), a new run's job.out_dir below a file, and a read-only
    run directory that eval would write
    eval.json into: one line naming the path, before anything is embedded, evaluated or exported (they had ended in
    an OSError traceback after the work; eval --no-map too, on a map it was told not to draw)."""
    import os
    import subprocess

    from tests.util import write_run

    run = tmp_path / "run"
    write_run(run, "simclr_digits.yaml", tmp_path / "cache", "model.backbone_kwargs={width: 0.25}")
    blocked = run / "backbone.pt" / "sub"
    cases = [["eval", "--checkpoint", str(run), "--no-map", "--out", str(blocked / "r.json")],
             ["embed", "--checkpoint", str(run), "--data", "samples", "--out", str(blocked / "e.parquet")],
             ["export", "--checkpoint", str(run), "--out", str(blocked / "m.pt2")],
             ["extract", "--checkpoint", str(run), "--out", str(blocked)],
             ["data", "shards", "--source", "digits", "--out", str(blocked)]]
    for argv in cases:
        assert main(argv) == 2, argv
        assert _one_line_error(capsys) == (f"error: --out: {run / 'backbone.pt'} is a file, so {argv[-1]} cannot be "
                                           "written")
    # a new run's job.out_dir below a file (it had been "<file>/<run>: Not a directory")
    assert main(["train", "--dry-run", "--set", f"job.out_dir={run / 'backbone.pt'}", "--set", "job.run_name=n"]) == 2
    assert _one_line_error(capsys) == (f"error: job.out_dir: {run / 'backbone.pt'} is a file, so "
                                       f"{run / 'backbone.pt' / 'n'} cannot be written")
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only file system needs root")
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(run), str(ro)], capture_output=True).returncode:
        pytest.skip("this machine does not allow a bind mount")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True, capture_output=True)
        assert main(["eval", "--checkpoint", str(ro), "--no-map"]) == 2
        assert _one_line_error(capsys) == (f"error: --checkpoint: {ro / 'eval.json'} cannot be written: {ro} is not "
                                           "writable here (its permissions, or a read-only file system)")
        assert main(["embed", "--checkpoint", str(ro), "--data", "samples", "--out", str(ro / "e.parquet")]) == 2
        assert _one_line_error(capsys).startswith(f"error: --out: {ro / 'e.parquet'} cannot be written: {ro} is not")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_a_ray_cluster_that_does_not_answer_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    """--address of a Ray head that does not answer (a typo, a head not started yet), given or through RAY_ADDRESS for
    `auto`: one line before the run directory is written (Ray's join had retried for minutes, a line a second, and
    the run directory it left refused the retry)."""
    from tests.util import free_port

    port = free_port()
    sets = ["--set", f"job.out_dir={tmp_path}", "--set", "job.run_name=a", "--set", f"data.cache_dir={tmp_path}"]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    for address in (f"127.0.0.1:{port}", "auto"):
        assert main(["train", *sets, "--address", address]) == 2
        error = _one_line_error(capsys)
        assert error.startswith(f"error: --address {address}: no Ray cluster answers at ") and error.endswith(
            f":{port} (Connection refused); start its head with `ray start --head`, or check the address"), error
    assert not (tmp_path / "a").exists()


def test_one_command_at_a_time_writes_a_run(tmp_path, capsys):
    """While a command holds a run directory (a training, a submission writing it), another training or dry run there
    is refused in one line naming the holder (two had trained into one directory and one MLflow run, their
    checkpoints and metrics interleaved; two dry runs of one new name had both written it); once it ends, they go
    ahead, and a refused command leaves no trace."""
    import subprocess

    sets = ["--set", f"job.out_dir={tmp_path}", "--set", f"data.cache_dir={tmp_path}"]
    assert main(["train", "--dry-run", *sets, "--set", "job.run_name=r"]) == 0
    capsys.readouterr()
    holders = []
    for name in ("r", "new"):
        code = (f"import time; from pathlib import Path; from pretrain.preflight import run_lock\n"
                f"with run_lock(Path({str(tmp_path / name)!r}), new=False):\n    print('held', flush=True)\n"
                "    time.sleep(120)\n")
        holders.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True))
        assert holders[-1].stdout.readline() == "held\n"
    try:
        tries = [(["--resume", str(tmp_path / "r")], "r", holders[0]),
                 ([*sets, "--set", "job.run_name=new"], "new", holders[1])]
        for argv, name, holder in tries:
            assert main(["train", "--dry-run", *argv]) == 2
            error = _one_line_error(capsys)
            assert error.startswith(f"error: {tmp_path / name} is in use by pid {holder.pid} on "), error
            assert error.endswith(": one training at a time writes a run; wait for it to end, or stop it"), error
        assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [".pretrain.lock"]  # the holder's own
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    assert main(["train", "--dry-run", "--resume", str(tmp_path / "r"), "--set", "job.max_steps=700"]) == 0
    assert main(["train", "--dry-run", *sets, "--set", "job.run_name=new"]) == 0
    assert (tmp_path / "new" / "config.yaml").is_file()
    assert (tmp_path / "new" / ".pretrain.lock").read_text() == ""  # released: it names no process
    assert main(["train", "--dry-run", *sets, "--set", "job.run_name=new"]) == 2  # written: a new run is refused
    assert _one_line_error(capsys).startswith(f"error: job.run_name: {tmp_path / 'new'} already holds a run; ")


def test_stop_asks_the_run_and_names_the_command_training_it(tmp_path, capsys):
    """`pretrain stop RUN` leaves the request in the run (the trainer reads it: test_torchrun) and says who trains the
    run, from its lock; a path that is not a run is one line, and asks nothing."""
    import subprocess

    assert main(["train", "--dry-run", "--set", f"job.out_dir={tmp_path}", "--set", f"data.cache_dir={tmp_path}",
                 "--set", "job.run_name=r"]) == 0
    run = tmp_path / "r"
    code = (f"import time; from pathlib import Path; from pretrain.preflight import run_lock\n"
            f"with run_lock(Path({str(run)!r}), new=False):\n    print('held', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        capsys.readouterr()
        assert main(["stop", str(run)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"Asked {run} to stop: it checkpoints after the step it is on and ends there; "
                              f"`pretrain train --resume {run}` goes on from that step. It is trained by pid "
                              f"{holder.pid} on "), out
    finally:
        holder.kill()
        holder.wait()
    assert (run / "stop_requested").read_text() == ""  # asked, not yet acted on
    for path, what in ((tmp_path / "nothing", "does not exist"), (tmp_path, "is not a run directory (no config.yaml)")):
        assert main(["stop", str(path)]) == 2
        assert _one_line_error(capsys) == f"error: {path} {what}"
    assert not (tmp_path / "stop_requested").exists()


def _checkpoint(path: Path, step: int) -> Path:
    """A checkpoint folder as list_checkpoints knows one: its DeepSpeed folder and its checkpoint.json."""
    (path / "state").mkdir(parents=True)
    (path / "checkpoint.json").write_text(json.dumps({"step": step, "epoch": 0, "world_size": 1}))
    return path


def test_a_damaged_run_is_refused_in_one_line_naming_what_is_damaged(tmp_path, capsys):
    """A resume of a run whose config.yaml is empty (it had been read as the default recipe and written over), whose
    Ray checkpoints have no record of Ray's (never written: the run stopped before Ray recorded its first checkpoint;
    deleted; or emptied by a disk that filled: Ray had started the run over from step 0, or failed with a traceback),
    or whose checkpoint.json is empty (the error had been JSON's, naming no file): one line each, before anything
    starts, naming the way on (a branch from a checkpoint on disk), which a run stopped so names at its end too."""
    from pretrain.cli import _way_on

    sets = ["--set", f"job.out_dir={tmp_path}", "--set", "job.run_name=r", "--set", f"data.cache_dir={tmp_path}"]
    run = tmp_path / "r"
    assert main(["train", "--dry-run", *sets]) == 0
    capsys.readouterr()
    resume = ["train", "--resume", str(run), "--dry-run"]
    first = _checkpoint(run / "checkpoint_2026-01-01_00-00-00.000000", 4)
    _checkpoint(run / "checkpoint_2026-01-01_00-01-00.000000", 8)
    way_on = (f"go on from one as a new run with `--resume {run} --from-step N`, which checks it holds every rank's "
              "files (steps on disk: 4, 8)")
    for record, why in ((None, "is missing (the run was stopped before Ray recorded its first checkpoint, or it was "
                               "deleted)"), ("", "is unreadable (a disk that filled while it was written?)")):
        if record is not None:
            (run / "checkpoint_manager_snapshot.json").write_text(record)
        assert main(resume) == 2
        assert _one_line_error(capsys) == (
            f"error: --resume: {run} holds 2 Ray checkpoint(s) (checkpoint_*) but Ray's record of them, "
            f"checkpoint_manager_snapshot.json, {why}: Ray would start the run over; {way_on}")
        # what a run stopped so says at its end: not the resume that is refused (it had said "resume with --resume")
        assert _way_on(run) == f"; Ray had not recorded its checkpoints: {way_on}"
    # ... a branch from a checkpoint of it that holds every rank's files goes on (the way on without the record)
    second = run / "checkpoint_2026-01-01_00-01-00.000000"
    assert main(["train", "--resume", str(run), "--dry-run", "--from-step", "8"]) == 2
    assert _one_line_error(capsys) == (f"error: --from-step: Ray's record of r's checkpoints is missing, and its "
                                       f"checkpoint of step 8 lacks {second.name}/ranks/rank_00000.pt, so it is not "
                                       "whole; take another step")
    (second / "ranks").mkdir()
    torch.save({}, second / "ranks" / "rank_00000.pt")
    assert main(["train", "--resume", str(run), "--dry-run", "--from-step", "8"]) == 0
    assert "Ray's record of r's checkpoints is missing; its checkpoint of step 8 holds every rank's files" in \
        capsys.readouterr().out
    assert (tmp_path / "r-from-8" / "checkpoints" / "step_0000008" / "ranks" / "rank_00000.pt").is_file()
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": p.name} for p in sorted(run.glob("checkpoint_*"))]}))
    assert main(resume) == 0
    capsys.readouterr()
    assert _way_on(run) == f"; its latest checkpoint is step 8; resume with --resume {run}"
    assert _way_on(run, latest=False) == f"; resume with --resume {run}"
    (first / "checkpoint.json").write_text("")
    assert main(resume) == 2
    assert _one_line_error(capsys) == (f"error: {first / 'checkpoint.json'} is not JSON (empty or damaged): the "
                                       "checkpoint's record of its step")
    (run / "config.yaml").write_text("")
    assert main(resume) == 2
    assert _one_line_error(capsys).startswith(f"error: --resume: {run / 'config.yaml'} is empty (damaged;")
    assert (run / "config.yaml").read_text() == ""


def test_an_encoder_older_than_the_runs_checkpoints_is_used_with_a_warning(tmp_path, capsys):
    """A finished run resumed to train on and stopped before its new end keeps the backbone.pt of its first end:
    evaluating, embedding or exporting it uses that encoder, and says so, naming the newer step and `extract`."""
    from pretrain.evaluate import load_run_files

    write_run(tmp_path / "r", "simclr_digits.yaml", tmp_path / "cache")
    saved = torch.load(tmp_path / "r" / "backbone.pt", weights_only=True)
    torch.save({**saved, "step": 8}, tmp_path / "r" / "backbone.pt")
    load_run_files(tmp_path / "r")
    assert "Warning" not in capsys.readouterr().out
    _checkpoint(tmp_path / "r" / "checkpoints" / "step_0000008", 8)
    load_run_files(tmp_path / "r")
    assert "Warning" not in capsys.readouterr().out
    _checkpoint(tmp_path / "r" / "checkpoints" / "step_0000040", 40)
    load_run_files(tmp_path / "r")
    assert capsys.readouterr().out == (
        f"Warning: {tmp_path / 'r' / 'backbone.pt'} is the encoder of step 8; the run has trained on to its checkpoint "
        f"of step 40 since (resumed, and stopped before its end): `pretrain extract --checkpoint {tmp_path / 'r'}` "
        "takes that step's\n")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_data_shards_leaves_nothing_behind(tmp_path, sig):
    """Ctrl-C or SIGTERM (`kill`, a batch job's end) while `data shards` writes: status 128 + the signal, one line,
    and neither the output nor the temp folder it writes into is left (SIGTERM had left the temp folder, a dataset's
    size); `~` in --out=~/... is the home folder (the shell leaves it; it had been a folder named ~ and a failure)."""
    from PIL import Image

    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(4000):
        Image.new("L", (8, 8), i % 256).save(src / f"{i}.png")
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.cli", "data", "shards", "--source", f"images:{src}",
                             f"--out={tmp_path / 'ds'}", "--shard-size", "16", "--no-progress"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".ds.tmp-*/shard-000002.tar")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert err.strip().splitlines()[-1] == f"Stopped by {sig.name} (data)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]
    home = tmp_path / "home"
    home.mkdir()
    for i in range(3990):
        (src / f"{i}.png").unlink()
    done = subprocess.run([sys.executable, "-m", "pretrain.cli", "data", "shards", "--source", f"images:{src}",
                           "--out=~/ds", "--no-progress"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert (home / "ds" / "manifest.parquet").is_file() and not (tmp_path / "~").exists()


def test_a_copied_run_does_not_log_into_the_originals_mlflow_run(tmp_path, capsys):
    """`cp -r runs/r1 runs/g1` then `--resume runs/g1`: the copy had gone on in r1's MLflow run (its points and tags
    mixed into r1's, or both training into it at once); refused in one line saying how to give the copy its own. A
    run moved elsewhere (its old directory gone) goes on in its MLflow run."""
    from pretrain.tracking import MLflowTracker, default_tracking_uri

    sets = ["--set", f"job.out_dir={tmp_path}", "--set", "job.run_name=r1", "--set", f"data.cache_dir={tmp_path}"]
    assert main(["train", "--dry-run", *sets]) == 0
    original = tmp_path / "r1"
    tracker = MLflowTracker(default_tracking_uri(tmp_path), experiment="ssl-pretrain")
    tracker.set_tags({"run_dir": str(original)})  # as training tags it
    tracker.finish("KILLED")
    (original / "mlflow_run_id").write_text(tracker.run_id + "\n")
    copy = tmp_path / "g1"
    shutil.copytree(original, copy)
    capsys.readouterr()
    assert main(["train", "--resume", str(copy), "--dry-run"]) == 2
    assert _one_line_error(capsys) == (f"error: --resume: {copy} is a copy of {original}, whose MLflow run "
                                       f"{tracker.run_id} it would log into as well; delete {copy / 'mlflow_run_id'} "
                                       "to have the copy go on in an MLflow run of its own, or resume the original")
    assert main(["train", "--resume", str(original), "--dry-run"]) == 0
    shutil.rmtree(original)  # moved: the copy is the run now
    assert main(["train", "--resume", str(copy), "--dry-run"]) == 0


def test_a_config_edited_by_hand_is_checked_against_the_checkpoints_config(tmp_path, capsys):
    """config.yaml edited by hand to another ZeRO stage (or model) passed the checks, which compare a resume's
    overrides with config.yaml, and failed in the workers with a bare AssertionError; the latest checkpoint's
    checkpoint.json holds the config it was saved under, and the resume is checked against that."""
    import yaml

    from pretrain.config import load_config, to_dict

    sets = ["--set", f"job.out_dir={tmp_path}", "--set", "job.run_name=r", "--set", f"data.cache_dir={tmp_path}"]
    run = tmp_path / "r"
    assert main(["train", "--dry-run", *sets]) == 0
    saved = to_dict(load_config(run / "config.yaml"))
    ckpt = _checkpoint(run / "checkpoints" / "step_0000004", 4)
    info = json.loads((ckpt / "checkpoint.json").read_text())
    (ckpt / "checkpoint.json").write_text(json.dumps({**info, "config": saved}))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--dry-run"]) == 0
    edited = yaml.safe_load((run / "config.yaml").read_text())
    edited["zero"]["stage"] = 3 if saved["zero"]["stage"] != 3 else 2
    (run / "config.yaml").write_text(yaml.safe_dump(edited))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--dry-run"]) == 2
    assert _one_line_error(capsys) == (f"error: zero.stage: the checkpoints of r were saved with "
                                       f"{saved['zero']['stage']!r}, and {edited['zero']['stage']!r} cannot load "
                                       "them; start a new run for it")


def test_a_resume_from_a_checkpoint_cut_short_is_refused_naming_the_file(tmp_path, capsys):
    """A latest checkpoint with a file cut short (a disk that filled while it was written) had failed in the workers
    a minute in, naming no file ("PytorchStreamReader failed"), and every resume the same: refused in one line naming
    the file and the last whole step to extract. torch.save's files are zip archives: their last bytes tell."""
    sets = ["--set", f"job.out_dir={tmp_path}", "--set", "job.run_name=r", "--set", f"data.cache_dir={tmp_path}"]
    run = tmp_path / "r"
    assert main(["train", "--dry-run", *sets]) == 0
    for step in (4, 8):
        ckpt = _checkpoint(run / "checkpoints" / f"step_{step:07d}", step)
        torch.save({"weights": torch.arange(1000.0)}, ckpt / "state" / "mp_rank_00_model_states.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--dry-run"]) == 0
    cut = run / "checkpoints" / "step_0000008" / "state" / "mp_rank_00_model_states.pt"
    cut.write_bytes(cut.read_bytes()[:-100])
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--dry-run"]) == 2
    assert _one_line_error(capsys) == (
        "error: --resume: the latest checkpoint of r (step 8) is damaged: checkpoints/step_0000008/state/"
        "mp_rank_00_model_states.pt is cut short (a disk that filled or a job stopped while it was written?); the run "
        f"cannot go on from it; `--from-step 4` goes on from its last whole one as a new run, `pretrain extract "
        f"--checkpoint {run} --step 4` takes that one's encoder")
    # ... which goes on from step 4 as a new run beside it, the run left as it is; refused in one line each: a step
    # without a checkpoint, the damaged one, --from-step alone, a branch that is there already
    (run / "metrics.csv").write_text("step,loss\n" + "".join(f"{s},{9 - s}\n" for s in range(1, 9)))
    for args, message in (
            (["--from-step", "5"], "--from-step: r has no checkpoint of step 5 (its checkpoints: 4, 8)"),
            (["--from-step", "8"], "--from-step: the checkpoint of step 8 of r is damaged: checkpoints/step_0000008/"
                                   "state/mp_rank_00_model_states.pt is cut short"),
            (["--from-step", "4", "--set", "job.max_steps=4", "--set", "optim.warmup_steps=1"],
             "job.max_steps: 4 leaves nothing to train after step 4; raise it")):
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "--dry-run", *args]) == 2
        assert _one_line_error(capsys) == f"error: {message}"
    capsys.readouterr()
    assert main(["train", "--dry-run", "--from-step", "4", *sets]) == 2
    assert _one_line_error(capsys) == ("error: --from-step: goes with --resume RUN_DIR (the run whose checkpoint to go "
                                       "on from)")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(["train", "--resume", str(run), "--dry-run", "--from-step", "4"]) == 0
    assert f"Branched from {run} at step 4 (that run is left as it is)" in capsys.readouterr().out
    branch = tmp_path / "r-from-4"
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert sorted(p.name for p in (branch / "checkpoints").iterdir()) == ["step_0000004"]
    model = branch / "checkpoints" / "step_0000004" / "state" / "mp_rank_00_model_states.pt"
    assert os.path.samefile(model, run / "checkpoints" / "step_0000004" / "state" / "mp_rank_00_model_states.pt")
    assert (branch / "metrics.csv").read_text() == "step,loss\n" + "".join(f"{s},{9 - s}\n" for s in range(1, 5))
    assert "run_name: r-from-4\n" in (branch / "config.yaml").read_text()
    assert main(["train", "--resume", str(branch), "--dry-run"]) == 0  # a run of its own now
    assert main(["train", "--resume", str(run), "--dry-run", "--from-step", "4"]) == 2
    assert _one_line_error(capsys) == (f"error: job.run_name: {branch} already holds a run; continue it with --resume "
                                       f"{branch}, or name another with --set job.run_name=NAME")
    # the source's own name given is refused too (it had become r-from-4 without a word)
    assert main(["train", "--resume", str(run), "--dry-run", "--from-step", "4", "--set", "job.run_name=r"]) == 2
    assert _one_line_error(capsys) == (f"error: job.run_name: {run} already holds a run; continue it with --resume "
                                       f"{run}, or name another with --set job.run_name=NAME")
    # a resume goes on in its MLflow run: another experiment is refused (it was ignored); a branch takes one
    (run / "mlflow_run_id").write_text("0123456789abcdef\n")
    other = ["--set", "tracking.experiment=elsewhere"]
    assert main(["train", "--resume", str(run), "--dry-run", *other]) == 2
    assert _one_line_error(capsys) == ("error: tracking.experiment: a resumed run goes on in its MLflow run, of "
                                       "experiment 'ssl-pretrain'; `--from-step N` goes on from a checkpoint as a new "
                                       "run, in an experiment of its choosing")
    assert main(["train", "--resume", str(run), "--dry-run", "--from-step", "4", "--set", "job.run_name=b2",
                 *other]) == 0
    assert "experiment: elsewhere\n" in (tmp_path / "b2" / "config.yaml").read_text()
    assert json.loads((tmp_path / "b2" / "branched_from.json").read_text()) == {
        "run_dir": str(run), "step": 4, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "mlflow_run_id": "0123456789abcdef"}  # what the MLflow run of the branch is tagged with
    assert main(["train", "--resume", str(run), "--dry-run", "--from-step", "4", "--config", str(ROOT / "configs" /
                 "mae_digits.yaml")]) == 2  # (it was ignored)
    assert _one_line_error(capsys) == ("error: --config: a branch goes on with its run's config; change its values "
                                       "with --set")
    # a run moved since (its out_dir stale), or whose out_dir is relative to another working directory: the branch
    # goes beside it where it is now (it had gone to out_dir, and begun another MLflow store there)
    moved = tmp_path / "moved"
    moved.mkdir()
    run.rename(moved / "r")
    assert main(["train", "--resume", str(moved / "r"), "--dry-run", "--from-step", "4"]) == 0
    assert (moved / "r-from-4" / "checkpoints" / "step_0000004").is_dir()
    assert f"out_dir: {moved}\n" in (moved / "r-from-4" / "config.yaml").read_text()
