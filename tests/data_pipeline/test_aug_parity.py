"""The colour ops of the training views (DALI) mean what torchvision's, and the PIL augmenter's, mean: recipes ported
from SimCLR, BYOL or DINO must jitter as they did there."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types
from PIL import Image

from data_pipeline.cpu import PilAugmenter
from data_pipeline.dali import GREY_WEIGHTS, DaliAugmenter, _jitter, _jitter_draws
from data_pipeline.views import JITTER_OPS, AugmentConfig

SIZE, BATCH = 24, 16


def _dark_low_contrast_png(channels: int) -> tuple[bytes, np.ndarray]:
    """A dark image of grey levels 40..90 (mean ~65, far from mid-grey 128), so that a contrast factor in [0.5, 1.5]
    never clips it: PNG bytes and its pixels (H, W) or (H, W, 3)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(40, 91, (SIZE, SIZE) if channels == 1 else (SIZE, SIZE, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue(), pixels


def _augmenters(aug: AugmentConfig, channels: int):
    dali = DaliAugmenter(aug, batch_size=BATCH, image_size=SIZE, channels=channels, num_views=1, seed=1)
    pil = PilAugmenter(aug, image_size=SIZE, channels=channels, num_views=1, seed=1)
    return {"dali": dali, "pil": pil}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("path", ["dali", "pil"])
def test_contrast_blends_with_the_images_own_mean_grey(channels, path):
    """Contrast jitter alone (no resize, no crop) is torchvision's: each pixel moves to mean + c * (pixel - mean), the
    mean being the image's own grey level, so the view keeps its mean and every pixel's offset from it scales by one
    factor c per view. (DALI's contrast centres on mid-grey, 128: a dark image's views came out up to 31 levels
    brighter or darker, the contrast jitter turned into a brightness jitter the recipe never asked for.)"""
    data, pixels = _dark_low_contrast_png(channels)
    grey = pixels if channels == 1 else pixels.astype(np.float64) @ [0.299, 0.587, 0.114]
    aug = AugmentConfig.disabled(
        jitter_prob=1.0, brightness=0.0, contrast=0.5, saturation=0.0, hue=0.0, mean=[0.0], std=[1 / 255]
    )
    views = _augmenters(aug, channels)[path]([data] * BATCH)[0].double()  # (B, C, S, S), 0..255
    source = torch.from_numpy(pixels.astype(np.float64)).reshape(SIZE, SIZE, channels).permute(2, 0, 1)
    offset = source - float(grey.mean())
    factors = (views - float(grey.mean())).mul(offset).sum((1, 2, 3)) / offset.square().sum()  # least squares, (B,)
    assert ((factors > 0.5 - 0.02) & (factors < 1.5 + 0.02)).all(), factors
    assert factors.std() > 0.05, "the contrast factor does not vary: the op is not applied"
    view_means = views.mean((1, 2, 3))
    assert (view_means - source.mean()).abs().max() < 1.5, view_means - source.mean()
    fitted = float(grey.mean()) + factors.view(-1, 1, 1, 1) * offset
    assert (views - fitted).abs().max() < 1.5  # rounding to whole grey levels only


def test_brightness_then_contrast_match_between_dali_and_pil():
    """Brightness and contrast on together, the DALI views and the PIL views are the same distribution: the mean and
    spread of the views' mean grey level and of their contrast (pixel std) agree."""
    data, _ = _dark_low_contrast_png(3)
    aug = AugmentConfig.disabled(
        jitter_prob=1.0, brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0, mean=[0.0], std=[1 / 255]
    )
    stats = {}
    for name, augment in _augmenters(aug, 3).items():
        views = torch.cat([augment([data] * BATCH)[0] for _ in range(8)]).double()  # 128 views
        means, spreads = views.mean((1, 2, 3)), views.std((1, 2, 3))
        stats[name] = torch.stack([means.mean(), means.std(), spreads.mean(), spreads.std()])
    assert (stats["dali"] - stats["pil"]).abs().max() < 3.0, stats


# torchvision's ColorJitter, its tensor ops (torchvision.transforms.functional_tensor) in float64 on 0..255, written
# out here as torchvision writes them: the HSV conversions with its table, not the closed form of data_pipeline.dali.
def _rgb_to_hsv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hi, lo = x.max(-1), x.min(-1)
    grey = hi == lo
    span = hi - lo
    s = span / np.where(grey, 1.0, hi)
    div = np.where(grey, 1.0, span)
    rc, gc, bc = (hi - r) / div, (hi - g) / div, (hi - b) / div
    h = (hi == r) * (bc - gc) + ((hi == g) & (hi != r)) * (2.0 + rc - bc) + ((hi != g) & (hi != r)) * (4.0 + gc - rc)
    return np.fmod(h / 6.0 + 1.0, 1.0), s, hi


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.astype(np.int64) % 6
    p, q, t = (np.clip(v * (1.0 - s * w), 0.0, 1.0) for w in (1.0, f, 1.0 - f))
    table = [np.stack(c) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))]
    return np.stack([np.take_along_axis(c, i[None], 0)[0] for c in table], -1)


