"""The DALI training stream on CPU: shapes, normalisation, views, disabled ops, corrupt images, endless epochs."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.dali import DaliAugmenter, build_pipeline
from data_pipeline.loader import make_train_stream
from data_pipeline.shards import list_shards, read_manifest, write_shards
from data_pipeline.sources import digits_uint8
from data_pipeline.views import AugmentConfig

ROOT = Path(__file__).resolve().parents[2]
GRAY = dict(mean=[0.5], std=[0.25])
ALL_ON = dict(solarize_prob=0.5, affine_prob=0.5, rotate_degrees=15.0, translate=(0.1, 0.1), scale=(0.9, 1.1),
              noise_prob=0.5, noise_std=0.05)


def _stream(shards, aug, **kw):
    args = dict(batch_size=32, aug=aug, image_size=16, channels=1, rank=0, world_size=1, num_workers=1,
                shuffle_buffer=64, seed=0)
    return make_train_stream(shards, **{**args, **kw})


def test_disabled_aug_is_exact_normalisation(digits_dir):
    """All aug off at the native 8x8 size: each view is exactly (pixel / 255 - mean) / std of its digit."""
    images, labels = digits_uint8()
    with _stream(list_shards(digits_dir), AugmentConfig.disabled(**GRAY), image_size=8) as stream:
        batch = next(iter(stream))
    idx = [int(k.split("_")[1]) for k in batch["keys"]]
    expected = (torch.from_numpy(images[idx]).float()[:, None] / 255.0 - 0.5) / 0.25
    assert batch["views"][0].dtype == torch.float32 and batch["views"][0].shape == (32, 1, 8, 8)
    torch.testing.assert_close(batch["views"][0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch["views"][1], batch["views"][0], atol=0, rtol=0)
    assert batch["label"].dtype == torch.long and batch["label"].tolist() == labels[idx].tolist()


@pytest.mark.parametrize("channels, mean, std", [(1, [0.5], [0.5]), (3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
def test_aug_views_shaped_and_different(digits_dir, channels, mean, std):
    """With every op on, views are (B, C, 16, 16), finite, roughly normalised, and differ between views."""
    aug = AugmentConfig(mean=mean, std=std, **ALL_ON)
    with _stream(list_shards(digits_dir), aug, channels=channels, num_views=3) as stream:
        batch = next(iter(stream))
    views = batch["views"]
    assert len(views) == 3 and all(v.shape == (32, channels, 16, 16) for v in views)
    assert all(torch.isfinite(v).all() for v in views)
    lo, hi = (0 - max(mean)) / min(std), (1 - min(mean)) / min(std)
    assert all(lo - 1e-4 <= v.min() and v.max() <= hi + 1e-4 for v in views)
    for a, b in itertools.combinations(views, 2):
        per_sample = (a - b).flatten(1).abs().amax(1)
        assert (per_sample > 0.1).float().mean() > 0.9  # nearly every image has two distinct views


def _has_op(serialized: bytes, name: str) -> bool:
    """Whether a serialized DALI pipeline has an operator ``name`` (a length-prefixed protobuf string field 1)."""
    raw = name.encode()
    return b"\n" + bytes([len(raw)]) + raw in serialized


def test_building_a_pipeline_leaves_no_temp_files(tmp_path):
    """DALI's conditionals write the converted graph functions to temp files, deleted only at a normal exit; a process
    that ends without it (as the loader's worker processes do: os._exit) leaves none behind after a build either."""
    code = ("import os\n"
            "from data_pipeline.dali import build_pipeline\n"
            "from data_pipeline.views import AugmentConfig\n"
            "build_pipeline(AugmentConfig(), batch_size=2, image_size=16, channels=3)\n"
            "print(len(os.listdir(os.environ['TMPDIR'])), flush=True)\n"
            "os._exit(0)\n")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "0" and not list(tmp_path.iterdir())


def test_disabled_ops_absent_from_graph():
    """Ops switched off are not in the DALI graph; switched on they are."""
    op_names = ["RandomResizedCrop", "Flip", "WarpAffine", "BrightnessContrast", "LookupTable", "Hsv", "GaussianBlur",
                "noise__Gaussian", "random__CoinFlip", "Cast"]
    on = build_pipeline(AugmentConfig(**ALL_ON), batch_size=2, image_size=16, channels=3).serialize()
    off = build_pipeline(AugmentConfig.disabled(), batch_size=2, image_size=16, channels=3).serialize()
    assert AugmentConfig(**ALL_ON).enabled_ops(3) == ["random_resized_crop", "flip", "affine", "jitter", "grayscale",
                                                      "blur", "solarize", "noise"]
    for name in op_names:
        assert _has_op(on, name), name
        assert not _has_op(off, name), name
    assert _has_op(off, "Resize") and not _has_op(on, "Resize")
    only_blur = AugmentConfig.disabled(blur_prob=0.5)
    assert only_blur.enabled_ops(3) == ["blur"]
    serial = build_pipeline(only_blur, batch_size=2, image_size=16, channels=3).serialize()
    assert [n for n in op_names if _has_op(serial, n)] == ["GaussianBlur", "random__CoinFlip"]


def test_corrupt_jpeg_counted_and_skipped(tmp_path, image_tree, corrupt, caplog):
    """JPEGs with garbage bytes are dropped and counted, by training's stream and by the decoding of eval / embed /
    search; every yielded batch is full and has no bad key."""
    root = image_tree(tmp_path / "imgs", classes={"a": 20, "b": 20})
    bad = [root / "a" / "4.jpg", root / "b" / "10.jpg"]
    for path in bad:
        corrupt(path)
    write_shards(f"folder:{root}", tmp_path / "ds", shard_size=10, progress=False)
    from pretrain.config import load_config
    from pretrain.eval.dataset import ShardImages

    caplog.set_level("WARNING")
    decoder = ShardImages(load_config(ROOT / "configs" / "simclr_digits.yaml", ["data.channels=3"]))
    assert sum(len(samples) for samples, _ in decoder.batches(list_shards(tmp_path / "ds"))) == 38
    assert decoder.corrupt == 2
    aug = AugmentConfig(flip_prob=0.5, blur_prob=0.0)
    with _stream(list_shards(tmp_path / "ds"), aug, batch_size=8, channels=3, num_workers=2) as stream:
        batches = list(itertools.takewhile(lambda b: b["epoch"] == 0, stream))
        stats = dict(stream.stats)
    keys = [k for b in batches for k in b["keys"]]
    # keys in source order (a class's files sorted); the stream has read into epoch 1 by now, which may meet one again
    order = [path for name in ("a", "b") for path in sorted((root / name).rglob("*"))]
    broken = {f"{order.index(path):08d}" for path in bad}
    assert {r.args[0] for r in caplog.records if r.msg.startswith("skipping undecodable")} == broken
    assert stats["corrupt"] >= 2 and not broken & set(k for b in batches for k in b["keys"])
    assert len(batches) == 38 // 8 and all(b["views"][0].shape == (8, 3, 16, 16) for b in batches)
    assert len(set(keys)) == len(keys) == stats["samples"] - 8  # the first epoch-1 batch was counted, not kept


def test_truncated_tar_through_stream(digits_copy):
    """A truncated shard shows up in stream.stats once per epoch and the stream keeps going into later epochs."""
    victim = digits_copy / "shard-000002.tar"
    victim.write_bytes(victim.read_bytes()[:5000])  # keeps 2 complete samples (2 members of 512 + 512 bytes each)
    seen = []  # (epoch, truncated count so far) per batch
    with _stream(list_shards(digits_copy), AugmentConfig.disabled(**GRAY), batch_size=64, num_workers=2) as stream:
        for batch in stream:
            seen.append((batch["epoch"], stream.stats["truncated_shards"]))
            if batch["epoch"] == 2:
                break
    first = {e: next(t for ep, t in seen if ep == e) for e in (1, 2)}
    # counts travel with the chunk after the shard's end, so the next epoch's first batch may include its own
    assert 1 <= first[1] <= 2 and 2 <= first[2] <= 3
    assert [e for e, _ in seen].count(0) == (1797 - 256 + 2) // 64


def test_endless_epochs_reshuffle(digits_dir):
    """After the first epoch the stream continues with epoch 1 in a different order."""
    with _stream(list_shards(digits_dir), AugmentConfig.disabled(**GRAY), batch_size=128, num_workers=2) as stream:
        batches = list(itertools.islice(stream, 2 * (1797 // 128)))
    e0 = [k for b in batches if b["epoch"] == 0 for k in b["keys"]]
    e1 = [k for b in batches if b["epoch"] == 1 for k in b["keys"]]
    assert len(e0) == len(e1) == 1797 // 128 * 128 and e0 != e1


def test_bad_stream_args_one_line(digits_dir):
    """mean/std that do not fit the channels, or a bad batch size, fail before any worker starts."""
    with pytest.raises(ValueError, match="mean: has 3 values for 1 channel"):
        _stream(list_shards(digits_dir), AugmentConfig())
    with pytest.raises(ValueError, match="batch_size"):
        _stream(list_shards(digits_dir), AugmentConfig(**GRAY), batch_size=0)


def test_numpy_free_labels(digits_dir):
    """Labels agree with the manifest for the keys of a stream batch under full augmentation."""
    _, labels = digits_uint8()
    with _stream(list_shards(digits_dir), AugmentConfig(**GRAY, **ALL_ON)) as stream:
        batch = next(iter(stream))
    idx = np.array([int(k.split("_")[1]) for k in batch["keys"]])
    assert batch["label"].tolist() == labels[idx].tolist()


def test_pil_baseline_matches_dali_when_aug_off(digits_dir):
    """The PIL baseline (benchmark reference) equals DALI with every op off and gives distinct views with ops on."""
    from data_pipeline.cpu import PilAugmenter
    from data_pipeline.dali import DaliAugmenter
    from data_pipeline.reader import read_epoch

    images = [s["image"] for s in itertools.islice(read_epoch(list_shards(digits_dir), rank=0, world_size=1,
                                                                num_workers=0), 16)]
    off = AugmentConfig.disabled(**GRAY)
    dali = DaliAugmenter(off, batch_size=16, image_size=8, channels=1)(images)
    pil = PilAugmenter(off, image_size=8, channels=1)(images)
    torch.testing.assert_close(pil[0], dali[0], atol=1e-5, rtol=0)
    on = PilAugmenter(AugmentConfig(mean=[0.5] * 3, std=[0.5] * 3, **ALL_ON), image_size=16, channels=3)(images)
    assert [v.shape for v in on] == [(16, 3, 16, 16)] * 2 and not torch.equal(on[0], on[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_matches_cpu_and_streams(digits_dir):
    """On GPU (mixed decoder, gpu ops) views equal the CPU graph's with every op off; the full stream runs on cuda."""
    from data_pipeline.dali import DaliAugmenter
    from data_pipeline.reader import read_epoch

    images = [s["image"] for s in itertools.islice(read_epoch(list_shards(digits_dir), rank=0, world_size=1,
                                                                num_workers=0), 16)]
    off = AugmentConfig.disabled(**GRAY)
    cpu = DaliAugmenter(off, batch_size=16, image_size=8, channels=1)(images)
    gpu = DaliAugmenter(off, batch_size=16, image_size=8, channels=1, device="cuda", device_id=0)(images)
    assert gpu[0].is_cuda
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-5, rtol=0)
    with _stream(list_shards(digits_dir), AugmentConfig(mean=[0.5] * 3, std=[0.5] * 3, **ALL_ON), channels=3,
                 device="cuda") as stream:
        batch = next(iter(stream))
    assert batch["views"][0].is_cuda and batch["views"][0].shape == (32, 3, 16, 16)
    assert not torch.equal(batch["views"][0], batch["views"][1])


def _take(stream, n: int) -> list[dict]:
    it = iter(stream)
    return [next(it) for _ in range(n)]


def _split(stream, before: int, after: int) -> tuple[list[dict], dict, list[dict]]:
    """``before`` batches, the stream's state there, then the next ``after`` batches (one iterator)."""
    it = iter(stream)
    head = [next(it) for _ in range(before)]
    state = stream.state_dict()
    return head, state, [next(it) for _ in range(after)]


def _same_batches(a: list[dict], b: list[dict]) -> None:
    assert [x["keys"] for x in a] == [y["keys"] for y in b]
    assert [x["epoch"] for x in a] == [y["epoch"] for y in b]
    for x, y in zip(a, b):
        for u, v in zip(x["views"], y["views"]):
            torch.testing.assert_close(u, v, atol=0, rtol=0)


def test_resumed_stream_yields_what_the_uninterrupted_one_would(digits_dir):
    """From a mid-epoch state, a new stream (here with another DALI thread count) yields exactly the next batches
    (keys, order, augmented pixels) of the uninterrupted stream, across the epoch boundary, and carries its stats on."""
    kw = dict(batch_size=128, num_workers=2, num_views=2)  # 14 batches per epoch: resume at 10, read on to 20
    aug = AugmentConfig(**GRAY, **ALL_ON)
    with _stream(list_shards(digits_dir), aug, **kw) as whole:
        head, state, tail = _split(whole, 10, 10)
        stats = dict(whole.stats)
    assert state["epoch"] == 0 and state["batches"] == 10 and state["taken"] == 1280
    assert tail[3]["epoch"] == 0 and tail[4]["epoch"] == 1
    with _stream(list_shards(digits_dir), aug, resume=state, dali_threads=1, **kw) as resumed:
        again = _take(resumed, 10)
        assert resumed.stats == stats and resumed.skipped[0] == 1280
    _same_batches(again, tail)
    assert not set(k for b in head for k in b["keys"]) & set(k for b in again[:4] for k in b["keys"])
    with _stream(list_shards(digits_dir), aug, start_epoch=0, **kw) as fresh:  # the old resume: epoch start
        assert _take(fresh, 1)[0]["keys"] == head[0]["keys"]


TRUNCATE = 1  # a shard read (and its truncation counted) before the saved position


def test_resume_keeps_corrupt_handling_exact(tmp_path, image_tree, corrupt):
    """With undecodable JPEGs before and after the saved position (pipeline rebuilt each time) and a truncated shard
    counted before it, the resumed stream yields exactly the uninterrupted stream's batches and problem counts."""
    root = image_tree(tmp_path / "imgs", classes={"a": 24, "b": 24})
    for path in sorted(root.glob("*/*.jpg"))[::5]:
        corrupt(path)
    write_shards(f"folder:{root}", tmp_path / "ds", shard_size=12, progress=False)
    shards = list_shards(tmp_path / "ds")
    victim = Path(shards[TRUNCATE])
    victim.write_bytes(victim.read_bytes()[:9000])
    kw = dict(batch_size=6, channels=3, num_workers=2, shuffle_buffer=8)
    aug = AugmentConfig(flip_prob=0.5, blur_prob=0.0)
    with _stream(shards, aug, **kw) as whole:
        it = iter(whole)
        _ = [next(it) for _ in range(3)]
        state, rebuilds = whole.state_dict(), whole._augment.rebuilds
        tail = [next(it) for _ in range(8)]
        stats = dict(whole.stats)
    assert 0 < state["stats"]["corrupt"] < stats["corrupt"] and rebuilds > 0  # corrupt samples on both sides
    assert state["stats"]["truncated_shards"] == 1
    with _stream(shards, aug, resume=state, **kw) as resumed:
        again = _take(resumed, 8)
        assert resumed.stats == stats
    _same_batches(again, tail)


def test_state_from_other_settings_restarts_the_epoch(digits_dir, caplog):
    """A saved position taken under another batch size is not applied: a warning, and the saved epoch from its start."""
    aug = AugmentConfig(**GRAY)
    with _stream(list_shards(digits_dir), aug, batch_size=64, num_workers=1) as s:
        _take(s, 3)
        state = s.state_dict()
    with _stream(list_shards(digits_dir), aug, batch_size=32, num_workers=1) as fresh:
        first = _take(fresh, 1)[0]
    with caplog.at_level("WARNING"), _stream(list_shards(digits_dir), aug, batch_size=32, num_workers=1,
                                             resume=state) as other:
        got = _take(other, 1)[0]
    assert "other data settings" in caplog.text
    assert got["keys"] == first["keys"] and got["epoch"] == 0


@pytest.mark.parametrize("saved", ["none", "other_graph"])
def test_resume_without_dali_state_keeps_the_samples(digits_dir, saved, caplog):
    """A position saved where DALI could not checkpoint the graph (augment state None), or with the state of another
    DALI graph (as an earlier version of the augmentations saved: DALI refuses it, "the checkpoint might come from
    another pipeline"), still resumes the exact samples and order; only the augmentation is drawn afresh, the latter
    with a warning."""
    aug = AugmentConfig(**GRAY, **ALL_ON)
    with _stream(list_shards(digits_dir), aug, batch_size=128, num_workers=2) as whole:
        _, state, tail = _split(whole, 5, 3)
    if saved == "none":
        state["augment"]["dali"] = None
    else:
        other = DaliAugmenter(AugmentConfig(**GRAY), batch_size=128, image_size=16, channels=1)
        state["augment"]["dali"] = other.state_dict()["dali"]
    with caplog.at_level("WARNING"), _stream(list_shards(digits_dir), aug, batch_size=128, num_workers=2,
                                             resume=state) as resumed:
        again = _take(resumed, 3)
    assert [b["keys"] for b in again] == [b["keys"] for b in tail]
    assert not torch.equal(again[0]["views"][0], tail[0]["views"][0])
    assert ("augments afresh" in caplog.text) == (saved == "other_graph")


def test_local_views_are_plain_resizes_without_crop(digits_dir):
    """Multi-crop with every op off and local_crop_scale (1, 1): the 2 global views are 16x16, the 3 local views are
    the exact 8x8 normalisation of each digit (its native size), after the globals in the list."""
    images, _ = digits_uint8()
    with _stream(list_shards(digits_dir), AugmentConfig.disabled(**GRAY), local_views=3, local_size=8,
                 local_crop_scale=(1.0, 1.0)) as stream:
        batch = next(iter(stream))
    idx = [int(k.split("_")[1]) for k in batch["keys"]]
    expected = (torch.from_numpy(images[idx]).float()[:, None] / 255.0 - 0.5) / 0.25
    views = batch["views"]
    assert [tuple(v.shape) for v in views] == [(32, 1, 16, 16)] * 2 + [(32, 1, 8, 8)] * 3
    for v in views[2:]:
        torch.testing.assert_close(v, expected, atol=1e-5, rtol=0)


def test_local_views_crop_their_own_range(digits_dir):
    """Local crops draw their area from local_crop_scale, not from aug.crop_scale: with global crops off (plain
    resize) and local crops of 10-20% of the area, every local view differs from the resized digit and from the other
    local view."""
    images, _ = digits_uint8()
    aug = AugmentConfig.disabled(**GRAY)
    with _stream(list_shards(digits_dir), aug, image_size=8, local_views=2, local_size=8,
                 local_crop_scale=(0.1, 0.2)) as stream:
        batch = next(iter(stream))
    g0, _, l0, l1 = batch["views"]
    idx = [int(k.split("_")[1]) for k in batch["keys"]]
    torch.testing.assert_close(g0, (torch.from_numpy(images[idx]).float()[:, None] / 255.0 - 0.5) / 0.25,
                               atol=1e-5, rtol=0)
    for a, b in ((l0, g0), (l0, l1)):
        assert ((a - b).flatten(1).abs().amax(1) > 0.1).float().mean() > 0.9


def test_resume_with_local_views_is_exact_and_fingerprinted(digits_dir, caplog):
    """A mid-epoch position with local crops resumes to the same global and local views; a state saved without local
    crops is not applied to a stream with them (other data settings)."""
    kw = dict(batch_size=128, num_workers=1, local_views=2, local_size=8, local_crop_scale=(0.2, 0.5))
    aug = AugmentConfig(**GRAY, **ALL_ON)
    with _stream(list_shards(digits_dir), aug, **kw) as whole:
        _, state, tail = _split(whole, 3, 2)
    with _stream(list_shards(digits_dir), aug, resume=state, **kw) as resumed:
        again = _take(resumed, 2)
    assert all(len(b["views"]) == 4 for b in again)
    _same_batches(again, tail)
    with _stream(list_shards(digits_dir), aug, batch_size=128, num_workers=1) as plain:
        _take(plain, 3)
        plain_state = plain.state_dict()
    with caplog.at_level("WARNING"), _stream(list_shards(digits_dir), aug, resume=plain_state, **kw) as other:
        assert _take(other, 1)[0]["epoch"] == 0
    assert "other data settings" in caplog.text
    assert plain_state["fingerprint"] != state["fingerprint"]


def test_captions_ride_with_their_images(tmp_path, image_tree):
    """With text=True every batch carries each sample's caption; samples without one (or with an empty one) are
    skipped and counted as corrupt, like an undecodable image; a caption-less dataset is refused before training."""
    from pretrain.config import ConfigError, DataConfig
    from pretrain.data import resolve_shards

    root = image_tree(tmp_path / "imgs", classes={"a": 12, "b": 12})
    for cls in ("a", "b"):
        for i in range(12):
            if (cls, i) in (("a", 3), ("b", 7)):
                continue  # no caption
            text = "" if (cls, i) == ("b", 8) else f"{cls} number {i}"
            (root / cls / f"{i}.txt").write_text(text)
    write_shards(f"folder:{root}", tmp_path / "ds", shard_size=5, progress=False)
    keys = {r["key"]: r["caption"] for r in read_manifest(tmp_path / "ds").to_pylist()}
    with _stream(list_shards(tmp_path / "ds"), AugmentConfig(), batch_size=7, channels=3, num_workers=2,
                 num_views=1, text=True) as stream:
        batches = list(itertools.takewhile(lambda b: b["epoch"] == 0, stream))
        stats = dict(stream.stats)
    # epoch 0 is exactly the 21 captioned samples; the 3 others were counted (and again in the epoch-1 read-ahead)
    assert sorted(k for b in batches for k in b["keys"]) == sorted(k for k, c in keys.items() if c)
    assert stats["corrupt"] >= 3
    for b in batches:
        assert b["text"] == [keys[k] for k in b["keys"]] and all(b["text"])
    # the caption-less image tree as shards: refused with one line naming the source
    bare = image_tree(tmp_path / "bare", classes={"a": 2})
    write_shards(f"folder:{bare}", tmp_path / "bare-ds", shard_size=5, progress=False)
    with pytest.raises(ConfigError, match="has no captions"):
        resolve_shards(DataConfig(source=str(tmp_path / "bare-ds")), captions=True)
    assert resolve_shards(DataConfig(source=str(tmp_path / "bare-ds")))  # fine for an image-only method
    with pytest.raises(ConfigError, match="data.source: samples has no captions"):  # a built-in source alike
        resolve_shards(DataConfig(source="samples", cache_dir=str(tmp_path / "cache")), captions=True)


def test_asymmetric_views_each_get_their_own_recipe(digits_dir, caplog):
    """Per-view recipes (BYOL's and DINO's asymmetric views): with every random op off but solarization at threshold
    0 (which inverts every pixel) in the first global view and the local crops only, those views are the exact
    normalisation of the inverted digit, the second global view that of the digit itself. A position saved with
    symmetric views is not applied to asymmetric ones (other data settings)."""
    images, _ = digits_uint8()
    off = AugmentConfig.disabled(**GRAY)
    invert = AugmentConfig.disabled(**GRAY, solarize_prob=1.0, solarize_threshold=0.0)
    kw = dict(image_size=8, num_workers=1, local_views=1, local_size=8, local_crop_scale=(1.0, 1.0))
    with _stream(list_shards(digits_dir), off, view_augs=[invert, off], local_aug=invert, **kw) as stream:
        batch = next(iter(stream))
        asym_state = stream.state_dict()
    idx = [int(k.split("_")[1]) for k in batch["keys"]]
    pixels = torch.from_numpy(images[idx]).float()[:, None]
    plain, inverted = (pixels / 255.0 - 0.5) / 0.25, ((255.0 - pixels) / 255.0 - 0.5) / 0.25
    g0, g1, local = batch["views"]
    torch.testing.assert_close(g0, inverted, atol=1e-5, rtol=0)
    torch.testing.assert_close(g1, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(local, inverted, atol=1e-5, rtol=0)
    with _stream(list_shards(digits_dir), off, **kw) as symmetric:
        _take(symmetric, 2)
        state = symmetric.state_dict()
    assert state["fingerprint"] != asym_state["fingerprint"]
    with caplog.at_level("WARNING"), _stream(list_shards(digits_dir), off, view_augs=[invert, off],
                                             local_aug=invert, resume=state, **kw) as other:
        assert _take(other, 1)[0]["epoch"] == 0
    assert "other data settings" in caplog.text
    with pytest.raises(ValueError, match="view_augs: 1 recipes for num_views=2"):
        _stream(list_shards(digits_dir), off, view_augs=[invert])
