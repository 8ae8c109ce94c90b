"""DALI decode + augmentation of N views per image. The only module of the project that imports ``nvidia.dali``.

The graph is fed encoded bytes by ``fn.external_source`` (the Python reader owns splitting, shuffling and counting) and
returns ``num_views`` tensors ``(B, C, S, S)`` float32, normalised, then ``local_views`` tensors ``(B, C, s, s)``
(multi-crop: the same recipe at ``local_size``, the crop's area drawn from ``local_crop_scale``). Views may differ in
their recipe (``view_augs``, ``local_aug``: BYOL's and DINO's asymmetric blur and solarization). Per view, in order:
random resized crop (or a plain resize), flip, affine, colour jitter, grayscale, blur, solarize, noise, normalise.
Each random op is applied to a sample with its probability through DALI conditionals (``if coin_flip: ...``) and is
left out of the graph entirely when the recipe disables it (``AugmentConfig.enabled_ops``).

``device="cuda"``: decoders run with ``device="mixed"`` and every op on the GPU of ``device_id``; ``device="cpu"``: the
same graph on CPU threads with ``device_id=None``.

The pipeline is built with DALI checkpointing on: ``DaliAugmenter.state_dict()`` captures every random generator of
the graph (a few KB), and an augmenter built from that state draws exactly what the saved one would have drawn next,
which is how a resumed run augments its remaining batches as the interrupted run would have. Should a DALI build lack
checkpointing for an op of the graph (the GPU variants have not been run here), the pipeline is built without it, with
a warning, and a resumed run then reads the same samples but augments them afresh.

A batch that DALI fails to decode raises ``CorruptBatch`` with the indices of the bad samples, found by decoding each
sample with PIL (and, if PIL accepts them all, by running each sample alone through DALI). The caller drops them and
retries; the happy path does no extra checking.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.pytorch import feed_ndarray

from data_pipeline.sources import pil_decodes
from data_pipeline.views import AugmentConfig

log = logging.getLogger(__name__)


class CorruptBatch(Exception):
    """DALI could not decode a batch; ``bad`` are the indices (into the fed list) of the samples to drop."""

    def __init__(self, bad: list[int]):
        super().__init__(f"undecodable samples at batch positions {bad}")
        self.bad = bad


def _uniform(lo: float, hi: float):
    """Per-sample U(lo, hi); a degenerate range (DALI rejects it) gives the constant lo."""
    return fn.random.uniform(range=(lo, hi)) if hi > lo else fn.random.uniform(values=[float(lo)])


def _coin(prob: float):
    return fn.random.coin_flip(probability=prob, dtype=types.BOOL)


GREY_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R 601 luma weights of R, G, B: PIL's ``convert("L")``, torchvision's ``rgb_to_grayscale``."""


def _brightness(x, factor, channels: int, dev: str):
    """The pixels scaled by ``factor`` (DALI's brightness is torchvision's)."""
    return fn.brightness_contrast(x, device=dev, brightness=factor)


def _contrast(x, factor, channels: int, dev: str):
    """Blended with the image's own mean grey level, ``mean + c * (x - mean)``, as torchvision's (and PIL's) contrast.
    DALI's ``brightness_contrast`` and ``color_twist`` centre contrast on mid-grey (128) instead, which moves a dark or
    bright image's mean: a contrast jitter that is mostly a brightness jitter. Built of arithmetic and a reduction,
    which run where ``x`` is (the factor, drawn on the CPU, follows it to the GPU); the cast to uint8 saturates."""
    means = fn.reductions.mean(x, axes=[0, 1], dtype=types.FLOAT)  # (C,) per sample
    grey = means if channels == 1 else fn.reductions.sum(means * types.Constant(np.float32(GREY_WEIGHTS)))
    return fn.cast(x * factor + (1.0 - factor) * grey, dtype=types.UINT8)


def _saturation(x, factor, channels: int, dev: str):
    """Blended with each pixel's own grey level, as torchvision's (and PIL's ``ImageEnhance.Color``): DALI's ``hsv``
    saturation scales YIQ's chroma about its luma, which is that blend (to a level of rounding)."""
    return fn.hsv(x, device=dev, saturation=factor)


