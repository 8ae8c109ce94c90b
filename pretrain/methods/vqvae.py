"""A visual tokenizer for BEiT: a ViT VQ-VAE (the encoder and decoder of ViT-VQGAN, Yu et al., 2022, without its GAN).

BEiT predicts the discrete tokens that a tokenizer assigns to an image's patches; the paper borrows DALL-E's dVAE,
trained on 250M images and not something a team can download into a closed cluster. This trains one on the team's own
data, as a run of its own: a ViT encoder (``backbone``, with the same patch size as the BEiT model, so token i is patch
i), a factorised l2-normalised codebook of ``method.vocab_size`` entries kept by EMA with dead-code restarts
(``pretrain.models.quantizer``, updated after each optimizer step), and a narrow ViT decoder that reconstructs each
patch's pixels from the quantised tokens (mean squared error on the normalised views, plus the commitment loss). The
run saves ``model.pt`` (the whole tokenizer) beside ``backbone.pt``; a BEiT run names the run directory in
``method.tokenizer`` and loads it with :func:`load_tokenizer`. ``perplexity`` and ``code_usage`` in MLflow say how much
of the codebook is alive.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from pretrain.config import Config, config_from_dict
from pretrain.methods.base import Gather, Reduce, SSLMethod, build_method_backbone, require_one_view, require_vit
from pretrain.methods.mae import check_decoder
from pretrain.models.quantizer import VectorQuantizer
from pretrain.models.vit import Block, sincos_pos_embed_2d


class PatchDecoder(nn.Module):
    """Quantised tokens (B, L, dim) on a fixed grid -> pixels per patch (B, L, patch_dim): sin-cos positions, blocks."""

    def __init__(self, grid: tuple[int, int], patch_dim: int, *, dim: int, depth: int, num_heads: int) -> None:
        super().__init__()
        self.register_buffer("pos_embed", sincos_pos_embed_2d(grid, dim).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads, 4.0, True, 0.0) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))


class VQVAE(SSLMethod):
    config_keys = frozenset({"code_dim", "codebook_decay", "commitment_weight", "decoder_depth", "decoder_dim",
                             "decoder_heads", "vocab_size"})
    saves_model = True

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_vit(cfg, "vqvae tokenizes the patches of")
        require_one_view(cfg, "vqvae reconstructs")
        check_decoder(cfg)

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        super().__init__()
        del rank
        if reduce is not None and gather is None:
            raise ValueError("method.gather_distributed: vqvae restarts dead codes from every rank's outputs, so it "
                             "must be true in a distributed run")
        self.gather, self.reduce = gather, reduce  # the codebook's EMA and restarts, identical on every rank
        m = cfg.method
        self.backbone = build_method_backbone(cfg)
        enc = self.backbone
        self.quantizer = VectorQuantizer(enc.embed_dim, m.vocab_size, m.code_dim, m.decoder_dim,
                                         commitment=m.commitment_weight, decay=m.codebook_decay)
        self.decoder = PatchDecoder(enc.grid_size, enc.patch_size ** 2 * enc.in_chans, dim=m.decoder_dim,
                                    depth=m.decoder_depth, num_heads=m.decoder_heads)

    @property
    def vocab_size(self) -> int:
        return self.quantizer.vocab_size

    def _check_size(self, imgs: Tensor) -> None:
        size = self.backbone.image_size
        if tuple(imgs.shape[-2:]) != (size, size):
            raise ValueError(f"vqvae: images must be {size}x{size} (the decoder's positions are fixed), got "
                             f"{tuple(imgs.shape[-2:])}")

    @torch.no_grad()
    def tokenize(self, imgs: Tensor) -> Tensor:
        """imgs (B, C, H, W), normalised as the tokenizer's data -> (B, L) int64 tokens, patches in row-major order."""
        self._check_size(imgs)
        return self.quantizer.tokenize(self.backbone.patch_tokens(self.backbone.forward_features(imgs)))

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch["views"]: one tensor (B, C, H, W) at the built image size."""
        imgs = batch["views"][0]
        self._check_size(imgs)
        q = self.quantizer(self.backbone.patch_tokens(self.backbone.forward_features(imgs)))
        pred = self.decoder(q["quantized"])
        rec = (pred.float() - self.backbone.patchify(imgs).float()).pow(2).mean()
        return {"loss": rec + q["loss"], "rec_loss": rec.detach(), "commit_loss": q["loss"].detach(),
                "perplexity": q["perplexity"], "code_usage": q["usage"]}


    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        self.quantizer.update(step, reduce=self.reduce, gather=self.gather)


def tokenizer_file(path: str | Path) -> Path:
    """A vqvae run directory (or its model.pt) -> its model.pt; ValueError("method.tokenizer: ...") if absent."""
    path = Path(path)
    file = path / "model.pt" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"method.tokenizer: {file} does not exist (expected a finished vqvae run directory, which "
                         "holds model.pt)")
    return file


def read_tokenizer(path: str | Path, *, mmap: bool = False) -> tuple[Config, dict]:
    """A finished vqvae run's config and saved ``model.pt`` (``mmap``: tensors left on disk, for the config alone);
    ValueError("method.tokenizer: ...") if it is missing or another method's run."""
    saved = torch.load(tokenizer_file(path), map_location="cpu", weights_only=True, mmap=mmap)
    cfg = config_from_dict(saved["config"])
    if cfg.method.name != "vqvae":
        raise ValueError(f"method.tokenizer: {path} is a {cfg.method.name} run, not a vqvae tokenizer")
    return cfg, saved


def load_tokenizer(path: str | Path) -> tuple[Config, VQVAE]:
    """The tokenizer of a finished vqvae run: its config and the model, in eval mode with frozen weights, on the CPU.

    Built under a forked RNG: loading it draws nothing from the caller's generators (BEiT loads it on its first step,
    and a resumed run must draw the masks the interrupted one would have)."""
    cfg, saved = read_tokenizer(path)
    with torch.random.fork_rng(devices=[]):
        model = VQVAE(cfg)
    model.load_state_dict(saved["state_dict"])
    model.eval().requires_grad_(False)
    return cfg, model