def _torchvision_jitter(x: np.ndarray, order, factors: dict) -> np.ndarray:
    """The ops of ``order`` with ``factors``, each rounded to whole levels as the ops on PIL images and uint8 do."""
    x = x.astype(np.float64)
    grey = (lambda y: y @ np.array(GREY_WEIGHTS)) if x.shape[-1] == 3 else (lambda y: y[..., 0])
    for name in order:
        f = factors[name]
        if name == "brightness":
            x = np.clip(x * f, 0.0, 255.0)
        elif name == "contrast":
            x = np.clip(grey(x).mean() + f * (x - grey(x).mean()), 0.0, 255.0)
        elif name == "saturation":
            x = np.clip(grey(x)[..., None] + f * (x - grey(x)[..., None]), 0.0, 255.0)
        else:
            h, s, v = _rgb_to_hsv(x / 255.0)
            x = _hsv_to_rgb(np.mod(h + f, 1.0), s, v) * 255.0
        x = np.floor(x + 0.5)
    return x


def _jitter_batch(aug: AugmentConfig, images: np.ndarray) -> tuple[np.ndarray, list[tuple[str, ...]], list[dict]]:
    """DALI's ColorJitter of ``images`` (B, H, W, C) uint8: the jittered images, each one's order of ops and factors."""
    channels = images.shape[-1]
    names = aug.jitter_ops(channels)

    @pipeline_def(enable_conditionals=True)
    def graph():
        img = fn.external_source(name="img", dtype=types.UINT8, ndim=3, layout="HWC")
        _, order, factors = _jitter_draws(aug, channels)
        order = order if order is not None else types.Constant(0)  # one op: one order
        return (_jitter(img, channels, names, order if len(names) > 1 else None, factors, "cpu"), order,
                *factors.values())

    pipe = graph(batch_size=len(images), num_threads=1, device_id=None, seed=5)
    pipe.build()
    pipe.feed_input("img", list(images))
    out, order, *factors = (o.as_array() for o in pipe.run())
    orders = list(itertools.permutations(names))
    order = np.broadcast_to(order, len(images))
    return (out, [orders[int(k)] for k in order.ravel()],
            [{n: float(f[k]) for n, f in zip(names, factors)} for k in range(len(images))])


def _colourful(batch: int, channels: int) -> np.ndarray:
    """Random pixels, plus rows of grey pixels (no hue) and of saturated primaries and secondaries (hues at the
    table's seams: hue 0 and 1 are the same red), and dark and bright rows that brightness and contrast clip."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (batch, 12, 18, channels), dtype=np.uint8)
    x[:, 0] = rng.integers(0, 256, (batch, 18, 1), dtype=np.uint8)
    if channels == 3:
        primaries = np.array([[255, 0, 0], [255, 255, 0], [0, 255, 0], [0, 255, 255], [0, 0, 255], [255, 0, 255]])
        x[:, 1] = np.tile(primaries, (3, 1))
    x[:, 2], x[:, 3] = rng.integers(0, 30, (18, channels)), rng.integers(225, 256, (18, channels))
    return x


@pytest.mark.parametrize("op", JITTER_OPS)
def test_each_dali_jitter_op_is_torchvisions(op):
    """Each colour jitter op alone is torchvision's, rounded to whole levels as its ops on PIL images and uint8 tensors
    are, each to a level: brightness, contrast and hue (turned in HSV, not by DALI's YIQ rotation, which moved
    saturation and value too) off only where float32 and float64 fall on either side of a half level, saturation
    (DALI's YIQ chroma scaling, the same blend with each pixel's grey) by its coefficients' rounding too."""
    aug = AugmentConfig(**{n: (0.5 if n == "hue" else 0.8) if n == op else 0.0 for n in JITTER_OPS})
    images = _colourful(64, 3)
    out, orders, factors = _jitter_batch(aug, images)
    assert all(o == (op,) for o in orders)
    errors = np.stack([np.abs(out[k] - _torchvision_jitter(images[k], orders[k], factors[k])) for k in range(64)])
    assert errors.max() <= 1, errors.max()  # float32 against float64 at the halves of a level
    assert (errors > 0).mean() < (0.001 if op in ("brightness", "contrast", "hue") else 0.1), (errors > 0).mean()
    assert len({round(f[op], 6) for f in factors}) == 64  # a factor of its own per image


