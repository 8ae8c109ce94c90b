"""NT-Xent (SimCLR) loss on top of the tiled row-vs-columns core in kernels/contrastive.py, and its decoupled form
(DCL, Yeh et al. 2022: the positive left out of each anchor's denominator).

The 2N x 2N similarity matrix is never built by the "triton" and "chunked" paths; `ntxent_loss_ref` builds it.

DCL needs no kernel of its own: it is ``kernels.contrastive.decoupled_rows`` of the core's per-row losses.
Distributed use: the caller gathers both views from all ranks *with gradient* (pretrain/dist.py) and passes them
as z0_all / z1_all with this rank's row offset; no communication happens here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.clip import clip_loss, clip_loss_ref  # noqa: F401  (re-exported: same core, same API family)
from kernels.contrastive import contrastive_rows_loss, decoupled_rows
from kernels.utils import check_pair, fp32_loss

__all__ = ["ntxent_loss", "ntxent_loss_ref", "clip_loss", "clip_loss_ref", "decoupled_rows"]


def _check(z0: Tensor, z1: Tensor, temperature: float, z0_all: Tensor | None, z1_all: Tensor | None,
           offset: int) -> tuple[Tensor, Tensor, int]:
    """Validate and return (z0_all, z1_all, offset) with the local defaults filled in."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return check_pair(("z0", "z1"), z0, z1, z0_all, z1_all, offset)


def _indices(n: int, n_all: int, offset: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """pos, excl (2n,) for anchors [z0; z1] against columns [z0_all; z1_all]."""
    i = torch.arange(n, device=device) + offset
    return torch.cat([i + n_all, i]), torch.cat([i, i + n_all])


@fp32_loss
def ntxent_loss(z0: Tensor, z1: Tensor, temperature: float = 0.1, *, z0_all: Tensor | None = None,
                z1_all: Tensor | None = None, offset: int = 0, impl: str = "auto", decoupled: bool = False) -> Tensor:
    """NT-Xent mean over this rank's 2n anchors (fp32 scalar); ``decoupled``: DCL's, each anchor's positive left out
    of its denominator.

    z0, z1: (n, D) this rank's two views (L2-normalised inside). z0_all, z1_all: (N, D) the views of ALL ranks,
    gathered by the caller with gradient; rows offset:offset+n are this rank's. None -> z0, z1 and offset 0.
    For anchor z0[i] the positive is z1_all[offset+i], for z1[i] it is z0_all[offset+i]; negatives are the other
    2N-2 columns (the anchor's own column excluded). fp32/fp16/bf16 inputs, fp32 accumulation.
    impl: "auto" (triton on CUDA, chunked elsewhere) | "triton" | "chunked" | "ref".
    """
    z0_all, z1_all, offset = _check(z0, z1, temperature, z0_all, z1_all, offset)
    local = z0_all is z0
    zn0, zn1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
    q = torch.cat([zn0, zn1])
    k = q if local else torch.cat([F.normalize(z0_all, dim=1), F.normalize(z1_all, dim=1)])
    pos, excl = _indices(z0.shape[0], z0_all.shape[0], offset, z0.device)
    if impl == "ref":
        return ntxent_loss_ref(z0, z1, temperature, z0_all=None if local else z0_all,
                               z1_all=None if local else z1_all, offset=offset, upcast=True, decoupled=decoupled)
    rows = contrastive_rows_loss(q * (1.0 / temperature), k, pos, excl, impl=impl)
    return (decoupled_rows(rows) if decoupled else rows).mean()


def ntxent_loss_ref(z0: Tensor, z1: Tensor, temperature: float = 0.1, *, z0_all: Tensor | None = None,
                    z1_all: Tensor | None = None, offset: int = 0, upcast: bool = False,
                    decoupled: bool = False) -> Tensor:
    """Naive NT-Xent: materialises the (2n, 2N) logits (2N x 2N on one rank). Same contract as `ntxent_loss`;
    computes in the input dtype unless upcast (then fp32). ``decoupled``: DCL written out, the positive's logit
    masked out of each row's log-sum-exp."""
    z0_all, z1_all, offset = _check(z0, z1, temperature, z0_all, z1_all, offset)
    if upcast:
        z0, z1, z0_all, z1_all = z0.float(), z1.float(), z0_all.float(), z1_all.float()
    q = F.normalize(torch.cat([z0, z1]), dim=1)
    k = F.normalize(torch.cat([z0_all, z1_all]), dim=1)
    logits = q @ k.T / temperature
    pos, excl = _indices(z0.shape[0], z0_all.shape[0], offset, z0.device)
    rows = torch.arange(q.shape[0], device=q.device)
    logits[rows, excl] = float("-inf")
    if not decoupled:
        return F.cross_entropy(logits, pos)
    positive = logits[rows, pos]  # a copy: the positives' logits before they leave the denominators
    logits[rows, pos] = float("-inf")
    return (torch.logsumexp(logits, dim=1) - positive).mean()
