"""pretrain.methods.clip, pretrain.models.text and pretrain.eval.zeroshot: the tokenizer, the causal text tower, the
loss against open_clip's formula (one process and over 2 real gloo ranks), the logit-scale cap, zero-shot scoring."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain import dist as pdist
from pretrain.config import load_config
from pretrain.eval.zeroshot import class_embeddings, zeroshot_predict, zeroshot_top1
from pretrain.methods.clip import capped_logit_scale
from pretrain.models.text import BOS, EOS, PAD, ByteTokenizer, TextTransformer
from pretrain.trainer import build_method
from tests.util import config_error, spawn_ranks

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "clip_digits.yaml"
# A ViT image tower with a linear projection: no BatchNorm, so one process on the whole batch and two ranks on its
# halves compute the same function.
SMALL = ["model.backbone=vit_tiny", "model.patch_size=4",
         "model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}", "model.proj_out_dim=16",
         "method.text_width=32", "method.text_depth=1", "method.text_heads=2", "method.context_length=24"]
CAPTIONS = ["a handwritten seven", "the digit 3", "zwei", "8", "a small blurry 1 written by hand", "nine", "é 5",
            "the number four, written by hand"]


def _method(*overrides: str):
    return build_method(load_config(RECIPE, [*SMALL, *overrides]), distributed=False)


def _batch(n: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(n, 1, 16, 16, generator=g)], "text": CAPTIONS[:n]}


def test_byte_tokenizer_frames_pads_and_cuts():
    tok = ByteTokenizer(8)
    ids = tok(["ab", "é", "abcdefghij"])
    assert ids.dtype == torch.long and ids.shape == (3, 8)
    assert ids[0].tolist() == [BOS, ord("a") + 1, ord("b") + 1, EOS, PAD, PAD, PAD, PAD]
    assert ids[1, :4].tolist() == [BOS, 0xC3 + 1, 0xA9 + 1, EOS]  # UTF-8 bytes of é
    assert ids[2].tolist() == [BOS, *(ord(c) + 1 for c in "abcdef"), EOS]  # cut, the end token kept
    with pytest.raises(ValueError, match="list of strings"):
        tok("ab")
    with pytest.raises(ValueError, match="context_length"):
        ByteTokenizer(2)


def test_text_tower_reads_up_to_the_end_token_only():
    """Causal: the embedding is the same whatever follows the end token (padding or junk) and whatever the context
    length; it changes with any byte before it."""
    torch.manual_seed(0)
    tower = TextTransformer(context_length=16, width=32, depth=2, num_heads=4, out_dim=8).eval()
    ids = ByteTokenizer(16)(["seven", "the digit 3"])
    with torch.no_grad():
        out = tower(ids)
        junk = ids.clone()
        junk[0, 7:] = torch.randint(1, 257, (9,))  # "seven" ends at position 6
        torch.testing.assert_close(tower(junk)[0], out[0])
        torch.testing.assert_close(tower(ByteTokenizer(10)(["seven"]))[0], out[0])
        other = ByteTokenizer(16)(["sever"])
        assert not torch.allclose(tower(other)[0], out[0])
    with pytest.raises(ValueError, match="end token"):
        tower(torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        tower(torch.ones(1, 17, dtype=torch.long))


def _reference_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """open_clip's ClipLoss written out: logits = scale * cos, cross-entropy both ways on the diagonal."""
    logits = scale * F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T
    labels = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


@pytest.mark.parametrize("impl", ["ref", "chunked"])
def test_loss_is_open_clips_and_trains_both_towers(impl):
    method = _method(f"method.loss_impl={impl}")
    batch = _batch()
    out = method(batch)
    with torch.no_grad():
        img = method.image_proj(method.backbone(batch["views"][0]))
        txt = method.text(method.tokenizer(batch["text"]))
    expected = _reference_loss(img, txt, method.logit_scale.exp())
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-4)
    out["loss"].backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert method.logit_scale.grad.abs().item() > 0


