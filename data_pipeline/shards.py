"""Write a source into WebDataset tar shards, and find / verify them again.

A dataset directory holds:

- ``shard-000000.tar``, ... : WebDataset shards; a sample is ``<key>.<ext>`` (the bytes the source gave; ``ext``
  png, jpg, webp, bmp or tiff) plus ``<key>.cls`` (the label as ASCII text; -1: unlabelled) and, where the source has
  one, ``<key>.txt`` (the caption, UTF-8).
- ``checksums.json``: ``{"shard-000000.tar": "<sha256 hex>", ...}``, one entry per shard.
- ``manifest.parquet``: one row per sample, columns ``key`` (str), ``shard`` (file name, str), ``label`` (int64),
  ``bytes`` (size of the encoded image, int64), ``caption`` (str, null where the sample has none; manifests written
  before captions existed lack the column), ``path`` (the absolute path of the file the image was read from; null for
  built-in sources; older manifests and ``index_shards``'s lack the column). The schema metadata holds ``classes``
  (JSON list of class names, index = label), ``source`` (the spec), ``shard_size`` and ``left_out`` (JSON list of
  what the source left out, in words).

``verify_dataset`` checks a dataset as a run would read it: every shard present and as its checksum says, every
sample of the manifest there and readable, and optionally every image decodable.

Everything is written into a hidden temp directory beside ``out_dir`` and renamed into place at the end, with the
manifest written last, so a crash never leaves a directory that looks complete: "complete" means "has a manifest".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import remote
from data_pipeline.sources import image_digest, not_an_image, pil_decodes, resolve_source

MANIFEST = "manifest.parquet"
CHECKSUMS = "checksums.json"
SHARD_PATTERN = "shard-%06d.tar"
COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
"""Names of compressed tars, which ``index_shards`` names and does not read (readers read plain tars only)."""


def dataset_dir(shard: str) -> str:
    """The dataset directory (or URL) of one of its shards."""
    return remote.parent(shard) if remote.is_url(shard) else str(Path(shard).parent)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shards(
    source: str, out_dir: str | Path, *, shard_size: int = 256, progress: bool = True, seed: int = 0,
    workers: int = 1, dedup: bool = False,
) -> Path:
    """Write ``source`` (see ``data_pipeline.sources``) as shards of ``shard_size`` samples into ``out_dir``.

    Samples are written in an order shuffled once by ``seed`` so that every shard mixes classes. ``out_dir`` must not
    exist yet (or be empty). Each image is read from disk only when its shard is written, so a dataset far larger than
    memory streams through; ``workers`` shards are written at a time (threads: reading files and writing tars wait on
    I/O, which is what a network file system makes slow), the bytes the same for any number. The manifest's
    ``digest`` column (``image_digest``) tells exact duplicates; ``dedup`` leaves them out, the first of each kept
    (``Source.without_duplicates``: every image is read once more, first). Returns the manifest path.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size: must be a positive int, got {shard_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: must be a positive int, got {workers!r}")
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        problem = "already exists and is not an empty directory" if out_dir.is_dir() else \
            "is a file; a dataset is written as a directory"
        raise ValueError(f"out_dir {out_dir} {problem}")
    above = next(p for p in out_dir.absolute().parents if p.exists())
    if not above.is_dir():
        raise ValueError(f"out_dir {out_dir}: {above} is a file, not a folder to write into")
    src = resolve_source(source)  # raises before anything is written
    if dedup:
        src = src.without_duplicates(workers=workers, progress=progress)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # An empty folder given (a link to one, a mount point: neither can be replaced by a rename) is written inside;
    # else the dataset is written beside it and renamed into place whole
    inside = out_dir.is_dir()
    tmp = (out_dir if inside else out_dir.parent) / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    moved: list[Path] = []
    try:
        order = np.random.default_rng(seed).permutation(len(src))
        groups = [order[start : start + shard_size] for start in range(0, len(order), shard_size)]
        bar = tqdm(total=len(order), disable=not progress, desc=f"shards {out_dir.name}", unit="img")

        def shard(index: int) -> list[tuple]:
            rows = _write_shard(tmp / (SHARD_PATTERN % index), src, groups[index])
            bar.update(len(rows))
            return rows

        with bar, ThreadPoolExecutor(workers) as pool:
            written = list(pool.map(shard, range(len(groups))))  # in shard order, whatever finished first
        rows = {name: [r[i] for group in written for r in group] for i, name in
                enumerate(("key", "shard", "label", "bytes", "caption", "path", "digest"))}
        shard_names = [SHARD_PATTERN % index for index in range(len(groups))]
        checksums = {name: sha256_file(tmp / name) for name in shard_names}
        (tmp / CHECKSUMS).write_text(json.dumps(checksums, indent=1, sort_keys=True))
        notes = src.notes + ([f"the captions of {len(src.bad_captions)} image(s), whose caption files are not UTF-8 "
                              f"text, e.g. {sorted(src.bad_captions)[0]}"] if src.bad_captions else [])
        if src.unreadable:
            notes.append(f"{len(src.unreadable)} image file(s) that could not be read when written (deleted or moved "
                         f"meanwhile?), e.g. {sorted(src.unreadable)[0]}")
        if src.not_images:
            notes.append(f"{len(src.not_images)} file(s) that are no image training decodes, e.g. "
                         f"{sorted(src.not_images)[0]}")
        if not any(written):
            raise ValueError(f"source {source!r}: none of its {len(src)} images could be read as one when written, "
                             f"e.g. {sorted(src.unreadable + src.not_images)[0]}")
        meta = {"classes": json.dumps(src.classes), "source": source, "shard_size": str(shard_size),
                "left_out": json.dumps(notes)}
        table = pa.table(
            {
                "key": pa.array(rows["key"], pa.string()),
                "shard": pa.array(rows["shard"], pa.string()),
                "label": pa.array(rows["label"], pa.int64()),
                "bytes": pa.array(rows["bytes"], pa.int64()),
                "caption": pa.array(rows["caption"], pa.string()),
                "path": pa.array(rows["path"], pa.string()),
                "digest": pa.array(rows["digest"], pa.string()),
            }
        ).replace_schema_metadata(meta)
        pq.write_table(table, tmp / MANIFEST)  # last: its presence marks the dataset complete
        if inside:
            for name in [*shard_names, CHECKSUMS, MANIFEST]:  # the manifest last, as above
                os.rename(tmp / name, out_dir / name)
                moved.append(out_dir / name)
            tmp.rmdir()
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in moved:
            path.unlink(missing_ok=True)
        raise
    return out_dir / MANIFEST


def _write_shard(path: Path, src, indices) -> list[tuple]:
    """Samples ``indices`` of ``src`` as one tar at ``path`` -> manifest rows (key, shard, label, bytes, caption, the
    file it was read from, the image's digest)."""
    import webdataset as wds

    rows = []
    # mtime=0 makes the tar bytes (and so the checksums) a function of the data only.
    with wds.TarWriter(str(path), mtime=0) as sink:
        for i in indices:
            try:
                key, data, ext, label, caption = src[int(i)]
            except OSError as e:  # gone since the source was walked (a collection still being edited): left out
                src.unreadable.append(f"{src.origin(int(i))} ({e.strerror or type(e).__name__})")
                continue
            if why := not_an_image(data):  # (training had skipped each, every epoch; a dataset of only such had
                src.not_images.append(f"{src.origin(int(i))} ({why})")  # failed after its cluster started)
                continue
            sample = {"__key__": key, ext: data, "cls": label}
            if caption is not None:
                sample["txt"] = caption
            sink.write(sample)
            rows.append((key, path.name, label, len(data), caption, src.origin(int(i)), image_digest(data)))
    return rows


def index_shards(data_dir: str | Path, *, workers: int = 4, progress: bool = True) -> tuple[Path, dict]:
    """Make WebDataset shards written by another tool (img2dataset, webdataset's TarWriter, ...) a dataset here,
    without rewriting them: write ``manifest.parquet`` and ``checksums.json`` beside the ``*.tar`` files of
    ``data_dir``. A sample is ``<key>.<image ext>`` with an optional ``<key>.txt`` caption (UTF-8) and ``<key>.cls``
    label (else unlabelled, -1); other members (img2dataset's .json) are ignored. Samples without an image, with one
    whose header is no image training decodes (``not_an_image``, as ``write_shards`` checks: a GIF named .jpg, an
    empty file), or with a label or caption that does not parse, are left out and counted; a tar that does not read
    to its end is listed with the samples before the damage and counted (so is one without tar's end blocks: cut
    between two members), and ``verify_dataset`` reports it as long as it stays so; compressed tars
    (``COMPRESSED_TARS``) are not read, and named. ``workers`` tars are read at a time. Returns (the manifest path,
    counts {"shards" (those of the manifest, as ``verify_dataset`` counts them), "tars" (the .tar files read),
    "compressed", "samples", "skipped", "damaged", "captions", "problems": a line naming each damaged tar
    (and how many of its samples it indexed), left-out sample, member of a type its sample has already (readers take
    the first), tar without a sample and compressed tar, "duplicates": samples whose image has the bytes of an earlier
    one's, told by the manifest's ``digest`` column, "repeated_keys": (key, first tar, other tar) of samples whose key
    an earlier sample has (tars of two crawls that both count from 0)})."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from data_pipeline.reader import _parse, _tar_samples, dotted_image

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"{data_dir}: {'not a directory' if data_dir.exists() else 'does not exist'} (give the "
                         "directory that holds the .tar shards)")
    if (data_dir / MANIFEST).exists():
        raise ValueError(f"{data_dir} already has a {MANIFEST}: it is a dataset already (to index it again, after "
                         f"adding or changing tars, delete its {MANIFEST} and {CHECKSUMS} first)")
    names = sorted(p.name for p in data_dir.glob("*.tar") if p.is_file())
    compressed = sorted(p.name for p in data_dir.iterdir() if p.name.endswith(COMPRESSED_TARS) and p.is_file())
    if not names:
        other = sorted(p.name for p in data_dir.iterdir() if p.name.endswith(COMPRESSED_TARS) or p.is_dir())
        raise ValueError(f"{data_dir}: no .tar files in it" + (
            f" (it holds {', '.join(other[:3])}{' ...' if len(other) > 3 else ''}: the shards must be plain .tar "
            "files at its top)" if other else ""))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: must be a positive int, got {workers!r}")
    bar = tqdm(total=len(names), disable=not progress, desc=f"index {data_dir.name}", unit="shard")

    def scan(name: str) -> tuple[list[tuple], list[str], list[str], str | None, str]:
        rows, skipped, errors, keys, repeated = [], [], [], set(), []
        for sample in _tar_samples(str(data_dir / name), errors, repeated):
            if sample["__key__"] in keys and dotted_image(sample):  # `cat.1.jpg`, `dog.1.jpg`, `cat.2.jpg`
                raise ValueError(f"{data_dir / name}: its file {sample['__key__']}.{dotted_image(sample)} is read "
                                 f"as sample {sample['__key__']!r}, as is a file before it, since WebDataset ends a "
                                 "sample's key at the first dot of a file name; name the files <key>.<ext> with no "
                                 "dot in the key")
            if sample["__key__"] in keys:  # the reader takes a sample's files from one run of members of its key
                raise ValueError(f"{data_dir / name}: the files of sample {sample['__key__']!r} are not next to each "
                                 "other in the tar, so readers would split it (an image without its label); write "
                                 "the tar with each sample's files together, e.g. `tar --sort=name` or webdataset's "
                                 "TarWriter")
            keys.add(sample["__key__"])
            parsed = _parse(sample)  # as training reads it: an image, a label or none (-1)
            if not isinstance(parsed, str) and parsed["label"] < -1:
                parsed = "a negative label"
            if not isinstance(parsed, str) and (why := not_an_image(parsed["image"])):  # as `data shards` checks it
                parsed = "an empty image" if not parsed["image"] else why
            try:
                caption = bytes(sample["txt"]).decode("utf-8").strip() or None if "txt" in sample else None
            except UnicodeDecodeError:
                parsed = "no UTF-8 caption"
            if isinstance(parsed, str):
                skipped.append(f"{name}: sample {sample['__key__']!r} left out ({parsed})")
                continue
            rows.append((parsed["key"], name, parsed["label"], len(parsed["image"]), caption,
                         image_digest(parsed["image"])))
        notes = [f"{name}: {member} is a second file of its type in its sample, which readers skip (the first one "
                 "is read)" for member in repeated]
        if not rows and not skipped and not errors:
            notes.append(f"{name}: holds no sample (not part of the dataset)")
        bar.update(1)
        damage = _tar_damage(data_dir / name, errors)
        if damage:  # what of it the manifest has, so the line says what index did without the README
            damage += f"; indexed up to there: {len(rows)} sample(s)"
        return rows, skipped, notes, damage, sha256_file(data_dir / name)

    with bar, ThreadPoolExecutor(workers) as pool:
        scanned = list(pool.map(scan, names))
    rows = [r for shard_rows, *_ in scanned for r in shard_rows]
    if not rows:
        skipped = sum(len(s[1]) for s in scanned)
        raise ValueError(f"{data_dir}: no sample to index in its {len(names)} tar file(s)" + (
            f" ({skipped} without an image or with a bad label/caption)" if skipped else " (no image in them)"))
    # every tar's checksum, those without a sample of the manifest too: `verify_dataset` checks each, so the tars
    # index calls damaged are the ones it reports
    checksums = {name: digest for name, (*_, digest) in zip(names, scanned)}
    (data_dir / CHECKSUMS).write_text(json.dumps(checksums, indent=1, sort_keys=True))
    columns = dict(zip(("key", "shard", "label", "bytes", "caption", "digest"), zip(*rows)))
    ids = sorted({r[2] for r in rows if r[2] >= 0})
    meta = {"classes": json.dumps([str(i) for i in ids]), "source": f"index:{data_dir}"}
    if ids != list(range(len(ids))):  # ids, not class indices (WordNet offsets, database keys): class i is ids[i]
        meta["label_ids"] = json.dumps(ids)
    table = pa.table({
        "key": pa.array(columns["key"], pa.string()),
        "shard": pa.array(columns["shard"], pa.string()),
        "label": pa.array(columns["label"], pa.int64()),
        "bytes": pa.array(columns["bytes"], pa.int64()),
        "caption": pa.array(columns["caption"], pa.string()),
        "digest": pa.array(columns["digest"], pa.string()),
    }).replace_schema_metadata(meta)
    partial = data_dir / f".{MANIFEST}.partial-{os.getpid()}"
    pq.write_table(table, partial)
    os.replace(partial, data_dir / MANIFEST)  # last, whole: its presence marks the dataset complete
    # shards: the manifest's, as `verify_dataset` counts them; tars: every .tar read
    counts = {"shards": len(set(columns["shard"])), "tars": len(names), "samples": len(rows),
              "skipped": sum(len(s[1]) for s in scanned), "damaged": sum(s[3] is not None for s in scanned),
              "captions": sum(r[4] is not None for r in rows), "compressed": len(compressed),
              "duplicates": len(rows) - len(set(columns["digest"])), "repeated_keys": _repeated_keys(rows),
              "problems": [line for _, skipped, notes, damage, _ in scanned
                           for line in [*([damage] if damage else []), *skipped, *notes]]
              + [f"{name}: not read: a compressed tar (readers read plain .tar files only; decompress it beside the "
                 "others, e.g. `gunzip`, and index again)" for name in compressed]}
    return data_dir / MANIFEST, counts


def _tar_damage(tar: Path, errors: list[Exception]) -> str | None:
    """Why a tar read by ``reader._tar_samples`` (its read errors: ``errors``) is not whole, in one line naming it, or
    None: what ``index_shards`` and ``verify_dataset`` both report, so a tar one calls damaged the other does too."""
    if errors:
        return f"{tar.name}: does not read to its end ({_tar_error(errors[0])})"
    return _no_end_marker(tar)


def _no_end_marker(tar: Path) -> str | None:
    """Why a tar that read to its end without an error is still not whole, or None. A tar ends with two zero blocks
    (tar, Python's tarfile and webdataset's TarWriter write them), then zeros only: one cut between two members (a copy
    stopped at a block boundary) reads as a whole, shorter tar, and readers stop at the first end blocks, so members
    after them (tars joined with ``cat``) or after a header cut short are never read."""
    import tarfile

    try:
        with tarfile.open(tar, "r:") as archive:
            for _ in archive:  # headers only: members' data is skipped
                pass
            end = archive.offset
    except (tarfile.TarError, OSError):  # what webdataset read without an error, tarfile does too; else it said so
        return None
    with tar.open("rb") as f:  # what follows, a block at a time (a second tar joined on may be large)
        f.seek(end)
        if f.read(512).strip(b"\0"):
            return f"{tar.name}: ends in a member header cut short (at byte {end})"
        for block in iter(lambda: f.read(1 << 20), b""):
            if block.strip(b"\0"):
                return (f"{tar.name}: has members after its end-of-archive blocks (byte {end}), which readers never "
                        "reach (tars joined with `cat`? write them as one tar, or keep them apart)")
        if f.tell() - end >= 1024:
            return None
    return f"{tar.name}: ends without tar's end-of-archive blocks (cut short between two members?)"


def _tar_error(error: Exception) -> str:
    """A reader's error in a few words: webdataset's carry the stream and path as arguments (``('empty file',
    <_io.BufferedReader ...>, PATH)``; ``unexpected end of data @ <_io.BufferedReader ...>``)."""
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    text = text.split(" @ <", 1)[0].strip()
    return (text or type(error).__name__).splitlines()[0]


def _repeated_keys(rows: list[tuple]) -> list[tuple[str, str, str]]:
    """``(key, first tar, other tar)`` for each manifest row (key, shard, ...) whose key an earlier row has."""
    first: dict[str, str] = {}
    repeated = []
    for key, shard, *_ in rows:
        if key in first:
            repeated.append((key, first[key], shard))
        else:
            first[key] = shard
    return repeated


def _read_checksums(data_dir: Path) -> dict[str, str] | None:
    """``checksums.json`` of a dataset directory (shard name -> sha256), None where there is none; a ValueError naming
    the file where it is not such a JSON object (cut short, edited by hand)."""
    path = data_dir / CHECKSUMS
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: does not parse as JSON ({e})") from None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"{path}: not a JSON object of shard name -> sha256")
    return value


def read_manifest(data_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The manifest table of a dataset directory or URL (columns key, shard, label, bytes, caption, path, digest
    (datasets written before it have none), or ``columns``; metadata classes, source, left_out)."""
    if remote.is_url(data_dir):
        try:
            return pq.read_table(pa.BufferReader(remote.fetch(remote.join(str(data_dir), MANIFEST))), columns=columns)
        except OSError as e:
            raise ValueError(f"no {MANIFEST} at {data_dir} ({e})") from None
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"no {MANIFEST} in {data_dir}: not a (complete) shard directory")
    return pq.read_table(path, columns=columns)