def _hue(x, shift, channels: int, dev: str):
    """torchvision's ``adjust_hue``: the hue of HSV turned by ``shift`` (a fraction of the circle), saturation and value
    kept. (DALI's own ``hsv``/``color_twist`` turn the colours about the grey axis in YIQ space, which moves saturation
    and value as well.) In closed form: with ``hi``/``lo`` a pixel's largest/smallest channel and ``h`` its turned hue
    in sixths of the circle (0 red, 2 green, 4 blue), a channel is ``hi - (hi - lo) * (d - 1)`` clamped to ``[lo,
    hi]``, ``d`` the distance of ``h`` from the channel's own hue round the circle (torchvision's HSV-to-RGB table
    without a branch). Each arithmetic op is a pass over the image, and DALI's float ``%`` costs ten others, so the
    expression is written with few of them: one mod (by ``floor``), and the distances of green and blue taken along
    the line, which differs from round the circle only where both are past 2, where the clamp gives ``lo`` either
    way."""
    x = fn.cast(x, dtype=types.FLOAT)
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    hi, lo = dmath.max(dmath.max(r, g), b), dmath.min(dmath.min(r, g), b)
    span = hi - lo
    not_r = hi != r
    is_g = (hi == g) & not_r
    is_b = (hi != g) & not_r
    # HSV's hue in sixths, in [-1, 5), a grey pixel's 0; turned by 6 * shift in [-3, 3], then taken mod 6
    h = ((hi == r) * (g - b) + is_g * (b - r) + is_b * (r - g)) / (span + (span == 0.0))
    h = h + (2.0 * is_g + 4.0 * is_b) + 6.0 * shift
    h = h - 6.0 * dmath.floor(h * (1 / 6.0))
    top = hi + span  # hi - span * (d - 1), clamped to [lo, hi] (by min and max: DALI's clamp costs three ops)
    out = [dmath.min(dmath.max(top - span * d, lo), hi)
           for d in (dmath.min(h, 6.0 - h), dmath.abs(h - 2.0), dmath.abs(h - 4.0))]
    # the slices and the stack drop the "HWC" layout, which the branches of a conditional must agree on
    return fn.reshape(fn.cast(fn.stack(*out, axis=2), dtype=types.UINT8), layout="HWC")


_JITTER = {"brightness": _brightness, "contrast": _contrast, "saturation": _saturation, "hue": _hue}


def _jitter_draws(aug: AugmentConfig, channels: int):
    """One image's ColorJitter draws, as torchvision's: ``(names, order, factors)``: the ops ``aug`` turns on, the index
    of the order to apply them in (uniform over ``itertools.permutations(range(len(names)))``, as torchvision's
    ``randperm`` and SimCLR's and BYOL's ``random_order``; None for one op) and each op's factor (brightness, contrast,
    saturation ``U(max(0, 1 - x), 1 + x)``, hue ``U(-hue, hue)``)."""
    names = aug.jitter_ops(channels)
    factors = {n: _uniform(-aug.hue, aug.hue) if n == "hue" else _uniform(max(0.0, 1 - getattr(aug, n)),
                                                                         1 + getattr(aug, n)) for n in names}
    return names, fn.random.choice(math.factorial(len(names))) if len(names) > 1 else None, factors


ONCE_FIRST = ("hue", "contrast")
"""The costliest jitter ops (many arithmetic passes over the image), the first of which the recipe has runs once on
every sample, outside the conditionals that order the others round it (:func:`_jitter`)."""


def _jitter(img, channels: int, names: list[str], order, factors: dict, dev: str):
    """ColorJitter on ``img`` (HWC uint8) with the draws of :func:`_jitter_draws`: the ops in the drawn order, each
    rounded to whole levels (as torchvision's ops on PIL images and uint8 tensors).

    An op in a conditional runs on the samples that take its branch, and DALI's CPU ops cost more per sample the
    smaller their batch, so the costliest op (``ONCE_FIRST``) runs once on every sample: the drawn order is applied as
    the other ops that come before it (each place a conditional choosing among them), that op, then the others after
    it."""
    if order is None:
        return _JITTER[names[0]](img, factors[names[0]], channels, dev)
    perms = [[names[i] for i in p] for p in itertools.permutations(range(len(names)))]  # as _jitter_draws numbers them

    def per_order(values: list[int]):
        return fn.lookup_table(order, keys=list(range(len(perms))), values=[float(v) for v in values],
                               dtype=types.INT32)

    once = next((n for n in ONCE_FIRST if n in names), None)
    others = [n for n in names if n != once]
    ranked = [[n for n in p if n != once] for p in perms]  # the other ops in each order
    which = [per_order([others.index(r[j]) for r in ranked]) if len(others) > 1 else None for j in range(len(others))]
    if once is None:
        for j in range(len(others)):
            img = _one_of(img, which[j], others, 0, len(others), factors, channels, dev)
        return img
    before = per_order([p.index(once) for p in perms])  # how many of the others come before it
    for j in range(len(others)):
        if before > j:
            img = _one_of(img, which[j], others, 0, len(others), factors, channels, dev)
    img = _JITTER[once](img, factors[once], channels, dev)
    for j in range(len(others)):
        if before <= j:
            img = _one_of(img, which[j], others, 0, len(others), factors, channels, dev)
    return img


