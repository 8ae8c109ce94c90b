"""``pretrain attention``: where a ViT run's cls token looks, DINO's self-attention maps, as numbers and a PNG.

For each image (whole, resized and normalised as evaluation sees it): the attention of the cls token over the patches
in one block (the last by default), per head, shaped to the patch grid; and how the cls token shares its attention
between itself, the register tokens (``num_registers``) and the patches. A ViT trained without registers may park much
of that attention on a few uninformative patches ("Vision Transformers Need Registers"), which show as bright isolated
spots in the maps; with registers, that attention goes to them and stays out of the maps.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from pretrain.index import Run


@dataclass
class AttentionMaps:
    keys: list[str]
    labels: list[int]
    """each image's class index (-1: unlabelled)"""
    classes: list[str]
    """each image's class: its name where the dataset has names, else its number; "-" for no label"""
    images: Tensor
    """(B, C, S, S) as the encoder saw them, in [0, 1] (the normalisation undone)"""
    maps: Tensor
    """(B, heads, gh, gw): the cls token's attention on each patch, per head"""
    shares: Tensor
    """(B, 3): the cls token's attention on itself, on the registers and on the patches, averaged over heads"""
    block: int


def attention_maps(run: Run, shards: list[str], keys: list[str], block: int = -1) -> AttentionMaps:
    """The cls-token attention of ``run``'s ViT in block ``block`` for the samples ``keys`` of ``shards``, in that
    order. ValueError (one line) for a backbone that is not a ViT, a block it does not have, or a key with no
    decodable sample."""
    from data_pipeline.shards import class_indices, dataset_dir, read_manifest
    from pretrain.eval.dataset import ShardImages
    from pretrain.models.vit import VisionTransformer

    vit = run.backbone
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"--checkpoint: attention maps need a ViT backbone; this run's is {run.cfg.model.backbone}")
    if not -len(vit.blocks) <= block < len(vit.blocks):
        raise ValueError(f"--block: the ViT has {len(vit.blocks)} blocks (0..{len(vit.blocks) - 1}, or "
                         f"-{len(vit.blocks)}..-1 counting back from the last), got {block}")
    found: dict[str, tuple[dict, Tensor]] = {}
    for samples, x in ShardImages(run.cfg).batches(shards, keep=set(keys)):
        found.update((s["key"], (s, img)) for s, img in zip(samples, x))
    missing = [k for k in keys if k not in found]
    if missing:
        raise ValueError(f"--image: no decodable sample with key {missing[0]!r} in the data")
    x = torch.stack([found[k][1] for k in keys])
    meta = read_manifest(dataset_dir(shards[0]), columns=["key"]).schema.metadata or {}
    labels = class_indices([found[k][0]["label"] for k in keys], meta)
    names = json.loads(meta.get(b"classes", b"[]"))
    with torch.no_grad():
        row = vit.eval().cls_attention(x.to(run.device), block).float().cpu()  # (B, heads, P+L)
    p = vit.num_prefix_tokens
    gh, gw = x.shape[-2] // vit.patch_size, x.shape[-1] // vit.patch_size
    mean_heads = row.mean(dim=1)
    shares = torch.stack([mean_heads[:, 0], mean_heads[:, 1:p].sum(-1), mean_heads[:, p:].sum(-1)], dim=1)
    d = run.cfg.data
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in d.aug.channel_stats(d.channels))
    return AttentionMaps(keys=list(keys), labels=[int(c) for c in labels],
                         classes=["-" if c < 0 else names[c] if c < len(names) else str(c) for c in labels],
                         images=(x * std + mean).clamp(0, 1), maps=row[:, :, p:].reshape(len(keys), -1, gh, gw),
                         shares=shares, block=block % len(vit.blocks))


def plot_attention(result: AttentionMaps, path: str | Path, *, note: str | None = None) -> Path:
    """A PNG with a row per image: the image (titled by its key), the heads' mean map over it, then each head's map
    (each map scaled to its own maximum, as DINO shows them); ``note``: a line under the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n, heads = result.maps.shape[:2]
    cols = 2 + heads
    fig = Figure(figsize=(1.6 * cols, 1.7 * n + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    size = result.images.shape[-1]
    for i in range(n):
        img = result.images[i].permute(1, 2, 0).numpy()
        grey = img.shape[-1] == 1
        panels = [(result.keys[i], None), ("mean of heads", result.maps[i].mean(0))] + [
            (f"head {h}", result.maps[i, h]) for h in range(heads)]
        for j, (title, m) in enumerate(panels):
            ax = fig.add_subplot(n, cols, i * cols + j + 1)
            if m is None or j == 1:
                ax.imshow(img[..., 0] if grey else img, cmap="gray" if grey else None, interpolation="nearest",
                          extent=(0, size, size, 0))
            if m is not None:
                m = (m / m.max().clamp_min(1e-12)).numpy()
                ax.imshow(m, cmap="inferno", interpolation="nearest", extent=(0, size, size, 0),
                          alpha=0.6 if j == 1 else 1.0)
            ax.set_title(title, fontsize=6)  # the image's key over it: one line (two ran into the row above)
            ax.axis("off")
    title = f"cls-token attention, block {result.block}"
    fig.suptitle(title if note is None else f"{title}\n{textwrap.fill(note, 25 * cols)}", fontsize=8 if note is None
                 else 6)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
