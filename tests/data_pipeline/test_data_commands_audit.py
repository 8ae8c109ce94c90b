"""`pretrain data shards / index / verify` on what a user audit found them to get wrong: a dataset URL given to verify
or with a query string, hand-made tars that index and verify told apart, links and hidden folders in image sources,
a JSON-lines error's line, plurals. Real files, tars and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipeline.shards import read_manifest, write_shards
from pretrain.cli import main
from pretrain.config import ConfigError, DataConfig
from pretrain.data import resolve_shards
from tests.http_fixture import serve


def _encode(seed: int, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    out = io.BytesIO()
    (image.convert("P") if fmt == "GIF" else image).save(out, format=fmt)
    return out.getvalue()


def test_verify_refuses_a_url_and_names_a_missing_folder(digits_dir, tmp_path, capsys):
    """A served dataset's URL is refused in one line that says what to do (it had become the local path http:/...,
    "no manifest.parquet"); a folder that does not exist says so."""
    with serve(digits_dir.parent) as (base, seen):
        url = f"{base}/{digits_dir.name}"
        assert main(["data", "verify", url, "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {url}: a dataset served over HTTP is not verified over HTTP; run `pretrain data verify DIR` on the "
        "directory the server serves, where its files lie")
    assert main(["data", "verify", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'}: does not exist"


@pytest.mark.parametrize("suffix", ["?x=1", "#part", "/?X-Amz-Signature=abc"])
def test_a_dataset_url_with_a_query_or_fragment_is_refused_before_any_fetch(digits_dir, suffix):
    """`data.source=<url>?x=1` fetched `<url>?x=1/manifest.parquet` and failed on "Parquet magic bytes"; now it is
    refused in one line naming the URL, and nothing is fetched."""
    with serve(digits_dir.parent) as (base, seen):
        url = f"{base}/{digits_dir.name}{suffix}"
        with pytest.raises(ConfigError) as e:
            resolve_shards(dataclasses.replace(DataConfig(), source=url))
        assert not seen
    message = str(e.value)
    assert message.startswith(f"data.source: {url}: a dataset URL with a query string or fragment")
    assert "\n" not in message


def _tars(root) -> None:
    """Hand-made tars: two whole ones, one holding a GIF named .jpg beside a JPEG, an empty tar, a file named .tar
    that is no tar, and a gzipped tar."""
    root.mkdir()
    for shard in range(2):
        with wds.TarWriter(str(root / f"a{shard}.tar")) as sink:
            for i in range(3):
                sink.write({"__key__": f"a{shard}{i}", "jpg": _encode(10 * shard + i), "cls": i % 2})
    with wds.TarWriter(str(root / "g.tar")) as sink:
        sink.write({"__key__": "g0", "jpg": _encode(7)})
        sink.write({"__key__": "g1", "jpg": _encode(8, "GIF")})
    with wds.TarWriter(str(root / "e.tar")):
        pass
    (root / "f_nottar.tar").write_bytes(b"this is not a tar, only text that someone named .tar\n" * 40)
    (root / "m_gz.tar.gz").write_bytes(b"\x1f\x8b" + bytes(100))


def test_index_and_verify_agree_on_hand_made_tars(tmp_path, capsys):
    """Index and verify count the same shards and report the same damaged tar (a file named .tar that is no tar had
    gone unmentioned by verify); a GIF named .jpg is left out at index time with a `problem:` line, as `data shards`
    leaves one out; a .tar.gz is named as not read; indexing again says how."""
    root = tmp_path / "tars"
    _tars(root)
    assert main(["data", "index", str(root), "--no-progress"]) == 0
    summary, *problems = capsys.readouterr().out.splitlines()
    assert summary.startswith(f"Indexed 7 samples (0 with captions) in 3 shards: {root / 'manifest.parquet'}; 2 other "
                              ".tar file(s) hold no sample of it; 1 compressed tar(s) not read; left out 1 ")
    assert "; 1 shard(s) damaged, indexed up to the damage" in summary
    damaged = [p for p in problems if p.startswith("problem: f_nottar.tar: does not read to its end (")]
    assert len(damaged) == 1 and damaged[0].endswith("; indexed up to there: 0 sample(s)")
    assert "problem: g.tar: sample 'g1' left out (a GIF image, which DALI does not decode)" in problems
    assert "problem: e.tar: holds no sample (not part of the dataset)" in problems
    assert problems[-1] == ("problem: m_gz.tar.gz: not read: a compressed tar (readers read plain .tar files only; "
                            "decompress it beside the others, e.g. `gunzip`, and index again)")
    assert sorted(read_manifest(root).column("key").to_pylist()) == ["a00", "a01", "a02", "a10", "a11", "a12", "g0"]

    assert main(["data", "verify", str(root), "--no-progress"]) == 1
    *found, summary = capsys.readouterr().out.splitlines()
    assert found == [damaged[0].removesuffix("; indexed up to there: 0 sample(s)")]
    assert summary == f"Verified {root}: 3 shards, 7 of 7 samples read: 1 problem(s)"

    assert main(["data", "index", str(root), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {root} already has a manifest.parquet: it is a dataset already (to index it again, after adding or "
        "changing tars, delete its manifest.parquet and checksums.json first)")


def test_a_linked_image_keeps_its_own_path(tmp_path):
    """An image and a link to it are two files read: the manifest names each by its own path (the link had been
    recorded as its target, two rows naming one file), and the duplicate note names both."""
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "odd.jpg").write_bytes(_encode(0))
    (root / "zlink.jpg").symlink_to(root / "odd.jpg")
    write_shards(f"images:{root}", tmp_path / "all", progress=False)
    assert sorted(read_manifest(tmp_path / "all").column("path").to_pylist()) == [str(root / "odd.jpg"),
                                                                                  str(root / "zlink.jpg")]
    write_shards(f"images:{root}", tmp_path / "once", progress=False, dedup=True)
    table = read_manifest(tmp_path / "once")
    assert table.column("path").to_pylist() == [str(root / "odd.jpg")]
    assert json.loads(table.schema.metadata[b"left_out"]) == [
        f"1 exact duplicate(s) of an earlier image (the same bytes), e.g. {root / 'zlink.jpg'} (as {root / 'odd.jpg'})"]


def test_hidden_folders_and_files_are_listed_as_left_out(tmp_path, image_tree, capsys):
    """`folder:` skipped a hidden class folder with images without a word (an empty folder was listed); both sources
    now list hidden folders and files under "Left out"."""
    root = image_tree(tmp_path / "tree", classes={"cat": 2, "dog": 1, ".hidden": 3})
    (root / "cat" / ".DS_Store").write_bytes(b"\0")
    (root / "cat" / ".ipynb_checkpoints").mkdir()
    assert main(["data", "shards", "--source", f"folder:{root}", "--out", str(tmp_path / "f"), "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"Wrote 3 images (2 classes) in 1 shard: {tmp_path / 'f' / 'manifest.parquet'}"
    assert out[1:] == [
        f"Left out: 2 hidden folder(s) (names starting with a dot), not read, e.g. {root / '.hidden'} (rename one to "
        "include its images)",
        f"Left out: 1 hidden file(s) (names starting with a dot), not read, e.g. {root / 'cat' / '.DS_Store'}"]
    assert main(["data", "shards", "--source", f"images:{root / 'cat'}", "--out", str(tmp_path / "i"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"Wrote 2 images (unlabelled) in 1 shard: {tmp_path / 'i' / 'manifest.parquet'}"
    assert [line.split(",")[0] for line in out[1:]] == ["Left out: 1 hidden folder(s) (names starting with a dot)",
                                                        "Left out: 1 hidden file(s) (names starting with a dot)"]


def test_one_of_each_is_singular(tmp_path, capsys):
    """`data shards` of one image in one class: "1 image (1 class) in 1 shard" (it had said "1 classes", "1 shards");
    verify of it: "1 shard"."""
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    (tmp_path / "tree" / "cat" / "a.jpg").write_bytes(_encode(0))
    assert main(["data", "shards", "--source", f"folder:{tmp_path / 'tree'}", "--out", str(tmp_path / "d"),
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == (f"Wrote 1 image (1 class) in 1 shard: "
                                               f"{tmp_path / 'd' / 'manifest.parquet'}")
    assert main(["data", "verify", str(tmp_path / "d"), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == f"Verified {tmp_path / 'd'}: 1 shard, 1 of 1 sample read: intact"


def test_a_bad_json_lines_row_names_its_line(tmp_path, capsys):
    """A JSON-lines table whose second line is no JSON: the error names line 2 (pyarrow's "in row 1" counts from 0),
    blank lines counted as the editor shows them."""
    (tmp_path / "a.jpg").write_bytes(_encode(0))
    table = tmp_path / "t.jsonl"
    table.write_text('{"image": "a.jpg"}\n\n{"image": "a.jpg", oops}\n')
    assert main(["data", "shards", "--source", f"table:{table}", "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: source 'table:{table}': {table} does not parse as jsonl: line 3: ")
    assert "in row" not in err
    table.write_text('{"image": "a.jpg"}\n[1, 2]\n')
    assert main(["data", "shards", "--source", f"table:{table}", "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().endswith("does not parse as jsonl: line 2: a JSON list, not an object")


def test_a_missing_checksummed_tar_without_samples_is_no_problem(tmp_path, capsys):
    """A tar index read that holds no sample of the dataset (an empty tar) and is deleted later is no problem of the
    dataset: verify checks such tars for damage only while they are there."""
    root = tmp_path / "tars"
    _tars(root)
    (root / "f_nottar.tar").unlink()
    assert main(["data", "index", str(root), "--no-progress"]) == 0
    os.remove(root / "e.tar")
    capsys.readouterr()
    assert main(["data", "verify", str(root), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == f"Verified {root}: 3 shards, 7 of 7 samples read: intact"