def _one_of(img, which, names: list[str], lo: int, hi: int, factors: dict, channels: int, dev: str):
    """Op ``names[which]`` (``lo <= which < hi``) on each sample, by halving the range."""
    if hi - lo == 1:
        return _JITTER[names[lo]](img, factors[names[lo]], channels, dev)
    mid = (lo + hi) // 2
    if which < mid:
        img = _one_of(img, which, names, lo, mid, factors, channels, dev)
    else:
        img = _one_of(img, which, names, mid, hi, factors, channels, dev)
    return img


def _view(img, aug: AugmentConfig, ops: set[str], size: int, channels: int, mean: list[float], std: list[float], dev):
    """One augmented view ``(C, size, size)`` float of decoded ``img`` (HWC uint8)."""
    if "random_resized_crop" in ops:
        img = fn.random_resized_crop(img, device=dev, size=(size, size), random_area=aug.crop_scale,
                                     random_aspect_ratio=aug.crop_ratio)
    else:
        img = fn.resize(img, device=dev, size=(size, size))
    if "flip" in ops:
        img = fn.flip(img, device=dev, horizontal=fn.random.coin_flip(probability=aug.flip_prob))
    if "affine" in ops and _coin(aug.affine_prob):
        c = (size / 2.0, size / 2.0)
        tx, ty = aug.translate[0] * size, aug.translate[1] * size
        z = _uniform(*aug.scale)
        mt = fn.transforms.scale(scale=fn.stack(z, z), center=c)
        mt = fn.transforms.rotation(mt, angle=_uniform(-aug.rotate_degrees, aug.rotate_degrees), center=c)
        mt = fn.transforms.translation(mt, offset=fn.stack(_uniform(-tx, tx), _uniform(-ty, ty)))
        img = fn.warp_affine(img, device=dev, matrix=mt, fill_value=0, inverse_map=False)
    if "jitter" in ops and _coin(aug.jitter_prob):
        img = _jitter(img, channels, *_jitter_draws(aug, channels), dev)
    if "grayscale" in ops and _coin(aug.grayscale_prob):
        img = fn.hsv(img, device=dev, saturation=0.0)
    if "blur" in ops and _coin(aug.blur_prob):
        img = fn.gaussian_blur(img, device=dev, sigma=_uniform(*aug.blur_sigma))
    if "solarize" in ops and _coin(aug.solarize_prob):
        x = fn.cast(img, dtype=types.FLOAT)
        hit = x >= aug.solarize_threshold * 255.0
        img = fn.cast(x + hit * (255.0 - 2.0 * x), dtype=types.UINT8)
    if "noise" in ops and _coin(aug.noise_prob):
        img = fn.noise.gaussian(img, device=dev, stddev=aug.noise_std * 255.0)
    return fn.crop_mirror_normalize(img, device=dev, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[m * 255.0 for m in mean], std=[s * 255.0 for s in std])