@pytest.mark.parametrize("channels", [3, 1])
def test_dali_colour_jitter_is_torchvisions(channels):
    """DALI's colour jitter is torchvision's ColorJitter: per image an order of the four ops uniform over their 24
    permutations (torchvision's randperm; each op applied once), factors in their ranges, each op as torchvision's,
    rounded to whole levels after each (a level of rounding in one op can move a dim pixel's hue, which later
    brightness and contrast scale: 0.6% of the pixels differ by more than a level, up to 5). On one channel only
    brightness and contrast apply, in both orders."""
    aug = AugmentConfig(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.5)  # SimCLR's strength 1, any hue
    images = _colourful(256, channels)
    out, orders, factors = _jitter_batch(aug, images)
    names = list(JITTER_OPS if channels == 3 else JITTER_OPS[:2])
    assert sorted(set(orders)) == sorted(itertools.permutations(names))  # every order comes up
    counts = np.array([[o.index(n) for o in orders] for n in names])  # each op's place, per image
    for n, places in zip(names, counts):
        assert np.bincount(places, minlength=len(names)).min() > 256 / len(names) / 2, (n, np.bincount(places))
    for f in factors:
        assert all(0.2 <= f[n] <= 1.8 for n in names[:3]) and (channels == 1 or -0.5 <= f["hue"] <= 0.5)
    errors = [np.abs(out[k] - _torchvision_jitter(images[k], orders[k], factors[k])) for k in range(len(out))]
    assert max(e.mean() for e in errors) < 0.5 and np.mean(np.concatenate(errors) > 1) < 0.02
    # the order is seen: in its fixed order torchvision's jitter gives other images for many of them (on one channel,
    # where brightness and contrast commute but for clipping, for those of the other order that clip)
    fixed = [np.abs(out[k] - _torchvision_jitter(images[k], names, factors[k])).mean() for k in range(len(out))]
    assert np.mean(np.array(fixed) > 1.0) > (0.5 if channels == 3 else 0.15)


def test_hue_turns_hsv_hue_and_keeps_saturation_and_value():
    """Hue alone, checked against HSV's definition: each pixel keeps its largest and smallest channel (HSV's value and
    saturation), greys stay grey, and its hue (PIL's HSV conversion, 0..255 round the circle) moves by the drawn
    shift."""
    aug = AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.5)
    images = _colourful(64, 3)
    out, _, factors = _jitter_batch(aug, images)
    src, got = images.astype(int), out.astype(int)
    assert np.abs(got.max(-1) - src.max(-1)).max() <= 1 and np.abs(got.min(-1) - src.min(-1)).max() <= 1
    assert (got[:, 0] == src[:, 0]).all()  # grey rows
    colourful = (src.max(-1) - src.min(-1)) > 60  # hue well defined there, to a level of rounding
    for k in range(len(out)):
        before = np.asarray(Image.fromarray(images[k]).convert("HSV"))[..., 0].astype(float)
        after = np.asarray(Image.fromarray(out[k]).convert("HSV"))[..., 0].astype(float)
        turn = np.mod(after - before - factors[k]["hue"] * 256 + 128, 256) - 128
        assert np.abs(turn[colourful[k]]).max() <= 3.0, (k, factors[k], np.abs(turn[colourful[k]]).max())


@pytest.mark.parametrize("strengths, tolerance", [((0.0, 0.0, 0.0, 0.2), 3.0), ((0.8, 0.8, 0.8, 0.2), 6.0)],
                         ids=["hue", "all"])
def test_colour_jitter_matches_between_dali_and_pil(strengths, tolerance):
    """Hue alone, and all four jitter ops on (SimCLR's strength 1), the DALI views and the PIL views (torchvision's PIL
    ops) are the same distribution: over 2048 views of a warm image, the mean and spread of each channel's mean and
    spread, and of the pixels' HSV saturation, agree to ``tolerance`` levels of 255. (With hue turned in YIQ, as
    DALI's own ops do, the hue-only spreads differed by up to 22 levels, and by 10 with all four. PIL's brightness,
    contrast and saturation truncate to whole levels, DALI's round: brightness and contrast alone leave the 4 levels
    of the saturation's mean that are left with all four.)"""
    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal([150, 90, 60], 40, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    aug = AugmentConfig.disabled(jitter_prob=1.0, **dict(zip(JITTER_OPS, strengths)), mean=[0.0], std=[1 / 255])
    stats = {}
    for name, augment in _augmenters(aug, 3).items():
        views = torch.cat([augment([buf.getvalue()] * BATCH)[0] for _ in range(128)]).double()  # 2048 views
        hi, lo = views.amax(1), views.amin(1)
        saturation = ((hi - lo) / hi.clamp_min(1.0)).mean((1, 2))
        per_view = torch.cat([views.mean((2, 3)), views.std((2, 3)), 255 * saturation[:, None]], 1)  # (2048, 7)
        stats[name] = torch.stack([per_view.mean(0), per_view.std(0)])
    assert (stats["dali"] - stats["pil"]).abs().max() < tolerance, stats
