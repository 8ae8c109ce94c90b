"""Symmetric CLIP loss (open_clip's ClipLoss) on the tiled row-vs-columns core in kernels/contrastive.py.

`logit_scale` is the LOG of the scale, as the learnable parameter in open_clip/CLIP models: the logits are
exp(logit_scale) * cos(img_i, txt_j). Features are L2-normalised inside (idempotent if the model already did).
Distributed use: the caller gathers both towers from all ranks with gradient and passes img_all / txt_all plus this
rank's row offset; positives sit on the offset-shifted diagonal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.contrastive import contrastive_rows_loss
from kernels.utils import check_pair, fp32_loss


def _check(img: Tensor, txt: Tensor, logit_scale: Tensor, img_all: Tensor | None, txt_all: Tensor | None,
           offset: int) -> tuple[Tensor, Tensor, int]:
    """Validate and return (img_all, txt_all, offset) with the local defaults filled in."""
    if not isinstance(logit_scale, Tensor) or logit_scale.numel() != 1:
        raise ValueError("logit_scale must be a one-element tensor (the log of the logit scale)")
    return check_pair(("img", "txt"), img, txt, img_all, txt_all, offset)


@fp32_loss
def clip_loss(img: Tensor, txt: Tensor, logit_scale: Tensor, *, img_all: Tensor | None = None,
              txt_all: Tensor | None = None, offset: int = 0, impl: str = "auto") -> Tensor:
    """0.5 * (CE(img -> txt) + CE(txt -> img)) averaged over the n local rows (fp32 scalar).

    img, txt: (n, D) this rank's towers; img_all, txt_all: (N, D) all ranks' (None -> local, offset 0);
    logit_scale: () or (1,) log scale, gradient flows to it. Row i's positive is column offset + i.
    impl: "auto" | "triton" | "chunked" | "ref".
    """
    img_all, txt_all, offset = _check(img, txt, logit_scale, img_all, txt_all, offset)
    if impl == "ref":
        local = img_all is img
        return clip_loss_ref(img, txt, logit_scale, img_all=None if local else img_all,
                             txt_all=None if local else txt_all, offset=offset, upcast=True)
    scale = logit_scale.float().exp().reshape(())
    img_n, txt_n = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    img_all_n = img_n if img_all is img else F.normalize(img_all, dim=1)
    txt_all_n = txt_n if txt_all is txt else F.normalize(txt_all, dim=1)
    pos = torch.arange(img.shape[0], device=img.device) + offset
    # The scale multiplies the queries in fp32 and rounds once to the input dtype; autograd gives d/d logit_scale.
    i2t = contrastive_rows_loss((img_n.float() * scale).to(img.dtype), txt_all_n, pos, impl=impl)
    t2i = contrastive_rows_loss((txt_n.float() * scale).to(img.dtype), img_all_n, pos, impl=impl)
    return 0.5 * (i2t.mean() + t2i.mean())


def clip_loss_ref(img: Tensor, txt: Tensor, logit_scale: Tensor, *, img_all: Tensor | None = None,
                  txt_all: Tensor | None = None, offset: int = 0, upcast: bool = False) -> Tensor:
    """Naive CLIP loss with the (n, N) logits matrices, open_clip style. Same contract as `clip_loss`."""
    img_all, txt_all, offset = _check(img, txt, logit_scale, img_all, txt_all, offset)
    if upcast:
        img, txt, img_all, txt_all = img.float(), txt.float(), img_all.float(), txt_all.float()
    scale = logit_scale.exp().reshape(()).to(img.dtype) if not upcast else logit_scale.float().exp().reshape(())
    labels = torch.arange(img.shape[0], device=img.device) + offset
    logits_per_image = scale * F.normalize(img, dim=1) @ F.normalize(txt_all, dim=1).T
    logits_per_text = scale * F.normalize(txt, dim=1) @ F.normalize(img_all, dim=1).T
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))
