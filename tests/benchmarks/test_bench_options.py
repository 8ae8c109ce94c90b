"""Every benchmark script refuses a bad option in one line ("error: ..." and exit status 2, without argparse's usage
block) before it measures or writes anything."""

from pathlib import Path

import pytest

from benchmarks import bench_data, bench_kernels, bench_memory, bench_train

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {"data": bench_data, "kernels": bench_kernels, "memory": bench_memory, "train": bench_train}


@pytest.mark.parametrize("script, argv, message", [
    ("data", ["--runs", "0"], "argument --runs: must be >= 1, got 0"),
    ("data", ["--threads", "two"], "argument --threads: not an integer: 'two'"),
    ("data", ["--jpegs", "16"], "argument --jpegs: must be >= 64, got 16"),  # fewer than one batch: nothing timed
    ("data", ["--set", "data.batch_size=8"], "--set: it applies to a --config recipe; give one"),
    ("data", ["--batches", "2"], "--batches: it applies to a --config recipe; give one"),
    ("data", ["--out", "{tmp}/train.csv"], "--out: {tmp}/train.csv is not a CSV of this benchmark's rows"),
    ("kernels", ["--ops", "ntxent,bogus"], "--ops: 'bogus' not among ntxent,dino,gather"),
    ("kernels", ["--smoke", "--providers", "triton,nope"], "--providers: 'nope' not among eager,compile,chunked,"),
    ("kernels", ["--budget-s", "-1"], "--budget-s: must be > 0, got -1"),
    ("kernels", ["--case-timeout-s", "0"], "--case-timeout-s: must be > 0, got 0"),
    ("kernels", ["--report", "{tmp}/none.csv"], "--report: {tmp}/none.csv is not a file"),
    ("kernels", ["--report", "{tmp}/other.csv"], "--report: {tmp}/other.csv is not a CSV of bench_kernels rows"),
    ("kernels", ["--smoke", "--out", "{tmp}"], "--out: {tmp} is a directory; give the CSV file"),
    # below a file: refused before measuring (it had measured, then died creating the folder)
    ("kernels", ["--smoke", "--out", "{tmp}/notes.txt/k.csv"], "--out: {tmp}/notes.txt is a file, so "),
    ("memory", ["--out", "{tmp}/notes.txt/m.csv"], "--out: {tmp}/notes.txt is a file, so "),
    ("train", ["--out", "{tmp}/notes.txt/t.csv"], "--out: {tmp}/notes.txt is a file, so "),
    ("kernels", ["--ops", ","], "--ops: names none of ntxent,dino,gather"),
    ("kernels", ["--budget-s", "nan"], "--budget-s: must be > 0, got nan"),
    ("kernels", ["--report", "{tmp}/partial.csv"], "--report: {tmp}/partial.csv is not a CSV of bench_kernels rows"),
    ("kernels", ["--smoke", "--device", "cuda"], "--smoke runs the GPU sweep's code path on the CPU"),
    ("kernels", ["--smoke", "--quick"], "--quick: --smoke runs its own tiny sweep; give one or the other"),
    ("kernels", ["--quick", "--device", "cpu", "--providers", "triton"], "nothing to measure: --providers triton on "
                                                                         "cpu (Triton runs on a GPU, or on the CPU"),
    ("memory", ["--budget-s", "nan"], "argument --budget-s: must be > 0, got nan"),
    ("memory", ["--backbones", "vit_tiny,convnet"], "--backbones: 'convnet' not among the ViT backbones vit_tiny,"),
    ("memory", ["--image-size", "30", "--patch-size", "8"], "--patch-size: 8 does not divide --image-size 30"),
    ("memory", ["--batch", "0"], "argument --batch: must be >= 1, got 0"),
    ("memory", ["--out", "{tmp}/notes.txt"], "--out: {tmp}/notes.txt is not a CSV of this benchmark's rows"),
    # a CSV of other columns: bench_kernels had rewritten it under its columns (its rows lost), the others had appended
    # rows under its header
    ("kernels", ["--smoke", "--out", "{tmp}/train.csv"], "--out: {tmp}/train.csv is not a CSV of this benchmark's"),
    ("memory", ["--out", "{tmp}/train.csv"], "--out: {tmp}/train.csv is not a CSV of this benchmark's rows"),
    ("train", ["--out", "{tmp}/other.csv"], "--out: {tmp}/other.csv is not a CSV of this benchmark's rows"),
    ("kernels", ["--smoke", "--out", "/proc/x1"], "--out: /proc/x1 cannot be written"),  # had named a temp file
    # pretrain train's data checks, before measuring (had measured model-only, or a ResNet-50 step, then failed)
    ("train", ["--set", "data.source={tmp}/nonexistent"], "data.source: {tmp}/nonexistent does not exist"),
    ("train", ["--config", "configs/simclr_resnet50_imagenet.yaml"], "data.source: /data/imagenet-train does not"),
    ("train", ["--steps", "1"], "argument --steps: must be >= 2, got 1"),
    ("train", ["--steps", "5", "--warmup", "5"], "--warmup: 5 leaves none of the 5 --steps to measure"),
    ("train", ["--config", "{tmp}/none.yaml"], "config file not found: {tmp}/none.yaml"),
    ("train", ["--set", "model.backbone=bogus"], "model.backbone: unknown backbone 'bogus'"),
    ("train", ["--set", "job.num_workers=0"], "job.num_workers"),
    # checked as `pretrain train` checks them (the run had failed ~10 s in, its error below a blank line)
    ("train", ["--set", "method.queue_size=10"], "method.queue_size: "),
    ("train", ["--set", "tracking.uri=http://127.0.0.1:1"], "tracking.uri: "),
    # keys the benchmark sets itself: the run had measured ~50 s, then died on the metrics.csv of another run name
    ("train", ["--set", "job.run_name=mine"], "job.run_name: the benchmark names its own run"),
    ("train", ["--set", "job.out_dir={tmp}/runs"], "job.out_dir: the benchmark runs in a temporary folder"),
    ("train", ["--set", "job={{run_name: mine}}"], "job.run_name: the benchmark names its own run"),  # {{ }}: format
    # had ended in a ConfigError traceback from the model-only part, which loaded the recipe without the run's sets
    ("train", ["--steps", "5", "--warmup", "1", "--set", "job.max_steps=3"], "job.max_steps: the benchmark sets it "
                                                                             "from --steps"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, capsys, script, argv, message):
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    (tmp_path / "train.csv").write_bytes((ROOT / "benchmarks" / "results" / "train.csv").read_bytes())
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "partial.csv").write_text("time_utc,provider\n2026-12-03T00:00:00+00:00,eager\n")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(SystemExit) as e:
        SCRIPTS[script].main([a.format(tmp=tmp_path) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err  # (argparse's usage block had come first)
    assert message.format(tmp=tmp_path) in err[0], err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, nothing appended


def test_data_on_a_gpu_the_machine_lacks_is_refused_before_any_work(capsys):
    """bench_data --device cuda without CUDA: one line before it writes its shards (it had ended in a DALI traceback
    after writing them)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a machine with a GPU runs it")
    with pytest.raises(SystemExit) as e:
        bench_data.main(["--device", "cuda"])
    assert e.value.code == 2
    assert "--device cuda: this machine has no GPU that torch can use" in capsys.readouterr().err


@pytest.mark.parametrize("key", [s.partition("=")[0] for s in bench_train._run_sets(5, "/tmp")])
def test_train_refuses_every_key_it_sets_itself(capsys, key):
    """Each key bench_train's run sets over the recipe is refused as a --set, in one line naming it, before any work."""
    with pytest.raises(SystemExit) as e:
        bench_train.main(["--steps", "5", "--warmup", "1", "--set", f"{key}=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {key}: the benchmark "), err


def test_kernels_on_a_cuda_device_the_machine_lacks_is_refused_in_one_line(capsys):
    """bench_kernels --device cuda without CUDA: exit 2 and `error: ...`, as every other refusal (it had exited 1)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a machine with a GPU runs it")
    with pytest.raises(SystemExit) as e:
        bench_kernels.main(["--device", "cuda", "--ops", "gather"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: --device cuda: this machine has no GPU")


def test_train_resolves_a_relative_config_against_the_users_directory(tmp_path, monkeypatch, capsys):
    """A relative --config is the file where the user runs, not one at the same path in the repo: a file only in the
    user's directory is checked (here refused for its data), one only in the repo is not found."""
    (tmp_path / "configs").mkdir()
    recipe = (ROOT / "configs" / "simclr_digits.yaml").read_text()
    (tmp_path / "configs" / "mine.yaml").write_text(recipe.replace("source: digits", "source: missing-here"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        bench_train.main(["--config", "configs/mine.yaml"])
    assert e.value.code == 2
    assert f"data.source: {tmp_path}/missing-here does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench_train.main(["--config", "configs/simclr_digits.yaml"])  # in the repo, not here
    assert e.value.code == 2
    assert f"config file not found: {tmp_path}/configs/simclr_digits.yaml" in capsys.readouterr().err