def test_logit_scale_is_capped_in_the_forward():
    """Above logit_scale_max the loss uses the cap; the scale gets no gradient that would raise it further (it cannot
    run away), and does get the one that lowers it: a loss that wants a smaller scale brings it back under the cap, as
    the official clamp after each step lets it (a plain clamp would hold it above the cap, gradient 0, for good)."""
    method = _method("method.logit_scale_max=3.0", "method.logit_scale_init=3.0")
    with torch.no_grad():
        method.logit_scale.fill_(5.0)
    out = method(_batch())
    assert out["logit_scale"].item() == pytest.approx(math.exp(3.0), rel=1e-6)
    (-out["loss"]).backward()  # a loss that falls as the logits sharpen: the scale would rise
    assert method.logit_scale.grad.item() == 0.0
    method.zero_grad()
    method(_batch())["loss"].backward()  # CLIP's loss on unrelated pairs: falls as the logits soften
    assert method.logit_scale.grad.item() > 0.0
    # the official dynamics: a toy loss whose best scale (50) is under the cap (100), from above the cap
    cap = math.log(100)
    runs = {}
    for name in ("official", "ours"):
        p = torch.nn.Parameter(torch.tensor([5.0]))
        opt = torch.optim.AdamW([p], lr=0.05, weight_decay=0.0)
        for _ in range(200):
            if name == "official":
                with torch.no_grad():
                    p.clamp_(max=cap)
            scale = p if name == "official" else capped_logit_scale(p, cap)
            opt.zero_grad()
            ((scale.exp() - 50.0) ** 2).sum().backward()
            opt.step()
        runs[name] = min(p.item(), cap)
    assert runs["official"] == pytest.approx(math.log(50), abs=1e-3)
    assert runs["ours"] == pytest.approx(math.log(50), abs=1e-3)


def test_captions_must_match_images():
    batch = _batch()
    batch["text"] = batch["text"][:-1]
    with pytest.raises(ValueError, match="8 images but 7 captions"):
        _method()(batch)


def test_config_errors():
    assert "data.num_views: clip pairs each caption with one view per image" in config_error(RECIPE,
                                                                                             ["data.num_views=2"])
    assert "method.text_width: 90 is not divisible" in config_error(RECIPE, ["method.text_width=90"])
    assert "method.logit_scale_init" in config_error(RECIPE, ["method.logit_scale_init=5.0"])
    assert "method.context_length: must be >= 3" in config_error(RECIPE, ["method.context_length=2"])


def _worker(r: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        cfg = load_config(RECIPE, [*SMALL, "method.loss_impl=chunked"])
        method = build_method(cfg, distributed=True)  # gather = pdist.gather_with_grad, rank from the group
        batch = _batch()
        half = {"views": [batch["views"][0][4 * r : 4 * r + 4]], "text": batch["text"][4 * r : 4 * r + 4]}
        loss = method(half)["loss"]
        loss.backward()
        grads = {k: p.grad.clone() for k, p in method.named_parameters()}
        for g in grads.values():  # what DeepSpeed does with the ranks' gradients
            dist.all_reduce(g)
            g /= 2
        torch.save({"loss": pdist.all_reduce_mean(loss.detach()), "grads": grads}, Path(out_dir) / f"rank{r}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_whole_batch_loss_and_gradients(tmp_path):
    """On 2 gloo ranks, each with half of the pairs and the other half gathered as negatives, the mean loss and the
    averaged gradients are those of one process on the whole batch: every caption is contrasted with every image."""
    spawn_ranks(_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    method = _method("method.loss_impl=chunked")
    loss = method(_batch())["loss"]
    loss.backward()
    for res in ranks:
        torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        for name, p in method.named_parameters():
            torch.testing.assert_close(res["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


class _Toy(torch.nn.Module):
    """An image-text model whose image i embeds as a one-hot of its class and a prompt as a one-hot of its digit."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.eye(3))

    def encode_image(self, x):
        return x.flatten(1) @ self.w

    def encode_text(self, texts):
        return torch.stack([self.w[int(t[-1])] for t in texts])


def test_zeroshot_scores_prompt_ensembles():
    toy = _Toy()
    images = torch.eye(3)[[0, 1, 2, 2, 1]].view(5, 3, 1, 1)
    labels = np.array([0, 1, 2, 2, 0])
    assert zeroshot_top1(toy, images, labels, ["0", "1", "2"], ["a {}", "the {}"]) == pytest.approx(4 / 5)
    # the class embedding is the renormalised mean of the prompts' unit embeddings
    emb = class_embeddings(lambda texts: torch.tensor([[3.0, 0.0], [0.0, 1.0]]), ["x"], ["a {}", "b {}"])
    torch.testing.assert_close(emb, torch.tensor([[1.0, 1.0]]) / math.sqrt(2))
    assert zeroshot_predict(torch.tensor([[0.1, 1.0], [1.0, -0.5]]), torch.eye(2)).tolist() == [1, 0]
    with pytest.raises(ValueError, match="has no"):
        class_embeddings(toy.encode_text, ["0"], ["no slot"])
    with pytest.raises(ValueError, match="index the 2 class names"):
        zeroshot_top1(toy, images, labels, ["0", "1"], ["a {}"])