def build_pipeline(aug: AugmentConfig, *, batch_size: int, image_size: int, channels: int, num_views: int = 2,
                   local_views: int = 0, local_size: int = 0, local_crop_scale: tuple[float, float] = (0.05, 0.4),
                   view_augs: list[AugmentConfig] | None = None, local_aug: AugmentConfig | None = None,
                   device: str = "cpu", device_id: int | None = None, num_threads: int = 2, seed: int = 0,
                   checkpoint: bytes | None = None, checkpointing: bool = True):
    """A built DALI pipeline: input ``"encoded"`` (list of 1-D uint8 arrays), outputs ``num_views`` x (B, C, S, S)
    then ``local_views`` x (B, C, local_size, local_size).

    ``view_augs``: one recipe per global view instead of ``aug`` for all; ``local_aug``: the local crops' recipe
    instead of ``aug`` with ``local_crop_scale`` as its crop range. Every view is normalised with ``aug``'s mean, std.

    ``checkpoint``: a ``pipe.checkpoint()`` of a pipeline built with the same arguments; its random state is restored.
    ``checkpointing``: whether ``pipe.checkpoint()`` is available (DALI's state tracking; no cost per batch).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels: must be 1 or 3, got {channels}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: must be 'cpu' or 'cuda', got {device!r}")
    if local_views and not 0 < local_size:
        raise ValueError(f"local_size: must be > 0 with local_views={local_views}, got {local_size}")
    if view_augs is not None and len(view_augs) != num_views:
        raise ValueError(f"view_augs: {len(view_augs)} recipes for {num_views} views")
    mean, std = aug.channel_stats(channels)
    globals_ = [(a, set(a.enabled_ops(channels))) for a in (view_augs or [aug] * num_views)]
    # Local crops: by default the same ops, only the crop's area range differs (DINO's multi-crop).
    if local_aug is None:
        local_aug = dataclasses.replace(aug, crop_scale=tuple(local_crop_scale))
    local_ops = set(local_aug.enabled_ops(channels))
    gpu = device == "cuda"

    @pipeline_def(enable_conditionals=True)
    def graph():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        img = fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                output_type=types.RGB if channels == 3 else types.GRAY)
        dev = "gpu" if gpu else "cpu"
        return (*(_view(img, a, ops, image_size, channels, mean, std, dev) for a, ops in globals_),
                *(_view(img, local_aug, local_ops, local_size, channels, mean, std, dev) for _ in range(local_views)))

    loaded = set(sys.modules)
    try:
        # prefetch 1: run() returns the batch just fed, so a decode error belongs to a known list of samples.
        pipe = graph(batch_size=batch_size, num_threads=num_threads, device_id=(device_id or 0) if gpu else None,
                     seed=seed, prefetch_queue_depth=1, exec_async=False, exec_pipelined=False,
                     enable_checkpointing=checkpointing, checkpoint=checkpoint if checkpointing else None)
        pipe.build()
    finally:
        _remove_autograph_files(set(sys.modules) - loaded)
    return pipe


def _remove_autograph_files(new_modules: set[str]) -> None:
    """DALI's conditionals convert the graph's Python through autograph, which writes each converted function's source
    to a temp file, loads it as a module and deletes it at exit. Processes that end without running ``atexit`` (the
    loader's worker processes, a killed rank) would leave every build's files in the temp dir; the modules are loaded
    by the time the pipeline is built, so their files go now."""
    for name in new_modules:
        if name.startswith("__autograph_generated_file"):
            path = getattr(sys.modules.get(name), "__file__", None)
            if path:
                Path(path).unlink(missing_ok=True)


@functools.cache
def _known_good() -> np.ndarray:
    """A small RGB PNG that every decoder reads: what tells a broken graph from a batch of images DALI cannot read."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


class DaliDecoder:
    """DALI's image decoder on the CPU, alone: whether it reads an encoded image, as the training graph's first op does
    (PIL reads some files DALI does not: an uncompressed 1-bit TIFF, a 32-bit integer one). One per thread."""

    def __init__(self) -> None:
        self._build()

    def _build(self) -> None:
        @pipeline_def
        def graph():
            return fn.decoders.image(fn.external_source(name="encoded", dtype=types.UINT8, ndim=1), device="cpu",
                                     output_type=types.RGB)

        self.pipe = graph(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_async=False,
                          exec_pipelined=False)
        self.pipe.build()

    def decodes(self, data: bytes) -> bool:
        try:
            self.pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8)])
            self.pipe.run()
            return True
        except RuntimeError:
            self._build()  # a failed run() can leave the pipeline unusable
            return False


