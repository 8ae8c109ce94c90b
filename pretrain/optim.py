"""The optimizers a recipe can name (``optim.name``): torch's AdamW, and LARS for SimCLR and BYOL at large batch.

LARS (You et al., 2017) as SimCLR and BYOL run it (their TF LARS and optax's ``lars``): the weight decay is added to
the gradient, the sum is rescaled per parameter by the trust ratio ``eta x ||w|| / ||g + wd w||`` (1 where either norm
is 0), times the learning rate, and then accumulated with heavy-ball momentum, the step being the accumulated update.
Biases and normalisation parameters (1-D: the group ``pretrain.engine.param_groups`` gives no weight decay) take
neither the decay nor the trust ratio, as in both papers.

The trust ratio needs each parameter whole, so LARS runs under ZeRO stage 0 only: stages 1-3 hand the optimizer flat
partitions that mix parameters (the config refuses the combination).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


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
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 1e-3) -> None:
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(f"LARS: bad hyperparameters lr={lr} momentum={momentum} weight_decay={weight_decay} "
                             f"trust_coefficient={trust_coefficient}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        lars=True)
        super().__init__(params, defaults)

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
                    w_norm, u_norm = torch.linalg.vector_norm(weight), torch.linalg.vector_norm(update)
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), eta * w_norm / u_norm, torch.ones_like(w_norm))
                    update = update * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(update)
                velocity = state["momentum_buffer"]
                velocity.mul_(momentum).add_(update, alpha=lr)
                p.sub_(velocity.to(p.dtype))
        return loss


def build_optimizer(groups: list[dict], name: str, lr: float, **hyper) -> torch.optim.Optimizer:
    """``optim.name``'s optimizer over ``groups`` (``pretrain.engine.param_groups``: the decaying groups are the ones
    LARS adapts; a group's learning rate is ``lr`` x its ``lr_mult``), with ``hyper``: AdamW's betas, or LARS's
    momentum and trust_coefficient."""
    groups = [{**g, "lr": lr * g.get("lr_mult", 1.0)} for g in groups]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **hyper)
    if name == "lars":
        groups = [{**g, "lars": bool(g.get("decay"))} for g in groups]
        return LARS(groups, lr=lr, **hyper)
    raise ValueError(f"optim.name: unknown optimizer {name!r}")
