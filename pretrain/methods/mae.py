"""MAE (He et al., 2022): masked autoencoders are scalable vision learners.

Each image's patches are shuffled per sample (argsort of uniform noise); the encoder, a ViT, sees only the first
``1 - mask_ratio`` of them, picked by ``kernels.masked_gather`` (no mask tokens in the encoder: it runs on a quarter of
the sequence). A narrow decoder gets the encoded visible tokens plus a shared mask token for every hidden patch, puts
them back in image order with the same gather through the inverse permutation, adds fixed sin-cos positions and
predicts each patch's pixels. The loss is the mean squared error over the hidden patches only, of per-patch normalised
pixels (``norm_pix_loss``). ``backbone`` is the encoder; downstream it sees every patch (no masking) and gives its
final-normed cls token.

The masks come from the torch generator of the rank's device, so each rank masks differently (the trainer seeds ranks
apart) and a resumed run, which restores that generator, draws the masks the interrupted run would have drawn.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kernels.masked_gather import masked_gather
from pretrain.config import Config
from pretrain.methods.base import (
    Gather,
    Reduce,
    SSLMethod,
    build_method_backbone,
    built_size_view,
    require_one_view,
    require_vit,
)
from pretrain.models.vit import Block, sincos_pos_embed_2d

IMPLS = ("auto", "triton", "ref")


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder sees: ``int(L * (1 - mask_ratio))``, as the reference implementation rounds."""
    return int(num_patches * (1.0 - mask_ratio))


def random_masking(batch: int, num_patches: int, mask_ratio: float, device: torch.device | str
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """A uniformly random subset of patches per sample -> ``(ids_keep (B, K), ids_restore (B, L), mask (B, L))``.

    ``ids_keep`` are the visible patches (int64, distinct per row), ``ids_restore`` the inverse of the shuffle (position
    of each patch in [visible..., hidden...] order), ``mask`` True where a patch is hidden. K = ``num_visible``.
    """
    ids_shuffle = torch.rand(batch, num_patches, device=device).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    keep = num_visible(num_patches, mask_ratio)
    mask = ids_restore >= keep
    return ids_shuffle[:, :keep].contiguous(), ids_restore, mask


def encode_patches(enc: nn.Module, imgs: Tensor, ids: Tensor, impl: str) -> Tensor:
    """A ViT ``enc`` on a subset of each image's patches: imgs (B, C, H, W), ids (B, K) -> (B, P+K, D), the cls
    token, any registers and the patches at ``ids`` (picked by ``kernels.masked_gather`` after the positions are
    added), through the blocks and the final norm (P = ``enc.num_prefix_tokens``). MAE's visible patches, I-JEPA's
    context."""
    tokens = enc.prepare_tokens(imgs)  # (B, P+L, D), positions added
    picked = masked_gather(enc.patch_tokens(tokens), ids, impl=impl)
    return enc.forward_tokens(torch.cat([tokens[:, :enc.num_prefix_tokens], picked], dim=1))


def check_decoder(cfg: Config) -> None:
    """The decoder's width fits its heads and its sin-cos positions (MAE's decoder, the VQ-VAE's)."""
    m = cfg.method
    if m.decoder_dim % m.decoder_heads or m.decoder_dim % 4:
        raise ValueError(f"method.decoder_dim: {m.decoder_dim} must be divisible by decoder_heads={m.decoder_heads} "
                         "and by 4 (sin-cos positions)")


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = True) -> Tensor:
    """Mean over hidden patches of the per-patch mean squared error, in fp32.

    pred, target: (B, L, P) patch pixels; mask: (B, L) bool, True = hidden (the loss is there only). ``norm_pix``
    normalises each target patch by its own mean and (unbiased) variance, as the reference's ``norm_pix_loss``.
    """
    pred, target = pred.float(), target.float()
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred - target).pow(2).mean(dim=-1)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum()


class MAEDecoder(nn.Module):
    """Encoded visible tokens (B, 1+K, D_enc) + ids_restore (B, L) -> predicted pixels (B, L, patch_dim)."""

    def __init__(self, embed_dim: int, grid: tuple[int, int], patch_dim: int, *, dim: int, depth: int, num_heads: int,
                 impl: str = "auto") -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # fixed, derived from the grid: not in the state dict, not trained
        pos = torch.cat([torch.zeros(1, dim), sincos_pos_embed_2d(grid, dim)])
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads, 4.0, True, 0.0) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_dim)
        self.impl = impl
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)  # the reference's decoder init
                nn.init.zeros_(m.bias)

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        x = self.embed(latent)
        b, length = ids_restore.shape
        hidden = self.mask_token.to(x.dtype).expand(b, length + 1 - x.shape[1], -1)
        patches = masked_gather(torch.cat([x[:, 1:], hidden], dim=1), ids_restore, impl=self.impl)
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]


class MAE(SSLMethod):
    config_keys = frozenset({"decoder_depth", "decoder_dim", "decoder_heads", "loss_impl", "mask_ratio",
                             "norm_pix_loss"})

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        m, d = cfg.method, cfg.data
        require_vit(cfg, "mae masks patches of")
        if m.loss_impl not in IMPLS:
            raise ValueError(f"method.loss_impl: mae takes one of {', '.join(IMPLS)}, got {m.loss_impl!r}")
        require_one_view(cfg, "mae reconstructs")
        patches = (d.image_size // cfg.model.patch_size) ** 2
        keep = num_visible(patches, m.mask_ratio)
        if not 0 < keep < patches:
            raise ValueError(f"method.mask_ratio: {m.mask_ratio} of {patches} patches leaves {keep} visible; need at "
                             "least one visible and one hidden")
        check_decoder(cfg)

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        super().__init__()
        del gather, reduce, rank  # the loss is per sample: nothing crosses ranks but the gradients
        m = cfg.method
        self.backbone = build_method_backbone(cfg)
        enc = self.backbone
        self.decoder = MAEDecoder(enc.embed_dim, enc.grid_size, enc.patch_size ** 2 * enc.in_chans,
                                  dim=m.decoder_dim, depth=m.decoder_depth, num_heads=m.decoder_heads,
                                  impl=m.loss_impl)
        self.mask_ratio = m.mask_ratio
        self.norm_pix = m.norm_pix_loss
        self.impl = m.loss_impl

    def encode(self, imgs: Tensor, ids_keep: Tensor) -> Tensor:
        """imgs (B, C, H, W), ids_keep (B, K) -> (B, P+K, D): the cls token, any registers and the visible patches,
        encoded (P = the backbone's ``num_prefix_tokens``)."""
        return encode_patches(self.backbone, imgs, ids_keep, self.impl)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch["views"]: one tensor (B, C, H, W) at the built image size."""
        imgs = built_size_view(batch, self.backbone, "mae", "the decoder's positions are fixed")
        ids_keep, ids_restore, mask = random_masking(imgs.shape[0], self.backbone.num_patches, self.mask_ratio,
                                                     imgs.device)
        latent = self.encode(imgs, ids_keep)
        if self.backbone.num_registers:  # the registers are the encoder's scratch space: the decoder never sees them
            latent = torch.cat([latent[:, :1], self.backbone.patch_tokens(latent)], dim=1)
        pred = self.decoder(latent, ids_restore)
        return {"loss": mae_loss(pred, self.backbone.patchify(imgs), mask, self.norm_pix)}