def read_classes(data_dir: str | Path) -> list[str]:
    """Class names of a dataset directory, index = class index (``class_indices`` of the stored labels)."""
    meta = read_manifest(data_dir, columns=["key"]).schema.metadata or {}
    return json.loads(meta.get(b"classes", b"[]"))


def class_indices(labels, meta: dict | None) -> np.ndarray:
    """The class index (into ``read_classes``) of each stored label of ``labels`` (what the tars' ``cls`` members
    hold), ``meta`` the dataset's manifest's schema metadata (read already): the label itself, except in a dataset
    indexed from tars whose labels are ids other than 0..K-1, where class i is the i-th smallest id (-1, unlabelled,
    stays -1)."""
    labels = np.asarray(labels, dtype=np.int64)
    meta = meta or {}
    if b"label_ids" not in meta:
        return labels
    ids = np.asarray(json.loads(meta[b"label_ids"]), dtype=np.int64)
    at = np.clip(np.searchsorted(ids, labels), 0, len(ids) - 1)
    return np.where((labels >= 0) & (ids[at] == labels), at, -1)


def count_captions(data_dir: str | Path, *, table: pa.Table | None = None) -> int:
    """How many samples of a dataset directory have a caption (0 for a manifest without the column); ``table``: its
    manifest, already read."""
    table = read_manifest(data_dir) if table is None else table
    if "caption" not in table.column_names:
        return 0
    column = table.column("caption")
    return len(column) - column.null_count


