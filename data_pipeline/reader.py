"""Read raw samples from shards, split across ranks and DataLoader workers, shuffled per epoch.

Split. There are ``N = world_size * num_workers`` readers; reader ``g = rank * num_workers + worker``. Each epoch, all
readers permute the shard list with the same ``(seed, epoch)`` generator, then:

- ``len(shards) >= N``: reader ``g`` reads shards ``perm[g::N]`` (shard-level split; readers may get a different number
  of samples, at most one shard's worth apart);
- ``len(shards) < N``: every reader reads every shard in ``perm`` order and keeps sample ``i`` (its position in that
  stream) when ``i % N == g`` (sample-level split; costs N-fold reading, which only happens for tiny datasets).

Either way every sample of an epoch goes to exactly one reader. Each reader then passes its samples through a shuffle
buffer seeded by ``(seed, epoch, g)``.

Problems are counted, logged once each (``logging.warning``) and skipped: a truncated or unreadable shard counts in
``truncated`` (once per shard and epoch, by one reader), a sample without an image or a parsable label in ``corrupt``
(with ``text=True``, as for CLIP, also one without a UTF-8 caption).
Workers hand samples to the main process in chunks that carry the counts since the previous chunk, so no count is lost.
"""

from __future__ import annotations

import collections
import functools
import logging
import multiprocessing as mp
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.remote import is_url, open_stream

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tiff", "tif")


def check_shard_list(shards) -> list[str]:
    """``shards`` as a list, or a one-line ValueError: one path given as a str (or Path) would be read as a list of
    one-character shard names, each counted as an unreadable shard, and no sample read."""
    if isinstance(shards, (str, bytes, os.PathLike)):
        raise ValueError(f"shards: a list of shard paths (data_pipeline.shards.list_shards(DIR) gives a dataset's), "
                         f"got the single {type(shards).__name__} {str(shards)!r}")
    shards = list(shards)
    if not shards:
        raise ValueError("shards: empty list")
    return shards


def split_shards(shards: list[str], *, reader: int, num_readers: int, seed: int, epoch: int) -> tuple[list[str], int]:
    """Shards reader ``reader`` of ``num_readers`` opens in ``epoch``, and its sample stride.

    Returns ``(paths, stride)``: stride 1 = keep every sample of ``paths``; stride N = sample-level split, keep sample
    ``i`` when ``i % N == reader``.
    """
    shards = check_shard_list(shards)
    if not 0 <= reader < num_readers:
        raise ValueError(f"reader {reader} out of range for {num_readers} readers")
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    perm = [sorted(shards)[i] for i in order]  # sorted first: the split must not depend on the caller's list order
    if len(perm) >= num_readers:
        return perm[reader::num_readers], 1
    return perm, num_readers


def smallest_rank_share(sizes: list[int], *, world_size: int, num_workers: int) -> int:
    """The fewest samples a rank reads in an epoch under :func:`split_shards`, over every epoch's permutation:
    ``sizes`` the samples of each shard, ``num_workers`` each rank's loader workers (0: it reads in its main process).
    Shards go to readers whole, so a rank whose readers draw the smallest shards can get fewer than an even share."""
    k = max(1, num_workers)
    readers, total = world_size * k, sum(sizes)
    if len(sizes) >= readers:
        fewest = min(sum(len(range(rank * k + w, len(sizes), readers)) for w in range(k)) for rank in range(world_size))
        return sum(sorted(sizes)[:fewest])
    return min(sum(len(range(rank * k + w, total, readers)) for w in range(k)) for rank in range(world_size))


