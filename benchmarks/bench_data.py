"""Data-path throughput: decode + N-view augmentation, DALI vs a plain PIL/numpy/torch baseline, in the same run.

Without ``--config``, two datasets, both real and generated into a temp dir: scikit-learn digits shards (8x8 PNG ->
16x16 gray views) and JPEG shards of 224 px crops cut from scikit-learn's two sample photos (-> 224x224 RGB views,
SimCLR-style recipe). With ``--config RECIPE.yaml`` (and ``--set KEY=VALUE`` overrides, as ``pretrain train`` takes
them), the recipe's own data path instead: its ``data.source`` shards (resolved as training resolves them, a built-in
source built on first use), its ``data.aug`` (with ``view_aug``, ``local_aug``), views, image size, channels, batch
size, loader readers and DALI threads. The recipe and its data are checked before anything is measured (a missing
``data.source`` is one line); a method that trains on image-text pairs is measured on its images.

For each dataset: warm-up, then the median over ``--runs`` passes of images/s (one image = decode + all its views), for

- ``dali``: ``data_pipeline.dali.DaliAugmenter`` on in-memory encoded batches,
- ``pil``:  ``data_pipeline.cpu.PilAugmenter`` (the tested reference) on the same batches, same thread count (it makes
  the global views with ``data.aug`` alone: a recipe's ``view_aug`` and local crops are DALI's and the stream's only;
  the ``views`` column says what each provider made),
- ``stream``: the whole ``make_train_stream`` path (tar shards -> reader workers -> DALI), batches/s * batch size.

Providers are timed in turn within each run (see ``interleaved_rates``) so that load from other jobs on a shared machine
skews them alike; compare providers within one run, not across runs.

Usage: ``python benchmarks/bench_data.py [--config RECIPE.yaml [--set KEY=VALUE ...]] [--runs 5] [--threads 2]
[--device cpu] [--out CSV]``. Prints a table, and appends one row per (dataset, provider) to ``--out`` (default
``benchmarks/results/data.csv``) with the time, git sha and machine.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    Parser,
    Stopped,
    append_csv,
    at_least,
    cpu_name,
    csv_out,
    git_sha,
    plural,
    stop_on_signals,
)
from data_pipeline.cpu import PilAugmenter  # noqa: E402
from data_pipeline.dali import DaliAugmenter  # noqa: E402
from data_pipeline.loader import make_train_stream  # noqa: E402
from data_pipeline.reader import read_epoch  # noqa: E402
from data_pipeline.shards import ensure_digits_shards, list_shards, write_shards  # noqa: E402
from data_pipeline.views import AugmentConfig  # noqa: E402

if TYPE_CHECKING:
    from pretrain.config import Config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "data.csv"
FIELDS = ["time", "git_sha", "machine", "recipe", "dataset", "provider", "views", "batch", "threads", "device", "runs",
          "images_per_s", "slowest_images_per_s"]
"""The CSV's columns (``recipe``: the config file name and its overrides, empty for the built-in datasets; ``views``:
the views each provider made of an image, e.g. ``2x16px+2x12px``; ``images_per_s``: the median over ``runs``)."""
DIGITS_AUG = AugmentConfig(crop_scale=(0.5, 1.0), flip_prob=0.0, jitter_prob=0.8, brightness=0.4, contrast=0.4,
                           blur_prob=0.5, blur_sigma=(0.1, 1.0), affine_prob=0.5, rotate_degrees=10.0,
                           mean=[0.5], std=[0.5])
SIMCLR_AUG = AugmentConfig()  # defaults: crop, flip, jitter 0.8, grayscale 0.2, blur 0.5
JPEG_BATCH = 64
RECIPE_BATCHES = 8


@dataclasses.dataclass(kw_only=True)
class DataPath:
    """One dataset and what the providers make of it."""

    name: str
    shards: list[str]
    aug: AugmentConfig
    size: int
    channels: int
    batch: int
    readers: int = 2
    """The stream's reader workers"""
    shuffle_buffer: int = 256
    seed: int = 0
    max_batches: int | None = None
    """Batches per timed run at most (a recipe's dataset may be large); None: every full batch of one pass"""
    views: dict = dataclasses.field(default_factory=dict)
    """``make_train_stream``'s view arguments (num_views, local crops, view_augs, local_aug) for DALI and the stream"""

    def describe(self, global_only: bool = False) -> str:
        """``2x16px``, ``2x16px+2x12px`` with local crops (``global_only``: the global views alone, PIL's)."""
        text = f"{self.views.get('num_views', 2)}x{self.size}px"
        if self.views.get("local_views") and not global_only:
            text += f"+{self.views['local_views']}x{self.views['local_size']}px"
        return text