def list_shards(data_dir: str | Path, *, verify: bool = False, table: pa.Table | None = None) -> list[str]:
    """Absolute shard paths (URLs for a dataset URL) named by the manifest, sorted; with ``verify`` check each against
    ``checksums.json`` (local datasets). ``table``: the manifest, already read (any columns with ``shard``)."""
    table = read_manifest(data_dir, columns=["shard"]) if table is None else table
    names = sorted(set(table.column("shard").to_pylist()))
    if remote.is_url(data_dir):
        if verify:
            raise ValueError(f"{data_dir}: shards served over HTTP are not verified here; verify them where they lie")
        return [remote.join(str(data_dir), n) for n in names]
    data_dir = Path(data_dir)
    paths = [str((data_dir / n).resolve()) for n in names]
    if verify:
        checksums = _read_checksums(data_dir)
        if checksums is None:
            raise ValueError(f"{data_dir}: no {CHECKSUMS} to check the shards against")
        for name, path in zip(names, paths):
            if name not in checksums:
                raise ValueError(f"shard {name}: no checksum in {data_dir / CHECKSUMS}")
            if not os.path.isfile(path):
                raise ValueError(f"shard {name}: missing from {data_dir}")
            if sha256_file(path) != checksums[name]:
                raise ValueError(f"shard {name}: sha256 mismatch (file changed or corrupt)")
    return paths


