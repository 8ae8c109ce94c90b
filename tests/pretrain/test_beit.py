"""BEiT and its visual tokenizer: the quantizer's lookup, EMA and restarts (also across 2 real gloo ranks), the VQ-VAE
and BEiT losses, the tokenizer checks before a run starts, and short trainings on real digits views."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import pretrain.dist as pdist
from data_pipeline.loader import make_train_stream
from data_pipeline.masking import block_masks
from pretrain.config import load_config, to_dict
from pretrain.methods import METHODS
from pretrain.methods.vqvae import load_tokenizer
from pretrain.models.quantizer import VectorQuantizer
from pretrain.trainer import build_method
from tests.util import config_error, spawn_ranks

ROOT = Path(__file__).resolve().parents[2]
VQVAE = ROOT / "configs" / "vqvae_digits.yaml"
BEIT = ROOT / "configs" / "beit_digits.yaml"
SMALL = ["model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2, global_pool: mean}", "method.vocab_size=64",
         "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]


def _save_tokenizer(path: Path, sets: list[str] = ()) -> Path:
    """A vqvae run directory holding model.pt as a finished run writes it (here untrained: the checks need no more)."""
    cfg = load_config(VQVAE, [*SMALL, *sets])
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"config": to_dict(cfg), "state_dict": build_method(cfg, distributed=False).state_dict()},
               path / "model.pt")
    return path


# --- the quantizer --------------------------------------------------------------------------------------------------


def test_tokens_are_the_nearest_entries_by_cosine_and_the_gradient_goes_straight_through():
    torch.manual_seed(0)
    q = VectorQuantizer(12, 10, 4, 6, commitment=0.5)
    x = torch.randn(3, 5, 12, requires_grad=True)
    out = q(x)
    z = F.normalize(q.proj_in(x), dim=-1)
    brute = torch.stack([torch.stack([F.cosine_similarity(z[i, j][None], q.codebook).argmax()
                                      for j in range(5)]) for i in range(3)])
    assert torch.equal(out["tokens"], brute) and torch.equal(q.tokenize(x), brute)
    torch.testing.assert_close(out["loss"], 0.5 * (z - q.codebook[brute]).pow(2).sum(-1).mean())
    torch.testing.assert_close(out["quantized"], q.proj_out(q.codebook[brute]))
    freq = torch.bincount(brute.reshape(-1), minlength=10).float() / 15
    assert out["usage"].item() == pytest.approx((freq > 0).float().mean().item())
    assert out["perplexity"].item() == pytest.approx(np.exp(-sum(p * np.log(p) for p in freq.tolist() if p > 0)))
    out["quantized"].sum().backward()  # straight through: the decoder's gradient reaches the encoder
    assert x.grad is not None and x.grad.abs().sum() > 0 and q.proj_in.weight.grad.abs().sum() > 0
    assert not any(p is q.codebook for p in q.parameters())  # kept by EMA, not by the optimizer


def test_lookup_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 256, 8)
    x = torch.randn(512, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = q.tokenize(x)
    assert torch.equal(tokens, q.tokenize(x))


def test_first_update_puts_every_entry_on_data_and_later_ones_follow_the_ema():
    torch.manual_seed(0)
    q = VectorQuantizer(6, 8, 3, decay=0.9)
    x = torch.randn(64, 6)
    q(x)
    z = F.normalize(q.proj_in(x), dim=-1).detach()
    assert q.update(step=1) == 8  # all unused at first: every entry restarts onto one of the step's outputs
    assert all(torch.isclose(z @ code, torch.tensor(1.0), atol=1e-5).any() for code in q.codebook)
    sums, counts = q.ema_sum.clone(), q.ema_count.clone()
    out = q(x)
    tokens = out["tokens"]
    q.update(step=2)
    batch_sum = torch.zeros(8, 3).index_add_(0, tokens, z)
    batch_count = torch.bincount(tokens, minlength=8).float()
    expected_count = 0.9 * counts + 0.1 * batch_count
    alive = expected_count >= q.restart_below(64)
    torch.testing.assert_close(q.ema_count[alive], expected_count[alive])
    torch.testing.assert_close(q.codebook[alive], F.normalize(0.9 * sums + 0.1 * batch_sum, dim=-1)[alive])
    q.eval()
    q(x)  # an evaluation forward leaves nothing to fold in
    assert q.update(step=3) == 0


def _quantizer_rank(r: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)  # the same init on both ranks, as the trainer builds it
        q = VectorQuantizer(6, 16, 3, decay=0.9)
        torch.manual_seed(1 + r)  # different data on each rank
        for step in range(1, 6):
            q(torch.randn(40, 6) + 3 * r)
            q.update(step, reduce=pdist.all_reduce_mean, gather=pdist.gather_with_grad)
        torch.save(q.state_dict(), Path(out_dir) / f"rank{r}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_keep_one_codebook(tmp_path):
    """On 2 gloo ranks fed different data, the EMA and the restarts leave both with the same codebook, drawn from both
    ranks' outputs (rank 1's data is shifted: some entries are near each rank's)."""
    spawn_ranks(_quantizer_rank, 2, str(tmp_path))
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for key in ("codebook", "ema_sum", "ema_count"):
        assert torch.equal(a[key], b[key]), key
    torch.manual_seed(0)
    q = VectorQuantizer(6, 16, 3)
    q.load_state_dict(a)
    with torch.no_grad():
        used = [set(q.tokenize(torch.randn(200, 6) + 3 * r).tolist()) for r in range(2)]
    assert len(used[0]) > 1 and len(used[1]) > 1 and used[0] != used[1]


