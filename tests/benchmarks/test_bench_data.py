"""bench_data --config measures a recipe's own data path (its data.source, augmentation and views) and appends its rows
to --out; a recipe whose data cannot be read is refused in one line before anything is measured."""

import csv
from pathlib import Path

import pytest

from benchmarks import bench_data

ROOT = Path(__file__).resolve().parents[2]


def _run(capsys, argv: list[str]) -> list[str]:
    assert bench_data.main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_recipe_rows_are_printed_and_appended_under_the_header(tmp_path, capsys):
    """simclr_digits: its built-in source built on first use (in data.cache_dir), one row per provider printed and
    appended under the header, stamped, with the recipe and its overrides."""
    out, cache = tmp_path / "data.csv", f"data.cache_dir={tmp_path}/cache"
    argv = ["--config", "configs/simclr_digits.yaml", "--set", cache, "--runs", "1", "--batches", "2",
            "--out", str(out)]
    lines = _run(capsys, argv)
    assert any(line.startswith(f"# recipe: simclr_digits.yaml {cache}  data.source: digits (") for line in lines)
    table = [line.split()[:3] for line in lines if line.startswith("digits 16px ")]
    assert [t[2] for t in table] == ["dali", "pil", "stream"]
    assert lines[-1] == f"Appended 3 rows to {out}"
    assert out.read_text().splitlines()[0] == ",".join(bench_data.FIELDS)
    rows = list(csv.DictReader(out.open()))
    assert [r["provider"] for r in rows] == ["dali", "pil", "stream"]
    for r in rows:
        assert r["recipe"] == f"simclr_digits.yaml {cache}" and r["dataset"] == "digits 16px"
        assert (r["views"], r["batch"], r["threads"], r["device"], r["runs"]) == ("2x16px", "256", "2", "cpu", "1")
        assert float(r["images_per_s"]) >= float(r["slowest_images_per_s"]) > 0 and r["time"] and r["git_sha"]


def test_recipe_local_crops_are_made_by_dali_and_the_stream(tmp_path, capsys, digits_shards):
    """dino_digits on a shard directory: DALI and the stream make its 2 global views and 2 local crops; PIL, the
    reference, its global views alone, and the printout says so."""
    source = Path(digits_shards[0]).parent
    lines = _run(capsys, ["--config", "configs/dino_digits.yaml", "--set", f"data.source={source}", "--threads", "1",
                          "--runs", "1", "--batches", "1", "--out", str(tmp_path / "d.csv")])
    assert any(line.startswith("# pil: the reference augmenter makes the global views with data.aug alone")
               for line in lines)
    rows = list(csv.DictReader((tmp_path / "d.csv").open()))
    assert {r["provider"]: r["views"] for r in rows} == {"dali": "2x16px+2x12px", "pil": "2x16px",
                                                         "stream": "2x16px+2x12px"}
    assert {(r["dataset"], r["threads"]) for r in rows} == {(f"{source.name} 16px", "1")}


@pytest.mark.parametrize("argv, message", [
    (["--set", "data.source={tmp}/nonexistent"], "error: data.source: {tmp}/nonexistent does not exist"),
    (["--set", "data.batch_size=4096"], "error: data.batch_size: 4096 images a rank x 1 ranks is more than the"),
    (["--set", "data.bogus=1"], "error: data.bogus: unknown key"),
    (["--out", "{tmp}"], "error: --out: {tmp} is a directory"),
    (["--jpegs", "64"], "error: --jpegs: sizes the built-in JPEG dataset, which --config replaces"),
])
def test_recipe_that_cannot_be_measured_is_refused_before_any_work(tmp_path, capsys, argv, message):
    """A recipe whose data is missing or too small, a bad override, or an --out folder: one line, exit 2, nothing
    printed on stdout and nothing written."""
    with pytest.raises(SystemExit) as e:
        bench_data.main(["--config", "configs/simclr_digits.yaml", "--set", f"data.cache_dir={tmp_path}/cache",
                         "--out", str(tmp_path / "d.csv"), *[a.format(tmp=tmp_path) for a in argv]])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(message.format(tmp=tmp_path)), err
    assert not (tmp_path / "d.csv").exists()