BUILTIN_VERSIONS = {"digits": "v2", "samples": "v1"}
"""Sources built into a cache on first use, and the version of their samples: it changes whenever the samples do
(digits v2: captions), so an older cache is never mistaken for the current one."""


def builtin_dir_name(source: str, shard_size: int) -> str:
    return f"{source}-{BUILTIN_VERSIONS[source]}-{shard_size}"


def digits_dir_name(shard_size: int) -> str:
    return builtin_dir_name("digits", shard_size)


def ensure_builtin_shards(cache_dir: str | Path, source: str, *, shard_size: int = 256) -> list[str]:
    """Shards of a built-in source (``BUILTIN_VERSIONS``) under ``cache_dir/<source>-<version>-<shard_size>``: built on
    first use, reused after.

    Safe when several processes (ranks) call it at once: each builds into its own temp dir and the first rename wins.
    """
    out_dir = Path(cache_dir) / builtin_dir_name(source, shard_size)
    if not (out_dir / MANIFEST).is_file():
        if out_dir.is_dir() and any(out_dir.iterdir()):  # builds land whole (a rename), so this is not one of ours
            raise ValueError(f"data.cache_dir: {out_dir} holds files but no {MANIFEST} (an older layout?); move it "
                             "away and the shards are built again")
        try:
            write_shards(source, out_dir, shard_size=shard_size, progress=False)
        except (ValueError, OSError):
            # Another process finished first (our rename found a non-empty dir); anything else re-raises below.
            if not (out_dir / MANIFEST).is_file():
                raise
    return list_shards(out_dir)