# --- the tokenizer (vqvae) --------------------------------------------------------------------------------------------


def _stream(shards, cfg, batch_size=64):
    d = cfg.data
    return make_train_stream(shards, batch_size=batch_size, aug=d.aug, image_size=d.image_size, channels=d.channels,
                             rank=0, world_size=1, num_workers=1, num_views=1)


def _train(method, batches, steps: int, lr: float) -> list[dict]:
    opt = torch.optim.AdamW(method.parameters(), lr=lr, betas=(0.9, 0.95))
    history = []
    for step in range(1, steps + 1):
        out = method(next(batches))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.on_step_end(step, steps)
        history.append({k: v.item() for k, v in out.items()})
    return history


def test_tokenizer_learns_to_reconstruct_with_a_live_codebook(digits_shards, tmp_path):
    """60 steps on real digits views: the reconstruction error falls by more than half and a batch uses most of the
    512 entries (without the EMA and restarts 3 of them were in use after 25 steps); load_tokenizer gives back the same
    tokens from a saved run, frozen, and draws nothing from the RNG."""
    cfg = load_config(VQVAE, ["model.backbone_kwargs={embed_dim: 64, depth: 2, num_heads: 4, global_pool: mean}"])
    method = build_method(cfg, distributed=False)
    with _stream(digits_shards, cfg) as stream:
        batches = iter(stream)
        history = _train(method, batches, 60, cfg.optim.lr)
        batch = next(batches)
    assert np.mean([h["rec_loss"] for h in history[-5:]]) < 0.5 * history[0]["rec_loss"], history
    assert history[-1]["code_usage"] > 0.5 and history[-1]["perplexity"] > 150, history[-1]
    torch.save({"config": to_dict(cfg), "state_dict": method.state_dict()}, tmp_path / "model.pt")
    state = torch.get_rng_state()
    _, tokenizer = load_tokenizer(tmp_path)
    assert torch.equal(torch.get_rng_state(), state)
    method.eval()
    tokens = tokenizer.tokenize(batch["views"][0])
    assert tokens.shape == (64, 16) and torch.equal(tokens, method.tokenize(batch["views"][0]))
    assert not any(p.requires_grad for p in tokenizer.parameters()) and not tokenizer.training


def test_vqvae_config_errors():
    assert "model.backbone: vqvae tokenizes the patches of a ViT" in config_error(VQVAE, ["model.backbone=convnet"])
    assert "data.num_views: vqvae reconstructs one view per image" in config_error(VQVAE, ["data.num_views=2"])
    assert "method.codebook_decay: must be in [0, 1)" in config_error(VQVAE, ["method.codebook_decay=1.0"])
    assert "method.vocab_size: must be >= 2" in config_error(VQVAE, ["method.vocab_size=1"])


# --- BEiT -----------------------------------------------------------------------------------------------------------


def test_beit_config_errors():
    assert "method.tokenizer: beit predicts the visual tokens of a trained tokenizer" in config_error(BEIT, [])
    tok = ["method.tokenizer=/nowhere"]
    assert "method.mask_prob: beit masks every image" in config_error(BEIT, [*tok, "method.mask_prob=0.5"])
    assert "model.backbone: beit masks patch tokens of a ViT" in config_error(BEIT, [*tok, "model.backbone=convnet"])
    assert "data.num_views: beit masks one view per image" in config_error(BEIT, [*tok, "data.num_views=2"])
    assert "method.loss_impl: beit takes one of" in config_error(BEIT, [*tok, "method.loss_impl=chunked"])


