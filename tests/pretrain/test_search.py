"""`pretrain search` on run directories written the way training writes them: image and text queries, the ranking
against a brute-force one, the contact sheet, undecodable images skipped, and one-line refusals."""

from __future__ import annotations

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


def test_image_query_finds_itself_first(runs, capsys):
    assert main(["search", "--checkpoint", str(runs / "simclr"), "--image", "digits_00042", "--k", "3"]) == 0
    rows = _table(capsys.readouterr().out)
    assert rows[0][3] == "digits_00042" and float(rows[0][1]) == pytest.approx(1.0, abs=1e-4)
    assert float(rows[1][1]) <= float(rows[0][1])


def test_undecodable_images_are_skipped_and_counted(runs, capsys, tmp_path):
    from tests.data_pipeline.conftest import corrupt_jpeg, make_image_tree

    root = make_image_tree(tmp_path / "imgs", classes={"a": 6, "b": 6})
    corrupt_jpeg(root / "a" / "2.jpg")
    write_shards(f"folder:{root}", tmp_path / "ds", shard_size=5, progress=False)
    assert main(["search", "--checkpoint", str(runs / "simclr"), "--data", str(tmp_path / "ds"), "--image",
                 "00000000", "--k", "20"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("11 nearest of 11 images to image '00000000' (1 undecodable skipped):")


@pytest.mark.parametrize("args, message", [
    (["--text", "seven"], "--text: {simclr} is a simclr run, which has no text tower"),
    (["--image", "nope"], "--image: no decodable sample with key 'nope'"),
    (["--image", "digits_00001", "--k", "0"], "--k: must be >= 1"),
])
def test_refusals_are_one_line(runs, capsys, args, message):
    assert main(["search", "--checkpoint", str(runs / "simclr"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: " + err[len("error: "):] and "\n" not in err
    assert message.format(simclr=runs / "simclr") in err
    assert main(["search", "--checkpoint", str(runs / "nothing"), "--image", "x"]) == 2
    assert "does not exist (expected a finished run directory" in capsys.readouterr().err
