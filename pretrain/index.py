"""Semantic search over a shard dataset with a trained run: embed every image, then rank them for a query.

``load_run`` rebuilds a run's encoder from its directory (``backbone.pt``; for CLIP ``model.pt``, both towers);
``embed_shards`` decodes every sample of a shard directory with the training recipe's size and normalisation (no
augmentation: the whole image, resized), skipping and counting undecodable ones; ``save_gallery`` / ``load_gallery``
keep those embeddings as a Parquet index (``pretrain embed``), so that searches need not embed the data again;
``rank`` orders the gallery for a query embedding. A CLIP run embeds images and texts in one space, so a caption-like
text can query images; any run can query with one of the gallery's own images (near-duplicates, same-class
neighbours).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_pipeline.remote import is_url
from pretrain.config import Config


@dataclass
class Run:
    cfg: Config
    encode_image: object
    """images (B, C, S, S) -> (B, E)"""
    encode_text: object | None
    """texts -> (B, E), or None for a method without a text tower"""
    device: torch.device = torch.device("cpu")
    """where the encoders' weights are: images go there"""
    backbone: torch.nn.Module | None = None
    """the image backbone (``encode_image`` without CLIP's projection; ``pretrain attention`` looks inside a ViT's)"""


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> Run:
    """The trained encoder(s) of a finished run directory on ``device`` ("auto": the GPU where there is one), in eval
    mode (ValueError naming what is missing)."""
    from pretrain.evaluate import load_run_files
    from pretrain.trainer import build_method

    cfg, backbone_state, method_state, _ = load_run_files(run_dir)
    method = build_method(cfg, distributed=False)
    if method_state is not None:
        method.load_state_dict(method_state)
    else:
        method.backbone.load_state_dict(backbone_state)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: this machine has no GPU that torch can use; device='auto' takes the "
                         "GPU where there is one")
    method.to(device).eval()
    if hasattr(method, "encode_text"):
        return Run(cfg, method.encode_image, method.encode_text, device, method.backbone)
    return Run(cfg, method.backbone, None, device, method.backbone)


@dataclass
class Gallery:
    keys: list[str]
    labels: np.ndarray
    """(N,) int64"""
    captions: list[str | None]
    embeddings: np.ndarray
    """(N, E) float32"""
    corrupt: int
    """samples skipped as undecodable"""
    paths: list[str | None] | None = None
    """the file each image was written from (the manifest's ``path``; None where it has none: built-in sources,
    datasets indexed from another tool's tars or written before manifests kept it)"""
    classes: list[str] | None = None
    """the dataset's class names, label = index (None: an index written before it kept them)"""
    digests: list[str | None] | None = None
    """each image's digest (the manifest's blake2b-128 of its bytes): what a contact sheet drawn later checks the
    images it reads against (None: an index written before it kept them)"""

    def class_name(self, row: int) -> str:
        """Row ``row``'s class: its name where the dataset has names, else its label number; "-" for no label."""
        label = int(self.labels[row])
        if label < 0:
            return "-"  # unlabelled (images:PATH)
        return self.classes[label] if self.classes and label < len(self.classes) else str(label)


@torch.no_grad()
def embed_shards(run: Run, shards: list[str], *, batch_size: int = 256) -> Gallery:
    """Every sample of ``shards`` (one pass, in shard order) embedded by ``run.encode_image``."""
    from data_pipeline.shards import class_indices, dataset_dir, read_manifest
    from pretrain.eval.dataset import ShardImages

    table = read_manifest(dataset_dir(shards[0]))
    classes = json.loads((table.schema.metadata or {}).get(b"classes", b"[]"))
    order = {str(s).rsplit("/", 1)[-1]: i for i, s in enumerate(shards)}  # a key's first sample is the one read
    caption_of, path_of, digest_of = {}, {}, {}
    for r in sorted(table.to_pylist(), key=lambda r: order.get(r["shard"], len(order))):
        caption_of.setdefault(r["key"], r.get("caption"))
        path_of.setdefault(r["key"], r.get("path"))
        digest_of.setdefault(r["key"], r.get("digest"))
    images = ShardImages(run.cfg)
    keys, labels, chunks = [], [], []
    for samples, x in images.batches(shards, batch_size=batch_size):
        chunks.append(run.encode_image(x.to(run.device, non_blocking=True)).float().cpu().numpy())
        keys.extend(s["key"] for s in samples)
        labels.extend(s["label"] for s in samples)
    if not keys:
        where = dataset_dir(shards[0])
        raise ValueError(f"--data: none of the {images.corrupt} images of {where} decodes (`pretrain data verify "
                         f"{where} --decode` lists them)")
    return Gallery(keys, class_indices(labels, table.schema.metadata), [caption_of.get(k) for k in keys],
                   np.concatenate(chunks), images.corrupt, [path_of.get(k) for k in keys], classes,
                   [digest_of.get(k) for k in keys])


