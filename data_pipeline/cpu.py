"""Plain PIL / numpy / torch implementation of the same augmentation recipe: the benchmark baseline and a fallback.

Same interface as ``data_pipeline.dali.DaliAugmenter`` (encoded bytes in, ``num_views`` tensors (B, C, S, S) out), the
same op order and parameter meaning (``data_pipeline.views``). Randomness differs (its own numpy generator), so outputs
agree with DALI only when every random op is off. No torchvision. Images are processed by a thread pool; PIL
releases the GIL in decode, resize and filters.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from data_pipeline.sources import open_image
from data_pipeline.views import JITTER_OPS, AugmentConfig


def _crop_box(w: int, h: int, aug: AugmentConfig, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Random resized crop box (torchvision's rule: 10 tries, then the whole image clipped to the ratio range)."""
    log_r = (math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]))
    for _ in range(10):
        area = w * h * rng.uniform(*aug.crop_scale)
        ratio = math.exp(rng.uniform(*log_r))
        cw, ch = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if cw <= w and ch <= h:
            x, y = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            return (x, y, x + cw, y + ch)
    ratio = min(max(w / h, aug.crop_ratio[0]), aug.crop_ratio[1])
    cw, ch = (w, w / ratio) if w / h < ratio else (h * ratio, h)
    return ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)


def _affine(im: Image.Image, aug: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    s = im.size[0]
    c = s / 2.0
    angle = math.radians(rng.uniform(-aug.rotate_degrees, aug.rotate_degrees))
    z = rng.uniform(*aug.scale)
    tx, ty = (rng.uniform(-t * s, t * s) for t in aug.translate)
    cos, sin = math.cos(angle) * z, math.sin(angle) * z
    fwd = np.array([[cos, -sin, c + tx - cos * c + sin * c], [sin, cos, c + ty - sin * c - cos * c], [0, 0, 1]])
    inv = np.linalg.inv(fwd)  # PIL maps output pixels back to input pixels
    return im.transform(im.size, Image.AFFINE, data=tuple(inv[:2].ravel()), resample=Image.BILINEAR)


def _jitter(im: Image.Image, aug: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    """torchvision's ColorJitter on a PIL image (its PIL ops): the order of the four ops drawn per image (``randperm``),
    then their factors; an op the recipe turns off is skipped."""
    order = rng.permutation(len(JITTER_OPS))
    factors = [rng.uniform(max(0.0, 1 - x), 1 + x) for x in (aug.brightness, aug.contrast, aug.saturation)]
    factors.append(rng.uniform(-aug.hue, aug.hue))
    on = aug.jitter_ops(3 if im.mode == "RGB" else 1)
    for i in order:
        name, factor = JITTER_OPS[i], factors[i]
        if name not in on:
            continue
        if name == "brightness":
            im = ImageEnhance.Brightness(im).enhance(factor)
        elif name == "contrast":
            im = ImageEnhance.Contrast(im).enhance(factor)
        elif name == "saturation":
            im = ImageEnhance.Color(im).enhance(factor)
        else:
            hsv = np.asarray(im.convert("HSV")).copy()
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(factor * 255)) % 256
            im = Image.fromarray(hsv, "HSV").convert("RGB")
    return im


class PilAugmenter:
    """Callable: encoded images (list of bytes) -> ``num_views`` tensors (B, C, S, S) float32, normalised."""

    def __init__(self, aug: AugmentConfig, *, image_size: int, channels: int, num_views: int = 2, num_threads: int = 2,
                 seed: int = 0):
        self.aug, self.size, self.channels, self.num_views = aug, image_size, channels, num_views
        self.ops = set(aug.enabled_ops(channels))
        mean, std = aug.channel_stats(channels)
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.seed, self.calls = seed, 0
        self.pool = ThreadPoolExecutor(num_threads)

    def _view(self, im: Image.Image, rng: np.random.Generator) -> np.ndarray:
        aug, ops, s = self.aug, self.ops, self.size
        box = _crop_box(*im.size, aug, rng) if "random_resized_crop" in ops else None
        im = im.resize((s, s), Image.BILINEAR, box=box)
        if "flip" in ops and rng.random() < aug.flip_prob:
            im = ImageOps.mirror(im)
        if "affine" in ops and rng.random() < aug.affine_prob:
            im = _affine(im, aug, rng)
        if "jitter" in ops and rng.random() < aug.jitter_prob:
            im = _jitter(im, aug, rng)
        if "grayscale" in ops and rng.random() < aug.grayscale_prob:
            im = im.convert("L").convert("RGB")
        if "blur" in ops and rng.random() < aug.blur_prob:
            im = im.filter(ImageFilter.GaussianBlur(rng.uniform(*aug.blur_sigma)))
        if "solarize" in ops and rng.random() < aug.solarize_prob:
            im = ImageOps.solarize(im, threshold=round(aug.solarize_threshold * 255))
        x = np.asarray(im, dtype=np.uint8)
        if "noise" in ops and rng.random() < aug.noise_prob:
            x = np.clip(x + rng.normal(0.0, aug.noise_std * 255.0, x.shape), 0, 255).astype(np.uint8)
        return x.reshape(s, s, self.channels)

    def _one(self, args: tuple[bytes, list[int]]) -> list[np.ndarray]:
        data, sample_seed = args
        rng = np.random.default_rng(sample_seed)
        with open_image(data) as im:
            im = im.convert("RGB" if self.channels == 3 else "L")
        return [self._view(im, rng) for _ in range(self.num_views)]

    def __call__(self, images: list[bytes]) -> list[torch.Tensor]:
        self.calls += 1
        per_image = list(self.pool.map(self._one, [(b, [self.seed, self.calls, i]) for i, b in enumerate(images)]))
        views = []
        for v in range(self.num_views):
            x = torch.from_numpy(np.stack([p[v] for p in per_image])).permute(0, 3, 1, 2).float().div_(255.0)
            views.append((x - self.mean) / self.std)
        return views

    def close(self) -> None:
        self.pool.shutdown()