def ensure_digits_shards(cache_dir: str | Path, *, shard_size: int = 256) -> list[str]:
    """``ensure_builtin_shards`` of the digits."""
    return ensure_builtin_shards(cache_dir, "digits", shard_size=shard_size)


def verify_dataset(data_dir: str | Path, *, decode: bool = False, workers: int = 4,
                   progress: bool = True) -> tuple[dict[str, int], list[str]]:
    """Check a local dataset directory -> (counts, problems). Every shard of the manifest must be there with the
    sha256 of ``checksums.json``, read to its end and be a whole tar (its end-of-archive blocks there, nothing after
    them: ``index_shards``'s check), and hold the manifest's samples, each with an image and a label that parse (as
    training reads them); with ``decode`` every image must also decode, by PIL (as evaluation and search read it, in
    a format DALI reads too: a GIF named .jpg is one training skips) and by DALI's decoder (as training reads it: PIL
    reads some files DALI does not, such as an uncompressed 1-bit TIFF). ``problems`` says each finding
    in words, a shard's first; counts: shards, samples (the manifest's), read, undecodable. Samples of a tar that the
    manifest does not list (those ``index_shards`` left out) are not the dataset's, and not checked; a tar of
    ``checksums.json`` without a sample of the manifest (``index_shards`` read it: a file that is no tar) is checked
    for its sha256 and damage, so what index called damaged is reported here until it is written again."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from data_pipeline.reader import _parse, _tar_samples

    if remote.is_url(data_dir):
        raise ValueError(f"{data_dir}: a dataset served over HTTP is not verified over HTTP; run `pretrain data verify "
                         "DIR` on the directory the server serves, where its files lie")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: must be a positive int, got {workers!r}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"{data_dir}: {'not a directory' if data_dir.exists() else 'does not exist'}")
    table = read_manifest(data_dir)
    # the file each sample was written from (``data shards``'), named with its problems; none for indexed tars
    paths = dict(zip(table.column("key").to_pylist(), table.column("path").to_pylist())) \
        if "path" in table.column_names else {}
    expected: dict[str, set[str]] = {}
    for key, shard in zip(table.column("key").to_pylist(), table.column("shard").to_pylist()):
        expected.setdefault(shard, set()).add(key)
    try:
        checksums, bad_checksums = _read_checksums(data_dir), None
    except ValueError as e:  # a problem of the dataset, reported with the others
        checksums, bad_checksums = None, f"{e} (the shards' bytes are not checked)"
    # tars `index_shards` read that hold no sample of the manifest (every one of a damaged tar was lost, a file that
    # is no tar): not the dataset's, but checked for the damage index reported, which stays until they are written
    # again (a name with a separator is none of index's: not followed out of the directory)
    others = sorted(n for n in (checksums or {}) if n not in expected and "/" not in n and n not in (".", ".."))
    bar = tqdm(total=len(expected) + len(others), disable=not progress, desc=f"verify {data_dir.name}", unit="shard")
    local = threading.local()

    def decodes(image: bytes) -> bool:
        if not pil_decodes(image):
            return False
        if not hasattr(local, "dali"):
            from data_pipeline.dali import DaliDecoder

            local.dali = DaliDecoder()
        return local.dali.decodes(image)

    def check(name: str) -> tuple[list[str], int, int]:
        path, problems, read, undecodable = data_dir / name, [], 0, 0
        if not path.is_file():
            bar.update(1)
            return [f"{name}: missing"] if name in expected else [], 0, 0
        if checksums is not None and checksums.get(name) != sha256_file(path):
            problems.append(f"{name}: " + ("no checksum in " + CHECKSUMS if name not in checksums else
                                           "sha256 differs from " + CHECKSUMS + " (changed or damaged since written)"))
        errors: list[Exception] = []
        seen = set()
        for sample in _tar_samples(str(path), errors, []):  # a repeated member: noted by index, the first one read
            key = sample.get("__key__")
            if key not in expected.get(name, ()):  # not the dataset's (`data index` leaves out what does not parse)
                continue
            parsed = _parse(sample)
            seen.add(key)
            what = f"{name}: sample {key!r}" + (f" (from {paths[key]})" if paths.get(key) else "")
            if isinstance(parsed, str):
                problems.append(f"{what}: {parsed}")
                continue
            read += 1
            if decode and not decodes(parsed["image"]):
                undecodable += 1
                problems.append(f"{what}: the image does not decode")
        damage = _tar_damage(path, errors)  # a read error, or no whole tar: members lost after what was read
        if damage:
            problems.append(damage)
        missing = expected.get(name, set()) - seen
        if missing:
            problems.append(f"{name}: {len(missing)} sample(s) of the manifest not in it, e.g. {min(missing)!r}")
        bar.update(1)
        return problems, read, undecodable

    with bar, ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(check, sorted(expected) + others))
    problems = [] if checksums is not None else [bad_checksums or f"{CHECKSUMS}: missing (the shards' bytes are not "
                                                                  "checked)"]
    problems += [p for found, _, _ in results for p in found]
    counts = {"shards": len(expected), "samples": table.num_rows, "read": sum(r for _, r, _ in results),
              "undecodable": sum(u for _, _, u in results)}
    return counts, problems
