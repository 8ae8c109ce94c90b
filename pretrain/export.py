"""A run's encoder as one self-contained file for serving: ``pretrain export`` writes a ``torch.export`` program (.pt2).

The program is ``pretrain.load_encoder``'s encoder, preprocessing included, traced for one input layout: ``(B, C, H,
W)`` images of one dtype (uint8 0..255 or float32 in [0, 1]) with C, H and W fixed and any batch size B. It loads with
plain torch, without ssl-pretrain or the run directory:

    import torch
    encoder = torch.export.load("encoder.pt2").module()
    features = encoder(images)   # (B, F)

It runs on the device it was exported on (``--device``), and its outputs carry no autograd graph (the weights do not
require gradients). A float32 program expects pixels in [0, 1]: ``load_encoder`` refuses other ranges, but a traced
program cannot check what depends on the data, so 0..255 floats or normalised images give features of nothing.

What it is rides in the file (``EXTRA_FILE``, JSON: the run, its checkpoint's sha256, method, backbone, the input
layout, the feature width), read back by ``read_export_info``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

EXTRA_FILE = "ssl_pretrain.json"
"""The name of the metadata entry inside an exported file."""
DTYPES = {"uint8": torch.uint8, "float32": torch.float32}
MAX_INPUT_SIDE = 8192
"""The largest --input-size side: the check before writing runs a batch of 3 such images (and their float copies)."""


def export_encoder(run: str | Path, out: str | Path, *, input_size: tuple[int, int] | None = None,
                   input_channels: int | None = None, input_dtype: str = "uint8",
                   device: str | torch.device = "cpu") -> dict:
    """Export the encoder of the finished run ``run`` to ``out`` (a new file) for ``(B, input_channels, *input_size)``
    images of ``input_dtype`` (default: the run's channels and image size, uint8) on ``device`` ("auto": the GPU where
    there is one). Before the file is written the
    program is run against the eager encoder on a batch of random images; returns the metadata, with ``max_abs_diff``
    of that check. ValueError (one line) for bad input, before anything is loaded."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"--out: {out} exists; export writes a new file and overwrites nothing")
    if input_dtype not in DTYPES:
        raise ValueError(f"--input-dtype: must be one of {', '.join(DTYPES)}, got {input_dtype!r}")
    if input_channels not in (None, 1, 3):
        raise ValueError(f"--input-channels: must be 1 or 3, got {input_channels}")
    if input_size is not None and min(input_size) < 1:
        raise ValueError(f"--input-size: must be >= 1, got {list(input_size)}")
    if input_size is not None and max(input_size) > MAX_INPUT_SIDE:
        raise ValueError(f"--input-size: at most {MAX_INPUT_SIDE} pixels a side, got {list(input_size)}")
    from pretrain.encoder import load_encoder
    from pretrain.index import checkpoint_digest

    if device == "auto":  # as everywhere: the GPU where there is one
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # the weights as constants of inference: outputs of the program carry no autograd graph (serving code that calls it
    # without torch.no_grad() had built one per call, holding every activation)
    try:
        encoder = load_encoder(run, device=device).requires_grad_(False)
    except ValueError as e:  # what is wrong with the run, said of --checkpoint as eval and embed say it
        raise (e if str(e).startswith("device") else ValueError(f"--checkpoint: {e}")) from None
    height, width = input_size or (encoder.image_size, encoder.image_size)
    channels = input_channels or encoder.channels
    dtype = DTYPES[input_dtype]

    def images(batch: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 256, (batch, channels, height, width), generator=g, dtype=torch.uint8)
        return (x if dtype == torch.uint8 else x.float() / 255).to(device)

    with torch.no_grad():
        # an example batch of 2: a batch of 1 would be specialised into the program
        program = torch.export.export(encoder, (images(2, 0),),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        check = images(3, 1)
        expected, got = encoder(check), program.module()(check)
    diff = (got - expected).abs().max().item()
    if not diff <= 1e-4 * max(1.0, expected.abs().max().item()):
        raise RuntimeError(f"the exported program's features differ from the encoder's by {diff}; nothing written")
    cfg = encoder.config
    info = {
        "run": str(Path(run).resolve()), "checkpoint_sha256": checkpoint_digest(run), "method": cfg.method.name,
        "backbone": cfg.model.backbone, "input": {"shape": ["B", channels, height, width], "dtype": input_dtype,
                                                  "range": "0..255" if dtype == torch.uint8 else "0..1"},
        "features": int(expected.shape[1]), "device": str(torch.device(device)), "torch": torch.__version__,
        "max_abs_diff": diff,
    }
    # the example batch is not kept in the file: at --input-size 2048 it had been 25 MB of the 27 (400 MB at 8192 x 3)
    program.example_inputs = None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")  # a file appears at `out` only whole; inside it,
    staging.mkdir()  # the archive's folder is named after the file, as torch.export.save names it from the file's stem
    try:
        torch.export.save(program, staging / out.name, extra_files={EXTRA_FILE: json.dumps(info)})
        (staging / out.name).rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info


def read_export_info(path: str | Path) -> dict:
    """The metadata ``export_encoder`` stored in an exported file."""
    extra = {EXTRA_FILE: ""}
    torch.export.load(path, extra_files=extra)
    return json.loads(extra[EXTRA_FILE])
