"""The contract between a pretext task and the trainer.

The trainer knows only ``method(batch)["loss"]``, ``method.on_step_start(step, max_steps)`` (schedules read before the
forward), ``method.on_step_end(step, max_steps)`` (EMA teachers, centers: after the optimizer step) and
``method.backbone`` (the encoder that downstream tasks use). With gradient accumulation several forwards (micro-batches)
make one step: what a method folds in after the step it averages over them (``StepMean``). A method owns its heads,
any teacher and its EMA, and never decides how it is distributed: cross-rank communication is passed in as ``gather``
and ``reduce``. Whatever a method schedules by step is a function of the step alone, so a resumed run continues every
schedule exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pretrain.models import build_backbone

if TYPE_CHECKING:
    from pretrain.config import Config

Gather = Callable[[Tensor], Tensor]
"""(n, D) on each rank -> (world * n, D) in rank order, differentiable (see pretrain.dist.gather_with_grad)."""
Reduce = Callable[[Tensor], Tensor]
"""A float tensor -> its mean over ranks, no autograd (see pretrain.dist.all_reduce_mean)."""


def build_method_backbone(cfg: Config, *, masks: bool = False, in_chans: int | None = None) -> nn.Module:
    """The backbone of ``cfg.model`` for ``cfg.data``'s images (``in_chans`` channels instead of the data's, for a
    method that feeds it something else: colorization's lightness). A ViT gets a mask token only for a method that
    masks (``masks``): an unused one would be a parameter without a gradient."""
    kwargs = dict(cfg.model.backbone_kwargs)
    if cfg.model.backbone.startswith("vit"):
        kwargs.setdefault("use_mask_token", masks)
    return build_backbone(cfg.model.backbone, image_size=cfg.data.image_size,
                          in_chans=cfg.data.channels if in_chans is None else in_chans,
                          patch_size=cfg.model.patch_size, **kwargs)


def projector_and_predictor(cfg: Config, in_dim: int, *, predictor_last_bn: bool = False
                            ) -> tuple[nn.Module, nn.Module]:
    """The projector of ``cfg.model`` (``proj_*``, ``proj_last_bn``) on features of width ``in_dim``, and the 2-layer
    predictor (``method.predictor_hidden_dim`` wide) from its output back to its width: BYOL's, MoCo v3's, NNCLR's and
    SimSiam's heads. ``predictor_last_bn``: the predictor too ends in a bias-free Linear and a BatchNorm without affine
    parameters (MoCo v3's ViT predictor)."""
    from pretrain.heads import ProjectionHead

    mc = cfg.model
    projector = ProjectionHead(in_dim, hidden_dim=mc.proj_hidden_dim, out_dim=mc.proj_out_dim,
                               num_layers=mc.proj_layers, last_bn=mc.proj_last_bn)
    predictor = ProjectionHead(mc.proj_out_dim, hidden_dim=cfg.method.predictor_hidden_dim, out_dim=mc.proj_out_dim,
                               num_layers=2, last_bn=predictor_last_bn)
    return projector, predictor


def require_vit(cfg: Config, what: str) -> None:
    """Raise the one-line config error of a method that needs a ViT backbone (``what``: "mae masks patches of")."""
    if not cfg.model.backbone.startswith("vit"):
        raise ValueError(f"model.backbone: {what} a ViT (vit_tiny, vit_small, vit_base, vit_large, vit_huge), got "
                         f"{cfg.model.backbone!r}")


def require_one_view(cfg: Config, what: str) -> None:
    """Raise the one-line config error of a method that uses one view per image (``what``: "mae reconstructs")."""
    d = cfg.data
    if d.num_views != 1 or d.local_views:
        raise ValueError(f"data.num_views: {what} one view per image (set data.num_views: 1 and no local_views), got "
                         f"{d.num_views} global and {d.local_views} local")


def require_two_views(cfg: Config, what: str) -> None:
    """Raise the one-line config error of a method that takes two global views per image and no local crops
    (``what``: "byol predicts one view from the other")."""
    d = cfg.data
    if d.num_views != 2 or d.local_views:
        raise ValueError(f"data.num_views: {what} (2 views, no local_views), got {d.num_views} global and "
                         f"{d.local_views} local")


def require_shared_queue(cfg: Config, name: str, what: str, paper: str) -> None:
    """Raise the one-line config error of a method that keeps ``what`` (e.g. "a queue of past keys"), a ring of
    every rank's embeddings of past batches (:func:`ring_enqueue_`): ``method.queue_size`` rows (``paper``: the
    paper's size) and ``method.gather_distributed`` on, so that every rank holds the same ring."""
    if cfg.method.queue_size < 1:
        raise ValueError(f"method.queue_size: {name} keeps {what}, this many rows (the paper's {paper}), got "
                         f"{cfg.method.queue_size}")
    if not cfg.method.gather_distributed:
        raise ValueError(f"method.gather_distributed: {name} needs it true: {what} holds every rank's rows, the same "
                         f"on every rank (a checkpoint keeps one copy of it)")


@torch.no_grad()
def ring_enqueue_(queue: Tensor, ptr: Tensor, rows: Tensor) -> int:
    """Write ``rows`` (every rank's, in rank order) into the ring ``queue`` (S, D) over its oldest rows, from row
    ``ptr`` (a 1-element long tensor) on, wrapping; of more than S rows the last S. Advances ``ptr`` past them and
    returns how many were written (NNCLR's support set, MoCo v2's queue of negatives)."""
    rows = rows.float()[-queue.shape[0]:]
    size, at = queue.shape[0], int(ptr)
    queue[(at + torch.arange(rows.shape[0], device=rows.device)) % size] = rows
    ptr.fill_((at + rows.shape[0]) % size)
    return rows.shape[0]


def require_no_kernel(cfg: Config, name: str) -> None:
    """Raise the one-line config error of a ``method.loss_impl`` other than auto for a method whose loss has no
    kernel to choose."""
    if cfg.method.loss_impl != "auto":
        raise ValueError(f"method.loss_impl: {name}'s loss has no kernel (leave it auto), got "
                         f"{cfg.method.loss_impl!r}")


def built_size_view(batch: dict, backbone: nn.Module, method: str, why: str) -> Tensor:
    """The one view of a method that masks on the backbone's patch grid: ``batch["views"][0]``, (B, C, H, W) at the
    size the ViT was built for; another size raises, naming ``method`` and ``why`` ("the decoder's positions are
    fixed")."""
    imgs = batch["views"][0]
    size = backbone.image_size
    if tuple(imgs.shape[-2:]) != (size, size):
        raise ValueError(f"{method}: views must be {size}x{size} ({why}), got {tuple(imgs.shape[-2:])}")
    return imgs


def each_view(views: Sequence[Tensor], *modules: Callable[[Tensor], Tensor]) -> Tensor:
    """Each view (B, ...) through ``modules`` in turn, a pass of its own per view -> the outputs concatenated in the
    views' order, (V * B, ...): rows [:B] are view 0's. A pass per view makes every BatchNorm layer (SyncBatchNorm over
    the ranks with ``model.sync_bn``) normalise a view by that view's own statistics and update its running statistics
    once per view, as the official code of BYOL, MoCo v3, SimSiam, NNCLR (solo-learn), Barlow Twins and VICReg does;
    one pass over ``torch.cat(views)`` would normalise the views by their joint statistics (SimCLR's official code,
    which keeps that)."""
    outs = []
    for x in views:
        for module in modules:
            x = module(x)
        outs.append(x)
    return torch.cat(outs)


def features_by_resolution(backbone: nn.Module, views: list[Tensor]) -> Tensor:
    """Multi-crop: every view through ``backbone``, one pass per run of views at the same resolution (the global
    views together, then the local crops) -> (V * B, D) in the views' order."""
    feats, i = [], 0
    while i < len(views):
        j = i
        while j < len(views) and views[j].shape[-2:] == views[i].shape[-2:]:
            j += 1
        feats.append(backbone(torch.cat(views[i:j])))
        i = j
    return torch.cat(feats)


class StepMean:
    """The mean of a statistic over the forwards of one optimizer step (one forward, or the micro-batches of gradient
    accumulation: ``optim.accum_steps``), for what a method folds in after the step (DINO's center, a prior)."""

    def __init__(self) -> None:
        self._sum: Tensor | None = None
        self._count = 0

    def add(self, value: Tensor) -> None:
        value = value.detach()
        self._sum = value.clone() if self._sum is None else self._sum + value
        self._count += 1

    def pop(self) -> Tensor | None:
        """The mean since the last pop (None if nothing was added), and start again."""
        if self._sum is None:
            return None
        mean, self._sum, self._count = self._sum / self._count, None, 0
        return mean


class SSLMethod(nn.Module):
    """Base class: subclasses set ``self.backbone`` and implement ``forward``."""

    backbone: nn.Module
    needs_text: bool = False
    """Trains on image-text pairs: the batch carries ``"text"`` (the captions), and the data must have them."""
    saves_model: bool = False
    """Used downstream whole, so a finished run also saves the whole method as ``model.pt`` beside ``backbone.pt``
    (CLIP: its text tower for zero-shot and search; a VQ-VAE: the tokenizer that BEiT runs load)."""
    reads_proj_last_bn: bool = False
    """Its projector ends in a BatchNorm without affine parameters where ``model.proj_last_bn`` is set (a method that
    does not read it refuses it: it would be ignored)."""
    config_keys: frozenset[str] = frozenset()
    """The ``method.*`` keys this method reads (besides ``name`` and ``gather_distributed``, which the trainer reads
    for every method): another one set for it would be ignored, and is refused (``check_method_keys``)."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise ``ValueError("section.key: problem")`` for settings this method cannot run with. Default: none."""

    @classmethod
    def check_inputs(cls, cfg: Config) -> None:
        """Raise ``ValueError`` for inputs outside the config that training reads (BEiT's tokenizer run); called where
        a run is prepared, before any worker starts (not on every config load: a finished run evaluates without
        them). Default: none."""

    def forward(self, batch: dict[str, Tensor | list[Tensor]]) -> dict[str, Tensor]:
        """Return a dict with a scalar ``loss`` plus detached values worth logging."""
        raise NotImplementedError

    def on_step_start(self, step: int, max_steps: int) -> None:
        """Set what the coming forward reads from schedules (``step`` counts the steps done). Default: nothing."""

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """Per-step updates outside the gradient (EMA teachers, centers), after optimizer step ``step``. Default:
        nothing."""
