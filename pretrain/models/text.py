"""CLIP's text tower in plain PyTorch: a byte-level tokenizer and a causal transformer.

The tokenizer maps UTF-8 bytes to ids (ByT5-style: no vocabulary file to ship, any language, any caption), framed by
begin and end tokens and padded to ``context_length``. The transformer (Radford et al., 2021) embeds tokens plus learned
positions, runs pre-norm blocks with a causal mask, and takes the final-normed features at the end token, projected to
the joint embedding. With the causal mask nothing after the end token (padding) reaches it, so a caption's embedding
does not depend on the context length it was padded to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pretrain.models.vit import Block

PAD, BOS, EOS = 0, 257, 258
VOCAB_SIZE = 259
"""Ids: 0 padding, 1..256 the byte values 0..255 (+1), 257 begin, 258 end."""


class ByteTokenizer:
    """``tokenizer(texts) -> LongTensor (N, context_length)``: ``[BOS, bytes + 1..., EOS, PAD...]``.

    A caption longer than ``context_length - 2`` bytes is cut (the end token is always kept).
    """

    def __init__(self, context_length: int) -> None:
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3 (begin, one byte, end), got {context_length}")
        self.context_length = context_length

    def __call__(self, texts: Sequence[str]) -> Tensor:
        if isinstance(texts, str):
            raise ValueError("ByteTokenizer takes a list of strings, got one string")
        out = torch.full((len(texts), self.context_length), PAD, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = list(text.encode("utf-8")[: self.context_length - 2])
            out[i, : len(ids) + 2] = torch.tensor([BOS, *(b + 1 for b in ids), EOS])
        return out


class TextTransformer(nn.Module):
    """``forward(tokens: (B, T) long) -> (B, out_dim)``: the causal transformer's end-token features, projected."""

    def __init__(self, *, context_length: int = 32, width: int = 256, depth: int = 4, num_heads: int = 4,
                 out_dim: int = 128, mlp_ratio: float = 4.0, vocab_size: int = VOCAB_SIZE) -> None:
        super().__init__()
        for key, value in (("context_length", context_length), ("width", width), ("depth", depth),
                           ("num_heads", num_heads), ("out_dim", out_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"text tower {key} must be a positive int, got {value!r}")
        if width % num_heads:
            raise ValueError(f"text tower width={width} is not divisible by num_heads={num_heads}")
        self.context_length = context_length
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.empty(1, context_length, width))
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, True, 0.0, causal=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.proj = nn.Linear(width, out_dim, bias=False)
        # CLIP's init: embeddings N(0, 0.02) / N(0, 0.01); Linear weights trunc-normal 0.02 as in the ViT.
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2 or tokens.dtype != torch.long or tokens.shape[1] > self.context_length:
            raise ValueError(f"text tower expects (B, T <= {self.context_length}) int64 token ids, got "
                             f"{tokens.dtype} {tuple(tokens.shape)}")
        if not tokens.shape[0]:  # (max() of no rows would raise)
            return self.proj.weight.new_zeros(0, self.proj.out_features)
        ends = (tokens == EOS).int().argmax(dim=1)  # the first end token of each row
        if not bool((tokens.gather(1, ends[:, None]) == EOS).all()):
            raise ValueError("text tower: every row of tokens needs an end token (see ByteTokenizer)")
        # Nothing after the last end token of the batch reaches any end token (causal): drop that padding.
        tokens = tokens[:, : int(ends.max()) + 1]
        x = self.token_embed(tokens) + self.pos_embed[:, : tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x[torch.arange(x.shape[0], device=x.device), ends])
        return self.proj(x)
