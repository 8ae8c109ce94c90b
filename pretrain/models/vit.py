"""Vision Transformer (ViT) backbone in plain PyTorch, shaped for self-supervised pretraining.

Follows timm / DINO: conv patch embedding, a cls token, learned position embeddings, pre-norm blocks, a final LayerNorm.
Additions the SSL methods need:

- position embeddings are interpolated (bicubic) when the input size differs from the built size, so one model sees
  DINO's global and local crops (resized to the new grid as MAE's and DeiT's ``interpolate_pos_embed``; DINO's own code
  passes a scale factor with a 0.1 offset instead, which samples a slightly narrower span of the table, shifted
  towards its first row and column);
- ``forward_features(x, mask)`` replaces masked patch embeddings with a learnable ``mask_token`` (BEiT / iBOT,
  through ``kernels.mask_token_replace``) before the position embeddings are added;
- ``prepare_tokens`` / ``forward_tokens`` split embedding from the transformer, so MAE can drop tokens in between;
- ``patchify`` / ``unpatchify`` for pixel-space targets;
- ``grad_checkpointing``: each block's activations are recomputed in the backward instead of kept (activation memory
  of one block instead of ``depth``, for about a third more compute), as timm's ``set_grad_checkpointing``;
- ``freeze_patch_embed``: the patch projection stays at its random init (MoCo v3's fix for ViT training instability);
- ``pos_embed="sincos"``: fixed 2-D sine-cosine position embeddings instead of learned ones (MAE's and MoCo v3's;
  MoCo v3's layout, row then column: ``sincos_pos_embed_2d``);
- ``drop_path_uniform``: the same stochastic-depth rate in every block (DINOv2's) instead of rising linearly;
- ``layer_scale``: LayerScale, a learned per-channel gain on each residual branch starting at this value (DINOv2's
  1e-5);
- ``num_registers``: register tokens ("Vision Transformers Need Registers", DINOv2 with registers): learned tokens
  without a position, after the cls token, that the network may use as scratch space instead of taking over
  low-information patch tokens; every output keeps them out (``patch_tokens``, ``pool``, ``forward_dense``).

Token layout everywhere: ``num_prefix_tokens`` = 1 + ``num_registers`` tokens first (the cls token at index 0, then the
registers), then the patches in row-major order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from kernels.masked_gather import mask_token_replace


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch per sample with probability ``p`` (scaled to keep the expectation)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (flash / mem-efficient when available)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 causal: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.causal = causal
        """Token i attends to tokens <= i only (CLIP's text tower)."""
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, D/heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                             is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def weights(self, x: Tensor) -> Tensor:
        """x: (B, N, D) -> (B, heads, N, N): the attention probabilities ``forward`` applies, softmax(q k^T / sqrt(d)),
        which scaled_dot_product_attention never forms; written out here in fp32, to look at, not to train."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.float().unbind(0)
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        if self.causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return scores.softmax(dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); with ``layer_scale`` each branch is first
    multiplied by a learned per-channel gain that starts at that value (LayerScale: CaiT, DINOv2's 1e-5)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float,
                 causal: bool = False, layer_scale: float | None = None) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, causal=causal)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)
        self.ls1 = self.ls2 = None
        if layer_scale is not None:
            self.ls1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.ls2 = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x: Tensor) -> Tensor:
        a = self.attn(self.norm1(x))
        x = x + self.drop_path(a if self.ls1 is None else a * self.ls1)
        m = self.mlp(self.norm2(x))
        return x + self.drop_path(m if self.ls2 is None else m * self.ls2)


def sincos_pos_embed_2d(grid: tuple[int, int], dim: int) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings -> (gh*gw, dim), rows in row-major patch order.

    The first half of ``dim`` encodes the row, the second the column; each half is sin and cos of the position at
    ``dim / 4`` frequencies ``10000^(-i / (dim / 4))``: MoCo v3's ``build_2d_sincos_position_embedding``. MAE's and
    I-JEPA's ``get_2d_sincos_pos_embed`` put the column first (its halves swapped: the same table for the transposed
    grid, as good to train with, but not interchangeable with it in a trained model).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        angles = pos[:, None] * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def interpolate_pos_embed(pos: Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Resize patch position embeddings ``pos: (1, gh*gw, D)`` from ``grid`` to ``new_grid`` -> (1, nh*nw, D), bicubic.

    Computed in fp32 (bicubic in bf16 loses the small embedding values) and cast back to ``pos.dtype``.
    """
    if tuple(grid) == tuple(new_grid):
        return pos
    d = pos.shape[-1]
    img = pos.float().reshape(1, grid[0], grid[1], d).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=new_grid, mode="bicubic", align_corners=False)
    return img.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d).to(pos.dtype)


