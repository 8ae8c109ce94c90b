"""The contract between a pretext task and the trainer.

The trainer knows only ``method(batch)["loss"]``, ``method.on_step_end(step, max_steps)`` and ``method.backbone``
(the encoder that downstream tasks use). A method owns its heads, any teacher and its EMA, and never decides how it is
distributed: cross-rank communication is passed in as ``gather``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

Gather = Callable[[Tensor], Tensor]
"""(n, D) on each rank -> (world * n, D) in rank order, differentiable (see pretrain.dist.gather_with_grad)."""


class SSLMethod(nn.Module):
    """Base class: subclasses set ``self.backbone`` and implement ``forward``."""

    backbone: nn.Module

    def forward(self, batch: dict[str, Tensor | list[Tensor]]) -> dict[str, Tensor]:
        """Return a dict with a scalar ``loss`` plus detached values worth logging."""
        raise NotImplementedError

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """Per-step updates outside the gradient (EMA teachers, centers, schedules). Default: nothing."""
