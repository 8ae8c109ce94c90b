"""The optimizers a recipe can name (``optim.name``): torch's AdamW, LARS for SimCLR and BYOL at large batch, LARC for
SwAV, and torch's SGD with momentum (SimSiam's, MoCo's; elementwise, so any ZeRO stage); the param groups they take
(``param_groups``: weight decay on weights only, layer-wise learning rates of a ViT, parameters whose rate is held at
its peak).

LARS (You et al., 2017) as SimCLR and BYOL run it (their TF LARS and optax's ``lars``): the weight decay is added to
the gradient, the sum is rescaled per parameter by the trust ratio ``eta x ||w|| / ||g + wd w||`` (1 where either norm
is 0), times the learning rate, and then accumulated with heavy-ball momentum, the step being the accumulated update.
Biases and normalisation parameters (1-D: the groups ``param_groups`` gives no weight decay) take
neither the decay nor the trust ratio, as in both papers (with ``optim.decay_norms_and_biases`` they decay, still
without the trust ratio).

LARC as the official SwAV code runs it: apex's ``LARC(SGD(model.parameters(), momentum=0.9, weight_decay=wd),
trust_coefficient=0.001, clip=False)``. It differs from LARS three ways: every parameter of every group is adapted,
biases and norms too (no lars / no-lars split), and decayed at its group's weight decay (the SwAV recipe decays every
one: ``optim.decay_norms_and_biases``); the rate is ``eta x ||w|| / (||g|| + wd ||w|| + 1e-8)``, the decay's norm
added to the gradient's rather than taken of their sum (where either norm is 0 the gradient passes unscaled and
undecayed); and the learning rate multiplies the momentum buffer (torch's SGD: ``v = m v + u; w -= lr v``), so a
schedule also rescales the velocity already gathered, where LARS's lr sits inside it.

Under ZeRO 1-3 the optimizer sees flat fp32 partitions that mix parameters and split some over ranks; the trust ratio
needs each parameter's norms whole. ``LARS.partitioned`` (``pretrain.engine`` sets it from the ZeRO optimizer's
layout; LARC, a LARS, takes it too) says where each parameter's piece lies in a partition; a step then sums the pieces'
squared norms over the data-parallel ranks (one all-reduce of 2 numbers per parameter and partition) and scales each
piece by its parameter's ratio: the step of plain LARS (LARC) on whole parameters, to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from pretrain.config import ConfigError
from pretrain.models.vit import VisionTransformer


class Fragments(NamedTuple):
    """Where the parameters of one flat partition lie: piece i is ``flat[starts[i]:starts[i] + numels[i]]``, a part of
    parameter ``index[i]`` of the ``count`` parameters that the ranks of ``group`` (a process group) split between
    their partitions. Every rank of the group steps its own partition of the same ``count`` parameters at once; the
    per-parameter sums are reduced on ``index``'s device (the accelerator under NCCL, also where the partitions are
    offloaded to the CPU)."""

    index: torch.Tensor  # (pieces,) int64, on the device the sums are reduced on
    starts: list[int]
    numels: list[int]
    count: int
    group: object

    @classmethod
    def of(cls, pieces: Sequence[tuple[int, int, int]], count: int, group, device: torch.device) -> Fragments:
        """From (parameter, start, numel) per piece."""
        return cls(torch.tensor([i for i, _, _ in pieces], dtype=torch.int64, device=device),
                   [s for _, s, _ in pieces], [n for _, _, n in pieces], count, group)


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with momentum.

    Per parameter ``w`` with gradient ``g``, in a group with ``lars=True``::

        u = g + weight_decay * w
        u = u * trust_coefficient * ||w|| / ||u||     (when ||w|| > 0 and ||u|| > 0)
        v = momentum * v + lr * u
        w = w - v

    Groups with ``lars=False`` (biases, norms) take ``v = momentum * v + lr * g`` (their weight decay, normally 0,
    still added). The lr sits inside the momentum, as in SimCLR's and BYOL's LARS: a learning-rate schedule scales
    new updates, not the velocity already gathered.

    ``partitioned``: None for whole parameters; under ZeRO 1-3, a function from a flat partition the optimizer steps
    to its ``Fragments``; the norms are then summed over the partitions' ranks (a step is collective).
    """

    GROUP_DEFAULTS: dict = {"lars": True}
    """Param-group settings beyond the hyperparameters, for groups that do not give them."""

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 1e-3) -> None:
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(f"{type(self).__name__}: bad hyperparameters lr={lr} momentum={momentum} "
                             f"weight_decay={weight_decay} trust_coefficient={trust_coefficient}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        **self.GROUP_DEFAULTS)
        super().__init__(params, defaults)
        self.partitioned: Callable[[torch.Tensor], Fragments] | None = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["trust_coefficient"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.float()
                weight = p.float()
                if wd:
                    update = update.add(weight, alpha=wd)
                if group["lars"]:
                    if self.partitioned is None:
                        update = update * _trust_ratio(torch.linalg.vector_norm(weight),
                                                       torch.linalg.vector_norm(update), eta)
                    else:  # scales its pieces in place: never the gradient itself
                        update = _scale_fragments(weight, update.clone() if update is p.grad else update, eta,
                                                  self.partitioned(p))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(update)
                velocity = state["momentum_buffer"]
                velocity.mul_(momentum).add_(update, alpha=lr)
                p.sub_(velocity.to(p.dtype))
        return loss


def _trust_ratio(w_norm: torch.Tensor, u_norm: torch.Tensor, eta: float) -> torch.Tensor:
    """eta x ||w|| / ||u||, elementwise over the norms; 1 where either is 0."""
    return torch.where((w_norm > 0) & (u_norm > 0), eta * w_norm / u_norm, torch.ones_like(w_norm))


def _scale_fragments(weight: torch.Tensor, update: torch.Tensor, eta: float, where: Fragments) -> torch.Tensor:
    """``update`` (a flat partition's; scaled in place) with each piece scaled by its whole parameter's trust ratio, the
    norms summed over the ranks of ``where.group`` from each rank's pieces. Collective: every rank calls it."""
    w_pieces, u_pieces = _pieces(weight, where), _pieces(update, where)
    ratio = _trust_ratio(*_whole_norms(w_pieces, u_pieces, where).unbind(1), eta).to(update.device)  # (pieces,)
    for piece, r in zip(u_pieces, ratio):
        piece.mul_(r)
    return update


def _pieces(flat: torch.Tensor, where: Fragments) -> list[torch.Tensor]:
    """Views of ``flat``'s pieces of ``where``'s parameters."""
    return [flat.narrow(0, start, numel) for start, numel in zip(where.starts, where.numels)]


def _whole_norms(a_pieces: list[torch.Tensor], b_pieces: list[torch.Tensor], where: Fragments) -> torch.Tensor:
    """(pieces, 2): the norms of the whole parameters (of two tensors of theirs: weights and updates or gradients) that
    the pieces are parts of, their squares summed over the ranks of ``where.group`` in one all-reduce, on
    ``where.index``'s device. Collective: every rank calls it, with or without pieces."""
    sums = torch.zeros(where.count, 2, dtype=torch.float32, device=where.index.device)  # per parameter: ||a||², ||b||²
    if a_pieces:
        norms = torch.stack([torch.stack(torch._foreach_norm(pieces)) for pieces in (a_pieces, b_pieces)], dim=1)
        sums.index_add_(0, where.index, norms.square().to(sums.device))
    torch.distributed.all_reduce(sums, group=where.group)
    return sums.sqrt()[where.index]


class LARC(LARS):
    """apex's ``LARC(clip=False)`` around torch's SGD with momentum (no dampening, no Nesterov), as the official SwAV
    code trains. Per parameter ``w`` with gradient ``g`` of every group, ``wd`` its group's weight decay (read at each
    step: the schedule may move it)::

        if ||w|| > 0 and ||g|| > 0:
            g = (g + wd * w) * trust_coefficient * ||w|| / (||g|| + wd * ||w|| + eps)
        v = momentum * v + g        (v = g at the first step)
        w = w - lr * v

    The lr outside the momentum, as torch's SGD: a schedule scales the velocity already gathered too. A LARS for
    ``partitioned`` (ZeRO 1-3: the norms summed over the partitions' ranks) and ``pretrain.engine``; no ``lars`` flag:
    every parameter is adapted.
    """

    GROUP_DEFAULTS = {"eps": 1e-8}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, wd, eta, eps = (group[k] for k in ("lr", "momentum", "weight_decay", "trust_coefficient",
                                                               "eps"))
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, weight = p.grad.float(), p.float()
                if self.partitioned is None:
                    update = _larc_update(grad, weight, torch.linalg.vector_norm(weight),
                                          torch.linalg.vector_norm(grad), wd, eta, eps)
                else:  # piece by piece, each with its whole parameter's norms; elements in no piece (padding) as is
                    where = self.partitioned(p)
                    w_pieces, g_pieces = _pieces(weight, where), _pieces(grad, where)
                    norms = _whole_norms(w_pieces, g_pieces, where).to(grad.device)
                    update = grad.clone()
                    for piece, g, w, (w_norm, g_norm) in zip(_pieces(update, where), g_pieces, w_pieces, norms):
                        piece.copy_(_larc_update(g, w, w_norm, g_norm, wd, eta, eps))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(update)
                velocity = state["momentum_buffer"]
                velocity.mul_(momentum).add_(update)
                p.add_(velocity.to(p.dtype), alpha=-lr)
        return loss


def _larc_update(g: torch.Tensor, w: torch.Tensor, w_norm: torch.Tensor, g_norm: torch.Tensor, wd: float, eta: float,
                 eps: float) -> torch.Tensor:
    """apex LARC's (clip=False) gradient for SGD: ``(g + wd w) x eta ||w|| / (||g|| + wd ||w|| + eps)``; ``g`` itself
    (undecayed) where either norm is 0. The norms are 0-d tensors: no host sync."""
    adapt = (w_norm > 0) & (g_norm > 0)
    rate = torch.where(adapt, eta * w_norm / (g_norm + w_norm * wd + eps), torch.ones_like(w_norm))
    return (g + w * torch.where(adapt, wd, 0.0)) * rate


def param_groups(model: nn.Module, weight_decay: float, *, layer_decay: float = 1.0,
                 patch_embed_lr_mult: float = 1.0, fixed_lr: Sequence[str] = (),
                 decay_norms_and_biases: bool = False, norm_bias_lr_mult: float = 1.0) -> list[dict]:
    """No weight decay on 1-D parameters: biases, norm weights, LayerScale gains (as DINO's and DINOv2's groups; a ViT's
    cls token and position embeddings are 3-D and decay, as there too), unless ``decay_norms_and_biases`` (as torch's
    SGD over every parameter in the official SimSiam and MoCo v2 code); the groups that decay are marked ``decay: True``
    for the schedule; with ``decay_norms_and_biases``, where the decay no longer tells them apart, the groups of weights
    (more than one dimension) are marked ``matrix: True`` for LARS's adaptation. Each group's ``lr_mult`` scales the
    scheduled learning rate: 1 everywhere unless ``layer_decay`` < 1 (layer-wise decay: BEiT's, DINOv2's 0.9), which
    gives a ViT's parameters layer_decay ** (depth + 1 - layer) of it (``VisionTransformer.layer_id``: the last block
    layer_decay, the embeddings layer_decay ** (depth + 1), the last norm 1), or ``patch_embed_lr_mult`` (DINOv2's 0.2)
    != 1, which multiplies the patch projection's; parameters outside a ViT (heads, decoders) keep the full rate; the
    1-D parameters' multiplier is also times ``norm_bias_lr_mult`` (Barlow Twins' 0.0048 / 0.2). The parameters under a
    name prefix of ``fixed_lr`` (SimSiam's ``predictor``) go in groups marked ``fixed_lr: True``, whose rate the
    schedule holds at its peak after the warmup; ConfigError if a prefix names no trainable parameter. One group per
    (weights or not, multiplier, fixed), in a fixed order: the weights' groups first, fastest first, fixed last (without
    options: the two groups of old)."""
    vits = {prefix: m for prefix, m in model.named_modules() if isinstance(m, VisionTransformer)}
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    check_param_prefixes([name for name, _ in trainable], fixed_lr, "optim.fixed_lr")
    groups: dict[tuple[bool, float, bool], list] = {(True, 1.0, False): [], (False, norm_bias_lr_mult, False): []}
    for name, p in trainable:
        mult = 1.0
        owner = max((prefix for prefix in vits if not prefix or name.startswith(prefix + ".")), key=len, default=None)
        if owner is not None:  # the innermost ViT holding it
            vit, local = vits[owner], name[len(owner) + 1:] if owner else name
            mult = layer_decay ** (len(vit.blocks) + 1 - vit.layer_id(local))
            if local.startswith("patch_embed."):
                mult *= patch_embed_lr_mult
        if p.ndim <= 1:
            mult *= norm_bias_lr_mult
        groups.setdefault((p.ndim > 1, mult, _under(name, fixed_lr)), []).append(p)
    out = []
    for (matrix, mult, fixed), params in sorted(groups.items(), key=lambda kv: (kv[0][2], not kv[0][0], -kv[0][1])):
        decay = matrix or decay_norms_and_biases
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0, "decay": decay, "lr_mult": mult}
        if decay_norms_and_biases:
            group["matrix"] = matrix
        if fixed:
            group["fixed_lr"] = True
        out.append(group)
    return out


def config_param_groups(model: nn.Module, o) -> list[dict]:
    """``param_groups`` with every option of ``o`` (an ``OptimConfig``): the groups the engine trains."""
    return param_groups(model, o.weight_decay, layer_decay=o.layer_decay, patch_embed_lr_mult=o.patch_embed_lr_mult,
                        fixed_lr=o.fixed_lr, decay_norms_and_biases=o.decay_norms_and_biases,
                        norm_bias_lr_mult=o.norm_bias_lr_mult)


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def check_fixed_lr(cfg) -> None:
    """ConfigError for an ``optim.fixed_lr`` prefix that names no trainable parameter of ``cfg``'s method, built on the
    meta device (milliseconds, no memory), before any worker starts. Where the method cannot be built there (a BEiT
    tokenizer run), the workers' ``param_groups`` check the same."""
    if not cfg.optim.fixed_lr:
        return
    from pretrain.methods import METHODS

    try:
        with torch.device("meta"):
            method = METHODS[cfg.method.name](cfg)
    except Exception:  # noqa: BLE001
        return
    names = [name for name, p in method.named_parameters() if p.requires_grad]
    check_param_prefixes(names, cfg.optim.fixed_lr, "optim.fixed_lr")


def check_param_prefixes(names: Sequence[str], prefixes: Sequence[str], key: str) -> None:
    """ConfigError naming ``key`` for a prefix of ``prefixes`` under which none of the parameter ``names`` lies (a
    prefix is a whole dotted component: ``predictor`` holds ``predictor.0.weight``, not ``predictors.0.weight``)."""
    for prefix in prefixes:
        if not any(_under(name, [prefix]) for name in names):
            tops = sorted({name.split(".")[0] for name in names})
            raise ConfigError(f"{key}: {prefix!r} names no trainable parameter of the model (its top-level modules "
                              f"with trainable parameters: {', '.join(tops)})")


def build_optimizer(groups: list[dict], name: str, lr: float, **hyper) -> torch.optim.Optimizer:
    """``optim.name``'s optimizer over ``groups`` (``param_groups``: the decaying groups are the ones
    LARS adapts, LARC adapting every group; a group's learning rate is ``lr`` x its ``lr_mult``), with ``hyper``:
    AdamW's betas, LARS's and LARC's momentum and trust_coefficient, or SGD's momentum."""
    groups = [{**g, "lr": lr * g.get("lr_mult", 1.0)} for g in groups]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **hyper)
    if name == "lars":  # adapts the weights (the decaying groups unless every parameter decays)
        groups = [{**g, "lars": bool(g.get("matrix", g.get("decay")))} for g in groups]
        return LARS(groups, lr=lr, **hyper)
    if name == "larc":  # every parameter adapted, at its group's decay
        return LARC(groups, lr=lr, **hyper)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, **hyper)
    raise ValueError(f"optim.name: unknown optimizer {name!r}")
