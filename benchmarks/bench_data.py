"""Data-path throughput: decode + N-view augmentation, DALI vs a plain PIL/numpy/torch baseline, in the same run.

Two datasets, both real and generated into a temp dir: scikit-learn digits shards (8x8 PNG -> 16x16 gray views) and
JPEG shards of 224 px crops cut from scikit-learn's two sample photos (-> 224x224 RGB views, SimCLR-style recipe).
For each: warm-up, then the median over ``--runs`` passes of images/s (one image = decode + all its views), for

- ``dali``: ``data_pipeline.dali.DaliAugmenter`` on in-memory encoded batches,
- ``pil``:  ``data_pipeline.cpu.PilAugmenter`` (the tested reference) on the same batches, same thread count,
- ``stream``: the whole ``make_train_stream`` path (tar shards -> reader workers -> DALI), batches/s * batch size.

Providers are timed in turn within each run (see ``interleaved_rates``) so that load from other jobs on a shared machine
skews them alike; compare providers within one printout, not across printouts.

Usage: ``python benchmarks/bench_data.py [--runs 5] [--threads 2] [--device cpu]``; prints one block of text.
"""

from __future__ import annotations

import datetime
import itertools
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Parser, Stopped, at_least, cpu_name, git_sha, stop_on_signals  # noqa: E402
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
JPEG_BATCH = 64


def machine() -> str:
    return f"{cpu_name()}, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


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


def interleaved_rates(fns: dict[str, object], n_images: int, runs: int) -> dict[str, tuple[float, float]]:
    """Per provider (median, slowest) images/s of ``fn()`` processing ``n_images``, after one warm-up call each.

    Providers are timed in turn within each run, so background load on a shared machine hits all of them alike.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (n_images / statistics.median(t), n_images / max(t)) for name, t in times.items()}


def bench(name: str, shards: list[str], aug: AugmentConfig, *, size: int, channels: int, batch: int, runs: int,
          threads: int, device: str) -> list[str]:
    """dali / pil on the same in-memory batches (one pass over the shards), and the whole stream, interleaved."""
    samples = [s["image"] for s in read_epoch(shards, rank=0, world_size=1, num_workers=0)]
    n_batches = len(samples) // batch
    batches = [samples[i * batch:(i + 1) * batch] for i in range(n_batches)]
    dali = DaliAugmenter(aug, batch_size=batch, image_size=size, channels=channels, num_threads=threads,
                         device=device)
    pil = PilAugmenter(aug, image_size=size, channels=channels, num_threads=threads)
    stream = make_train_stream(shards, batch_size=batch, aug=aug, image_size=size, channels=channels, rank=0,
                               world_size=1, num_workers=2, shuffle_buffer=256, device=device,
                               dali_threads=threads)
    try:  # closed on the way out of a stop too (``stop_on_signals``): its reader workers and PIL's pool end with it
        it = iter(stream)
        fns = {
            "dali": lambda: [dali(b) for b in batches],
            "pil": lambda: [pil(b) for b in batches],
            "stream": lambda: list(itertools.islice(it, n_batches)),
        }
        rates = interleaved_rates(fns, batch * n_batches, runs)
    finally:
        stream.close()
        pil.close()
    notes = {"dali": f"DALI {threads} threads", "pil": f"PIL pool {threads} threads",
             "stream": f"tar shards -> 2 reader workers -> DALI {threads} threads"}
    return [f"{name:<18} {p:<7} {med:>9.1f} img/s  (slowest run {worst:.1f}; {notes[p]})"
            for p, (med, worst) in rates.items()]


def main(argv: list[str] | None = None) -> int:
    """Ctrl-C (SIGTERM) ends it in one line, exit 130 (143), its workers closed (it had ended in a traceback)."""
    try:
        with stop_on_signals():
            _main(argv)
    except Stopped as e:
        print(f"Stopped by {e}; nothing measured is kept (the table is printed at the end)", file=sys.stderr)
        return 128 + e.signum
    return 0


def _main(argv: list[str] | None) -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=at_least(1), default=5, help="timed runs per provider, the median reported "
                        "(default 5, after a warm-up)")
    parser.add_argument("--threads", type=at_least(1), default=2, help="DALI threads = PIL pool threads (default 2)")
    parser.add_argument("--jpegs", type=at_least(JPEG_BATCH), default=384,
                        help=f"number of 224 px JPEGs to generate (default 384; at least one batch of {JPEG_BATCH})")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where DALI runs (default cpu)")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no GPU that torch can use (DALI's GPU ops need CUDA)")

    print("# bench_data: decode + 2-view augmentation throughput (images/s; each image yields 2 views)")
    print(f"# machine: {machine()}")
    print(f"# git: {git_sha()}  time: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print(f"# device: {args.device}  threads: {args.threads}  runs: {args.runs} (median; 1 warm-up)  "
          f"load average before: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        digits = ensure_digits_shards(tmp / "cache", shard_size=256)
        t0 = time.perf_counter()
        write_shards(f"folder:{make_jpeg_tree(tmp / 'jpegs', args.jpegs)}", tmp / "jpeg-shards", shard_size=64,
                     progress=False)
        print(f"# generated {args.jpegs} JPEGs 224x224 + shards in {time.perf_counter() - t0:.1f}s")
        jpeg = list_shards(tmp / "jpeg-shards")
        common = dict(runs=args.runs, threads=args.threads, device=args.device)
        lines = bench("digits 16px", digits, DIGITS_AUG, size=16, channels=1, batch=256, **common)
        lines += bench("jpeg 224px", jpeg, SIMCLR_AUG, size=224, channels=3, batch=JPEG_BATCH, **common)
        lines += bench("jpeg 224px noblur", jpeg, AugmentConfig(blur_prob=0.0), size=224, channels=3,
                       batch=JPEG_BATCH, **common)
    print(f"{'dataset':<18} {'provider':<7} {'median':>15}")
    for line in lines:
        print(line)
    print(f"# peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; "
          f"load average after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")


if __name__ == "__main__":
    sys.exit(main())