def recipe_path(cfg: Config, shards: list[str], max_batches: int) -> DataPath:
    """The data path ``pretrain train`` builds from ``cfg`` (``pretrain.trainer``'s ``make_train_stream`` call), for
    one rank."""
    d = cfg.data
    source = d.source.rstrip("/").rsplit("/", 1)[-1] or d.source  # digits, or a dataset folder's (URL's) last name
    return DataPath(name=f"{source} {d.image_size}px", shards=shards, aug=d.aug, size=d.image_size, channels=d.channels,
                    batch=d.batch_size, readers=d.num_loader_workers, shuffle_buffer=d.shuffle_buffer,
                    seed=cfg.job.seed, max_batches=max_batches,
                    views=dict(num_views=d.num_views, local_views=d.local_views, local_size=d.local_size,
                               local_crop_scale=tuple(d.local_crop_scale), view_augs=d.view_augments(),
                               local_aug=d.local_augment() if d.local_aug else None))


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_name()}, {gpu}, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


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


def bench(path: DataPath, *, runs: int, threads: int, device: str) -> list[dict]:
    """dali / pil on the same in-memory batches (one pass over the shards, or its first ``max_batches``), and the whole
    stream, interleaved: one row per provider."""
    batch = path.batch
    epoch = read_epoch(path.shards, rank=0, world_size=1, num_workers=0)
    try:
        limit = None if path.max_batches is None else path.max_batches * batch
        samples = [s["image"] for s in itertools.islice(epoch, limit)]
    finally:
        epoch.close()
    n_batches = len(samples) // batch
    if n_batches == 0:
        raise SystemExit(f"{path.name}: {len(samples)} readable samples, fewer than one batch of {batch}")
    batches = [samples[i * batch:(i + 1) * batch] for i in range(n_batches)]
    dali = DaliAugmenter(path.aug, batch_size=batch, image_size=path.size, channels=path.channels, num_threads=threads,
                         device=device, **path.views)
    pil = PilAugmenter(path.aug, image_size=path.size, channels=path.channels, num_threads=threads,
                       num_views=path.views.get("num_views", 2))
    stream = make_train_stream(path.shards, batch_size=batch, aug=path.aug, image_size=path.size,
                               channels=path.channels, rank=0, world_size=1, num_workers=path.readers,
                               shuffle_buffer=path.shuffle_buffer, seed=path.seed, device=device, dali_threads=threads,
                               **path.views)
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
    return [{"dataset": path.name, "provider": p, "views": path.describe(global_only=p == "pil"), "batch": batch,
             "threads": threads, "device": device, "runs": runs, "images_per_s": med, "slowest_images_per_s": worst,
             "readers": path.readers} for p, (med, worst) in rates.items()]


def note(row: dict) -> str:
    threads = row["threads"]
    if row["provider"] == "stream":
        readers = plural(row["readers"], "reader worker") if row["readers"] else "reading in the main process"
        return f"tar shards -> {readers} -> DALI {threads} threads"
    return f"DALI {threads} threads" if row["provider"] == "dali" else f"PIL pool {threads} threads"