class VisionTransformer(nn.Module):
    """ViT without a classifier head: ``forward(x: (B, C, H, W)) -> (B, embed_dim)``, the pooled representation."""

    def __init__(
        self,
        *,
        image_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        use_mask_token: bool = True,
        global_pool: str = "cls",
        grad_checkpointing: bool = False,
        freeze_patch_embed: bool = False,
        pos_embed: str = "learned",
        layer_scale: float | None = None,
        num_registers: int = 0,
        drop_path_uniform: bool = False,
    ) -> None:
        super().__init__()
        for key, value in (("image_size", image_size), ("patch_size", patch_size), ("in_chans", in_chans),
                           ("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ViT {key} must be a positive int, got {value!r}")
        if image_size % patch_size != 0:
            raise ValueError(f"ViT image_size={image_size} is not divisible by patch_size={patch_size}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"ViT embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        if not isinstance(num_registers, int) or isinstance(num_registers, bool) or num_registers < 0:
            raise ValueError(f"ViT num_registers must be an int >= 0, got {num_registers!r}")
        if global_pool not in ("cls", "mean"):
            raise ValueError(f"ViT global_pool must be 'cls' or 'mean', got {global_pool!r}")
        if layer_scale is not None and not layer_scale > 0:
            raise ValueError(f"ViT layer_scale must be > 0 (or null: off), got {layer_scale}")
        if pos_embed not in ("learned", "sincos"):
            raise ValueError(f"ViT pos_embed must be 'learned' or 'sincos', got {pos_embed!r}")
        if pos_embed == "sincos" and embed_dim % 4:
            raise ValueError(f"ViT pos_embed='sincos' needs an embed_dim divisible by 4, got {embed_dim}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"ViT drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.global_pool = global_pool
        self.grad_checkpointing = grad_checkpointing
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_registers = num_registers
        self.num_prefix_tokens = 1 + num_registers
        """Tokens before the patches in every token sequence: the cls token, then the registers."""

        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        # A parameter that a step does not use trips DDP (find_unused_parameters=False); methods without masking
        # (SimCLR, DINO, MAE) can build the ViT with use_mask_token=False.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_mask_token else None
        self.mask_impl = "ref"
        """kernels.mask_token_replace's impl (auto | triton | ref); a masking method sets its own."""
        # sincos: fixed 2-D sine-cosine embeddings (MAE's and MoCo v3's encoders), a parameter without gradient so
        # checkpoints and position interpolation treat both kinds alike
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim),
                                      requires_grad=pos_embed == "learned")
        # stochastic depth grows linearly with depth (timm), or is the same in every block (DINOv2's
        # drop_path_uniform); plain floats so the model also builds on the meta device
        rates = [drop_path_rate if drop_path_uniform else drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, r, layer_scale=layer_scale)
                                    for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()
        # MoCo v3's random patch projection: the patch embedding stays at its init (no gradient, no optimizer state),
        # which the paper finds removes the training instability of ViTs; a fine-tune trains it again
        self.patch_embed.requires_grad_(not freeze_patch_embed)

    def _init_weights(self) -> None:
        # timm / DINO: trunc_normal(0.02) for tokens, position embeddings and Linear weights; mask_token stays 0 (iBOT).
        if self.pos_embed.requires_grad:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:  # the cls token's row stays 0
            with torch.no_grad():
                self.pos_embed[0, 1:].copy_(sincos_pos_embed_2d(self.grid_size, self.embed_dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.register_tokens is not None:  # DINOv2's and timm's init for registers
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _grid(self, x: Tensor) -> tuple[int, int]:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"ViT expects (B, {self.in_chans}, H, W) input, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"ViT input size {h}x{w} is not divisible by patch_size={self.patch_size}")
        return h // self.patch_size, w // self.patch_size

    def prepare_tokens(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W), mask: (B, L) bool or None -> (B, P+L, D) tokens, L = H*W/p^2, P = ``num_prefix_tokens``:
        the cls token and the patches with their position embeddings, the registers (no position) between them.

        Masked patch embeddings are replaced by ``mask_token`` before position embeddings are added, so the model still
        knows where the hidden patch was.
        """
        grid = self._grid(x)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, L, D)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("ViT got a mask but was built with use_mask_token=False")
            if mask.shape != tokens.shape[:2] or mask.dtype != torch.bool:
                raise ValueError(f"ViT mask must be a bool tensor of shape {tuple(tokens.shape[:2])}, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
            tokens = mask_token_replace(tokens, mask, self.mask_token.view(-1), impl=self.mask_impl)
        pos = self.pos_embed
        patch_pos = interpolate_pos_embed(pos[:, 1:], self.grid_size, grid)
        tokens = tokens + patch_pos
        prefix = self.cls_token + pos[:, :1]
        if self.register_tokens is not None:  # DINOv2: registers join after the position embeddings, without one
            prefix = torch.cat([prefix, self.register_tokens], dim=1)
        return torch.cat([prefix.to(tokens.dtype).expand(tokens.shape[0], -1, -1), tokens], dim=1)

    def patch_tokens(self, tokens: Tensor) -> Tensor:
        """tokens: (B, P+L, D) laid out as ``prepare_tokens`` makes them -> (B, L, D), the patches only."""
        return tokens[:, self.num_prefix_tokens:]

    def forward_tokens(self, tokens: Tensor) -> Tensor:
        """tokens: (B, N, D) from ``prepare_tokens`` (or a subset, as in MAE) -> (B, N, D) after blocks and norm."""
        # Recompute only where a backward will run (not for an EMA teacher under no_grad, nor in evaluation); the
        # non-reentrant form replays stochastic depth's draws from the saved RNG state and leaves the RNG as an
        # ordinary forward would, so a resumed run's random streams are the same with it on or off.
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
        return self.norm(tokens)

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W), mask: (B, L) bool or None -> (B, P+L, D); index 0 is the cls token, then the registers
        (``patch_tokens`` takes the patches)."""
        return self.forward_tokens(self.prepare_tokens(x, mask))

    def pool(self, tokens: Tensor) -> Tensor:
        """tokens: (B, P+L, D) from ``forward_features`` -> (B, D): the cls token, or with ``global_pool="mean"`` the
        mean of the patch tokens (MAE's encoder is trained with no objective on its cls token); never the registers. A
        method that trains an image-level objective on tokens (iBOT) pools through here, so it trains what ``forward``
        releases."""
        return self.patch_tokens(tokens).mean(dim=1) if self.global_pool == "mean" else tokens[:, 0]

    def cls_attention(self, x: Tensor, block: int = -1) -> Tensor:
        """x: (B, C, H, W) -> (B, heads, P+L): the attention of the cls token over every token (itself, the registers,
        then the patches in row-major order; each row sums to 1) in block ``block`` (default the last), DINO's
        attention maps once the patches' part is shaped to the grid."""
        if not -len(self.blocks) <= block < len(self.blocks):
            raise ValueError(f"ViT block {block} does not exist: the model has {len(self.blocks)} blocks")
        last = block % len(self.blocks)
        tokens = self.prepare_tokens(x)
        for b in self.blocks[:last]:
            tokens = b(tokens)
        return self.blocks[last].attn.weights(self.blocks[last].norm1(tokens))[:, :, 0]

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, D): the final-normed tokens pooled by ``pool``."""
        return self.pool(self.forward_features(x))

    def forward_dense(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, D, H/p, W/p): the final-normed patch tokens as a map (dense pretext tasks)."""
        gh, gw = self._grid(x)
        tokens = self.patch_tokens(self.forward_features(x))
        return tokens.transpose(1, 2).reshape(x.shape[0], self.embed_dim, gh, gw)

    def patchify(self, imgs: Tensor) -> Tensor:
        """imgs: (B, C, H, W) -> (B, L, p*p*C), patches in row-major order, pixels ordered (p, p, C) as in MAE."""
        gh, gw = self._grid(imgs)
        p, c = self.patch_size, imgs.shape[1]
        x = imgs.reshape(imgs.shape[0], c, gh, p, gw, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(imgs.shape[0], gh * gw, p * p * c)

    def layer_id(self, name: str) -> int:
        """The layer of parameter ``name`` (as ``named_parameters`` calls it) for layer-wise learning-rate decay (BEiT,
        DINOv2): 0 for the embeddings and tokens, i + 1 for ``blocks.i``, depth + 1 for the last norm."""
        if name.startswith(("patch_embed.", "cls_token", "register_tokens", "mask_token", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    def unpatchify(self, patches: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """patches: (B, L, p*p*C) -> (B, C, gh*p, gw*p); ``grid`` defaults to the built grid."""
        gh, gw = grid or self.grid_size
        p = self.patch_size
        b, n, k = patches.shape
        if n != gh * gw or k % (p * p):
            raise ValueError(f"unpatchify: patches {tuple(patches.shape)} do not fit grid {gh}x{gw}, patch {p}")
        c = k // (p * p)
        x = patches.reshape(b, gh, gw, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, gh * p, gw * p)


_SIZES: dict[str, dict[str, int]] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_huge": dict(embed_dim=1280, depth=32, num_heads=16),
}


def _vit(size: str, image_size: int, in_chans: int, patch_size: int, kwargs: dict[str, Any]) -> VisionTransformer:
    opts = {**_SIZES[size], **kwargs}
    return VisionTransformer(image_size=image_size, in_chans=in_chans, patch_size=patch_size, **opts)


def vit_tiny(*, image_size: int = 224, in_chans: int = 3, patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-Ti: 192 wide, 12 deep, 3 heads (each overridable through kwargs)."""
    return _vit("vit_tiny", image_size, in_chans, patch_size, kwargs)


def vit_small(*, image_size: int = 224, in_chans: int = 3, patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-S: 384 wide, 12 deep, 6 heads (about 21.7M parameters at 224/16)."""
    return _vit("vit_small", image_size, in_chans, patch_size, kwargs)


def vit_base(*, image_size: int = 224, in_chans: int = 3, patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-B: 768 wide, 12 deep, 12 heads (about 85.8M parameters at 224/16)."""
    return _vit("vit_base", image_size, in_chans, patch_size, kwargs)


def vit_large(*, image_size: int = 224, in_chans: int = 3, patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-L: 1024 wide, 24 deep, 16 heads (about 303M parameters at 224/16)."""
    return _vit("vit_large", image_size, in_chans, patch_size, kwargs)


def vit_huge(*, image_size: int = 224, in_chans: int = 3, patch_size: int = 14, **kwargs: Any) -> VisionTransformer:
    """ViT-H: 1280 wide, 32 deep, 16 heads (about 631M parameters at 224/14, I-JEPA's)."""
    return _vit("vit_huge", image_size, in_chans, patch_size, kwargs)

