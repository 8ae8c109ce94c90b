"""Zero-shot classification with an image-text model (CLIP): classes become text prompts, images go to the nearest.

A class's embedding is the mean of its prompts' unit embeddings, normalised again (CLIP's prompt ensembling); an image
is assigned the class whose embedding has the highest cosine with the image's. No labelled example is seen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DIGIT_PROMPTS = ("a photo of the number {}.", "a drawing of a {}.", "an image showing a {}.")
"""Prompts for the digits classes ("0".."9"); worded unlike the captions digits are trained with
(data_pipeline.sources.DIGIT_CAPTIONS), so the score measures how the text tower generalises, not recall."""


@torch.no_grad()
def class_embeddings(encode_text: Callable[[list[str]], Tensor], classnames: Sequence[str],
                     templates: Sequence[str]) -> Tensor:
    """(C, E) unit class embeddings: each class's ``template.format(name)`` prompts encoded, unit-normed, averaged."""
    if not classnames or not templates:
        raise ValueError("zero-shot needs at least one class name and one prompt template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"zero-shot prompt template {bad[0]!r} has no '{{}}' for the class name")
    rows = []
    for name in classnames:
        emb = F.normalize(encode_text([t.format(name) for t in templates]).float(), dim=-1)
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(rows)


def cut_prompt_notes(classnames: Sequence[str], templates: Sequence[str], max_bytes: int) -> list[str]:
    """What a text tower that reads the first ``max_bytes`` UTF-8 bytes of a prompt (pretrain.models.text's
    ByteTokenizer: method.context_length - 2) loses of the classes' prompts: a line naming classes whose prompts all
    read the same once cut (zero-shot cannot tell them apart: long names that differ late), else one saying how many
    classes' prompts are cut; [] where none is."""
    def read(name: str) -> tuple[bytes, ...]:
        return tuple(t.format(name).encode()[:max_bytes] for t in templates)

    cut = [name for name in classnames if any(len(t.format(name).encode()) > max_bytes for t in templates)]
    if not cut:
        return []
    seen: dict[tuple[bytes, ...], str] = {}
    for name in classnames:
        if (first := seen.setdefault(read(name), name)) != name:
            return [f"zero-shot: classes {first!r} and {name!r} read the same to the text tower, which reads the first "
                    f"{max_bytes} bytes of a prompt (method.context_length {max_bytes + 2}): it cannot tell them apart"]
    return [f"zero-shot: the prompts of {len(cut)} of {len(classnames)} classes are cut at {max_bytes} bytes "
            f"(method.context_length {max_bytes + 2}), e.g. {templates[0].format(cut[0])!r}"]


def zeroshot_predict(image_emb: Tensor, class_emb: Tensor) -> Tensor:
    """image_emb (N, E), class_emb (C, E) -> (N,) index of the class of highest cosine."""
    if image_emb.ndim != 2 or class_emb.ndim != 2 or image_emb.shape[1] != class_emb.shape[1]:
        raise ValueError(f"image embeddings {tuple(image_emb.shape)} and class embeddings {tuple(class_emb.shape)} "
                         "must be (N, E) and (C, E)")
    return (F.normalize(image_emb.float(), dim=-1) @ class_emb.float().T).argmax(dim=1)


@torch.no_grad()
def zeroshot_top1(model, images: Tensor, labels, classnames: Sequence[str], templates: Sequence[str] = DIGIT_PROMPTS,
                  *, batch_size: int = 512) -> float:
    """Top-1 accuracy of zero-shot classification of ``images: (N, C, H, W)`` with ``labels: (N,)`` (indices into
    ``classnames``) by ``model``, which has ``encode_image`` and ``encode_text`` (pretrain.methods.CLIP). Runs in eval
    mode and restores the model's mode."""
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels {labels.shape} must have one entry per image ({images.shape[0]})")
    if labels.size and not 0 <= labels.min() <= labels.max() < len(classnames):
        raise ValueError(f"labels must index the {len(classnames)} class names")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        classes = class_embeddings(model.encode_text, classnames, templates)
        preds = torch.cat([zeroshot_predict(model.encode_image(images[i : i + batch_size].to(device)), classes).cpu()
                           for i in range(0, images.shape[0], batch_size)])
    finally:
        model.train(was_training)
    return float((preds.numpy() == labels).mean())