def _shuffle(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Shuffle buffer of ``size`` (0 or 1 = pass-through): emit a random buffered sample for each new one."""
    if size <= 1:
        yield from samples
        return
    buf: list[dict] = []
    for sample in samples:
        if len(buf) < size:
            buf.append(sample)
            continue
        j = int(rng.integers(size))
        buf[j], sample = sample, buf[j]
        yield sample
    rng.shuffle(buf)
    yield from buf


def _tar_samples(path: str, errors: list[Exception], repeated: list[str] | None = None) -> Iterator[dict]:
    """Grouped webdataset samples of one tar; exceptions go into ``errors`` and end or skip as webdataset decides. A
    member of a type its sample has already (``a.jpg`` then ``a.JPG``, or a file appended twice) is no read error:
    webdataset keeps the first and reads on, so its name goes into ``repeated`` (or a warning) instead."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def handler(exn: Exception) -> bool:
        text = exn.args[0] if exn.args and isinstance(exn.args[0], str) else ""
        if isinstance(exn, ValueError) and ": duplicate file name in tar file" in text:
            member = text.split(": duplicate file name", 1)[0]
            if repeated is not None:
                repeated.append(member)
            else:
                log.warning("%s: %s is a second file of its type in its sample; the first one is read", path, member)
            return True
        errors.append(exn)
        return True  # keep going: read whatever is still readable

    try:
        stream = open_stream(path)  # opened here (not by webdataset's url_opener) so it is always closed
    except OSError as exn:
        errors.append(exn)
        return
    with stream:
        yield from group_by_keys(tar_file_expander([{"url": path, "stream": stream}], handler=handler), handler=handler)


def dotted_image(sample: dict) -> str | None:
    """A member of ``sample`` that is an image file whose name had a dot before its extension (``img.001.jpg``:
    WebDataset reads it as sample ``img`` with a member ``001.jpg``, which is no image member), or None."""
    return next((m for m in sorted(sample) if not m.startswith("__") and m.rsplit(".", 1)[-1] in IMAGE_EXTS
                 and "." in m), None)


def _parse(sample: dict, text: bool = False) -> dict | str:
    """``{"key", "image", "label"}`` (+ ``"text"`` with ``text``) from a webdataset sample, or why it cannot be one (a
    str): no image member, a label that is not an integer or (with ``text``) no non-empty UTF-8 caption. An empty
    image (a zero-byte file written into the shards) is passed on: decoding it fails, and it is counted as undecodable
    as any broken image is. A sample without a ``cls`` member (shards written by other tools, e.g. img2dataset) is
    unlabelled: -1."""
    image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    try:
        label = int(sample["cls"]) if "cls" in sample else -1
    except (ValueError, TypeError):
        return "a label that is not an integer"
    if image is None:
        dotted = dotted_image(sample)
        if dotted is None:
            return "no image"
        return (f"no image: its file {sample['__key__']}.{dotted} is read as sample {sample['__key__']!r} with a "
                f"{dotted!r} member, as WebDataset ends a sample's key at the first dot of a file name; name the files "
                "<key>.<ext> with no dot in the key")
    out = {"key": sample["__key__"], "image": bytes(image), "label": label}
    if text:
        try:
            out["text"] = bytes(sample["txt"]).decode("utf-8").strip()
        except (KeyError, UnicodeDecodeError):
            return "no UTF-8 caption"
        if not out["text"]:
            return "an empty caption"
    return out


@dataclass
class Counts:
    """Problems seen since the last chunk was emitted."""

    corrupt: int = 0
    truncated: int = 0


@functools.lru_cache(maxsize=8)
def _expected_counts(data_dir: str, mtime_ns: int) -> dict[str, int]:
    """Samples per shard file name from the manifest in ``data_dir`` (a directory or URL; cached per manifest
    version)."""
    from data_pipeline.shards import read_manifest

    names = read_manifest(data_dir, columns=["shard"]).column("shard").to_pylist()
    return dict(collections.Counter(names))


def expected_samples(path: str) -> int | None:
    """Samples the manifest beside ``path`` promises for it, or None when there is no manifest."""
    if is_url(path):
        data_dir, name = path.rsplit("/", 1)
        try:
            return _expected_counts(data_dir, 0).get(name)  # a served dataset never changes in place
        except ValueError:  # no manifest there
            return None
    data_dir, name = os.path.split(path)
    try:
        mtime = os.stat(os.path.join(data_dir, "manifest.parquet")).st_mtime_ns
    except OSError:
        return None
    return _expected_counts(data_dir, mtime).get(name)


def iter_reader(
    shards: list[str], *, reader: int, num_readers: int, seed: int, epoch: int, shuffle_buffer: int, counts: Counts,
    text: bool = False,
) -> Iterator[dict]:
    """Samples ``{"key", "image" (bytes), "label"}`` (+ ``"text"`` (str) with ``text``) of one reader for one epoch;
    problems are added to ``counts``.

    A shard is truncated when reading it raised (caught by the webdataset handler) or when it held fewer samples than
    its manifest row count: tarfile's stream mode ends silently when a file is cut at a header boundary.
    """
    paths, stride = split_shards(shards, reader=reader, num_readers=num_readers, seed=seed, epoch=epoch)

    def raw() -> Iterator[dict]:
        index = 0  # position in this reader's stream; decides ownership in sample-level mode
        def bad(held: tuple[str | None, str], path: str) -> None:
            counts.corrupt += 1
            log.warning("skipping sample %r in %s: %s", held[0], path, held[1])

        for shard_pos, path in enumerate(paths):
            errors: list[Exception] = []
            seen = 0
            # A sample that did not parse is corrupt, unless it is the cut-off last one of a truncated shard, which
            # the truncation count covers: so it is held until the next sample (or the shard's end) decides.
            held: tuple[str | None, str] | None = None  # (key, why)
            for sample in _tar_samples(path, errors):
                seen += 1
                mine = index % stride == reader % stride
                index += 1
                if held is not None:
                    bad(held, path)
                    held = None
                if not mine:
                    continue
                parsed = _parse(sample, text)
                if isinstance(parsed, str):
                    if not errors:  # after a read error the rest of the shard is covered by its truncation count
                        held = (sample.get("__key__"), parsed)
                    continue
                yield parsed
            expected = expected_samples(path)
            short = expected is not None and seen < expected
            if held is not None and not (errors or short):
                bad(held, path)
            # In sample-level mode every reader reads this shard; only one of them reports it.
            if (errors or short) and (stride == 1 or shard_pos % stride == reader):
                counts.truncated += 1
                why = errors[0] if errors else f"{seen} of {expected} samples"
                log.warning("shard %s is truncated or unreadable (%s); skipped the rest of it", path, why)

    rng = np.random.default_rng([seed, epoch, reader])
    yield from _shuffle(raw(), shuffle_buffer, rng)


class ShardStream(IterableDataset):
    """One epoch of this rank's samples per ``iter()``, as chunks ``{"samples": [...], "corrupt", "truncated"}``.

    The epoch lives in a shared ``mp.Value`` so persistent DataLoader workers pick up a new epoch on the next
    ``iter(loader)`` without being restarted.
    """

    def __init__(self, shards: list[str], *, rank: int, world_size: int, num_workers: int, shuffle_buffer: int,
                 seed: int, epoch: int, chunk: int = 32, text: bool = False):
        super().__init__()
        shards = check_shard_list(shards)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {num_workers}")
        self.shards = list(shards)
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle_buffer, self.seed, self.chunk, self.text = shuffle_buffer, seed, chunk, text
        self.epoch = mp.Value("q", epoch, lock=False)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, k = (info.id, info.num_workers) if info is not None else (0, 1)
        counts = Counts()
        samples = iter_reader(self.shards, reader=self.rank * k + worker, num_readers=self.world_size * k,
                              seed=self.seed, epoch=int(self.epoch.value), shuffle_buffer=self.shuffle_buffer,
                              counts=counts, text=self.text)
        out: list[dict] = []
        for sample in samples:
            out.append(sample)
            if len(out) >= self.chunk:
                yield {"samples": out, "corrupt": counts.corrupt, "truncated": counts.truncated}
                out, counts.corrupt, counts.truncated = [], 0, 0
        yield {"samples": out, "corrupt": counts.corrupt, "truncated": counts.truncated}  # always: carries last counts


def _identity(x):
    return x


def make_loader(stream: ShardStream) -> DataLoader:
    """DataLoader over ``stream`` with ``stream.num_workers`` persistent workers (0 = read in the main process).

    It has a generator of its own: a DataLoader draws its workers' base seed at each ``iter()``, and from the global
    torch RNG that would shift the model's random draws (masks, dropout) by how often the data was restarted, so a
    resumed run would draw differently from an uninterrupted one.
    """
    k = stream.num_workers
    return DataLoader(stream, batch_size=None, num_workers=k, collate_fn=_identity, persistent_workers=k > 0,
                      prefetch_factor=4 if k > 0 else None, generator=torch.Generator().manual_seed(stream.seed))


def read_epoch(shards: list[str], *, rank: int, world_size: int, num_workers: int, shuffle_buffer: int = 0,
               seed: int = 0, epoch: int = 0, text: bool = False) -> Iterator[dict]:
    """Raw samples ``{"key", "image" (bytes), "label"}`` (+ ``"text"``) of one epoch for one rank, read by real
    DataLoader workers."""
    stream = ShardStream(shards, rank=rank, world_size=world_size, num_workers=num_workers,
                         shuffle_buffer=shuffle_buffer, seed=seed, epoch=epoch, text=text)
    for chunk in make_loader(stream):
        yield from chunk["samples"]

