"""`pretrain data index`: WebDataset shards written by another tool (img2dataset's layout: <key>.jpg, <key>.txt,
<key>.json; no labels) become a dataset in place; runs read them unlabelled with their captions."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from data_pipeline.reader import read_epoch
from data_pipeline.shards import read_manifest, sha256_file
from pretrain.cli import main
from pretrain.config import DataConfig
from pretrain.data import resolve_shards


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def _img2dataset_like(root: Path) -> dict[str, str | None]:
    """3 tars of 10 samples as img2dataset writes them (key, jpg, txt, json); in the second one sample has no
    caption, one has no image (a failed download), one a label that is not a number; in the third one image is the
    very file of the first sample (the same URL crawled twice). Returns {key: caption} of the samples an index
    keeps."""
    root.mkdir()
    kept = {}
    for shard in range(3):
        with wds.TarWriter(str(root / f"{shard:05d}.tar")) as sink:
            for i in range(10):
                key = f"{shard:05d}{i:04d}"
                sample = {"__key__": key, "jpg": _jpeg(0 if (shard, i) == (2, 7) else 10 * shard + i),
                          "txt": f"photo {key}",
                          "json": json.dumps({"url": f"https://example.com/{key}.jpg"})}
                if shard == 1 and i == 3:
                    del sample["txt"]
                if shard == 1 and i == 4:
                    del sample["jpg"]
                if shard == 1 and i == 5:
                    sample["cls"] = "n/a"
                sink.write(sample)
                if "jpg" in sample and "cls" not in sample:
                    kept[key] = sample.get("txt")
    return kept


def test_foreign_shards_become_a_dataset(tmp_path, capsys):
    kept = _img2dataset_like(tmp_path / "laion")
    before = {p.name: sha256_file(p) for p in (tmp_path / "laion").glob("*.tar")}
    assert main(["data", "index", str(tmp_path / "laion"), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"Indexed 28 samples (27 with captions) in 3 shards: {tmp_path / 'laion' / 'manifest.parquet'}; left out 2 "
        "without an image, with one training does not decode, or with a bad label/caption; 1 sample(s) repeat an "
        "earlier one's image exactly (the same bytes)\nproblem: 00001.tar: sample '000010004' left out (no image)\n"
        "problem: 00001.tar: sample '000010005' left out (a label that is not an integer)")
    assert {p.name: sha256_file(p) for p in (tmp_path / "laion").glob("*.tar")} == before  # the tars untouched
    # what it left out is not the dataset's: the dataset verifies clean
    assert main(["data", "verify", str(tmp_path / "laion"), "--decode", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith("3 shards, 28 of 28 samples read, 0 undecodable: intact")
    manifest = read_manifest(tmp_path / "laion").to_pylist()
    assert {r["key"]: r["caption"] for r in manifest} == kept and {r["label"] for r in manifest} == {-1}
    digest = {r["key"]: r["digest"] for r in manifest}  # the repeated image: one digest; every other its own
    assert digest["000000000"] == digest["000020007"] and len(set(digest.values())) == 27
    assert json.loads((tmp_path / "laion" / "checksums.json").read_text()) == before
    # a run reads them as any dataset: CLIP's caption check passes, samples come unlabelled with their captions
    shards = resolve_shards(DataConfig(source=str(tmp_path / "laion")), captions=True)
    samples = list(read_epoch(shards, rank=0, world_size=1, num_workers=0, text=True))
    assert {s["key"]: s["text"] for s in samples} == {k: v for k, v in kept.items() if v}
    assert {s["label"] for s in samples} == {-1}
    plain = list(read_epoch(shards, rank=0, world_size=1, num_workers=0))  # without captions: every image
    assert sorted(s["key"] for s in plain) == sorted(kept)


def test_damaged_tar_and_refusals(tmp_path, capsys):
    """A tar cut short is listed up to the damage and reported; a second index, a directory without tars: one line."""
    _img2dataset_like(tmp_path / "d")
    tar = tmp_path / "d" / "00002.tar"
    tar.write_bytes(tar.read_bytes()[: 5 * 1024 + 100])
    # cut between two members (at a block boundary): it reads as a whole tar of fewer samples, without its end blocks
    tar = tmp_path / "d" / "00000.tar"
    import tarfile

    with tarfile.open(tar) as t:
        cut = t.getmembers()[9].offset  # the fourth sample's first member (3 members a sample)
    tar.write_bytes(tar.read_bytes()[:cut])
    assert main(["data", "index", str(tmp_path / "d"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 shard(s) damaged, indexed up to the damage (`pretrain data verify` reports them until they are written " \
        "again)" in out
    assert "problem: 00002.tar: does not read to its end (" in out
    assert ("problem: 00000.tar: ends without tar's end-of-archive blocks (cut short between two members?); indexed "
            "up to there: 3 sample(s)" in out.splitlines())
    rows = read_manifest(tmp_path / "d").to_pylist()
    assert sum(r["shard"] == "00000.tar" for r in rows) == 3 and 11 < len(rows) < 21
    assert any(line.startswith("problem: 00002.tar: does not read to its end (empty header); indexed up to there: ")
               for line in out.splitlines())  # webdataset's words
    # two tars joined with `cat`: readers stop at the first one's end blocks, and the second one's members were left
    # out without a word; a header cut short was called a cut between members; an empty tar named its stream object
    _img2dataset_like(tmp_path / "j")
    joined, second = tmp_path / "j" / "00000.tar", tmp_path / "j" / "00001.tar"
    joined.write_bytes(joined.read_bytes() + second.read_bytes())
    with tarfile.open(second) as t:
        header = t.getmembers()[9].offset
    second.write_bytes(second.read_bytes()[: header + 100])
    (tmp_path / "j" / "00002.tar").write_bytes(b"")
    capsys.readouterr()
    assert main(["data", "index", str(tmp_path / "j"), "--no-progress"]) == 0
    problems = [line for line in capsys.readouterr().out.splitlines() if line.startswith("problem: ")]
    assert problems[0].startswith("problem: 00000.tar: has members after its end-of-archive blocks (byte ")
    assert problems[1] == (f"problem: 00001.tar: ends in a member header cut short (at byte {header}); indexed up to "
                           "there: 3 sample(s)")
    assert problems[2] == "problem: 00002.tar: does not read to its end (empty file); indexed up to there: 0 sample(s)"
    assert main(["data", "index", str(tmp_path / "d")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["data", "index", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path / 'd'} already has a manifest.parquet: it is a dataset already (to index it again, after "
        "adding or changing tars, delete its manifest.parquet and checksums.json first)",
        f"error: {tmp_path / 'empty'}: no .tar files in it"]


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_verify_reports_the_tars_index_calls_damaged(tmp_path, capsys):
    """A tar without its end-of-archive blocks, one with members after them (two tars joined with `cat`) and one
    ending in a member header cut short read without an error: `data verify` names each as `data index` did, and
    exits 1 (it had called the dataset intact)."""
    import tarfile

    root = tmp_path / "tars"
    root.mkdir()
    for shard in range(4):
        with wds.TarWriter(str(root / f"{shard}.tar")) as sink:
            for i in range(10):
                sink.write({"__key__": f"{shard}{i:03d}", "png": _png(10 * shard + i), "cls": i % 3})
    extra = (root / "3.tar").read_bytes()
    (root / "3.tar").unlink()
    for name in ("0.tar", "2.tar"):
        with tarfile.open(root / name) as t:
            last = t.getmembers()[-1]
        end = last.offset_data + -(-last.size // 512) * 512  # just past the last member: where the end blocks begin
        data = (root / name).read_bytes()[:end]
        (root / name).write_bytes(data if name == "0.tar" else data + extra[:100])
    (root / "1.tar").write_bytes((root / "1.tar").read_bytes() + extra)
    assert main(["data", "index", str(root), "--no-progress"]) == 0
    indexed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("problem: ")]
    assert len(indexed) == 3 and all(line.endswith("; indexed up to there: 10 sample(s)") for line in indexed)
    assert main(["data", "verify", str(root), "--no-progress"]) == 1
    *problems, summary = capsys.readouterr().out.splitlines()
    assert problems == [line.removesuffix("; indexed up to there: 10 sample(s)") for line in indexed]
    assert problems[0] == "problem: 0.tar: ends without tar's end-of-archive blocks (cut short between two members?)"
    assert problems[1].startswith("problem: 1.tar: has members after its end-of-archive blocks (byte ")
    assert problems[2] == f"problem: 2.tar: ends in a member header cut short (at byte {end})"
    assert summary == f"Verified {root}: 3 shards, 30 of 30 samples read: 3 problem(s)"


def test_same_manifest_for_any_number_of_workers(tmp_path):
    """Tars read 1 or 3 at a time: the same manifest rows, in the tars' order."""
    from data_pipeline.shards import index_shards

    for workers in (1, 3):
        _img2dataset_like(tmp_path / f"w{workers}")
        index_shards(tmp_path / f"w{workers}", workers=workers, progress=False)
    one, three = (read_manifest(tmp_path / f"w{w}").to_pylist() for w in (1, 3))
    assert one == three and [r["shard"] for r in one] == sorted(r["shard"] for r in one)


