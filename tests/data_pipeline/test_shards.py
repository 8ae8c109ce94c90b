"""Shard writing: manifest, checksums, sources, bad specs, atomicity, reuse."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import shards as shards_mod
from data_pipeline.reader import read_epoch
from data_pipeline.shards import (
    CHECKSUMS,
    MANIFEST,
    builtin_dir_name,
    ensure_digits_shards,
    list_shards,
    read_classes,
    read_manifest,
    sha256_file,
    verify_dataset,
    write_shards,
)
from data_pipeline.sources import DIGIT_WORDS, digit_caption, digits_uint8, image_digest


def test_digits_manifest_matches_shards(digits_dir):
    """Every manifest row names a sample that is in its shard with that label, byte size, caption and digest."""
    table = read_manifest(digits_dir)
    assert table.column_names == ["key", "shard", "label", "bytes", "caption", "path", "digest"]
    assert table.num_rows == 1797 and set(table.column("path").to_pylist()) == {None}  # built in: no file
    rows = {r["key"]: r for r in table.to_pylist()}
    seen = 0
    for path in list_shards(digits_dir):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            row = rows[key]
            assert row["shard"] == path.rsplit("/", 1)[1]
            if ext == "cls":
                assert int(data) == row["label"]
            elif ext == "txt":
                assert data.decode() == row["caption"]
                assert data.decode() == digit_caption(row["label"], int(key.split("_")[1]))
            else:
                assert ext == "png" and len(data) == row["bytes"] and image_digest(data) == row["digest"]
                seen += 1
    assert seen == 1797


def test_digits_pixels_and_labels_roundtrip(digits_dir):
    """A PNG in the shards decodes to the digits_uint8 pixels of its key, with its label."""
    images, labels = digits_uint8()
    path = list_shards(digits_dir)[3]
    with tarfile.open(path) as tar:
        names = sorted(m.name for m in tar.getmembers())[:6]
        for name in names:
            key, ext = name.split(".", 1)
            i = int(key.split("_")[1])
            data = tar.extractfile(name).read()
            if ext == "png":
                np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), images[i])
            elif ext == "txt":
                assert data.decode() == digit_caption(labels[i], i)
            else:
                assert int(data) == labels[i]


def test_shard_size_respected(digits_dir):
    """Shards hold shard_size samples each, the last one the remainder."""
    counts = read_manifest(digits_dir).group_by("shard").aggregate([("key", "count")]).sort_by("shard")
    assert counts.column("key_count").to_pylist() == [256] * 7 + [1797 - 7 * 256]


def test_checksums_match_and_verify(digits_dir):
    """checksums.json holds the sha256 of every shard; list_shards(verify=True) accepts them."""
    sums = json.loads((digits_dir / "checksums.json").read_text())
    paths = list_shards(digits_dir, verify=True)
    assert sorted(sums) == [p.rsplit("/", 1)[1] for p in paths]
    for p in paths:
        assert sums[p.rsplit("/", 1)[1]] == sha256_file(p)


def test_verify_names_changed_shard(digits_copy):
    """A changed shard fails verification with an error naming it."""
    victim = digits_copy / "shard-000002.tar"
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-000002.tar"):
        list_shards(digits_copy, verify=True)


def test_checksums_that_do_not_parse_are_one_line(digits_copy, capsys):
    """A checksums.json cut short or edited into something else: `data verify` reports it as a problem of the dataset
    (naming the file) and checks the rest; list_shards(verify=True) refuses in one line; none is a traceback."""
    from pretrain.cli import main

    path = digits_copy / "checksums.json"
    for text, problem in (('{"shard-000000.tar": "ab', "does not parse as JSON"),
                          ("[]", "not a JSON object of shard name -> sha256")):
        path.write_text(text)
        assert main(["data", "verify", str(digits_copy), "--no-progress"]) == 1
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"problem: {path}: {problem}") and out[0].endswith("(the shards' bytes are not "
                                                                                   "checked)")
        assert out[-1].endswith(": 1 problem(s)")
        with pytest.raises(ValueError, match=f"^{path}: {problem}"):
            list_shards(digits_copy, verify=True)
    path.unlink()
    with pytest.raises(ValueError, match=r"^.*digits: no checksums\.json to check the shards against$"):
        list_shards(digits_copy, verify=True)


def test_data_verify_passes_an_intact_dataset_and_names_each_problem(digits_copy, tmp_path, image_tree, corrupt,
                                                                      capsys):
    """`pretrain data verify`: the digits as written are intact (status 0); a shard cut short (its checksum, the damage
    and the manifest's samples it lost named), a shard gone, a sample whose image is a broken JPEG (with
    --decode): each named on a line of its own, with status 1."""
    from pretrain.cli import main

    assert main(["data", "verify", str(digits_copy), "--decode", "--no-progress"]) == 0
    assert capsys.readouterr().out == (f"Verified {digits_copy}: 8 shards, 1797 of 1797 samples read, 0 undecodable: "
                                       "intact\n")
    cut = digits_copy / "shard-000002.tar"
    cut.write_bytes(cut.read_bytes()[:40_000])
    (digits_copy / "shard-000005.tar").unlink()
    assert main(["data", "verify", str(digits_copy), "--no-progress"]) == 1
    *problems, summary = capsys.readouterr().out.splitlines()
    cut_short = "problem: shard-000002.tar: sha256 differs from checksums.json (changed or damaged since written)"
    assert problems[0] == cut_short and problems[-1] == "problem: shard-000005.tar: missing"
    lost = [line for line in problems if "sample(s) of the manifest not in it" in line]
    assert len(lost) == 1 and lost[0].startswith("problem: shard-000002.tar: ")
    # cut inside a member's data it is a read error; inside a header it reads without one (webdataset, like tar, takes
    # a short header for the end) but is no whole tar: either is named, once (a header cut short had gone unsaid)
    damage = set(problems) - {cut_short, lost[0], problems[-1]}
    assert len(damage) == 1 and damage.pop().removeprefix("problem: shard-000002.tar: ").startswith(
        ("does not read to its end (", "ends in a member header cut short (at byte "))
    read = int(summary.split(" of 1797")[0].rsplit(" ", 1)[1])
    assert summary == f"Verified {digits_copy}: 8 shards, {read} of 1797 samples read: {len(problems)} problem(s)"
    assert read < 1797 - 256

    root = image_tree(tmp_path / "imgs", classes={"a": 3, "b": 3})
    corrupt(root / "a" / "0.jpg")
    write_shards(f"folder:{root}", tmp_path / "ds", progress=False)
    assert main(["data", "verify", str(tmp_path / "ds"), "--no-progress"]) == 0  # the bytes are as written
    capsys.readouterr()
    assert main(["data", "verify", str(tmp_path / "ds"), "--decode", "--no-progress"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("problem: shard-000000.tar: sample '0000000")
    assert lines[0].endswith(f"' (from {root / 'a' / '0.jpg'}): the image does not decode")  # the file it was
    assert lines[1] == f"Verified {tmp_path / 'ds'}: 1 shard, 6 of 6 samples read, 1 undecodable: 1 problem(s)"
    assert main(["data", "verify", str(tmp_path / "imgs"), "--no-progress"]) == 2


def test_folder_source_labels_and_classes(tmp_path, image_tree):
    """Folder labels are sorted class indices, classes go into the manifest, bytes are stored unchanged; a sub-folder
    without an image (__MACOSX of a zip, a class not collected yet) is no class, and noted."""
    root = image_tree(tmp_path / "imgs", classes={"zebra": 3, "ant": 4, "moose": 2})
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._0.jpg").write_bytes(b"AppleDouble")
    (root / "llama").mkdir()
    write_shards(f"folder:{root}", tmp_path / "ds", shard_size=4, progress=False)
    assert read_classes(tmp_path / "ds") == ["ant", "moose", "zebra"]
    assert json.loads(read_manifest(tmp_path / "ds").schema.metadata[b"left_out"]) == [
        f"1 hidden file(s) (names starting with a dot), not read, e.g. {root / '__MACOSX' / '._0.jpg'}",
        "2 sub-folder(s) without an image, not classes: __MACOSX, llama"]
    table = read_manifest(tmp_path / "ds")
    assert sorted(table.column("label").to_pylist()) == [0] * 4 + [1] * 2 + [2] * 3
    assert len(list_shards(tmp_path / "ds")) == 3
    stored = {}
    for path in list_shards(tmp_path / "ds"):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                stored[m.name] = tar.extractfile(m).read()
    originals = sorted(p.read_bytes() for p in root.rglob("*.*") if "__MACOSX" not in p.parts)
    assert sorted(v for k, v in stored.items() if not k.endswith(".cls")) == originals
    assert {k.rsplit(".", 1)[1] for k in stored} == {"jpg", "png", "cls"}
    # each row names the file its image was read from: those bytes, under that class
    for row in table.to_pylist():
        file = Path(row["path"])
        assert file.is_absolute() and stored[f"{row['key']}.{file.suffix[1:]}"] == file.read_bytes()
        assert read_classes(tmp_path / "ds")[row["label"]] == file.parent.name


def test_images_source_is_unlabelled_at_any_depth(tmp_path, image_tree):
    """images:PATH takes every image under PATH, loose or in sub-folders of any depth (hidden ones left out), unlabelled
    (-1, no class names), bytes unchanged; the reader yields them with label -1."""
    root = image_tree(tmp_path / "imgs", classes={"a": 2, "a/deeper": 2, ".thumbs": 2})
    image_tree(tmp_path / "loose", classes={"": 3}, seed=1)
    for p in (tmp_path / "loose").iterdir():
        p.rename(root / f"loose-{p.name}")
    write_shards(f"images:{root}", tmp_path / "ds", shard_size=4, progress=False)
    assert read_classes(tmp_path / "ds") == []
    table = read_manifest(tmp_path / "ds")
    assert table.column("label").to_pylist() == [-1] * 7
    stored = []
    for path in list_shards(tmp_path / "ds"):
        with tarfile.open(path) as tar:
            stored += [tar.extractfile(m).read() for m in tar.getmembers() if not m.name.endswith(".cls")]
    wanted = [p.read_bytes() for p in root.rglob("*.*") if ".thumbs" not in p.parts]
    assert sorted(stored) == sorted(wanted) and len(wanted) == 7
    samples = list(read_epoch(list_shards(tmp_path / "ds"), rank=0, world_size=1, num_workers=0))
    assert len(samples) == 7 and {s["label"] for s in samples} == {-1}


def test_linked_folders_and_files_are_followed_once_and_hidden_ones_skipped(tmp_path, image_tree):
    """Datasets assembled from symbolic links (DVC, git-annex, class subsets) are read whole: a linked folder's images
    and a linked file are taken, a link to the folder it is in does not loop, a folder reached through two links is
    taken once, a link to nothing is left out and noted; hidden folders and files (.ipynb_checkpoints, ._x.jpg) are
    skipped at any depth, in images:PATH and in folder:PATH's class folders alike."""
    real = image_tree(tmp_path / "real", classes={"cats": 3, "dogs": 2})
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    (data / "cat" / "more").symlink_to(real / "cats")  # a linked folder inside a class folder
    (data / "cat" / "again").symlink_to(real / "cats")  # the same folder through a second link: once
    (data / "cat" / "loop").symlink_to(data / "cat")  # a link to the folder it is in: no loop
    (data / "dog").symlink_to(real / "dogs")  # a linked class folder
    one = sorted((real / "dogs").iterdir())[0]
    (data / "cat" / "linked.png").symlink_to(one)  # a linked file
    (data / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # a link to nothing
    (data / "cat" / ".ipynb_checkpoints").mkdir()
    (data / "cat" / ".ipynb_checkpoints" / "copy.png").write_bytes(one.read_bytes())
    (data / "cat" / "._linked.png").write_bytes(b"AppleDouble, not an image")
    write_shards(f"folder:{data}", tmp_path / "labelled", progress=False)
    rows = read_manifest(tmp_path / "labelled").to_pylist()
    names = read_classes(tmp_path / "labelled")
    got = sorted((names[r["label"]], r["path"]) for r in rows)  # the manifest names each file as it was read
    expected = sorted([("cat", str(data / "cat" / "again" / p.name)) for p in (real / "cats").iterdir()]
                      + [("cat", str(data / "cat" / "linked.png"))]
                      + [("dog", str(data / "dog" / p.name)) for p in (real / "dogs").iterdir()])
    assert got == expected and len(got) == 6
    meta = read_manifest(tmp_path / "labelled").schema.metadata
    assert json.loads(meta[b"left_out"]) == [
        f"1 image link(s) to nothing, e.g. {data / 'cat' / 'gone.png'}",
        f"1 hidden folder(s) (names starting with a dot), not read, e.g. {data / 'cat' / '.ipynb_checkpoints'} (rename "
        "one to include its images)",
        f"1 hidden file(s) (names starting with a dot), not read, e.g. {data / 'cat' / '._linked.png'}"]
    write_shards(f"images:{data}", tmp_path / "unlabelled", progress=False)
    assert sorted(r["path"] for r in read_manifest(tmp_path / "unlabelled").to_pylist()) == sorted(p for _, p in got)


def test_what_a_walk_leaves_out_is_noted_and_a_class_linking_to_another_is_no_class(tmp_path, image_tree):
    """Files of other types (a phone's HEIC, a GIF) and names that are not UTF-8 text (a Latin-1 archive's: the
    manifest holds text, and the write had failed after every shard) are left out and noted by kind; .jfif/.jpe are
    JPEGs and taken; a caption's .txt is no other type. A class folder that links to another class's folder (or into
    it) would read its images twice under two labels: it is no class, and noted, whatever the names' order."""
    root = image_tree(tmp_path / "imgs", classes={"cat": 2, "dog": 2})
    jpeg = (root / "cat" / "0.jpg").read_bytes()
    (root / "cat" / "5.jfif").write_bytes(jpeg)
    (root / "dog" / "6.JPE").write_bytes(jpeg)
    (root / "cat" / "0.txt").write_text("a cat")
    for i in range(3):
        (root / "dog" / f"clip{i}.gif").write_bytes(b"GIF89a")
    (root / "cat" / "photo.HEIC").write_bytes(b"heic")
    (root / "cat" / "notes").write_bytes(b"x")
    os.mkdir(os.fsencode(root / "dog") + b"/caf\xe9")
    for name in (b"/caf\xe9/1.jpg", b"/../cat/\xe9t\xe9.jpg"):
        with open(os.fsencode(root / "dog") + name, "wb") as f:
            f.write(jpeg)
    (root / "a-kitty").symlink_to(root / "cat")  # sorts before cat: cat is still the class, read once
    (root / "pup").symlink_to(root / "dog")
    write_shards(f"folder:{root}", tmp_path / "ds", progress=False)
    names = read_classes(tmp_path / "ds")
    assert names == ["cat", "dog"]
    rows = read_manifest(tmp_path / "ds").to_pylist()
    got = sorted((names[r["label"]], Path(r["path"]).name) for r in rows)
    assert got == [("cat", "0.jpg"), ("cat", "1.png"), ("cat", "5.jfif"), ("dog", "0.jpg"), ("dog", "1.png"),
                   ("dog", "6.JPE")]
    notes = json.loads(read_manifest(tmp_path / "ds").schema.metadata[b"left_out"])
    assert notes[0].startswith("5 file(s) of other types (.gif: 3, .heic: 1, no suffix: 1; images are .jpg/")
    assert notes[1].startswith("2 file(s) or folder(s) whose names are not UTF-8 text, e.g. b'")
    assert notes[2] == "2 sub-folder(s) that lead to a folder read already (links), not classes: a-kitty, pup"
    assert len(notes) == 3
    write_shards(f"images:{root}", tmp_path / "unlabelled", progress=False)
    assert len(read_manifest(tmp_path / "unlabelled")) == 6


def test_files_that_are_no_image_are_left_out_and_noted(tmp_path, image_tree, capsys):
    """Files named as images whose bytes are none (a web page saved as .jpg, random bytes, an error message) are left
    out when written, noted with the others left out (training had skipped each every epoch; a dataset of only such
    had failed after its cluster started); an image cut short, whose header reads, is kept (where it is read it is
    skipped and counted); a source of no image at all is refused, nothing written."""
    from pretrain.cli import main
    from tests.data_pipeline.conftest import undecodable_png

    root = image_tree(tmp_path / "imgs", classes={"a": 3, "b": 3})
    (root / "a" / "page.jpg").write_bytes(b"<!DOCTYPE html><html><body>404 Not Found</body></html>")
    (root / "b" / "noise.png").write_bytes(np.random.default_rng(0).bytes(300))
    (root / "b" / "cut.png").write_bytes(undecodable_png())
    assert main(["data", "shards", "--source", f"folder:{root}", "--out", str(tmp_path / "ds"), "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"Left out: 2 file(s) that are no image training decodes, e.g. {root / 'a' / 'page.jpg'} (no image format PIL "
        "knows)"]
    kept = {Path(p).relative_to(root).as_posix() for p in read_manifest(tmp_path / "ds").column("path").to_pylist()}
    assert len(kept) == 7 and "b/cut.png" in kept and not kept & {"a/page.jpg", "b/noise.png"}
    (tmp_path / "junk").mkdir()
    for i in range(3):
        (tmp_path / "junk" / f"{i}.jpg").write_bytes(b"Access denied")
    assert main(["data", "shards", "--source", f"images:{tmp_path / 'junk'}", "--out", str(tmp_path / "none"),
                 "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: source 'images:{tmp_path / 'junk'}': none of its 3 images could be read as one when written, e.g. "
        f"{tmp_path / 'junk' / '0.jpg'} (no image format PIL knows)")
    assert not (tmp_path / "none").exists() and not list(tmp_path.glob(".none.tmp-*"))


def test_exact_duplicates_are_told_and_left_out_on_request(tmp_path, image_tree, capsys):
    """An image copied within its class and one copied into another class: written as they are, the manifest's digest
    tells them (the same for a copy, distinct otherwise) and the command says how many; with --dedup the copies are
    left out, the first of each kept under its key, noted with the labelling conflict, and the output is the same
    for any number of workers."""
    import shutil

    from pretrain.cli import main

    root = image_tree(tmp_path / "imgs", classes={"a": 4, "b": 3})
    shutil.copy(root / "a" / "0.jpg", root / "a" / "9.jpg")  # a copy in the same class
    shutil.copy(root / "a" / "1.png", root / "b" / "8.png")  # a copy under another class
    assert main(["data", "shards", "--source", f"folder:{root}", "--out", str(tmp_path / "all"), "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "Of them 2 repeat an earlier image exactly (the same bytes); --dedup writes each image once"]
    rows = {Path(r["path"]).relative_to(root).as_posix(): r for r in read_manifest(tmp_path / "all").to_pylist()}
    assert len(rows) == 9 and len({r["digest"] for r in rows.values()}) == 7
    assert rows["a/0.jpg"]["digest"] == rows["a/9.jpg"]["digest"] and rows["a/1.png"]["digest"] == rows["b/8.png"][
        "digest"]
    for workers in ("1", "3"):
        out = tmp_path / f"dedup{workers}"
        assert main(["data", "shards", "--source", f"folder:{root}", "--out", str(out), "--no-progress", "--dedup",
                     "--shard-size", "2", "--workers", workers]) == 0
        assert capsys.readouterr().out.splitlines()[1:] == [
            f"Left out: 2 exact duplicate(s) of an earlier image (the same bytes), e.g. {root / 'a' / '9.jpg'} (as "
            f"{root / 'a' / '0.jpg'}); 1 of them under another class than the image they repeat"]
    kept = {Path(r["path"]).relative_to(root).as_posix(): r for r in read_manifest(tmp_path / "dedup1").to_pylist()}
    assert sorted(kept) == sorted(set(rows) - {"a/9.jpg", "b/8.png"})
    assert all(kept[p]["key"] == rows[p]["key"] and kept[p]["label"] == rows[p]["label"] for p in kept)
    for name in ("checksums.json", "manifest.parquet", *[f"shard-{i:06d}.tar" for i in range(4)]):
        assert (tmp_path / "dedup1" / name).read_bytes() == (tmp_path / "dedup3" / name).read_bytes(), name


def test_images_stream_and_workers_write_the_same_bytes(tmp_path, image_tree, monkeypatch):
    """Each image is read from disk as its sample is written (reads and tar writes alternate: nothing is read up
    front), and shards written 3 at a time are byte for byte those written one at a time (checksums, manifest)."""
    from pathlib import Path

    import webdataset as wds

    root = image_tree(tmp_path / "imgs", classes={"a": 9, "b": 8, "c": 7})
    events = []
    read, write = Path.read_bytes, wds.TarWriter.write
    with monkeypatch.context() as m:
        m.setattr(Path, "read_bytes", lambda self: events.append("read") or read(self))
        m.setattr(wds.TarWriter, "write", lambda self, obj: events.append("write") or write(self, obj))
        write_shards(f"folder:{root}", tmp_path / "one", shard_size=5, progress=False, workers=1)
    assert events == ["read", "write"] * 24
    write_shards(f"folder:{root}", tmp_path / "three", shard_size=5, progress=False, workers=3)
    for name in ("checksums.json", "manifest.parquet", *[f"shard-{i:06d}.tar" for i in range(5)]):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes(), name
    assert not (tmp_path / "one" / "shard-000005.tar").exists()


def test_webp_bmp_tiff_are_read_and_decoded(tmp_path):
    """A photo crop saved as PNG, lossless WebP, BMP and TIFF (.tif): all four are sharded under their own extension,
    read back by the reader and decoded by the DALI graph (CPU) to the very same view."""
    from sklearn.datasets import load_sample_images

    from data_pipeline.dali import DaliAugmenter
    from data_pipeline.views import AugmentConfig

    crop = Image.fromarray(load_sample_images().images[1][100:160, 200:280])
    (tmp_path / "imgs").mkdir()
    for fmt, suffix, kw in [("PNG", "png", {}), ("WEBP", "webp", {"lossless": True}), ("BMP", "bmp", {}),
                            ("TIFF", "tif", {})]:
        crop.save(tmp_path / "imgs" / f"crop.{suffix}", format=fmt, **kw)
    write_shards(f"images:{tmp_path / 'imgs'}", tmp_path / "ds", progress=False)
    samples = list(read_epoch(list_shards(tmp_path / "ds"), rank=0, world_size=1, num_workers=0))
    with tarfile.open(list_shards(tmp_path / "ds")[0]) as tar:
        assert {m.name.rsplit(".", 1)[1] for m in tar.getmembers()} == {"png", "webp", "bmp", "tiff", "cls"}
    dali = DaliAugmenter(AugmentConfig.disabled(mean=[0.5] * 3, std=[0.25] * 3), batch_size=4, image_size=32,
                         channels=3, num_views=1, device="cpu")
    views = dali([s["image"] for s in samples])[0]
    assert views.shape == (4, 3, 32, 32)
    for i in range(1, 4):
        torch.testing.assert_close(views[i], views[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("mnist", "unknown source 'mnist'"),
        ("folder:", "empty folder path"),
        ("images:", "empty folder path"),
        ("folder:/does/not/exist", "is not a directory"),
        ("images:/does/not/exist", "is not a directory"),
        ("EMPTY", r"no images \(.jpg/.jpeg/.png/.webp/.bmp/.tif/.tiff\)"),
        ("LOOSE", r"no images \(.*\) in class sub-folders of .*loose \(unlabelled images: use 'images:"),
    ],
)
def test_bad_source_one_line_error_and_nothing_written(tmp_path, spec, match, image_tree):
    """A bad source spec raises a one-line ValueError naming the problem and writes nothing."""
    if spec == "EMPTY":
        (tmp_path / "empty" / "cls").mkdir(parents=True)
        spec = f"folder:{tmp_path / 'empty'}"
    if spec == "LOOSE":  # images but no class sub-folders: folder: points to images:
        spec = f"folder:{image_tree(tmp_path / 'loose', classes={'': 2})}"
    with pytest.raises(ValueError, match=match) as err:
        write_shards(spec, tmp_path / "out", progress=False)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [d for d in ("empty", "loose") if d in spec]


def test_crash_leaves_no_dataset(tmp_path, monkeypatch):
    """A crash while writing leaves neither out_dir nor the temp dir behind."""
    calls = []

    def failing_sha(path):
        calls.append(path)
        raise OSError("disk gone")

    monkeypatch.setattr(shards_mod, "sha256_file", failing_sha)  # fail after the shards are written
    with pytest.raises(OSError, match="disk gone"):
        write_shards("digits", tmp_path / "out", progress=False)
    assert calls and list(tmp_path.iterdir()) == []


def test_existing_dir_refused(digits_dir, tmp_path):
    """Writing into a non-empty directory, over a file, or below one, is refused before any work."""
    with pytest.raises(ValueError, match="already exists and is not an empty directory"):
        write_shards("digits", digits_dir, progress=False)
    (tmp_path / "notes.txt").write_text("mine\n")
    with pytest.raises(ValueError, match=f"^out_dir {tmp_path / 'notes.txt'} is a file; a dataset is written as a "):
        write_shards("digits", tmp_path / "notes.txt", progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine\n"
    with pytest.raises(ValueError, match=f"^out_dir {tmp_path / 'notes.txt' / 'ds'}: {tmp_path / 'notes.txt'} is a "
                                         "file, not a folder to write into$"):
        write_shards("digits", tmp_path / "notes.txt" / "ds", progress=False)


def test_ensure_digits_reuses(digits_dir):
    """ensure_digits_shards returns the existing shards without rewriting them."""
    before = {p: (digits_dir / p).stat().st_mtime_ns for p in ["manifest.parquet", "shard-000000.tar"]}
    paths = ensure_digits_shards(digits_dir.parent, shard_size=256)
    assert paths == list_shards(digits_dir)
    assert before == {p: (digits_dir / p).stat().st_mtime_ns for p in before}


def test_cache_dir_of_another_layout_is_one_line(tmp_path):
    """A cache entry with files but no manifest (an older nested layout) is named, and left as it was."""
    stale = tmp_path / builtin_dir_name("digits", 256)
    (stale / "digits-v1").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"^data.cache_dir: .* holds files but no manifest.parquet") as e:
        ensure_digits_shards(tmp_path, shard_size=256)
    assert "\n" not in str(e.value) and [p.name for p in stale.iterdir()] == ["digits-v1"]


def test_digit_captions_name_the_label_and_vary():
    """Each digits caption names its digit (as a numeral or a word), is fixed per sample, and templates vary."""
    captions = [digit_caption(label, i) for i, label in enumerate([7] * 40)]
    assert all("7" in c.split() or "seven" in c.replace(",", "").split() for c in captions)
    assert len(set(captions)) >= 5 and captions == [digit_caption(7, i) for i in range(40)]
    assert all(DIGIT_WORDS[d] in digit_caption(d, 1) or str(d) in digit_caption(d, 1) for d in range(10))


def test_folder_captions_from_sidecar_text(tmp_path, image_tree):
    """An image's caption is the .txt beside it (same stem, UTF-8, stripped, a byte-order mark dropped); images
    without one, or with a blank one, have none; a caption file that is not UTF-8 leaves its image without a caption,
    noted (it had failed the whole dataset halfway through writing)."""
    root = image_tree(tmp_path / "imgs", classes={"a": 3, "b": 2})
    (root / "a" / "0.txt").write_text("a red fox\n", encoding="utf-8")
    (root / "b" / "1.txt").write_text("une façade", encoding="utf-8")
    write_shards(f"folder:{root}", tmp_path / "ds", shard_size=2, progress=False)
    assert shards_mod.count_captions(tmp_path / "ds") == 2
    stored = {}
    for path in list_shards(tmp_path / "ds"):
        with tarfile.open(path) as tar:
            stored.update({m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".txt")})
    assert sorted(v.decode() for v in stored.values()) == ["a red fox", "une façade"]
    manifest = read_manifest(tmp_path / "ds").to_pylist()
    assert sorted(r["caption"] for r in manifest if r["caption"]) == ["a red fox", "une façade"]
    (root / "a" / "2.txt").write_bytes("façade en latin-1".encode("latin-1"))
    (root / "b" / "0.txt").write_bytes("\ufeffwith a byte-order mark\r\n".encode("utf-8"))
    (root / "a" / "1.txt").write_text("  \n", encoding="utf-8")
    write_shards(f"folder:{root}", tmp_path / "ds2", shard_size=2, progress=False)
    rows = {Path(r["path"]).relative_to(root).as_posix(): r["caption"] for r in read_manifest(tmp_path / "ds2")
            .to_pylist()}
    assert rows == {"a/0.jpg": "a red fox", "a/1.png": None, "a/2.jpg": None, "b/0.jpg": "with a byte-order mark",
                    "b/1.png": "une façade"}
    assert json.loads(read_manifest(tmp_path / "ds2").schema.metadata[b"left_out"]) == [
        f"the captions of 1 image(s), whose caption files are not UTF-8 text, e.g. {root / 'a' / '2.txt'}"]


@pytest.mark.parametrize("kind", ["csv", "tsv", "parquet", "jsonl"])
def test_table_source_pairs_images_with_captions_and_labels(tmp_path, image_tree, kind):
    """table:FILE: image paths relative to the table (or absolute), captions, class-name labels (sorted and numbered;
    an empty one unlabelled); the samples in the table's order, the bytes as they were; the same from every format."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    root = image_tree(tmp_path / "imgs", classes={"x": 4})
    files = sorted((root / "x").iterdir())
    rows = {"image": [f"imgs/x/{files[0].name}", str(files[1]), f"imgs/x/{files[2].name}", f"imgs/x/{files[3].name}"],
            "caption": ["a red fox", None, "une façade", "  "],
            "label": ["fox", "cat", "", "fox"]}
    table = pa.table(rows)
    file = tmp_path / f"pairs.{kind}"
    if kind == "parquet":
        pq.write_table(table, file)
    elif kind == "jsonl":
        file.write_text("".join(json.dumps({k: rows[k][i] for k in rows}) + "\n" for i in range(4)))
    else:
        pcsv.write_csv(table, file, write_options=pcsv.WriteOptions(delimiter="\t" if kind == "tsv" else ","))
    write_shards(f"table:{file}", tmp_path / "ds", shard_size=3, progress=False)
    manifest = sorted(read_manifest(tmp_path / "ds").to_pylist(), key=lambda r: r["key"])
    assert [r["caption"] for r in manifest] == ["a red fox", None, "une façade", None]
    assert [r["label"] for r in manifest] == [1, 0, -1, 1]
    assert shards_mod.read_classes(tmp_path / "ds") == ["cat", "fox"]
    samples = sorted(read_epoch(list_shards(tmp_path / "ds"), rank=0, world_size=1, num_workers=0),
                     key=lambda s: s["key"])
    assert [s["image"] for s in samples] == [f.read_bytes() for f in files]


def test_table_integer_ids_are_the_classes_they_name(tmp_path, image_tree):
    """Integer labels: the ids present, in numeric order, are the classes (sparse ids, say database keys up to 10^6,
    give 3 classes, not a million names); an empty one is unlabelled."""
    root = image_tree(tmp_path / "imgs", classes={"x": 5})
    files = sorted((root / "x").iterdir())
    ids = ["1000000", "7", "", "1000000", "42"]
    (tmp_path / "ids.csv").write_text("image,label\n" + "".join(f"{f},{i}\n" for f, i in zip(files, ids)))
    write_shards(f"table:{tmp_path / 'ids.csv'}", tmp_path / "ds", progress=False)
    manifest = read_manifest(tmp_path / "ds").to_pylist()
    assert shards_mod.read_classes(tmp_path / "ds") == ["7", "42", "1000000"]
    by_file = {r["path"]: r["label"] for r in manifest}
    assert [by_file[str(f)] for f in files] == [2, 0, -1, 2, 1]


def test_table_source_refusals(tmp_path, image_tree):
    """A table without an image column, a row naming a missing file, integer labels below -1: one line, nothing
    written."""
    root = image_tree(tmp_path / "imgs", classes={"x": 1})
    name = next((root / "x").iterdir()).name
    cases = [("path,caption\nimgs/x/a.jpg,hi\n", r"no 'image' column \(columns: path, caption\)"),
             (f"image\nimgs/x/{name}\nimgs/x/gone.png\n", r"line 3: .*gone\.png is not a readable file"),
             (f"image,label\nimgs/x/{name},-2\n", "labels must be >= 0"),
             ("image\nnotes.txt\n", r"line 2: image 'notes\.txt' is not a \.jpg/.* file name"),
             ("image\nhttps://example.com/a.jpg\n",
              r"line 2: image 'https://example\.com/a\.jpg' is a URL; table: reads image files on this machine")]
    for i, (text, match) in enumerate(cases):
        (tmp_path / f"t{i}.csv").write_text(text)
        with pytest.raises(ValueError, match=match) as err:
            write_shards(f"table:{tmp_path / f't{i}.csv'}", tmp_path / "out", progress=False)
        assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"is not a file \(expected 'table:FILE'"):
        write_shards(f"table:{tmp_path / 'none.csv'}", tmp_path / "out", progress=False)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [{"bytes": b"\x89PNG" + bytes(5000), "path": "a.png"}]}), tmp_path / "hf.parquet")
    with pytest.raises(ValueError, match=r"the 'image' column holds struct<.*>, not file paths \(a table of image "
                                         r"bytes") as err:
        write_shards(f"table:{tmp_path / 'hf.parquet'}", tmp_path / "out", progress=False)
    assert len(str(err.value)) < 300  # the image's bytes are not in the message


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
def test_a_refused_table_row_is_named_by_its_line_in_the_file(tmp_path, image_tree, kind):
    """A row naming a missing file is named where an editor shows it: its line in a CSV or TSV (the header line 1, a
    blank line and a caption over two lines counted) or JSON-lines file, its row from 1 in a Parquet file (messages
    had counted data rows from 0: "row 3" for line 6)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = image_tree(tmp_path / "imgs", classes={"x": 3})
    good = [str(f) for f in sorted((root / "x").iterdir())]
    gone = str(tmp_path / "gone.png")
    file = tmp_path / f"t.{kind}"
    sep = "\t" if kind == "tsv" else ","
    if kind == "parquet":
        pq.write_table(pa.table({"image": [*good, gone], "caption": ["a", "b\nc", "d", "e"]}), file)
    elif kind == "jsonl":
        lines = [json.dumps({"image": f, "caption": "x"}) for f in good]  # lines 1, 3, 4; 2 blank; 5 the gone file
        file.write_text("\n".join([lines[0], "", lines[1], lines[2], json.dumps({"image": gone})]) + "\n")
    else:  # line 1 the header, 2 a row, 3 blank, 4-5 one row (its caption over two lines), 6 a row, 7 the gone file
        file.write_text(f"image{sep}caption\n{good[0]}{sep}a\n\n{good[1]}{sep}\"two\nlines\"\n{good[2]}{sep}d\n"
                        f"{gone}{sep}e\n")
    where = {"csv": "line 7", "tsv": "line 7", "jsonl": "line 5", "parquet": "row 4"}[kind]
    with pytest.raises(ValueError, match=re.escape(f": {where}: {gone} is not a readable file") + "$") as err:
        write_shards(f"table:{file}", tmp_path / "out", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_table_columns_as_people_write_them(tmp_path, image_tree):
    """Column names in any case and with spaces around them (a CSV header "image, Label"); integer ids that pandas
    stored as floats for a missing value (1.0, 10.0, NaN: ids 1 and 10, in numeric order, not the names "1.0" and
    "10.0"); a caption "NA" stays text; columns it does not read are named in what it left out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = image_tree(tmp_path / "imgs", classes={"x": 4})
    files = sorted((root / "x").iterdir())
    (tmp_path / "t.csv").write_text("Image, Label, Caption ,url\n" + "".join(
        f"{f},{label},{caption},http://x\n" for f, label, caption in zip(files, ["cat", "dog", "", "cat"],
                                                                          ["NA", "a dog", "null", ""])))
    write_shards(f"table:{tmp_path / 't.csv'}", tmp_path / "csv", progress=False)
    rows = {r["path"]: r for r in read_manifest(tmp_path / "csv").to_pylist()}
    assert [rows[str(f)]["label"] for f in files] == [0, 1, -1, 0]
    assert [rows[str(f)]["caption"] for f in files] == ["NA", "a dog", "null", None]
    meta = read_manifest(tmp_path / "csv").schema.metadata
    assert json.loads(meta[b"left_out"]) == ["the column(s) 'url' of the table (it reads image, caption or text, and "
                                             "label)"]
    floats = pa.table({"image": [str(f) for f in files], "label": pa.array([10.0, 1.0, float("nan"), 2.0])})
    pq.write_table(floats, tmp_path / "f.parquet")  # as pandas writes [10, 1, None, 2]: float64, NaN
    write_shards(f"table:{tmp_path / 'f.parquet'}", tmp_path / "floats", progress=False)
    assert shards_mod.read_classes(tmp_path / "floats") == ["1", "2", "10"]
    rows = {r["path"]: r["label"] for r in read_manifest(tmp_path / "floats").to_pylist()}
    assert [rows[str(f)] for f in files] == [2, 0, -1, 1]


def test_files_gone_while_written_are_left_out_and_an_empty_folder_given_is_written_into(tmp_path, image_tree,
                                                                                         monkeypatch):
    """A file deleted after the walk and before its shard is written (a collection still being edited: the write had
    failed whole on it) is left out and noted. --out an empty folder that cannot be replaced by a rename (a link to
    one, as a mount point): the dataset is written inside it (it had failed after every shard, keeping nothing)."""
    import data_pipeline.shards as shards

    root = image_tree(tmp_path / "imgs", classes={"": 6})
    real = shards.resolve_source

    def resolve_then_delete(spec):
        src = real(spec)
        (root / "3.png").unlink()  # walked, and gone before its turn
        return src

    monkeypatch.setattr(shards, "resolve_source", resolve_then_delete)
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    write_shards(f"images:{root}", tmp_path / "link", shard_size=2, progress=False)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / MANIFEST).is_file()
    assert sorted(p.name for p in (tmp_path / "target").iterdir()) == sorted(
        [MANIFEST, CHECKSUMS, *(f"shard-{i:06d}.tar" for i in range(3))])
    table = read_manifest(tmp_path / "link")
    assert sorted(Path(p).name for p in table.column("path").to_pylist()) == ["0.jpg", "1.png", "2.jpg", "4.jpg",
                                                                               "5.png"]
    notes = json.loads(table.schema.metadata[b"left_out"])
    assert notes == [f"1 image file(s) that could not be read when written (deleted or moved meanwhile?), e.g. "
                     f"{root / '3.png'} (No such file or directory)"]
    counts, problems = verify_dataset(tmp_path / "link", decode=True, progress=False)
    assert not problems and counts["read"] == 5
