"""Encoder evaluation against random-init and raw-pixel baselines, on the real digits."""

import json

import numpy as np
import pytest
import torch

from pretrain.eval import METRICS, digits_eval_set, evaluate_encoder, extract_features, format_report, write_report


def _encoder(seed: int) -> torch.nn.Module:
    """A tiny real encoder: flatten + a fixed random linear map + ReLU, (B, 1, 8, 8) -> (B, 64)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU())


@pytest.fixture(scope="module")
def digits():
    return digits_eval_set(image_size=8, channels=1, mean=[0.5], std=[0.5])


@pytest.fixture(scope="module")
def report(digits):
    images, labels = digits
    return evaluate_encoder(_encoder(0), _encoder(1), images, labels)


def test_report_has_all_keys_in_unit_range(report):
    """Trained, random_init and raw_pixels each carry the six metrics, all in [0, 1]."""
    for section in (report, report["random_init"], report["raw_pixels"]):
        for key in METRICS:
            assert 0.0 <= section[key] <= 1.0, key
    assert set(report) == set(METRICS) | {"random_init", "raw_pixels", "notes"}
    assert report["notes"] == []  # ~135 training images a class: no score bounded by the data


def test_classes_smaller_than_what_knn_and_retrieval_read_are_noted(capsys):
    """25 classes of 10 images (7 or 8 to train on): features that separate the classes (one axis per class) score 1
    on the linear probe, and retrieval_p10 exactly at its ceiling, the training images of each query's class over 10
    (kNN's 20 voters are most of them of other classes: a looser separation scored 0.84 where every other score was
    1): the report says both, and why, under the table."""
    from pretrain.eval.digits import split_indices
    from pretrain.eval.report import format_report, report_features

    labels = np.repeat(np.arange(25), 10)
    features = np.eye(25, dtype=np.float32)[labels] + 0.1 * np.random.default_rng(0).normal(size=(250, 25))
    report = report_features({"trained": features.astype(np.float32)}, labels)
    train, test = split_indices(labels, seed=0)
    counts = np.bincount(labels[train], minlength=25)
    ceiling = float(np.mean(counts[labels[test]] / 10))
    assert report["linear_top1"] == 1.0
    assert report["retrieval_p10"] == pytest.approx(ceiling) and ceiling < 1
    assert report["notes"] == [
        f"retrieval_p10 is at most {ceiling:.4f} here: 25 of 25 classes have fewer than 10 training images to find",
        f"knn_top1 can stay below 1 for features that separate the classes: 25 of 25 classes have fewer training "
        f"images than the 20 that vote (fewest: {counts.min()})"]
    assert format_report(report).splitlines()[-2:] == [f"Note: {n}" for n in report["notes"]]


def test_zero_shot_prompts_cut_by_the_text_tower_are_noted():
    """Class names that differ only past the bytes the text tower reads (method.context_length - 2) make the same
    prompts: zero-shot scored chance without a word. Named; prompts merely cut are counted; short ones give none."""
    from pretrain.eval.zeroshot import cut_prompt_notes

    templates = ("a photo of a {}.", "a picture of a {}.")
    same = ["golden retriever puppy photographed outdoors", "golden retriever puppy photographed indoors"]
    assert cut_prompt_notes(same, templates, 46) == [
        "zero-shot: classes 'golden retriever puppy photographed outdoors' and 'golden retriever puppy photographed "
        "indoors' read the same to the text tower, which reads the first 46 bytes of a prompt (method.context_length "
        "48): it cannot tell them apart"]
    assert cut_prompt_notes(same, templates, 60) == []  # all of both read
    assert cut_prompt_notes(["a long class name here", "cat"], templates, 20) == [
        "zero-shot: the prompts of 1 of 2 classes are cut at 20 bytes (method.context_length 22), e.g. 'a photo of a "
        "a long class name here.'"]


def test_raw_pixels_knn_on_digits_is_high(report):
    """Measured sanity check: weighted kNN on raw digit pixels is above 90%."""
    assert report["raw_pixels"]["knn_top1"] > 0.9


def test_extract_features_shape_and_restores_train_mode(digits):
    """Features are (N, F) float32, equal to a plain forward pass, and the encoder goes back to train mode."""
    images, _ = digits
    enc = _encoder(0).train()
    feats = extract_features(enc, images[:100], batch_size=32)
    assert feats.shape == (100, 64) and feats.dtype == "float32"
    assert enc.training
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(feats), enc(images[:100]))


def test_extract_features_runs_in_eval_mode(digits):
    """Dropout is off during extraction: two extractions agree exactly."""
    images, _ = digits
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5)).train()
    assert (extract_features(enc, images[:50]) == extract_features(enc, images[:50])).all()
    assert enc.training


def test_extract_features_rejects_non_2d_output(digits):
    """An encoder returning (B, C, H, W) is a ValueError naming the expected shape."""
    with pytest.raises(ValueError, match=r"\(B, F\)"):
        extract_features(torch.nn.Identity(), digits[0][:4])


def test_format_report_has_a_row_per_metric_and_three_columns(report):
    """The table lists every metric with trained / random init / raw pixels values."""
    table = format_report(report)
    assert "trained" in table and "random init" in table and "raw pixels" in table
    for key in METRICS:
        row = next(line for line in table.splitlines() if line.startswith(key))
        assert f"{report[key]:.4f}" in row and f"{report['raw_pixels'][key]:.4f}" in row


def test_a_small_test_split_is_said_to_be_coarse(report):
    """The first line names the data; where its 25% test split is under 100 images it says what one image is worth
    (40 samples: a split of 10, one image 10 points), and nothing of the kind for the 1,797 digits."""
    data = {"dataset": "mine", "samples": 40, "classes": 2, "corrupt": 0, "dropped_classes": [], "duplicates": 0}
    first = format_report({**report, "data": data}).splitlines()[0]
    assert first == ("Evaluated on mine: 40 samples, 2 classes; only 10 test images: one image moves an accuracy by "
                     "10.0 points")
    first = format_report({**report, "data": {**data, "samples": 1797}}).splitlines()[0]
    assert first == "Evaluated on mine: 1797 samples, 2 classes"
    first = format_report({**report, "data": {**data, "samples": 1797, "unlabelled": 20}}).splitlines()[0]
    assert first == "Evaluated on mine: 1797 samples, 2 classes, 20 unlabelled left out"


def test_write_report_round_trips(report, tmp_path):
    """eval.json holds exactly the report."""
    path = tmp_path / "run" / "eval.json"
    write_report(report, path)
    assert json.loads(path.read_text()) == report
