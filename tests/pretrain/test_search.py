"""`pretrain search` on run directories written the way training writes them: image and text queries, the ranking
against a brute-force one, the contact sheet, undecodable images skipped, and one-line refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.shards import write_shards
from pretrain.cli import main
from pretrain.data import resolve_shards
from pretrain.index import embed_shards, load_run
from tests.util import write_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    write_run(root / "clip", "clip_digits.yaml", root / "cache", "method.text_width=32", "method.text_depth=1",
               "model.backbone_kwargs={width: 0.25}")
    write_run(root / "simclr", "simclr_digits.yaml", root / "cache", "model.backbone_kwargs={width: 0.25}")
    return root


def _table(out: str) -> list[list[str]]:
    return [line.split(maxsplit=4) for line in out.splitlines()[2:] if line.strip() and line.split()[0].isdigit()]


def test_text_query_ranks_the_gallery_by_cosine(runs, capsys, tmp_path):
    """A CLIP run's text query returns the k images of highest cosine with the text's embedding, best first, and
    draws them."""
    sheet = tmp_path / "sheet.png"
    assert main(["search", "--checkpoint", str(runs / "clip"), "--text", "a handwritten seven", "--k", "6",
                 "--out", str(sheet)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("6 nearest of 1797 images to text 'a handwritten seven':")
    rows = _table(out)
    assert [int(r[0]) for r in rows] == list(range(1, 7))
    run = load_run(runs / "clip")
    gallery = embed_shards(run, resolve_shards(run.cfg.data))
    with torch.no_grad():
        q = run.encode_text(["a handwritten seven"])[0].numpy()
    sims = gallery.embeddings @ q / (np.linalg.norm(gallery.embeddings, axis=1) * np.linalg.norm(q))
    best = np.argsort(-sims, kind="stable")[:6]
    assert [r[3] for r in rows] == [gallery.keys[i] for i in best]
    np.testing.assert_allclose([float(r[1]) for r in rows], sims[best], atol=1e-4)
    assert all(r[4] for r in rows)  # digits carry captions
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_text_longer_than_the_tower_reads_is_searched_cut_and_said_so(runs, capsys):
    """The text tower reads method.context_length - 2 bytes of a query, as of a caption in training: a longer query
    is searched as its cut (the same ranking), with a warning naming what is searched for (it had been cut
    silently)."""
    most = load_run(runs / "clip").cfg.method.context_length - 2
    query = "a handwritten seven " * 8
    tables = []
    for text in (query, query[:most]):
        assert main(["search", "--checkpoint", str(runs / "clip"), "--text", text, "--k", "5"]) == 0
        tables.append(capsys.readouterr().out)
    assert tables[0].splitlines()[0] == (f"Warning: --text is {len(query)} bytes and the text tower reads the first "
                                         f"{most} (method.context_length {most + 2}, as in training): it searches for "
                                         f"{query[:most]!r}")
    assert "Warning" not in tables[1] and _table(tables[0]) == _table(tables[1])


def test_image_query_finds_itself_first(runs, capsys):
    assert main(["search", "--checkpoint", str(runs / "simclr"), "--image", "digits_00042", "--k", "3", "--device",
                 "cpu"]) == 0
    rows = _table(capsys.readouterr().out)
    assert rows[0][3] == "digits_00042" and float(rows[0][1]) == pytest.approx(1.0, abs=1e-4)
    assert float(rows[1][1]) <= float(rows[0][1])


def test_undecodable_images_are_skipped_and_counted(runs, capsys, tmp_path):
    from tests.data_pipeline.conftest import make_image_tree, undecodable_png

    root = make_image_tree(tmp_path / "imgs", classes={"a": 6, "b": 6})
    (root / "a" / "2.jpg").write_bytes(undecodable_png())  # its header reads: written, then skipped where read
    write_shards(f"folder:{root}", tmp_path / "ds", shard_size=5, progress=False)
    assert main(["search", "--checkpoint", str(runs / "simclr"), "--data", str(tmp_path / "ds"), "--image",
                 "00000000", "--k", "20"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("11 nearest of 11 images to image '00000000' (1 undecodable skipped):")
    rows = _table(out)  # each image's class by the name of its folder (the dataset's class names), and its file
    assert len(rows) == 11 and all(r[2] == Path(r[4].strip()).parent.name for r in rows)
    assert sorted(r[2] for r in rows) == ["a"] * 5 + ["b"] * 6
    index = tmp_path / "ds.parquet"
    assert main(["embed", "--checkpoint", str(runs / "simclr"), "--data", str(tmp_path / "ds"), "--out",
                 str(index)]) == 0
    assert f"Embedded 11 images of {tmp_path / 'ds'} (1 undecodable skipped)" in capsys.readouterr().out
    assert main(["search", "--checkpoint", str(runs / "simclr"), "--index", str(index), "--image", "00000000", "--k",
                 "20"]) == 0
    assert capsys.readouterr().out == out


@pytest.mark.parametrize("args, message", [
    (["--text", "seven"], "--text: {simclr} is a simclr run, which has no text tower"),
    (["--image", "nope"], "--image: no sample with key 'nope' in "),  # (before the pass over the data, not after)
    (["--text", " "], "--text: empty; give the words to search for"),
    (["--image", "digits_00001", "--k", "0"], "--k: must be >= 1"),
    (["--image", "digits_00001", "--device", "tpu"], "--device: 'tpu' is not a device (auto, cpu, cuda, cuda:N)"),
    (["--image", "digits_00001", "--device", "cuda:7"], "--device: cuda:7 is not on this machine"),
    (["--image", "digits_00001", "--data", "/nonexistent/ds"], "--data: /nonexistent/ds does not exist"),
    (["--image", "digits_00001", "--data", ""], "--data: must not be empty"),
    (["--image", "digits_00001", "--data", "images:/data/x"], "--data: {cwd}/images:/data/x does not exist: --data "
     "takes a shard dataset; write one from those files first, `pretrain data shards --source images:/data/x"),
])
def test_refusals_are_one_line(runs, capsys, args, message, tmp_path):
    assert main(["search", "--checkpoint", str(runs / "simclr"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: " + err[len("error: "):] and "\n" not in err
    assert message.format(simclr=runs / "simclr", cwd=Path.cwd()) in err
    (tmp_path / "mine.png").write_bytes(b"mine")  # a contact sheet never replaces a file
    assert main(["search", "--checkpoint", str(runs / "simclr"), "--image", "digits_00001", "--out",
                 str(tmp_path / "mine.png")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out: {tmp_path / 'mine.png'} already exists; search " \
                                              "overwrites nothing"
    assert (tmp_path / "mine.png").read_bytes() == b"mine"
    assert main(["search", "--checkpoint", str(runs / "nothing"), "--image", "x"]) == 2
    assert "does not exist (expected a finished run directory" in capsys.readouterr().err


def test_embed_writes_an_index_that_search_reads(runs, capsys, tmp_path):
    """`pretrain embed` writes every image's key, label, caption and embedding with the checkpoint's digest; `pretrain
    search --index` answers from it exactly as from embedding the data again (image and text queries, contact sheet)."""
    import pyarrow.parquet as pq

    from pretrain.index import checkpoint_digest

    for run, query in (("simclr", ["--image", "digits_00042"]), ("clip", ["--text", "a handwritten seven"])):
        index = tmp_path / f"{run}.parquet"
        assert main(["embed", "--checkpoint", str(runs / run), "--out", str(index), "--batch-size", "500"]) == 0
        assert capsys.readouterr().out.startswith("Embedded 1797 images of digits, ")
        table = pq.read_table(index)
        meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
        assert table.num_rows == 1797 and table.column_names == ["key", "label", "caption", "path", "digest",
                                                               "embedding"]
        assert meta["checkpoint_sha256"] == checkpoint_digest(runs / run) and meta["corrupt"] == "0"
        gallery = embed_shards(load_run(runs / run), resolve_shards(load_run(runs / run).cfg.data))
        np.testing.assert_allclose(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
                                   gallery.embeddings, rtol=0, atol=1e-6)
        assert table.column("key").to_pylist() == gallery.keys
        answers = []
        for source in (["--index", str(index), "--out", str(tmp_path / f"{run}.png")], []):
            assert main(["search", "--checkpoint", str(runs / run), *query, "--k", "5", *source]) == 0
            answers.append(capsys.readouterr().out.split("Contact sheet:")[0])
        assert answers[0] == answers[1] and len(_table(answers[0])) == 5
        assert (tmp_path / f"{run}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_index_refusals_are_one_line(runs, capsys, tmp_path):
    """An existing --out is left alone; an index of other weights, or a file that is no index, is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    taken = tmp_path / "taken.parquet"
    taken.write_bytes(b"mine")
    assert main(["embed", "--checkpoint", str(runs / "simclr"), "--out", str(taken)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out: {taken} already exists; embed overwrites nothing"
    assert taken.read_bytes() == b"mine"
    for cmd, name, what in (("embed", "index.csv", "a Parquet file; give it a name ending in .parquet or .pq"),
                            ("search", "hits.jpg", "a PNG contact sheet; give it a name ending in .png")):
        extra = ["--image", "digits_00001"] if cmd == "search" else []
        assert main([cmd, "--checkpoint", str(runs / "simclr"), *extra, "--out", str(tmp_path / name)]) == 2
        assert capsys.readouterr().err.strip() == f"error: --out: {cmd} writes {what}, got {name!r}"
        assert not (tmp_path / name).exists()
    index = tmp_path / "simclr.parquet"
    assert main(["embed", "--checkpoint", str(runs / "simclr"), "--out", str(index)]) == 0
    write_run(tmp_path / "other", "simclr_digits.yaml", runs / "cache", "model.backbone_kwargs={width: 0.25}",
              "job.seed=1")
    capsys.readouterr()
    assert main(["search", "--checkpoint", str(tmp_path / "other"), "--image", "digits_00001", "--index",
                 str(index)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --index: {index} was embedded with other weights")
    # the same weights in other files (as `extract` of a run's last step writes them, saying which step and run): taken
    same = tmp_path / "same"
    shutil.copytree(runs / "simclr", same)
    saved = torch.load(same / "backbone.pt", weights_only=True)
    torch.save({**saved, "step": 600, "run": str(runs / "simclr")}, same / "backbone.pt")
    assert main(["search", "--checkpoint", str(same), "--image", "digits_00001", "--index", str(index)]) == 0
    # ... also where BatchNorm's step counts are int64 in one file and float32 in the other (a backbone.pt of an
    # earlier version, and `extract`, which keeps their dtype: it had been refused as other weights)
    counts = [k for k in saved["state_dict"] if k.endswith("num_batches_tracked")]
    assert counts
    flipped = {k: v.long() if k in counts and v.is_floating_point() else v.float() if k in counts else v
               for k, v in saved["state_dict"].items()}
    torch.save({**saved, "state_dict": flipped}, same / "backbone.pt")
    assert main(["search", "--checkpoint", str(same), "--image", "digits_00001", "--index", str(index)]) == 0
    # an index of an earlier version: the digest it kept over each tensor's dtype and bytes, or older still, none and
    # its files' digest
    from pretrain.index import weights_digest

    table = pq.read_table(index)
    meta = {k: v for k, v in table.schema.metadata.items() if k != b"values_sha256"}
    earlier = {**meta, b"weights_sha256": weights_digest(runs / "simclr", legacy=True).encode()}
    pq.write_table(table.replace_schema_metadata(earlier), tmp_path / "earlier.parquet")
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "older.parquet")
    for older in ("earlier", "older"):
        for run, code in ((runs / "simclr", 0), (same, 2)):
            assert main(["search", "--checkpoint", str(run), "--image", "digits_00001", "--index",
                         str(tmp_path / f"{older}.parquet")]) == code
    capsys.readouterr()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "plain.parquet")
    pq.write_table(table.slice(0, 0), tmp_path / "empty.parquet")  # (it had said the key was not in the data)
    for bad, message in ((tmp_path / "plain.parquet", "is not an embedding index written by `pretrain embed`"),
                         (taken, "is not a Parquet file"), (tmp_path / "none.parquet", "does not exist"),
                         (tmp_path / "empty.parquet", "holds no embeddings; write it again with `pretrain embed`")):
        assert main(["search", "--checkpoint", str(runs / "simclr"), "--image", "x", "--index", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --index: {bad} {message}") and "\n" not in err, err


def test_unlabelled_images_show_no_label(runs, capsys, tmp_path):
    """A gallery of unlabelled images (images:PATH) lists '-' for the class, and the file each image was written
    from (the manifest's path), searched directly and through an index; the query finds its own file first."""
    from tests.data_pipeline.conftest import make_image_tree

    root = make_image_tree(tmp_path / "imgs", classes={"": 4, "deep/er": 3})
    write_shards(f"images:{root}", tmp_path / "ds", progress=False)
    files = sorted(str(p.resolve()) for p in root.rglob("*") if p.is_file())
    assert main(["embed", "--checkpoint", str(runs / "simclr"), "--data", str(tmp_path / "ds"), "--out",
                 str(tmp_path / "i.parquet")]) == 0
    for source in (["--data", str(tmp_path / "ds")], ["--index", str(tmp_path / "i.parquet")]):
        capsys.readouterr()
        assert main(["search", "--checkpoint", str(runs / "simclr"), *source, "--image", "00000000", "--k", "7"]) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[1].split() == ["rank", "similarity", "class", "key", "file", "caption"]
        rows = _table(out)
        assert len(rows) == 7 and {r[2] for r in rows} == {"-"}
        assert rows[0][3] == "00000000" and rows[0][4].strip() == files[0]
        assert sorted(r[4].strip() for r in rows) == files


def test_a_contact_sheet_from_an_index_of_data_written_again_is_refused(runs, capsys, tmp_path):
    """`search --index --out` draws the hits from the data the index names: where that data was written again since
    (other images under the same keys, or fewer keys), one line says so (it had drawn the new images under the old
    hits' captions, or ended in a KeyError)."""
    from tests.data_pipeline.conftest import make_image_tree

    write_shards(f"images:{make_image_tree(tmp_path / 'a', classes={'': 6})}", tmp_path / "ds", progress=False)
    index = tmp_path / "i.parquet"
    assert main(["embed", "--checkpoint", str(runs / "simclr"), "--data", str(tmp_path / "ds"), "--out",
                 str(index)]) == 0
    query = ["search", "--checkpoint", str(runs / "simclr"), "--index", str(index), "--image", "00000000", "--k", "3"]
    assert main([*query, "--out", str(tmp_path / "fine.png")]) == 0
    for name, seed, problem in (("b", 7, "the image with key '00000000' in the shards is another than the one "
                                         "embedded"),
                                ("c", 0, "the shards hold no decodable sample with key ")):  # the first image only
        shutil.rmtree(tmp_path / "ds")
        write_shards(f"images:{make_image_tree(tmp_path / name, classes={'': 6 if seed else 1}, seed=seed)}",
                     tmp_path / "ds", progress=False)
        capsys.readouterr()
        assert main([*query, "--out", str(tmp_path / f"{name}.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --out: {problem}") and err.endswith(
            f": the data at {tmp_path / 'ds'} changed since {index} was embedded; embed it again with `pretrain "
            "embed`"), err
        assert not (tmp_path / f"{name}.png").exists()


def test_a_contact_sheet_draws_at_most_its_maximum(runs, capsys, tmp_path):
    """--k 120 --out: the table lists the 120 results, the sheet draws the first 100 (20 rows of 5) and says so (at
    --k 100000 it had taken 41 s for a PNG 79,240 px tall)."""
    from PIL import Image

    from pretrain.plots import SHEET_MAX

    out = tmp_path / "sheet.png"
    assert main(["search", "--checkpoint", str(runs / "simclr"), "--image", "digits_00001", "--k", "120", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert len(_table(printed)) == 120 and SHEET_MAX == 100
    assert ("Note: the contact sheet draws the first 100 of the 120 results (the table above lists them all)"
            in printed.splitlines())
    with Image.open(out) as png:
        assert png.size[1] == round((2.2 * 20 + 0.4) * 100)  # 20 rows, not 24


def test_an_index_with_data_it_was_not_embedded_from_is_refused(runs, capsys, tmp_path):
    """`search --index I --data D` where D is other data than I's (other images under the same keys): refused in one
    line before the ranking, with --out or without (it had been taken without a word, and with --out called "changed
    since" the index was embedded); the data moved, D its new place, is taken."""
    from tests.data_pipeline.conftest import make_image_tree

    write_shards(f"images:{make_image_tree(tmp_path / 'a', classes={'': 6})}", tmp_path / "ds", progress=False)
    write_shards(f"images:{make_image_tree(tmp_path / 'b', classes={'': 6}, seed=7)}", tmp_path / "other",
                 progress=False)
    index = tmp_path / "i.parquet"
    assert main(["embed", "--checkpoint", str(runs / "simclr"), "--data", str(tmp_path / "ds"), "--out",
                 str(index)]) == 0
    query = ["search", "--checkpoint", str(runs / "simclr"), "--index", str(index), "--image", "00000000"]
    for out in ([], ["--out", str(tmp_path / "s.png")]):
        capsys.readouterr()
        assert main([*query, "--data", str(tmp_path / "other"), *out]) == 2
        printed, err = capsys.readouterr()
        assert "nearest" not in printed and err.strip().splitlines() == [
            f"error: --data: {(tmp_path / 'other').resolve()} is not the data {index} was embedded from: 6 of its 6 "
            f"images are not in it (by key and bytes), e.g. '00000003'; give the directory that data is in now "
            f"({(tmp_path / 'ds').resolve()} at embed time), or embed this one"]
    assert not (tmp_path / "s.png").exists()
    shutil.move(tmp_path / "ds", tmp_path / "moved")
    assert main([*query, "--data", str(tmp_path / "moved")]) == 0


def test_a_contact_sheet_of_data_moved_since_it_was_indexed(runs, capsys, tmp_path):
    """The data an index recorded at embed time moved: the ranking still prints and the contact sheet is refused in one
    line naming the recorded directory and --data; `--index --data NEW` draws it from where the data is now (checked
    against the digests the index kept), with the similarities to 4 decimals as the table prints them."""
    from tests.data_pipeline.conftest import make_image_tree

    write_shards(f"images:{make_image_tree(tmp_path / 'a', classes={'': 6})}", tmp_path / "ds", progress=False)
    index = tmp_path / "i.parquet"
    assert main(["embed", "--checkpoint", str(runs / "simclr"), "--data", str(tmp_path / "ds"), "--out",
                 str(index)]) == 0
    old = str((tmp_path / "ds").resolve())
    shutil.move(tmp_path / "ds", tmp_path / "moved")
    query = ["search", "--checkpoint", str(runs / "simclr"), "--index", str(index), "--image", "00000000", "--k", "3"]
    capsys.readouterr()
    assert main([*query, "--out", str(tmp_path / "gone.png")]) == 2
    out, err = capsys.readouterr()
    assert len(_table(out)) == 3 and _table(out)[0][3] == "00000000"
    assert err.strip().splitlines() == [
        f"error: --out: the contact sheet reads the images from {old}, the data directory {index} recorded at embed "
        "time, which holds no shard dataset now; give where the data is now with --data DIR"]
    assert not (tmp_path / "gone.png").exists()
    import pretrain.plots

    drawn = []

    def spy(*args, **kwargs):
        drawn.append(args[2])
        return real(*args, **kwargs)

    real = pretrain.plots.contact_sheet
    pretrain.plots.contact_sheet = spy
    try:
        assert main([*query, "--data", str(tmp_path / "moved"), "--out", str(tmp_path / "here.png")]) == 0
    finally:
        pretrain.plots.contact_sheet = real
    rows = _table(capsys.readouterr().out)
    assert drawn == [[r[1] for r in rows]] and all(len(note.split(".")[1]) == 4 for note in drawn[0])
    assert (tmp_path / "here.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_of_no_decodable_image_is_one_line(runs, capsys, caplog, tmp_path):
    """A dataset whose every image is undecodable: embed and search name --data's directory and the count in one line,
    and the images skipped are named up to a bound, not one line each."""
    from pretrain.eval.dataset import NAMED_UNDECODABLE
    from tests.data_pipeline.conftest import undecodable_png

    (tmp_path / "bad").mkdir()
    for i in range(NAMED_UNDECODABLE + 5):
        (tmp_path / "bad" / f"{i}.png").write_bytes(undecodable_png(i))
    write_shards(f"images:{tmp_path / 'bad'}", tmp_path / "ds", progress=False)
    data = str((tmp_path / "ds").resolve())
    for cmd in (["embed", "--out", str(tmp_path / "x.parquet")], ["search", "--image", "00000000"]):
        caplog.clear()
        assert main([cmd[0], "--checkpoint", str(runs / "simclr"), "--data", str(tmp_path / "ds"), *cmd[1:]]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: --data: none of the {NAMED_UNDECODABLE + 5} images of {data} decodes (`pretrain data verify "
            f"{data} --decode` lists them)"]
        named = [r for r in caplog.records if "undecodable" in r.getMessage()]
        assert len(named) == NAMED_UNDECODABLE + 1  # and one saying the rest are counted
    assert not (tmp_path / "x.parquet").exists()
