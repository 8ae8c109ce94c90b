"""Vector quantisation for visual tokenizers: a factorised, l2-normalised codebook (ViT-VQGAN, Yu et al., 2022) kept by
exponential moving averages with dead-code restarts (VQ-VAE-2, Razavi et al., 2019; Jukebox, Dhariwal et al., 2020).

Each input vector is projected to a low-dimensional code space (``code_dim``) and normalised; its token is the nearest
codebook entry by cosine similarity. The codebook is not trained by gradients: each entry is the normalised EMA of the
vectors assigned to it (their sums and counts all-reduced over ranks, so every rank keeps the same codebook). An entry
whose EMA count falls below a quarter of its fair share (at most one vector per step) is dead: it moves onto one of
this step's encoder outputs, and again each step until it wins some. The outputs come from every rank and are picked by
a generator seeded with the step, so all ranks pick the same. The first update places the whole codebook on data
(k-means' usual start). Gradient training alone collapses onto a handful of codes (seen on digits: 3 of 512 in use
after 25 steps). The encoder gets the commitment loss and the straight-through gradient (van den Oord et al., 2017).

The codebook and its statistics are buffers: no optimizer state, never partitioned by ZeRO, saved with the module.
The lookup runs in fp32, also under bf16 autocast: a token is an argmax, and bf16's three digits would flip near ties.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CANDIDATES = 1024
"""Encoder outputs per rank offered to dead codes (a strided subset of the step's)."""


class VectorQuantizer(nn.Module):
    """(..., dim) -> quantised (..., out_dim), tokens (...), the commitment loss; ``tokenize`` gives the tokens alone.
    Call :meth:`update` after each optimizer step (the EMA and the restarts use the last forward's assignments)."""

    def __init__(self, dim: int, vocab_size: int, code_dim: int, out_dim: int | None = None, *,
                 commitment: float = 0.25, decay: float = 0.99) -> None:
        super().__init__()
        if vocab_size < 2 or code_dim < 1:
            raise ValueError(f"VectorQuantizer needs vocab_size >= 2 and code_dim >= 1, got {vocab_size}, {code_dim}")
        self.vocab_size, self.code_dim, self.commitment, self.decay = vocab_size, code_dim, commitment, decay
        self.proj_in = nn.Linear(dim, code_dim)
        self.proj_out = nn.Linear(code_dim, out_dim or dim)
        self.register_buffer("codebook", F.normalize(torch.randn(vocab_size, code_dim), dim=-1))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("ema_count", torch.zeros(vocab_size))
        self._seen: list[tuple[Tensor, Tensor]] = []  # (tokens, z) of the training forwards since the last update

    def _lookup(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (..., dim) -> (z, tokens): normalised projections (..., code_dim), fp32, and the nearest entries (...)."""
        with torch.autocast(x.device.type, enabled=False):
            z = F.normalize(self.proj_in(x.float()), dim=-1)
            tokens = (z @ self.codebook.float().t()).argmax(dim=-1)
        return z, tokens

    @torch.no_grad()
    def tokenize(self, x: Tensor) -> Tensor:
        """x (..., dim) -> (...) int64 token ids in [0, vocab_size)."""
        return self._lookup(x)[1]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x (..., dim) -> {"quantized" (..., out_dim), "tokens" (...), "loss" (commitment, scalar), "perplexity",
        "usage"}. ``perplexity`` is exp of the entropy of this batch's token frequencies (the number of equally used
        codes it is worth), ``usage`` the fraction of the codebook this batch used."""
        z, tokens = self._lookup(x)
        q = self.codebook.float()[tokens]
        loss = self.commitment * (z - q).pow(2).sum(-1).mean()
        straight_through = z + (q - z).detach()
        with torch.no_grad():
            freq = torch.bincount(tokens.reshape(-1), minlength=self.vocab_size).float() / tokens.numel()
            entropy = -(freq * freq.clamp_min(1e-12).log()).sum()
            stats = {"perplexity": entropy.exp(), "usage": (freq > 0).float().mean()}
        if self.training:  # every forward of the step (micro-batches of gradient accumulation too)
            self._seen.append((tokens.detach().reshape(-1), z.detach().reshape(-1, self.code_dim)))
        return {"quantized": self.proj_out(straight_through.to(x.dtype)), "tokens": tokens, "loss": loss, **stats}

    def restart_below(self, vectors: int) -> float:
        """The EMA count under which an entry is dead: a quarter of its share of ``vectors`` per step, at most 1."""
        return min(1.0, 0.25 * vectors / self.vocab_size)

    @torch.no_grad()
    def update(self, step: int, *, reduce: Callable[[Tensor], Tensor] | None = None,
               gather: Callable[[Tensor], Tensor] | None = None) -> int:
        """Fold the assignments of this step's training forwards into the EMA (mean over ranks with ``reduce``) and
        restart the dead entries from this step's outputs (all ranks' with ``gather``). Returns how many entries were
        restarted."""
        if not self._seen:
            return 0
        tokens, z = (torch.cat(parts) for parts in zip(*self._seen))
        self._seen = []
        onehot_sum = torch.zeros(self.vocab_size, self.code_dim + 1, device=z.device)
        onehot_sum[:, :-1].index_add_(0, tokens, z)
        onehot_sum[:, -1].index_add_(0, tokens, torch.ones_like(tokens, dtype=z.dtype))
        if reduce is not None:
            onehot_sum = reduce(onehot_sum)  # every rank folds in the same mean: the codebooks stay equal
        sums, counts = onehot_sum[:, :-1], onehot_sum[:, -1]
        first = not self.ema_count.any()  # never updated: the random init goes, every entry onto data
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        below = self.restart_below(len(tokens))
        dead = torch.nonzero((self.ema_count < below) | first).reshape(-1)
        if len(dead):  # the same on every rank: the counts are reduced
            candidates = z[:: max(1, len(z) // CANDIDATES)].contiguous()
            if gather is not None:
                candidates = gather(candidates)
            g = torch.Generator().manual_seed(step)
            pick = torch.randint(len(candidates), (len(dead),), generator=g).to(candidates.device)
            self.ema_sum[dead] = candidates[pick]
            self.ema_count[dead] = below  # one step to win vectors of its own, or it moves again
        self.codebook.copy_(F.normalize(self.ema_sum, dim=-1))
        return len(dead)
