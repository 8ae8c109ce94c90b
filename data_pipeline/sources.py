"""Image sources that shards are written from.

Every source yields ``(key, encoded_bytes, extension, label, caption)``; ``caption`` is the image's text (``str``) or
None. The shard writer never needs to know where images and captions came from.

Source specs (strings, so they fit a YAML recipe or a CLI flag):

- ``"digits"``: scikit-learn's 1797 digits, each an 8x8 grayscale PNG, label = the digit, and a caption made from the
  label with one of ``DIGIT_CAPTIONS`` (picked per sample by a fixed seed): the image-text pairs CLIP trains on. The
  captions say nothing the label does not, so CLIP on digits is supervised by the labels through text.
- ``"samples"``: scikit-learn's two sample photos (a temple in China, a flower) cut into 64x64 colour crops on a
  32-pixel grid (456 PNGs), label = the photo: a small colour dataset for the tasks that need colour (colorization).
- ``"folder:PATH"``: an ImageFolder-style tree ``PATH/<class>/<image>`` (JPEG, PNG, WebP, BMP or TIFF:
  ``IMAGE_SUFFIXES``); labels are indices into the sorted list of class (sub-folder) names. Files are stored as they
  are (no re-encoding). An image's caption is the UTF-8 text of a ``.txt`` file beside it with the same stem
  (``cat.jpg`` + ``cat.txt``), if there is one.
- ``"images:PATH"``: unlabelled images, every image under ``PATH`` at any depth (sub-folders mean nothing; hidden
  ones skipped, counted in what it left out), label ``UNLABELLED`` (-1) and no class names: what self-supervised
  pretraining needs. Captions as for ``folder:``. Such a dataset trains any method but cannot be an
  ``eval.dataset`` (no labels to score).

- ``"table:FILE"``: a table of images, one row each: a CSV, TSV, Parquet or JSON-lines file with an ``image`` column
  (a path, relative to the table's folder or absolute) and optionally ``caption`` (or ``text``: image-text pairs, as
  COCO's or your own) and ``label`` (class names or integer ids, each sorted, names by text and ids by value, and
  numbered); rows without a label are unlabelled.

``resolve_source`` checks a spec completely (unknown kind, missing / unreadable / empty folder) and raises a one-line
``ValueError`` before anything is written.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".jpe": "jpg", ".jfif": "jpg", ".png": "png", ".webp": "webp",
                  ".bmp": "bmp", ".tif": "tiff", ".tiff": "tiff"}
"""Image files a folder source takes (suffix, any case) -> the extension of its shard member; DALI, PIL decode all."""
IMAGE_KINDS = "/".join(s for s in IMAGE_SUFFIXES if s not in (".jpe", ".jfif"))  # (JPEGs too, rarely named so)
UNLABELLED = -1
"""The label of every sample of an ``images:PATH`` source."""

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_CAPTIONS = (
    "a handwritten {word}",
    "the digit {digit}",
    "a scanned image of the number {word}",
    "{digit}",
    "a small blurry {digit} written by hand",
    "the number {word}, written by hand",
    "{word}",
    "a low resolution scan of a handwritten {digit}",
)
"""Caption templates of the digits source; zero-shot evaluation prompts with other wordings (pretrain.eval.zeroshot)."""


def digit_caption(label: int, index: int) -> str:
    """The caption of digits sample ``index`` with ``label``: a template picked by a generator seeded by the index."""
    template = DIGIT_CAPTIONS[int(np.random.default_rng([7, index]).integers(len(DIGIT_CAPTIONS)))]
    return template.format(word=DIGIT_WORDS[label], digit=label)


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as 8-bit grayscale.

    Returns images ``(1797, 8, 8) uint8`` (the 0..16 intensities scaled to 0..255) and labels ``(1797,) int64``.
    Shards and the evaluation set both go through this function, so training and evaluation see the same pixels.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of ``image``: (H, W) uint8 grayscale or (H, W, 3) uint8 RGB."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Source:
    """A resolved source: ``len(source)`` samples, ``classes[label]`` names a label, ``iter(source)`` yields samples."""

    spec: str
    classes: list[str]
    _items: list[tuple[str, object, str, int, object]] = field(repr=False)
    """(key, payload, ext, label, caption); payload is a Path (read lazily) or encoded bytes; caption a str, a Path
    (read lazily) or None."""
    notes: list[str] = field(default_factory=list)
    """What the source left out and why (empty files; images outside a folder source's class sub-folders)."""
    bad_captions: list[Path] = field(default_factory=list, repr=False)
    """Caption files read so far that are not UTF-8 text (their images go without a caption)."""
    unreadable: list[str] = field(default_factory=list, repr=False)
    """Image files that could not be read when their turn came (deleted, moved or locked since the source was
    resolved), as "path (why)": left out."""
    not_images: list[str] = field(default_factory=list, repr=False)
    """Files read when their turn came whose bytes are no image training decodes (``not_an_image``), as "path (why)":
    left out."""

    def __len__(self) -> int:
        return len(self._items)

    @property
    def captioned(self) -> int:
        """How many samples have a caption."""
        return sum(item[4] is not None for item in self._items)

    def __getitem__(self, index: int) -> tuple[str, bytes, str, int, str | None]:
        """Sample ``index`` as ``(key, encoded bytes, ext, label, caption)``; a file is read only now."""
        key, payload, ext, label, caption = self._items[index]
        data = Path(payload).read_bytes() if isinstance(payload, Path) else payload
        if isinstance(caption, Path):
            try:  # utf-8-sig: a byte-order mark (Windows editors write one) is not the caption's
                caption = caption.read_text(encoding="utf-8-sig").strip() or None
            except UnicodeDecodeError:  # the image is still an image: kept, without a caption, and noted
                self.bad_captions.append(caption)
                caption = None
        return key, data, ext, label, caption

    def origin(self, index: int) -> str | None:
        """Where sample ``index`` was read from: its file's absolute path, or None for a built-in source. A link's
        own path, not its target's (two links to one file, or a link and its target, are two files read: the
        manifest and the duplicate note name each)."""
        payload = self._items[index][1]
        return os.path.abspath(payload) if isinstance(payload, Path) else None

    def __iter__(self) -> Iterator[tuple[str, bytes, str, int, str | None]]:
        for index in range(len(self._items)):
            yield self[index]

    def without_duplicates(self, *, workers: int = 1, progress: bool = False) -> Source:
        """This source less every image whose bytes an earlier one (in the source's order) has, each file read once
        for it (``workers`` at a time); the keys of the rest stay. A note says how many were left out, names one,
        and how many of them were under another class than the image they repeat (a labelling conflict)."""
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        def digest(index: int) -> str:
            payload = self._items[index][1]
            return image_digest(Path(payload).read_bytes() if isinstance(payload, Path) else payload)

        with ThreadPoolExecutor(workers) as pool:
            digests = list(tqdm(pool.map(digest, range(len(self._items))), total=len(self._items),
                                disable=not progress, desc="duplicates", unit="img"))
        first: dict[str, int] = {}
        kept, repeats, conflicts = [], [], 0
        for index, d in enumerate(digests):
            if d not in first:
                first[d] = index
                kept.append(self._items[index])
                continue
            repeats.append((index, first[d]))
            conflicts += self._items[index][3] != self._items[first[d]][3]
        if not repeats:
            return self
        again, original = (self.origin(i) or self._items[i][0] for i in repeats[0])
        note = (f"{len(repeats)} exact duplicate(s) of an earlier image (the same bytes), e.g. {again} (as {original})"
                + (f"; {conflicts} of them under another class than the image they repeat" if conflicts else ""))
        return Source(self.spec, self.classes, kept, [*self.notes, note])


def image_digest(data: bytes) -> str:
    """blake2b-128 of an image file's bytes, in hex: images with the same digest are the same file's bytes."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _digits_source() -> Source:
    images, labels = digits_uint8()
    items = [(f"digits_{i:05d}", encode_png(img), "png", int(y), digit_caption(int(y), i))
             for i, (img, y) in enumerate(zip(images, labels))]
    return Source("digits", [str(d) for d in range(10)], items)


def _samples_source() -> Source:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    items = []
    for label, image in enumerate(photos.images):
        h, w = image.shape[:2]
        for top in range(0, h - 64 + 1, 32):
            for left in range(0, w - 64 + 1, 32):
                crop = np.ascontiguousarray(image[top : top + 64, left : left + 64])
                items.append((f"samples_{len(items):05d}", encode_png(crop), "png", label, None))
    return Source("samples", ["china", "flower"], items)


def _folder_source(spec: str, root_str: str) -> Source:
    root = _readable_dir(spec, root_str, "folder:PATH")
    found = _Found()
    subdirs = [p for p in root.iterdir() if p.is_dir()]
    found.unnamed += [os.fsencode(p) for p in subdirs if not _utf8(p.name)]
    folders = sorted(p.name for p in subdirs if not p.name.startswith(".") and _utf8(p.name))
    found.hidden_dirs += sorted(p for p in subdirs if p.name.startswith(".") and _utf8(p.name))
    # each real folder read once, under its own name: the real ones walked first, then the links to folders (a class
    # `kitty` linking to `cat` would repeat cat's images under a second label: None, no class)
    seen: set = set()
    walked: dict[str, list[Path] | None] = {}
    for name in sorted(folders, key=lambda n: (root / n).is_symlink()):
        st = os.stat(root / name)
        walked[name] = None if (st.st_dev, st.st_ino) in seen else _image_files(root / name, found, seen)
    files: list[tuple[Path, int]] = []
    empty: list[Path] = []
    classes, imageless = [], []
    repeated = [name for name in folders if walked[name] is None]
    for name in folders:  # a folder without an image (__MACOSX, an empty class) is no class
        if walked[name] is None:
            continue
        before = len(files)
        for path in walked[name]:
            _keep_readable(spec, path, len(classes), files, empty)
        (classes if len(files) > before else imageless).append(name)
    loose = sum(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in root.iterdir())
    if not files:
        raise ValueError(f"source {spec!r}: no images ({IMAGE_KINDS}) in class sub-folders of {root}"
                         + (f" (unlabelled images: use 'images:{root_str}')" if loose else ""))
    # Key = index in sorted order: unique, dot-free (webdataset splits member names at the first dot) and stable.
    items = [(f"{i:08d}", path, IMAGE_SUFFIXES[path.suffix.lower()], label, _caption_file(path))
             for i, (path, label) in enumerate(files)]
    notes = _empty_note(empty) + found.notes()
    if repeated:
        notes.append(f"{len(repeated)} sub-folder(s) that lead to a folder read already (links), not classes: "
                     + ", ".join(repeated[:5]) + (" ..." if len(repeated) > 5 else ""))
    if imageless:
        notes.append(f"{len(imageless)} sub-folder(s) without an image, not classes: "
                     + ", ".join(imageless[:5]) + (" ..." if len(imageless) > 5 else ""))
    if loose:
        notes.append(f"{loose} image(s) at the top of {root}, outside any class sub-folder (images:{root_str} takes "
                     "every image, unlabelled)")
    return Source(spec, classes, items, notes)


def _keep_readable(spec: str, path: Path, label, files: list, empty: list) -> None:
    """``(path, label)`` into ``files`` if it is a readable file with bytes; into ``empty`` if it has none (a zero-byte
    file is no image: left out, and noted); an unreadable one is a ValueError before anything is written."""
    if not os.access(path, os.R_OK):
        raise ValueError(f"source {spec!r}: {path} is not readable")
    if path.stat().st_size == 0:
        empty.append(path)
    else:
        files.append((path, label))


def _empty_note(empty: list[Path]) -> list[str]:
    if not empty:
        return []
    return [f"{len(empty)} empty (zero-byte) file(s), e.g. {empty[0]}"]


@dataclass
class _Found:
    """What walks for images left out."""

    broken: list[Path] = field(default_factory=list)
    """Image-named links that lead nowhere."""
    others: dict[str, int] = field(default_factory=dict)
    """Files of other types (not a caption's .txt), by suffix."""
    unnamed: list[bytes] = field(default_factory=list)
    """Files (or folders) whose names are not UTF-8 text: a manifest holds text."""
    hidden_dirs: list[Path] = field(default_factory=list)
    """Folders whose name starts with a dot (``.git``, ``.ipynb_checkpoints``): not walked."""
    hidden_files: list[Path] = field(default_factory=list)
    """Files whose name starts with a dot (``.DS_Store``, macOS's ``._photo.jpg``): not read."""

    def notes(self) -> list[str]:
        notes = []
        if self.broken:
            notes.append(f"{len(self.broken)} image link(s) to nothing, e.g. {min(self.broken)}")
        if self.others:
            kinds = sorted(self.others.items(), key=lambda kv: (-kv[1], not kv[0], kv[0]))  # no suffix: last
            notes.append(f"{sum(self.others.values())} file(s) of other types ("
                         + ", ".join(f"{kind or 'no suffix'}: {n}" for kind, n in kinds[:8])
                         + (", ..." if len(kinds) > 8 else "") + f"; images are {IMAGE_KINDS})")
        if self.unnamed:
            notes.append(f"{len(self.unnamed)} file(s) or folder(s) whose names are not UTF-8 text, e.g. "
                         f"{self.unnamed[0]!r} (rename them to include them)")
        if self.hidden_dirs:
            notes.append(f"{len(self.hidden_dirs)} hidden folder(s) (names starting with a dot), not read, e.g. "
                         f"{min(self.hidden_dirs)} (rename one to include its images)")
        if self.hidden_files:
            notes.append(f"{len(self.hidden_files)} hidden file(s) (names starting with a dot), not read, e.g. "
                         f"{min(self.hidden_files)}")
        return notes


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # os.walk hands over undecodable bytes as lone surrogates
        return False


def _image_files(root: Path, found: _Found, seen: set | None = None) -> list[Path]:
    """Every image file under ``root`` at any depth, sorted; what it leaves out goes into ``found``. Folders and
    files whose name starts with a dot are skipped (``.ipynb_checkpoints``, ``.git``); symbolic links are followed, to
    folders too (datasets assembled from links: DVC, git-annex, class subsets), each real folder walked once (a link
    to a folder above it, or two links to one folder, neither loops nor repeats it; ``seen`` carries the folders
    walked across calls)."""
    seen = seen if seen is not None else set()
    images = []
    for top, dirs, names in os.walk(root, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:  # reached again through another link: walked already
            dirs.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        for d in [d for d in dirs if not _utf8(d)]:
            found.unnamed.append(os.fsencode(Path(top) / d))
        found.hidden_dirs += [Path(top) / d for d in dirs if d.startswith(".") and _utf8(d)]
        # sorted: of two links to one folder the same one is walked on every machine, and names its files
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and _utf8(d))
        for name in names:
            path = Path(top) / name
            if name.startswith("."):
                if _utf8(name):
                    found.hidden_files.append(path)
                continue
            if not _utf8(name):
                found.unnamed.append(os.fsencode(path))
                continue
            suffix = path.suffix.lower()
            if suffix not in IMAGE_SUFFIXES:
                if suffix != ".txt":  # a caption
                    found.others[suffix] = found.others.get(suffix, 0) + 1
                continue
            if path.is_file():
                images.append(path)
            elif path.is_symlink() and not path.exists():
                found.broken.append(path)
    return sorted(images)


def _images_source(spec: str, root_str: str) -> Source:
    root = _readable_dir(spec, root_str, "images:PATH")
    files: list[tuple[Path, int]] = []
    empty: list[Path] = []
    found = _Found()
    for path in _image_files(root, found):
        _keep_readable(spec, path, UNLABELLED, files, empty)
    if not files:
        raise ValueError(f"source {spec!r}: no images ({IMAGE_KINDS}) under {root}")
    items = [(f"{i:08d}", path, IMAGE_SUFFIXES[path.suffix.lower()], UNLABELLED, _caption_file(path))
             for i, (path, _) in enumerate(files)]
    return Source(spec, [], items, _empty_note(empty) + found.notes())


TABLE_KINDS = (".csv", ".tsv", ".parquet", ".jsonl")


def _table_source(spec: str, file_str: str) -> Source:
    import pyarrow as pa

    file = Path(file_str).expanduser()
    if not file_str or not file.is_file():
        raise ValueError(f"source {spec!r}: {file} is not a file (expected 'table:FILE', FILE one of "
                         f"{', '.join(TABLE_KINDS)})")
    table = _read_table(spec, file)
    # column names as people write them: "Image", " label" (a space after the comma of a CSV header)
    named = {str(c).strip().lower(): c for c in reversed(table.column_names)}
    if "image" not in named:
        raise ValueError(f"source {spec!r}: no 'image' column (columns: {', '.join(table.column_names)})")
    image = table.column(named["image"])
    if not (pa.types.is_string(image.type) or pa.types.is_large_string(image.type) or pa.types.is_null(image.type)):
        raise ValueError(f"source {spec!r}: the 'image' column holds {image.type}, not file paths (a table of image "
                         "bytes, as Hugging Face datasets write: save the images as files and list their paths)")
    text = next((named[c] for c in ("caption", "text") if c in named), None)
    captions = [None if c is None or not str(c).strip() else str(c).strip()
                for c in (table.column(text).to_pylist() if text else [None] * table.num_rows)]
    labels, classes = _table_labels(spec, table.column(named["label"]) if "label" in named else None,
                                    table.num_rows, pa)
    used = {named["image"], text, named.get("label")}
    ignored = [c for c in table.column_names if c not in used]
    items, empty = [], []
    for i, (name, label, caption) in enumerate(zip(image.to_pylist(), labels, captions)):
        if name is not None and "://" in str(name):
            raise ValueError(f"source {spec!r}: {_row_place(file, i)}: image {name!r} is a URL; table: reads image "
                             "files on this machine (download them first, e.g. with img2dataset, then `pretrain data "
                             "index`)")
        path = Path(str(name)).expanduser() if name is not None else None
        if path is not None and not path.is_absolute():
            path = file.parent / path
        if path is None or path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"source {spec!r}: {_row_place(file, i)}: image {name!r} is not a {IMAGE_KINDS} file "
                             "name")
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ValueError(f"source {spec!r}: {_row_place(file, i)}: {path} is not a readable file")
        if path.stat().st_size == 0:  # no image: left out and noted, as the folder sources do
            empty.append(path)
            continue
        items.append((f"{i:08d}", path, IMAGE_SUFFIXES[path.suffix.lower()], label, caption))
    if not items:
        raise ValueError(f"source {spec!r}: the table has no rows" + (" with an image" if empty else ""))
    notes = _empty_note(empty)
    if ignored:
        notes.append(f"the column(s) {', '.join(map(repr, ignored))} of the table (it reads image, caption or text, "
                     "and label)")
    return Source(spec, classes, items, notes)


def _row_place(file: Path, row: int) -> str:
    """Where data row ``row`` (0-based, in the order read) of a table file is, as an editor shows it: ``line N`` of a
    CSV, TSV or JSON-lines file (a CSV's header is line 1; the blank lines the reader skips and each line of a quoted
    caption over several count), ``row N`` (from 1) of a Parquet file. The file is read again, for a message only."""
    import csv

    kind = file.suffix.lower()
    try:
        if kind in (".csv", ".tsv"):
            with open(file, encoding="utf-8", errors="replace", newline="") as f:
                reader = csv.reader(f, delimiter="\t" if kind == ".tsv" else ",")
                start, seen = 1, -1  # the first line with fields is the header
                for fields in reader:
                    if fields:  # a blank line is no row (pyarrow skips it) but is a line
                        if seen == row:
                            return f"line {start}"
                        seen += 1
                    start = reader.line_num + 1
        elif kind == ".jsonl":
            with open(file, encoding="utf-8", errors="replace") as f:
                rows = (number for number, line in enumerate(f, 1) if line.strip())  # blank lines: no row
                for seen, number in enumerate(rows):
                    if seen == row:
                        return f"line {number}"
    except (OSError, csv.Error):  # changed since it was read, a field over csv's size limit: the row's number
        pass
    return f"row {row + 1}"


def _read_table(spec: str, file: Path):
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    kind = file.suffix.lower()
    try:
        if kind == ".parquet":
            return pq.read_table(file)
        if kind in (".csv", ".tsv"):  # only an empty field is missing: a caption "NA" or "null" is text
            return pcsv.read_csv(file, parse_options=pcsv.ParseOptions(delimiter="\t" if kind == ".tsv" else ","),
                                 convert_options=pcsv.ConvertOptions(null_values=[""], strings_can_be_null=True))
        if kind == ".jsonl":
            return pjson.read_json(file)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid and others for malformed files
        where = _bad_json_line(file) if kind == ".jsonl" else None  # pyarrow's "in row 1" counts rows from 0
        raise ValueError(f"source {spec!r}: {file} does not parse as {kind[1:]}: "
                         + (where or str(e).splitlines()[0])) from None
    raise ValueError(f"source {spec!r}: {file} is not one of {', '.join(TABLE_KINDS)}")


def _bad_json_line(file: Path) -> str | None:
    """``line N: why`` of the first line of a JSON-lines file that is no JSON object (blank lines are none), or None
    where each is one (the file parsed after all, or pyarrow objects to something else: mixed types)."""
    import json

    try:
        with open(file, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"line {number}: {e.msg} (column {e.colno})"
                if not isinstance(value, dict):
                    return f"line {number}: a JSON {type(value).__name__}, not an object"
    except (OSError, UnicodeDecodeError) as e:
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def _table_labels(spec: str, column, rows: int, pa) -> tuple[list[int], list[str]]:
    """Labels (-1 where missing) and class names of a table's ``label`` column (None: all unlabelled)."""
    if column is None:
        return [UNLABELLED] * rows, []
    values = column.to_pylist()
    if pa.types.is_floating(column.type):  # integer ids with a gap: pandas stores [0, 1, None] as 0.0, 1.0, NaN
        values = [None if v is None or v != v else v for v in values]  # NaN: missing, as None is
        if all(v is None or float(v).is_integer() for v in values):  # 1.0 is id 1, not the class name "1.0"
            column = pa.array([None if v is None else int(v) for v in values], pa.int64())
            values = column.to_pylist()
    if pa.types.is_integer(column.type) or pa.types.is_null(column.type):
        labels = [UNLABELLED if v is None else int(v) for v in values]
        if any(v < UNLABELLED for v in labels):
            raise ValueError(f"source {spec!r}: labels must be >= 0 (or -1, or empty: unlabelled)")
        # the ids present, in numeric order, are the classes: 0..K-1 stay themselves, and sparse ids (database keys)
        # do not make a class name of every integer below the largest
        ids = sorted({v for v in labels if v != UNLABELLED})
        index = {v: i for i, v in enumerate(ids)}
        return [index.get(v, UNLABELLED) for v in labels], [str(v) for v in ids]
    names = sorted({str(v).strip() for v in values if v is not None and str(v).strip()})
    index = {n: i for i, n in enumerate(names)}
    return [UNLABELLED if v is None else index.get(str(v).strip(), UNLABELLED) for v in values], names


def _readable_dir(spec: str, root_str: str, form: str) -> Path:
    if not root_str:
        raise ValueError(f"source {spec!r}: empty folder path (expected '{form}')")
    root = Path(root_str).expanduser()
    if not root.is_dir():
        raise ValueError(f"source {spec!r}: {root} is not a directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise ValueError(f"source {spec!r}: {root} is not readable")
    return root


def _caption_file(image: Path) -> Path | None:
    caption = image.with_suffix(".txt")
    if not caption.is_file():
        return None
    if not os.access(caption, os.R_OK):
        raise ValueError(f"caption {caption} is not readable")
    return caption


def resolve_source(spec: str) -> Source:
    """Parse and check a source spec; raise a one-line ``ValueError`` naming the problem."""
    if not isinstance(spec, str):
        raise ValueError(f"source spec must be a string, got {type(spec).__name__}")
    if spec == "digits":
        return _digits_source()
    if spec == "samples":
        return _samples_source()
    if spec.startswith("folder:"):
        return _folder_source(spec, spec[len("folder:"):])
    if spec.startswith("images:"):
        return _images_source(spec, spec[len("images:"):])
    if spec.startswith("table:"):
        return _table_source(spec, spec[len("table:"):])
    raise ValueError(f"unknown source {spec!r}: expected 'digits', 'samples', 'folder:PATH', 'images:PATH' or "
                     "'table:FILE'")


def pil_decodes(data: bytes) -> bool:
    """Whether PIL decodes ``data`` whole, in a format DALI reads too (``open_image``; any failure, of whatever type
    PIL raises, means no)."""
    try:
        with open_image(data):
            pass
        return True
    except Exception:  # noqa: BLE001 - PIL raises several types for broken files
        return False


MAX_PIXELS = 1 << 30
"""The largest image decoded, width × height (3 GiB as 8-bit RGB). PIL's own limit (a warning past 89 MP, an error past
179 MP) would make a large scan or aerial photo undecodable for evaluation, search and ``data verify --decode`` though
DALI decodes it for training; this one bounds the memory one image may take in the PIL paths."""

_UNLIMITED = threading.Lock()
"""Held while PIL's module-wide limit is lifted for one ``Image.open`` (which reads the header only)."""


HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""PIL's modes of one-channel images deeper than 8 bits (16-bit PNG and TIFF open as these), values 0..65535."""


DALI_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "PPM", "JPEG2000")
"""PIL's names of the formats DALI's decoder reads (MPO: a camera's JPEG with extra pictures); it fails on GIF, TGA,
ICO, PCX, ... whatever their file is named."""


def not_an_image(data: bytes) -> str | None:
    """Why encoded ``data`` is no image training decodes, read from its header only (~20 µs; not its pixels: a file
    cut short passes, and is skipped where it is read), or None: bytes no image format begins with (a web page or an
    error message saved under an image's name, random bytes) or a format DALI does not read (a GIF named .jpg)."""
    try:
        with _open_header(data) as im:
            kind = im.format
    except Exception:  # noqa: BLE001 - PIL raises several types for what it cannot read
        return "no image format PIL knows"
    return None if kind in DALI_FORMATS else f"a {kind} image, which DALI does not decode"


def _open_header(data: bytes):
    """PIL's ``Image.open`` of encoded ``data`` (its header read, not its pixels) without PIL's guard against
    decompression bombs, which refuses what DALI decodes: ours is ``MAX_PIXELS``, checked where pixels are decoded."""
    from PIL import Image

    with _UNLIMITED:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def open_image(data: bytes):
    """A PIL image of the encoded ``data`` as DALI's decoder (the training views) sees it: turned upright by its EXIF
    orientation (a phone photo stored sideways), and a 16-bit grey image scaled to 8 bits (PIL's own conversion would
    clip it to white). Colour modes (CMYK, palette, alpha) are left for ``convert``. Raises what PIL raises on a file
    it cannot read, and ValueError for a format training cannot decode (a GIF named .jpg: as undecodable for
    evaluation and search as it is for training) or an image over ``MAX_PIXELS``. A floating-point grey image (a
    32-bit float TIFF) is read as DALI reads it, 0..1 as black..white."""
    from PIL import Image, ImageOps

    im = _open_header(data)
    if im.width * im.height > MAX_PIXELS:
        raise ValueError(f"a {im.width}x{im.height} image, over the {MAX_PIXELS:,} pixels decoded")
    if im.format not in DALI_FORMATS:
        raise ValueError(f"a {im.format} image, which the training pipeline (DALI) does not decode")
    ImageOps.exif_transpose(im, in_place=True)  # decodes it, then turns it where its orientation says so
    if im.mode in HIGH_BIT_MODES:
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8), "L")
    elif im.mode == "F":  # a floating-point TIFF: DALI reads 0..1 as black..white; PIL's convert would clip 0..255
        im = Image.fromarray((np.asarray(im, dtype=np.float64) * 255.0).round().clip(0, 255).astype(np.uint8), "L")
    return im
