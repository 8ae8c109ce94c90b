"""Attention maps: the probabilities the ViT's attention applies, written out (against its fused forward), the cls
token's row of them through the model (registers apart), and `pretrain attention` on a run directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from pretrain.cli import main
from pretrain.models import build_backbone
from pretrain.models.vit import Attention
from tests.util import write_run


@pytest.mark.parametrize("causal", [False, True])
def test_weights_are_what_the_fused_attention_applies(causal: bool) -> None:
    """softmax(q k^T / sqrt(d)) times the values, projected, is Attention.forward (scaled_dot_product_attention);
    each row sums to 1, and a causal row puts nothing on later tokens."""
    torch.manual_seed(0)
    attn = Attention(24, 3, causal=causal)
    x = torch.randn(2, 7, 24)
    w = attn.weights(x)
    assert w.shape == (2, 3, 7, 7) and w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 7))
    v = attn.qkv(x).reshape(2, 7, 3, 3, 8).permute(2, 0, 3, 1, 4)[2]
    torch.testing.assert_close(attn.proj((w @ v).transpose(1, 2).reshape(2, 7, 24)), attn(x), rtol=1e-5, atol=1e-6)
    assert (w.triu(1).abs().sum() == 0) == causal


def test_cls_attention_is_the_cls_row_of_the_chosen_block() -> None:
    """cls_attention(x, block) is row 0 of that block's attention over [cls, registers, patches] computed by hand; an
    out-of-range block is refused in one line."""
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", image_size=16, in_chans=3, patch_size=4, embed_dim=32, depth=3, num_heads=4,
                         num_registers=2).eval()
    with torch.no_grad():
        vit.register_tokens.normal_()
    x = torch.randn(2, 3, 16, 16)
    tokens = vit.prepare_tokens(x)
    for i, block in enumerate(vit.blocks):
        expected = block.attn.weights(block.norm1(tokens))[:, :, 0]
        torch.testing.assert_close(vit.cls_attention(x, i), expected)
        tokens = block(tokens)
    torch.testing.assert_close(vit.cls_attention(x), vit.cls_attention(x, 2))
    assert vit.cls_attention(x).shape == (2, 4, 1 + 2 + 16)
    with pytest.raises(ValueError, match="block 3 does not exist: the model has 3 blocks"):
        vit.cls_attention(x, 3)


def test_attention_command_writes_maps_and_shares(tmp_path, digits_shards, capsys) -> None:
    """`pretrain attention` on a ViT run with 2 register tokens: a row per requested image, in the order asked, whose
    shares (self, registers, patches) add up to 1, and a PNG of those rows; an --out that exists (it stays), a ConvNet
    run, an unknown key and a block the ViT lacks are refused in one line."""
    vit_run, convnet_run = tmp_path / "vit", tmp_path / "convnet"
    cache = Path(digits_shards[0]).parents[1]  # the session's digits shards, found where a run's cache_dir points
    write_run(vit_run, "dino_vit_digits.yaml", cache, "model.backbone_kwargs.num_registers=2")
    write_run(convnet_run, "simclr_digits.yaml", cache, "model.backbone_kwargs={width: 0.25}")
    out = tmp_path / "maps" / "attention.png"
    keys = ["digits_00042", "digits_00007", "digits_01000"]
    args = ["attention", "--checkpoint", str(vit_run), "--device", "cpu", "--out", str(out)]
    assert main([*args, *(a for k in keys for a in ("--image", k))]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "2 register tokens" in printed[0] and printed[-1] == f"Attention maps: {out}"
    # the recipe's ViT pools its patch tokens: the last block's cls token is read by no loss, and the user is told
    assert printed[-2] == ("Note: this ViT pools the mean of its patch tokens (global_pool: mean), so no loss reads "
                           "the cls token of its last block: the maps of that block are untrained; --block -2 shows "
                           "the last block whose cls token the patches read")
    rows = [line.split() for line in printed[2:-2]]
    assert [r[0] for r in rows] == keys
    for r in rows:
        self_, registers, patches = map(float, r[2:5])
        assert self_ + registers + patches == pytest.approx(1.0, abs=2e-3) and registers > 0
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1] > 200
    earlier = [*args[:-1], str(tmp_path / "earlier.png"), "--image", "digits_00042", "--block", "-2"]
    assert main(earlier) == 0  # a block whose cls token the patches read: no note
    assert "Note:" not in capsys.readouterr().out
    assert main([*args, "--image", "digits_00042"]) == 2  # the maps written stay
    args[-1] = str(tmp_path / "other.png")
    assert main([*args, "--image", "digits_99999"]) == 2
    assert main([*args, "--image", "digits_00042", "--block", "9"]) == 2
    assert main(["attention", "--checkpoint", str(convnet_run), "--image", "digits_00042", "--out",
                 str(tmp_path / "c.png")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --out: {out} already exists; attention overwrites nothing",
        "error: --image: no decodable sample with key 'digits_99999' in the data",
        "error: --block: the ViT has 4 blocks (0..3, or -4..-1 counting back from the last), got 9",
        "error: --checkpoint: attention maps need a ViT backbone; this run's is convnet"]


def test_attention_prints_class_names(tmp_path, digits_shards, capsys) -> None:
    """The class column holds each image's class name where the dataset has names (as `pretrain search` shows them),
    not its label number; '-' for an unlabelled image."""
    from data_pipeline.shards import read_manifest, write_shards
    from tests.data_pipeline.conftest import make_image_tree

    write_shards(f"folder:{make_image_tree(tmp_path / 'imgs', classes={'cat': 3, 'dog': 3})}", tmp_path / "named",
                 progress=False)
    write_shards(f"images:{tmp_path / 'imgs'}", tmp_path / "unlabelled", progress=False)
    write_run(tmp_path / "vit", "dino_vit_digits.yaml", Path(digits_shards[0]).parents[1])
    manifest = read_manifest(tmp_path / "named", columns=["key", "path"]).to_pylist()
    keys = [next(r["key"] for r in manifest if f"/{name}/" in r["path"]) for name in ("dog", "cat")]
    for data, expected in (("named", ["dog", "cat"]), ("unlabelled", ["-", "-"])):
        capsys.readouterr()
        assert main(["attention", "--checkpoint", str(tmp_path / "vit"), "--data", str(tmp_path / data), "--out",
                     str(tmp_path / f"{data}.png"), *(a for k in keys for a in ("--image", k))]) == 0
        printed = capsys.readouterr().out.splitlines()
        assert printed[1].split()[:2] == ["key", "class"]
        assert [line.split()[1] for line in printed[2:-1] if not line.startswith("Note:")] == expected