def test_beit_checks_its_tokenizer_before_a_run_starts(tmp_path):
    """A missing tokenizer, a run of another method, or one for other images is one line naming the key; a finished
    run's config does not need the tokenizer to load (evaluation works without it)."""
    def check(sets):
        cfg = load_config(BEIT, [*SMALL, *sets])
        with pytest.raises(ValueError) as e:
            METHODS["beit"].check_inputs(cfg)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "does not exist (expected a finished vqvae run directory" in check([f"method.tokenizer={tmp_path}/none"])
    other = tmp_path / "mae"
    other.mkdir()
    cfg = load_config(ROOT / "configs" / "mae_digits.yaml")
    torch.save({"config": to_dict(cfg), "state_dict": {}}, other / "model.pt")
    assert "is a mae run, not a vqvae tokenizer" in check([f"method.tokenizer={other}"])
    small = _save_tokenizer(tmp_path / "tok8", ["model.patch_size=8"])
    assert "model.patch_size: 4 differs from the tokenizer's 8" in check([f"method.tokenizer={small}"])
    tok = _save_tokenizer(tmp_path / "tok")
    assert "method.vocab_size: 512 differs from the tokenizer's 64" in check([f"method.tokenizer={tok}",
                                                                            "method.vocab_size=512"])
    assert "data.aug.mean" in check([f"method.tokenizer={tok}", "data.aug.mean=[0.2]"])
    METHODS["beit"].check_inputs(load_config(BEIT, [*SMALL, f"method.tokenizer={tok}"]))  # a match passes


@pytest.mark.parametrize("registers", [0, 2])
def test_beit_loss_is_cross_entropy_at_the_masked_patches_only(tmp_path, registers):
    """The loss is the cross-entropy of the head's logits against the tokenizer's tokens at the masked patches only (a
    ViT with register tokens too, and a tokenizer with them: both keep their registers out of the patches)."""
    tok = _save_tokenizer(tmp_path / "tok", [f"model.backbone_kwargs.num_registers={registers}"])
    cfg = load_config(BEIT, [*SMALL, f"method.tokenizer={tok}", f"model.backbone_kwargs.num_registers={registers}"])
    method = build_method(cfg, distributed=False)
    assert not any("tokenizer" in k for k in method.state_dict())  # not part of the module: no state, no partition
    x = torch.randn(6, 1, 16, 16)
    torch.manual_seed(3)
    out = method({"views": [x]})
    torch.manual_seed(3)
    mask = block_masks(6, (4, 4), (0.4, 0.4), 1.0)
    assert mask.sum(1).min() >= 4  # every image masked
    targets = load_tokenizer(tok)[1].tokenize(x)
    logits = method.head(method.backbone.forward_features(x, mask)[:, 1 + registers:][mask])
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, targets[mask]))
    assert out["accuracy"].item() == pytest.approx((logits.argmax(-1) == targets[mask]).float().mean().item())
    with pytest.raises(ValueError, match="beit: views must be 16x16"):
        method({"views": [torch.randn(2, 1, 8, 8)]})


def test_beit_learns_the_tokens_of_a_trained_tokenizer(digits_shards, tmp_path):
    """A tokenizer trained 100 steps, then BEiT 150 steps on real digits views: on fresh batches its cross-entropy at
    the masked patches is well below the entropy of those patches' tokens, the loss of the best guess that ignores the
    visible patches (measured on the same tokens, which flatters that guess): the context is used."""
    small = "model.backbone_kwargs={embed_dim: 64, depth: 2, num_heads: 4, global_pool: mean}"
    tcfg = load_config(VQVAE, [small, "method.vocab_size=64"])
    tokenizer = build_method(tcfg, distributed=False)
    with _stream(digits_shards, tcfg) as stream:
        _train(tokenizer, iter(stream), 100, tcfg.optim.lr)
    torch.save({"config": to_dict(tcfg), "state_dict": tokenizer.state_dict()}, tmp_path / "model.pt")
    cfg = load_config(BEIT, [small, "method.vocab_size=64", f"method.tokenizer={tmp_path}"])
    method = build_method(cfg, distributed=False)
    with _stream(digits_shards, cfg) as stream:
        batches = iter(stream)
        _train(method, batches, 150, cfg.optim.lr)
        method.eval()
        losses, entropies = [], []
        with torch.no_grad():
            for _ in range(4):
                imgs = next(batches)["views"][0]
                state = torch.get_rng_state()
                losses.append(method({"views": [imgs]})["loss"].item())
                torch.set_rng_state(state)  # the same masks again, to count the tokens the loss was taken over
                mask = block_masks(len(imgs), (4, 4), (0.4, 0.4), 1.0)
                tokens = method.tokenizer(torch.device("cpu")).tokenize(imgs)[mask]
                p = torch.bincount(tokens, minlength=64).float() / len(tokens)
                entropies.append(-(p[p > 0] * p[p > 0].log()).sum().item())
    assert np.mean(losses) < np.mean(entropies) - 0.25, (losses, entropies)