def main(argv: list[str] | None = None) -> int:
    """Ctrl-C (SIGTERM) ends it in one line, exit 130 (143), its workers closed (it had ended in a traceback)."""
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=None, metavar="RECIPE.yaml",
                   help="a recipe: measure its data path (data.source, data.aug, views, batch size, readers) instead "
                   "of the built-in digits and JPEG datasets")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override of --config, as `pretrain train --set` takes it (repeatable)")
    p.add_argument("--runs", type=at_least(1), default=5, help="timed runs per provider, the median reported "
                   "(default 5, after a warm-up)")
    p.add_argument("--threads", type=at_least(1), default=None, help="DALI threads = PIL pool threads (default 2; "
                   "with --config the recipe's data.dali_threads)")
    p.add_argument("--jpegs", type=at_least(JPEG_BATCH), default=None, help="number of 224 px JPEGs to generate "
                   f"without --config (default 384; at least one batch of {JPEG_BATCH})")
    p.add_argument("--batches", type=at_least(1), default=None, help="with --config: batches of data.batch_size per "
                   f"timed run (default {RECIPE_BATCHES}; fewer where the dataset holds fewer)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where DALI runs (default cpu)")
    p.add_argument("--out", type=Path, default=RESULTS, metavar="CSV",
                   help="the CSV to append a row per dataset and provider to (default benchmarks/results/data.csv)")
    args = p.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no GPU that torch can use (DALI's GPU ops need CUDA)")
    if args.config is None:
        for option, value in (("--set", args.overrides), ("--batches", args.batches)):
            if value:
                p.error(f"{option}: it applies to a --config recipe; give one")
    elif args.jpegs is not None:
        p.error("--jpegs: sizes the built-in JPEG dataset, which --config replaces by the recipe's data")
    csv_out(p, "--out", args.out, FIELDS)
    try:
        with stop_on_signals():
            recipe, cfg, shards = _recipe(p, args) if args.config is not None else ("", None, [])
            rows = _measure(args, cfg, shards, recipe)
    except Stopped as e:
        print(f"Stopped by {e}: nothing appended to {args.out}", file=sys.stderr)
        return 128 + e.signum
    append_csv(args.out, rows, FIELDS)
    print(f"Appended {plural(len(rows), 'row')} to {args.out}")
    return 0


def _recipe(p: Parser, args) -> tuple[str, Config, list[str]]:
    """(the config file's name and the overrides, the config, its shards), checked as `pretrain train` checks them,
    before anything is measured; ``p.error`` in one line where they do not pass."""
    from pretrain.data import resolve_shards
    from pretrain.preflight import new_config

    config = args.config.expanduser().absolute()  # the user's file, relative to where they run
    try:
        cfg = new_config(config, args.overrides)
        shards = resolve_shards(cfg.data, ranks=1)  # a built-in source built on first use; one full batch at least
    except ValueError as e:  # (ConfigError's)
        p.error(str(e))
    return " ".join([config.name, *args.overrides]), cfg, shards


def _measure(args, cfg: Config | None, shards: list[str], recipe: str) -> list[dict]:
    """The header, the measurements and the table; the CSV's rows, stamped."""
    threads = args.threads or (cfg.data.dali_threads if cfg else 2)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    sha, where = git_sha(), machine()
    print("# bench_data: decode + augmentation throughput (images/s; each image decoded once into all its views)")
    print(f"# machine: {where}")
    print(f"# git: {sha}  time: {stamp}")
    print(f"# device: {args.device}  threads: {threads}  runs: {args.runs} (median; 1 warm-up)  "
          f"load average before: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    common = dict(runs=args.runs, threads=threads, device=args.device)
    notes: list[str] = []
    if cfg is not None:
        path = recipe_path(cfg, shards, args.batches or RECIPE_BATCHES)
        print(f"# recipe: {recipe}  data.source: {cfg.data.source} ({plural(len(shards), 'shard')})  "
              f"batch: {path.batch}, at most {path.max_batches} a run")
        rows = bench(path, **common)
        if path.views.get("local_views") or path.views.get("view_augs"):
            notes.append("# pil: the reference augmenter makes the global views with data.aug alone (not the recipe's "
                         "view_aug or local crops): not the work dali and stream do")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            jpegs = args.jpegs or 384
            digits = ensure_digits_shards(tmp / "cache", shard_size=256)
            t0 = time.perf_counter()
            write_shards(f"folder:{make_jpeg_tree(tmp / 'jpegs', jpegs)}", tmp / "jpeg-shards", shard_size=64,
                         progress=False)
            print(f"# generated {jpegs} JPEGs 224x224 + shards in {time.perf_counter() - t0:.1f}s")
            jpeg = list_shards(tmp / "jpeg-shards")
            rows = bench(DataPath(name="digits 16px", shards=digits, aug=DIGITS_AUG, size=16, channels=1, batch=256),
                         **common)
            rows += bench(DataPath(name="jpeg 224px", shards=jpeg, aug=SIMCLR_AUG, size=224, channels=3,
                                   batch=JPEG_BATCH), **common)
            rows += bench(DataPath(name="jpeg 224px noblur", shards=jpeg, aug=AugmentConfig(blur_prob=0.0), size=224,
                                   channels=3, batch=JPEG_BATCH), **common)
    width = max(18, *(len(r["dataset"]) + 1 for r in rows))
    print(f"{'dataset':<{width}} {'provider':<7} {'median':>15}")
    for r in rows:
        print(f"{r['dataset']:<{width}} {r['provider']:<7} {r['images_per_s']:>9.1f} img/s  (slowest run "
              f"{r['slowest_images_per_s']:.1f}; {r['views']} views; {note(r)})")
    for line in notes:
        print(line)
    print(f"# peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; "
          f"load average after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return [{"time": stamp, "git_sha": sha, "machine": where, "recipe": recipe, **r} for r in rows]


if __name__ == "__main__":
    sys.exit(main())