def test_an_empty_image_is_left_out_and_named(tmp_path, capsys):
    """A sample whose image member is empty (a zero-byte download) is no image training decodes: index leaves it out
    with a `problem:` line as `data shards` leaves out an empty file (it had been indexed, then skipped each epoch)."""
    root = tmp_path / "t"
    root.mkdir()
    with wds.TarWriter(str(root / "00000.tar")) as sink:
        for i in range(4):
            sink.write({"__key__": f"k{i}", "jpg": b"" if i == 2 else _jpeg(i)})
    assert main(["data", "index", str(root), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith("problem: 00000.tar: sample 'k2' left out (an empty image)")
    assert sorted(r["key"] for r in read_manifest(root).to_pylist()) == ["k0", "k1", "k3"]


def test_tars_that_repeat_keys_are_indexed_with_a_warning_and_evaluated_once_per_key(tmp_path, capsys):
    """Two crawls that both count keys from 0: every sample is indexed (training reads them all), the command warns
    which key repeats where, and the evaluation takes the first sample of each key (as many samples as keys, each
    image another)."""
    import torch

    from pretrain.config import load_config
    from pretrain.eval.dataset import load_eval_set

    root = tmp_path / "two-crawls"
    root.mkdir()
    for crawl in range(2):
        with wds.TarWriter(str(root / f"crawl{crawl}.tar")) as sink:
            for i in range(20):
                sink.write({"__key__": f"{i:04d}", "jpg": _jpeg(100 * crawl + i), "cls": str(i % 2),
                            "txt": f"crawl {crawl} image {i}"})
    assert main(["data", "index", str(root), "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        "Warning: 20 sample(s) have the key of an earlier sample, e.g. '0000' in crawl0.tar and again in crawl1.tar: "
        "training reads them all; evaluation, search, embed and attention take the first sample of a key")
    assert read_manifest(root).num_rows == 40
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "simclr_digits.yaml",
                      [f"eval.dataset={root}", "data.channels=3"])
    evalset = load_eval_set(cfg)
    assert len(evalset.labels) == 20 and len(torch.unique(evalset.images.flatten(1), dim=0)) == 20
    from data_pipeline.shards import list_shards
    from pretrain.index import embed_shards, load_run
    from tests.util import write_run

    write_run(tmp_path / "run", "simclr_digits.yaml", tmp_path / "cache", "model.backbone_kwargs={width: 0.25}",
              "data.channels=3")
    gallery = embed_shards(load_run(tmp_path / "run"), list_shards(root))
    assert sorted(gallery.keys) == [f"{i:04d}" for i in range(20)]  # each key once: crawl0's samples
    assert gallery.captions == [f"crawl 0 image {int(k)}" for k in gallery.keys]  # with their captions (not crawl1's)
    assert np.allclose(gallery.embeddings, embed_shards(load_run(tmp_path / "run"), list_shards(root)[:1]).embeddings)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar of ``members`` (name, bytes) in exactly that order, as `tar cf` of a folder may write them."""
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_tar_whose_samples_are_split_is_refused_before_anything_is_written(tmp_path, capsys):
    """`tar cf` of a folder lists files in directory order: a sample's image and label apart. Readers would take them
    as two samples (an image without its label), so index refuses in one line naming the tar and the sample, and
    writes nothing."""
    root = tmp_path / "shuffled"
    root.mkdir()
    _tar(root / "s0.tar", [("a.jpg", _jpeg(0)), ("b.jpg", _jpeg(1)), ("a.cls", b"1"), ("b.cls", b"0")])
    assert main(["data", "index", str(root), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {root / 's0.tar'}: the files of sample 'a' are not next to each other in the tar, so readers would "
        "split it (an image without its label); write the tar with each sample's files together, e.g. `tar "
        "--sort=name` or webdataset's TarWriter")
    assert sorted(p.name for p in root.iterdir()) == ["s0.tar"]


def test_file_names_with_a_dot_before_the_extension_are_named_with_webdatasets_rule(tmp_path, capsys, caplog):
    """WebDataset ends a sample's key at the first dot of a member's name: `photo.2023.jpg` is sample `photo` with a
    `2023.jpg` member, no image. Index, and training, say so naming the file (not a bare "no image"); and where two
    such files share a key apart (`cat.1.jpg`, `dog.1.jpg`, `cat.2.jpg`), index names the rule, not the order of the
    tar (sorting it by name, as that message advised, only made one imageless sample of both cats)."""
    rule = ("as WebDataset ends a sample's key at the first dot of a file name; name the files <key>.<ext> with no "
            "dot in the key")
    root = tmp_path / "dotted"
    root.mkdir()
    _tar(root / "0.tar", [("photo.2023.jpg", _jpeg(0)), ("ok.jpg", _jpeg(1))])
    assert main(["data", "index", str(root), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith(
        "problem: 0.tar: sample 'photo' left out (no image: its file photo.2023.jpg is read as sample 'photo' with a "
        f"'2023.jpg' member, {rule})")
    with caplog.at_level("WARNING"):
        assert [s["key"] for s in read_epoch([str(root / "0.tar")], rank=0, world_size=1, num_workers=0)] == ["ok"]
    assert f"photo.2023.jpg is read as sample 'photo' with a '2023.jpg' member, {rule}" in caplog.text
    apart = tmp_path / "apart"
    apart.mkdir()
    _tar(apart / "0.tar", [("cat.1.jpg", _jpeg(0)), ("dog.1.jpg", _jpeg(1)), ("cat.2.jpg", _jpeg(2))])
    assert main(["data", "index", str(apart), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {apart / '0.tar'}: its file cat.2.jpg is read as sample 'cat', as is a file before it, since "
        + rule.removeprefix("as "))
    assert sorted(p.name for p in apart.iterdir()) == ["0.tar"]


def test_a_repeated_member_is_no_damage_and_an_empty_tar_is_named(tmp_path):
    """A sample with two files of one type (`a.jpg` and `a.JPG`: WebDataset lower-cases the type; a file appended
    twice) reads whole, the first one taken: index names the member and calls no tar damaged, and training counts no
    truncated shard (it had counted one every epoch, logging that the rest of the tar was skipped, which it was not);
    a tar without a sample is named too (the summary's shard count had included it silently)."""
    from data_pipeline.reader import Counts, iter_reader
    from data_pipeline.shards import index_shards

    root = tmp_path / "tars"
    root.mkdir()
    _tar(root / "0.tar", [("a.jpg", _jpeg(0)), ("a.cls", b"1"), ("a.JPG", _jpeg(1)), ("b.jpg", _jpeg(2))])
    _tar(root / "1.tar", [])
    _, counts = index_shards(root, progress=False)
    assert (counts["samples"], counts["damaged"], counts["skipped"]) == (2, 0, 0)
    assert counts["problems"] == [
        "0.tar: a.JPG is a second file of its type in its sample, which readers skip (the first one is read)",
        "1.tar: holds no sample (not part of the dataset)"]
    found = Counts()
    samples = list(iter_reader([str(root / "0.tar")], reader=0, num_readers=1, seed=0, epoch=0, shuffle_buffer=0,
                               counts=found))
    assert [(s["key"], s["label"], s["image"]) for s in samples] == [("a", 1, _jpeg(0)), ("b", -1, _jpeg(2))]
    assert (found.truncated, found.corrupt) == (0, 0)


def test_labels_that_are_ids_tif_members_and_negative_labels(tmp_path, capsys):
    """Labels that are sparse ids (WordNet offsets): the classes are the ids present, no more (an id of 4e9 once made
    a class name of every integer below it), and the evaluation scores them as two classes; a .tif image is a sample
    as .jpg is; a label below -1 is a bad label, left out and counted."""
    from PIL import Image

    from data_pipeline.shards import class_indices, read_classes
    from pretrain.config import load_config
    from pretrain.eval.dataset import load_eval_set

    tif = io.BytesIO()
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tif, format="TIFF")
    root = tmp_path / "ids"
    root.mkdir()
    with wds.TarWriter(str(root / "00000.tar")) as sink:
        for i in range(20):
            sink.write({"__key__": f"{i:04d}", "jpg": _jpeg(i), "cls": str(4_000_000_000 if i % 2 else 1440764)})
        sink.write({"__key__": "tiff", "tif": tif.getvalue(), "cls": "1440764"})
        sink.write({"__key__": "neg", "jpg": _jpeg(99), "cls": "-7"})
    assert main(["data", "index", str(root), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith("left out 1 without an image, with one training does not decode, "
                                                    "or with a bad label/caption\n"
                                                    "problem: 00000.tar: sample 'neg' left out (a negative label)")
    assert read_classes(root) == ["1440764", "4000000000"] and (root / "manifest.parquet").stat().st_size < 10_000
    table = read_manifest(root)
    assert "tiff" in table.column("key").to_pylist() and "neg" not in table.column("key").to_pylist()
    assert class_indices([1440764, 4_000_000_000, -1, 5], table.schema.metadata).tolist() == [0, 1, -1, -1]
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "simclr_digits.yaml",
                      [f"eval.dataset={root}", "data.channels=3"])
    evalset = load_eval_set(cfg)
    assert evalset.classes == ["1440764", "4000000000"] and sorted(np.bincount(evalset.labels).tolist()) == [10, 11]


def test_index_of_what_is_not_a_shard_directory(tmp_path, capsys):
    """A directory that does not exist, or one of gzipped tars or of folders: one line that says so."""
    assert main(["data", "index", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'nope'}: does not exist (give the directory that "
                                               "holds the .tar shards)")
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "00000.tar.gz").write_bytes(b"")
    assert main(["data", "index", str(tmp_path / "gz"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'gz'}: no .tar files in it (it holds "
                                               "00000.tar.gz: the shards must be plain .tar files at its top)")
    (tmp_path / "captions").mkdir()
    _tar(tmp_path / "captions" / "0.tar", [("a.txt", b"a caption, no image")])
    assert main(["data", "index", str(tmp_path / "captions"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'captions'}: no sample to index in its 1 tar "
                                               "file(s) (1 without an image or with a bad label/caption)")
