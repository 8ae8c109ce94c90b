"""Data-path throughput: decode + N-view augmentation, DALI vs a plain PIL/numpy/torch baseline, in the same run.

Two datasets, both real and generated into a temp dir: scikit-learn digits shards (8x8 PNG -> 16x16 gray views) and
JPEG shards of 224 px crops cut from scikit-learn's two sample photos (-> 224x224 RGB views, SimCLR-style recipe).
For each: warm-up, then the median over ``--runs`` passes of images/s (one image = decode + all its views), for

- ``dali``: ``data_pipeline.dali.DaliAugmenter`` on in-memory encoded batches,
- ``pil``:  ``data_pipeline.cpu.PilAugmenter`` (the tested reference) on the same batches, same thread count,
- ``stream``: the whole ``make_train_stream`` path (tar shards -> reader workers -> DALI), batches/s * batch size.

Usage: ``python benchmarks/bench_data.py [--runs 5] [--threads 2] [--device cpu]``; prints one block of text.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.cpu import PilAugmenter  # noqa: E402
from data_pipeline.dali import DaliAugmenter  # noqa: E402
from data_pipeline.loader import make_train_stream  # noqa: E402
from data_pipeline.reader import read_epoch  # noqa: E402
from data_pipeline.shards import ensure_digits_shards, list_shards, write_shards  # noqa: E402
from data_pipeline.views import AugmentConfig  # noqa: E402

DIGITS_AUG = AugmentConfig(crop_scale=(0.5, 1.0), flip_prob=0.0, jitter_prob=0.8, brightness=0.4, contrast=0.4,
                           blur_prob=0.5, blur_sigma=(0.1, 1.0), affine_prob=0.5, rotate_degrees=10.0,
                           mean=[0.5], std=[0.5])
SIMCLR_AUG = AugmentConfig()  # defaults: crop, flip, jitter 0.8, grayscale 0.2, blur 0.5


def machine() -> str:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def git_sha() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
        return sha + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def make_jpeg_tree(root: Path, count: int, size: int = 224, seed: int = 0) -> Path:
    """``count`` JPEGs of ``size`` px: random crops (side 160..427 px) of sklearn's china/flower photos, resized."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rng = np.random.default_rng(seed)
    for i in range(count):
        which = i % len(photos.images)
        img = photos.images[which]
        side = int(rng.integers(160, min(img.shape[:2]) + 1))
        y, x = int(rng.integers(0, img.shape[0] - side + 1)), int(rng.integers(0, img.shape[1] - side + 1))
        crop = Image.fromarray(img[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
        out = root / Path(photos.filenames[which]).stem
        out.mkdir(parents=True, exist_ok=True)
        crop.save(out / f"{i:05d}.jpg", quality=90)
    return root


def median_rate(fn, n_images: int, runs: int) -> tuple[float, float]:
    """(median, min) images/s of ``fn()`` processing ``n_images``, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_images / statistics.median(times), n_images / max(times)


def bench_augmenters(name: str, shards: list[str], aug: AugmentConfig, *, size: int, channels: int, batch: int,
                     n_batches: int, runs: int, threads: int, device: str) -> list[str]:
    samples = [s["image"] for s in itertools.islice(read_epoch(shards, rank=0, world_size=1, num_workers=0),
                                                    batch * n_batches)]
    batches = [samples[i:i + batch] for i in range(0, batch * n_batches, batch)]
    n = batch * n_batches
    dali = DaliAugmenter(aug, batch_size=batch, image_size=size, channels=channels, num_threads=threads,
                         device=device)
    pil = PilAugmenter(aug, image_size=size, channels=channels, num_threads=threads)
    lines = []
    for provider, augment in (("dali", dali), ("pil", pil)):
        med, worst = median_rate(lambda: [augment(b) for b in batches], n, runs)
        lines.append(f"{name:<14} {provider:<7} {med:>10.1f} img/s  (slowest run {worst:.1f})")
    pil.close()
    return lines


def bench_stream(name: str, shards: list[str], aug: AugmentConfig, *, size: int, channels: int, batch: int,
                 n_batches: int, runs: int, device: str) -> str:
    stream = make_train_stream(shards, batch_size=batch, aug=aug, image_size=size, channels=channels, rank=0,
                               world_size=1, num_workers=2, shuffle_buffer=256, device=device)
    it = iter(stream)
    med, worst = median_rate(lambda: list(itertools.islice(it, n_batches)), batch * n_batches, runs)
    stream.close()
    return f"{name:<14} {'stream':<7} {med:>10.1f} img/s  (slowest run {worst:.1f}; reader workers=2 + DALI)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="DALI threads = PIL pool threads")
    parser.add_argument("--jpegs", type=int, default=384, help="number of 224 px JPEGs to generate")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()

    print("# bench_data: decode + 2-view augmentation throughput (images/s; each image yields 2 views)")
    print(f"# machine: {machine()}")
    print(f"# git: {git_sha()}  time: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print(f"# device: {args.device}  threads: {args.threads}  runs: {args.runs} (median; 1 warm-up)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        digits = ensure_digits_shards(tmp / "cache", shard_size=256)
        t0 = time.perf_counter()
        write_shards(f"folder:{make_jpeg_tree(tmp / 'jpegs', args.jpegs)}", tmp / "jpeg-shards", shard_size=64,
                     progress=False)
        print(f"# generated {args.jpegs} JPEGs 224x224 + shards in {time.perf_counter() - t0:.1f}s")
        jpeg = list_shards(tmp / "jpeg-shards")
        common = dict(runs=args.runs, device=args.device)
        lines = bench_augmenters("digits 16px", digits, DIGITS_AUG, size=16, channels=1, batch=256, n_batches=6,
                                 threads=args.threads, **common)
        lines.append(bench_stream("digits 16px", digits, DIGITS_AUG, size=16, channels=1, batch=256, n_batches=6,
                                  **common))
        lines += bench_augmenters("jpeg 224px", jpeg, SIMCLR_AUG, size=224, channels=3, batch=64, n_batches=4,
                                  threads=args.threads, **common)
        noblur = AugmentConfig(blur_prob=0.0)
        lines += bench_augmenters("jpeg 224 noblur", jpeg, noblur, size=224, channels=3, batch=64, n_batches=4,
                                  threads=args.threads, **common)
        lines.append(bench_stream("jpeg 224px", jpeg, SIMCLR_AUG, size=224, channels=3, batch=64, n_batches=4,
                                  **common))
    print(f"{'dataset':<14} {'provider':<7} {'throughput':>16}")
    for line in lines:
        print(line)
    print(f"# peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
