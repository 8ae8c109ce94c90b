"""`pretrain export`: a run's encoder as a torch.export program that plain torch loads and runs, in another process
without ssl-pretrain importable, giving load_encoder's features for any batch size; refusals in one line."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from pretrain.cli import main
from pretrain.encoder import load_encoder
from pretrain.export import read_export_info
from tests.util import write_run

SMALL = "model.backbone_kwargs={width: 0.25}"

# run by a Python that cannot import ssl-pretrain: only torch's own loader can make a module of the file
LOAD = """
import importlib.util, sys, torch
assert importlib.util.find_spec("pretrain") is None, "pretrain is importable"
encoder = torch.export.load(sys.argv[1]).module()
out = {}
for name, x in torch.load(sys.argv[2]).items():
    out[name] = encoder(x)
torch.save(out, sys.argv[3])
assert not any(m.split(".")[0] in ("pretrain", "kernels", "data_pipeline") for m in sys.modules)
"""


def _load_elsewhere(program: Path, inputs: dict[str, torch.Tensor], tmp: Path) -> dict[str, torch.Tensor]:
    """The exported ``program`` run on ``inputs`` by a Python that cannot import ssl-pretrain."""
    torch.save(inputs, tmp / "inputs.pt")
    # the editable install puts the repository on sys.path through a .pth file: -S skips site (and so it), then the
    # interpreter gets torch's site-packages back through PYTHONPATH, without that .pth
    site = Path(torch.__file__).parents[1]
    proc = subprocess.run([sys.executable, "-S", "-c", LOAD, str(program), str(tmp / "inputs.pt"),
                           str(tmp / "outputs.pt")], cwd=tmp, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp / "outputs.pt")


@pytest.mark.parametrize("recipe, sets, cli, x", [
    # the digits ConvNet, grey uint8 at its own size, batches of 1 and 5
    ("simclr_digits.yaml", [SMALL], [], lambda g: torch.randint(0, 256, (5, 1, 16, 16), generator=g,
                                                                    dtype=torch.uint8)),
    # a ViT for RGB float photos of 48x40, turned grey and resized inside the program
    ("dino_vit_digits.yaml", ["model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2}"],
     ["--input-size", "48", "40", "--input-channels", "3", "--input-dtype", "float32"],
     lambda g: torch.rand(5, 3, 48, 40, generator=g)),
], ids=["convnet-uint8", "vit-float-rgb-resized"])
def test_exported_program_runs_without_ssl_pretrain(tmp_path, capsys, recipe, sets, cli, x):
    write_run(tmp_path / "run", recipe, tmp_path / "cache", *sets)
    out = tmp_path / "served" / "encoder.pt2"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out), *cli]) == 0
    printed = capsys.readouterr().out
    assert f": {out}" in printed and "matches the encoder to" in printed
    images = x(torch.Generator().manual_seed(0))
    inputs = {"batch": images, "one": images[:1]}
    got = _load_elsewhere(out, inputs, tmp_path)
    encoder = load_encoder(tmp_path / "run")
    with torch.no_grad():
        for name, batch in inputs.items():
            torch.testing.assert_close(got[name], encoder(batch), rtol=1e-4, atol=1e-5)
    info = read_export_info(out)
    c, h, w = images.shape[1:]
    assert info["input"] == {"shape": ["B", c, h, w], "dtype": "uint8" if images.dtype == torch.uint8 else "float32",
                             "range": "0..255" if images.dtype == torch.uint8 else "0..1"}
    assert info["features"] == got["batch"].shape[1] and info["method"] == recipe.split("_")[0]
    from pretrain.index import checkpoint_digest

    assert info["checkpoint_sha256"] == checkpoint_digest(tmp_path / "run")
    assert sorted(p.name for p in out.parent.iterdir()) == ["encoder.pt2"]  # no partial file left
    with zipfile.ZipFile(out) as archive:  # its folder named after the file (it had been the staging name), and no
        # example batch kept in it (25 MB of a 27 MB file at --input-size 2048)
        assert {name.split("/")[0] for name in archive.namelist()} == {"encoder"}
        assert all(i.file_size < 2048 for i in archive.infolist() if "sample_inputs" in i.filename)
    # serving code that calls the program without torch.no_grad() builds no autograd graph
    served = torch.export.load(out).module()(images)
    assert served.grad_fn is None and not served.requires_grad


def test_device_auto_is_the_gpu_where_there_is_one(tmp_path, capsys):
    """--device auto means what it means in every other command: a GPU where there is one (it had meant the CPU)."""
    write_run(tmp_path / "run", "simclr_digits.yaml", tmp_path / "cache", SMALL)
    out = tmp_path / "encoder.pt2"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out), "--device", "auto"]) == 0
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert read_export_info(out)["device"].split(":")[0] == expected
    assert f"on {read_export_info(out)['device']}" in capsys.readouterr().out


def test_refusals_are_one_line(tmp_path, capsys):
    """An existing --out (left as it was), a bad input layout or a missing run: exit 2, one line naming the option."""
    write_run(tmp_path / "run", "simclr_digits.yaml", tmp_path / "cache", SMALL)
    taken = tmp_path / "taken.pt2"
    taken.write_bytes(b"keep me")
    cases = [(["--out", str(taken)], f"error: --out: {taken} already exists; export overwrites nothing"),
             (["--out", str(tmp_path / "new.pt")], "error: --out: export writes a torch.export program; give it a name "
                                                   "ending in .pt2, got 'new.pt'"),
             (["--input-size", "20000", "16"], "error: --input-size: at most 8192 pixels a side, got [20000, 16]"),
             (["--input-channels", "2"], "error: --input-channels: must be 1 or 3, got 2"),
             (["--input-dtype", "float16"], "error: --input-dtype: must be one of uint8, float32, got 'float16'"),
             (["--input-size", "0"], "error: --input-size: must be >= 1, got [0, 0]"),
             (["--input-size", "1", "2", "3"], "error: --input-size: one side or height and width, got 3 numbers")]
    for extra, line in cases:
        argv = ["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "new.pt2"), *extra]
        assert main(argv) == 2
        assert capsys.readouterr().err.strip().splitlines() == [line]
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "new.pt2")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [  # naming the option, as eval's and embed's do
        f"error: --checkpoint: {tmp_path / 'nope'} does not exist (expected a finished run directory or its "
        "backbone.pt)"]
    assert taken.read_bytes() == b"keep me" and not (tmp_path / "new.pt2").exists()
