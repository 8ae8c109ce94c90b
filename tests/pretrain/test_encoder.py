"""`pretrain.load_encoder`: a finished run's encoder in the user's code prepares images as the run's evaluation views
are made (PIL decode, resize, grey conversion, normalisation) to within a grey level, and gives the run's features."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

import pretrain
from data_pipeline.cpu import PilAugmenter
from data_pipeline.sources import digits_uint8
from data_pipeline.views import AugmentConfig
from pretrain.index import load_run
from tests.util import write_run

ROOT = Path(__file__).resolve().parents[2]
SMALL = "model.backbone_kwargs={width: 0.25}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    write_run(root / "simclr", "simclr_digits.yaml", root / "cache", SMALL)
    write_run(root / "simclr_rgb", "simclr_digits.yaml", root / "cache", SMALL, "data.channels=3", "data.image_size=24",
              "data.aug.mean=[0.5, 0.4, 0.3]", "data.aug.std=[0.2, 0.25, 0.3]")
    write_run(root / "clip", "clip_digits.yaml", root / "cache", SMALL, "method.text_width=32", "method.text_depth=1")
    return root


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _eval_views(encoder, arrays: np.ndarray) -> torch.Tensor:
    """What evaluation and `pretrain search` feed the run (pretrain.eval.dataset.ShardImages): PIL, no augmentation."""
    d = encoder.config.data
    mean, std = d.aug.channel_stats(d.channels)
    views = PilAugmenter(AugmentConfig.disabled(mean=mean, std=std), image_size=d.image_size, channels=d.channels,
                         num_views=1)
    return views([_png(a) for a in arrays])[0]


def _crops() -> np.ndarray:
    """Nine 64x64 RGB crops of a sample photo, (9, 64, 64, 3) uint8."""
    photo = load_sample_images().images[0]
    return np.stack([photo[i * 64:(i + 1) * 64, j * 64:(j + 1) * 64] for i in range(3) for j in range(3)])


def _grey_levels(a: torch.Tensor, b: torch.Tensor, std) -> float:
    return float(((a - b).abs() * torch.tensor(std).view(1, -1, 1, 1)).max() * 255)


@pytest.mark.parametrize("run, source", [("simclr", "digits"), ("simclr", "photo"), ("simclr_rgb", "digits"),
                                         ("simclr_rgb", "photo")])
def test_preprocess_matches_the_evaluation_views(runs, run, source):
    """Grey 8x8 digits and 64x64 colour crops, as uint8 tensors, into a grey 16x16 run and a colour 24x24 one:
    within one grey level of the PIL path (which rounds to 8 bits), float input in [0, 1] the same as uint8."""
    encoder = pretrain.load_encoder(runs / run)
    arrays = digits_uint8()[0][:64] if source == "digits" else _crops()
    x = torch.from_numpy(arrays)
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    got = encoder.preprocess(x)
    assert got.shape == (len(arrays), encoder.channels, encoder.image_size, encoder.image_size)
    d = encoder.config.data
    assert _grey_levels(got, _eval_views(encoder, arrays), d.aug.channel_stats(d.channels)[1]) <= 1.0
    torch.testing.assert_close(encoder.preprocess(x.float() / 255), got)


def test_features_are_the_runs(runs):
    """encoder(images) is the released backbone on the prepared images, in eval mode, on CPU."""
    encoder = pretrain.load_encoder(runs / "simclr")
    x = torch.from_numpy(digits_uint8()[0][:32])[:, None]
    run = load_run(runs / "simclr")
    with torch.no_grad():
        feats = encoder(x)
        torch.testing.assert_close(feats, run.encode_image(encoder.preprocess(x)))
    assert feats.shape[0] == 32 and feats.ndim == 2 and not encoder.training and not encoder.has_text


def test_clip_encodes_images_and_texts_in_one_space(runs):
    """A CLIP run's encoder gives the image tower's projected embeddings and encode_text in the same width; no texts
    give no rows, and one string (not a list) is refused."""
    encoder = pretrain.load_encoder(runs / "clip")
    run = load_run(runs / "clip")
    x = torch.from_numpy(digits_uint8()[0][:8])[:, None]
    with torch.no_grad():
        images = encoder(x)
        torch.testing.assert_close(images, run.encode_image(encoder.preprocess(x)))
    texts = encoder.encode_text(["a handwritten seven", "the digit 3"])
    assert encoder.has_text and texts.shape == (2, images.shape[1])
    assert encoder.encode_text([]).shape == (0, images.shape[1])  # as images[:0] (it had raised max()'s RuntimeError)
    with pytest.raises(ValueError, match=r"^texts: a list of strings, got one string; pass \[text\]$"):
        encoder.encode_text("seven")  # (it had been five texts, one a character)


def test_a_clip_backbone_without_its_model_is_refused(runs, tmp_path):
    """A CLIP run's backbone.pt copied (or linked) without the model.pt beside it: one line saying so (its text tower
    and projections had been left at a random init, the features and search results silently wrong)."""
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "backbone.pt").symlink_to(runs / "clip" / "backbone.pt")
    message = (f"^{alone / 'backbone.pt'} is a clip run's, which is used with the model.pt written beside it, and "
               f"{alone} has none; give the run directory, or copy its model.pt beside the backbone.pt$")
    with pytest.raises(ValueError, match=message):
        pretrain.load_encoder(alone / "backbone.pt")
    from pretrain.cli import main

    assert main(["eval", "--checkpoint", str(alone / "backbone.pt")]) == 2
    assert not (alone / "eval.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU takes the device")
def test_a_device_the_machine_lacks_is_one_line(runs):
    with pytest.raises(ValueError, match=r"^device 'cuda': this machine has no GPU that torch can use; device='auto' "):
        pretrain.load_encoder(runs / "simclr", device="cuda")
    encoder = pretrain.load_encoder(runs / "simclr", device="auto")
    assert {p.device.type for p in encoder.parameters()} == {"cpu"}


def test_bad_input_is_one_line(runs, tmp_path):
    encoder = pretrain.load_encoder(runs / "simclr")
    with pytest.raises(ValueError, match=r"images must be \(B, C, H, W\) with C 1 or 3, got \(2, 2, 8, 8\)"):
        encoder(torch.zeros(2, 2, 8, 8))
    # floats outside [0, 1]: pixel values not divided by 255, or images normalised already
    with pytest.raises(ValueError, match=r"float images must be in \[0, 1\] \(these span 0\.\.255\); pass uint8"):
        encoder(torch.arange(256.0).view(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"these span -1\.5\.\.0\.5"):
        encoder(torch.full((1, 3, 8, 8), 0.5).index_fill_(1, torch.tensor([0]), -1.5))
    with pytest.raises(ValueError, match=r"must be uint8 \(0\.\.255\) or float \(in \[0, 1\]\), got torch.int64"):
        encoder(torch.zeros(1, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^float images hold NaN or inf$"):  # NaN passes a range test
        encoder(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"^images must be a torch tensor \(B, C, H, W\), got ndarray"):
        encoder(torch.zeros(1, 8, 8, 3, dtype=torch.uint8).numpy())
    assert encoder(torch.rand(2, 1, 8, 8)).shape[0] == 2 and encoder(torch.rand(0, 1, 8, 8)).shape[0] == 0
    with pytest.raises(ValueError, match="a simclr run has no text tower"):
        encoder.encode_text(["seven"])
    # the Python API's messages name no CLI flag
    with pytest.raises(ValueError, match=f"^{tmp_path / 'nope'} does not exist"):
        pretrain.load_encoder(tmp_path / "nope")
    (tmp_path / "train.log").write_text("not weights\n")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'train.log'} is not a backbone.pt that training writes"):
        pretrain.load_encoder(tmp_path / "train.log")
    from pretrain.cli import main

    assert main(["eval", "--checkpoint", str(tmp_path / "train.log")]) == 2  # the CLI's: one line naming its flag
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt is not a backbone.pt that training writes \(no config and"):
        pretrain.load_encoder(tmp_path / "other.pt")


def test_the_cli_does_not_import_torch():
    """`pretrain.load_encoder` is found lazily: importing the package (and its CLI) stays light."""
    code = "import sys, pretrain, pretrain.cli; assert 'torch' not in sys.modules; print(pretrain.load_encoder)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "load_encoder" in proc.stdout, proc.stderr
