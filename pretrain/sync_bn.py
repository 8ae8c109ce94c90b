"""BatchNorm over the global batch: in training, each layer's mean and variance are those of every rank's samples
together (SimCLR's and BYOL's "global BN"; per-GPU statistics let a contrastive network tell the ranks' samples
apart, and at 128 images a GPU they are noisy).

torch's ``nn.SyncBatchNorm`` runs on CUDA only, so a CPU run (and this project's tests) would train another model than
a GPU run; this one is the same code on gloo and NCCL: two differentiable all-reduces per layer and forward (the sum
with the count, then the centred sum of squares, which keeps the variance exact where E[x^2] - E[x]^2 would cancel).
Its backward sums each rank's share of the statistics' gradient, so averaging parameter gradients over ranks
afterwards (DeepSpeed) gives the gradient of the mean loss over the global batch, as with BatchNorm on the whole
batch in one process. Parameters, buffers and state-dict keys are BatchNorm's: checkpoints and ``backbone.pt`` load
into the plain module. Evaluation mode (running statistics) and a world of one are plain BatchNorm.

Which modules to convert is decided outside the model (``pretrain.trainer.build_method``, from ``model.sync_bn``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from pretrain import dist


class SyncBatchNorm(_BatchNorm):
    """BatchNorm{1,2,3}d whose training statistics are those of ``group``'s whole batch. x: (N, C, *)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, group: torch.distributed.ProcessGroup | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.group = group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects (N, C, *) input, got shape {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.world_size(self.group) > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()  # statistics in fp32 also under bf16 autocast, as torch's BatchNorm keeps them
        count = torch.full((1,), x.numel() // x.shape[1], dtype=torch.float32, device=x.device)
        total = dist.all_reduce_sum_with_grad(torch.cat([xf.sum(dims), count]), self.group)
        n = total[-1].detach()  # >= 2: a world of 2 or more, each rank with a sample (no host sync to check it)
        mean = total[:-1] / n
        centered = xf - mean.view(shape)
        var = dist.all_reduce_sum_with_grad(centered.square().sum(dims), self.group) / n
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * (n / (n - 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return out.to(x.dtype)


def convert_sync_bn(module: nn.Module, group: torch.distributed.ProcessGroup | None = None) -> nn.Module:
    """``module`` with every BatchNorm replaced by a SyncBatchNorm over ``group`` that holds the same parameter and
    buffer tensors (an EMA teacher's pairing with its student, which follows parameter order, is kept); returns the
    converted module (a new one when ``module`` itself is a BatchNorm)."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, group=group)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_bn(child, group))
    return out