class DaliAugmenter:
    """Callable: encoded images (list of bytes, length <= batch_size) -> ``num_views`` tensors (B, C, S, S), then
    ``local_views`` tensors (B, C, local_size, local_size).

    A failed ``run()`` can leave a DALI pipeline unusable ("Current pipeline object is no longer valid"), so after any
    error the pipeline is rebuilt, with a new seed so the augmentation stream does not replay.

    ``state``: a :meth:`state_dict` of an augmenter built with the same arguments; this one continues its random
    stream (and its rebuild count, so a later rebuild draws the same seed).
    """

    def __init__(self, aug: AugmentConfig, *, batch_size: int, image_size: int, channels: int, num_views: int = 2,
                 local_views: int = 0, local_size: int = 0, local_crop_scale: tuple[float, float] = (0.05, 0.4),
                 view_augs: list[AugmentConfig] | None = None, local_aug: AugmentConfig | None = None,
                 device: str = "cpu", device_id: int | None = None, num_threads: int = 2, seed: int = 0,
                 state: dict | None = None):
        self.device = torch.device("cuda", device_id or 0) if device == "cuda" else torch.device("cpu")
        self._kw = dict(batch_size=batch_size, image_size=image_size, channels=channels, num_views=num_views,
                        local_views=local_views, local_size=local_size, local_crop_scale=local_crop_scale,
                        view_augs=view_augs, local_aug=local_aug, device=device, device_id=device_id,
                        num_threads=num_threads)
        self._aug, self._seed = aug, seed
        self.rebuilds = int(state["rebuilds"]) if state else 0
        self.checkpointing = True
        saved = state["dali"] if state else None
        try:
            self.pipe = build_pipeline(aug, seed=self._current_seed(), checkpoint=saved, **self._kw)
        except RuntimeError as e:
            if "Checkpointing is not implemented" in str(e):
                log.warning("DALI cannot checkpoint this graph (%s); a resumed run will augment afresh",
                            str(e).strip().splitlines()[-1])
                self.checkpointing = False
                self.pipe = build_pipeline(aug, seed=self._current_seed(), checkpointing=False, **self._kw)
            elif saved is not None and "another pipeline" in str(e):
                # The saved state is of another graph: another data.aug recipe, or an earlier version of this module.
                log.warning("The saved augmentation state is of another DALI graph (the recipe or ssl-pretrain's "
                            "augmentations changed since it was saved): the resumed run augments afresh")
                self.pipe = build_pipeline(aug, seed=self._current_seed(), **self._kw)
            else:
                raise

    def _current_seed(self) -> int:
        return self._seed + 7919 * self.rebuilds

    def _rebuild(self) -> None:
        self.rebuilds += 1
        self.pipe = build_pipeline(self._aug, seed=self._current_seed(), checkpointing=self.checkpointing,
                                   **self._kw)

    def state_dict(self) -> dict:
        """``{"dali": bytes | None, "rebuilds": int}``: the pipeline's random state after the last batch it returned
        (None when the graph cannot be checkpointed)."""
        return {"dali": bytes(self.pipe.checkpoint()) if self.checkpointing else None, "rebuilds": self.rebuilds}

    def _run(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        try:
            self.pipe.feed_input("encoded", arrays)
            outs = self.pipe.run()
        except RuntimeError:
            self._rebuild()
            raise
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        views = []
        for out in outs:
            dense = out.as_tensor()
            views.append(feed_ndarray(dense, torch.empty(dense.shape(), dtype=torch.float32, device=self.device),
                                      cuda_stream=stream))
        if stream is not None:
            stream.synchronize()  # the copies must finish before the next run() reuses DALI's output buffers
        return views

    def __call__(self, images: list[bytes]) -> list[torch.Tensor]:
        arrays = [np.frombuffer(b, dtype=np.uint8) for b in images]
        try:
            return self._run(arrays)
        except RuntimeError as err:
            bad = [i for i, b in enumerate(images) if not pil_decodes(b)]
            if not bad:  # PIL is more lenient than DALI for some files: ask DALI itself, one sample at a time
                bad = [i for i, a in enumerate(arrays) if not self._decodes_alone(a)]
                if len(bad) == len(images) and not self._decodes_alone(_known_good()):
                    raise  # every sample fails alone, and so does an image any decoder reads: the graph is broken
            if not bad:
                raise  # not a data problem
            log.debug("DALI batch failed (%s); bad positions %s", str(err).splitlines()[-1:], bad)
            raise CorruptBatch(bad) from None

    def _decodes_alone(self, array: np.ndarray) -> bool:
        try:
            self._run([array])
            return True
        except RuntimeError:
            return False