INDEX_FORMAT = b"ssl-pretrain embeddings 1"
"""Schema metadata ``format`` of an embedding index (``save_gallery``)."""


def weights_digest(run_dir: str | Path, *, legacy: bool = False) -> str:
    """sha256 over the weights a run's encoder is loaded from (the state dicts of backbone.pt, and of model.pt where
    there is one: each tensor's name, shape and values as float32), not their files: ``pretrain extract`` of a run's
    last step writes the very weights into files that also say which step and run they are, and BatchNorm's step
    counts as int64 where training's files had held them as float32 (loading either gives the same buffer).
    ``legacy``: the digest of indexes written before, over each tensor's dtype and bytes (their ``weights_sha256``)."""
    import hashlib

    from pretrain.steps import MODEL_FILE

    path = Path(run_dir)
    path = path / "backbone.pt" if path.is_dir() else path
    digest = hashlib.sha256()
    for file in (path, path.parent / MODEL_FILE):
        if file.is_file():
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
            for name in sorted(state):
                tensor = state[name].detach().contiguous().reshape(-1)
                if legacy:
                    digest.update(f"{file.name}:{name}:{tensor.dtype}:{tuple(state[name].shape)}".encode())
                else:
                    digest.update(f"{file.name}:{name}:{tuple(state[name].shape)}".encode())
                    tensor = tensor.float()
                digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def checkpoint_digest(run_dir: str | Path) -> str:
    """sha256 over the files a run's encoder is loaded from (backbone.pt, and model.pt where there is one): an index
    embedded with other weights is told apart from one of these."""
    import hashlib

    from pretrain.steps import MODEL_FILE

    path = Path(run_dir)
    path = path / "backbone.pt" if path.is_dir() else path
    digest = hashlib.sha256()
    for file in (path, path.parent / MODEL_FILE):
        if file.is_file():
            with file.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def save_gallery(gallery: Gallery, path: str | Path, *, checkpoint: str | Path, data_dir: str | Path) -> Path:
    """Write ``gallery`` as a Parquet embedding index: columns key, label, caption, path (the image's file, where the
    dataset's manifest has it), digest (the manifest's, of the image's bytes), embedding (fixed-size float32 list);
    schema metadata format, checkpoint (path, sha256 of its files and of its weights), data (the shard directory),
    corrupt, dim, classes (the dataset's class names, a JSON list). Written beside ``path`` and renamed into place: a
    crash leaves no partial index."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    emb = np.ascontiguousarray(gallery.embeddings, dtype=np.float32)
    table = pa.table({
        "key": pa.array(gallery.keys, pa.string()),
        "label": pa.array(gallery.labels, pa.int64()),
        "caption": pa.array(gallery.captions, pa.string()),
        "path": pa.array(gallery.paths or [None] * len(gallery.keys), pa.string()),
        "digest": pa.array(gallery.digests or [None] * len(gallery.keys), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
    }).replace_schema_metadata({
        "format": INDEX_FORMAT, "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_sha256": checkpoint_digest(checkpoint), "values_sha256": weights_digest(checkpoint),
        "data": data_dir if is_url(data_dir) else str(Path(data_dir).resolve()),
        "corrupt": str(gallery.corrupt), "dim": str(emb.shape[1]), "classes": json.dumps(gallery.classes or [])})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    pq.write_table(table, partial)
    os.replace(partial, path)
    return path


def load_gallery(path: str | Path) -> tuple[Gallery, dict[str, str]]:
    """An index written by ``save_gallery`` and its metadata; ValueError (one line) for anything else."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--index: {path} does not exist (write one with `pretrain embed`)")
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a file that is not Parquet
        raise ValueError(f"--index: {path} is not a Parquet file ({type(e).__name__})") from None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("format") != INDEX_FORMAT.decode():
        raise ValueError(f"--index: {path} is not an embedding index written by `pretrain embed`")
    dim = int(meta["dim"])
    emb = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    gallery = Gallery(table.column("key").to_pylist(), np.asarray(table.column("label").to_pylist(), dtype=np.int64),
                      table.column("caption").to_pylist(), emb.reshape(-1, dim).astype(np.float32, copy=False),
                      int(meta["corrupt"]),
                      table.column("path").to_pylist() if "path" in table.column_names else None,
                      json.loads(meta["classes"]) if "classes" in meta else None,
                      table.column("digest").to_pylist() if "digest" in table.column_names else None)
    return gallery, meta


def rank(gallery: Gallery, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` gallery rows nearest to ``query: (E,)`` by cosine -> [(row, similarity), ...], best first."""
    from pretrain.eval.search import search

    idx, sims = search(gallery.embeddings, query[None], min(k, len(gallery.keys)))
    return list(zip(idx[0].tolist(), sims[0].tolist()))
