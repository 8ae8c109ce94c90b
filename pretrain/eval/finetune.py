"""Fine-tuning: the whole encoder plus a linear classifier trained on the labelled split (MAE's main protocol).

Where the frozen-feature protocols ask what the features already separate, fine-tuning asks how good a starting point
the weights are. A copy of the encoder is trained (the original is left as it is) with AdamW under a cosine schedule,
weight decay except on 1-D parameters (biases, norms), and for a ViT optionally with layer-wise lr decay (MAE's and
BEiT's fine-tuning: 0.75 / 0.65 for ViT-B; ``pretrain.optim.param_groups``), in train mode (BatchNorm statistics
adapt), on the training images as they are; the test accuracy is reported. BatchNorm's running statistics are then
computed again over the training images with the final weights (PreciseBN, as pycls and Detectron do): the running
averages lag weights that moved fast, and after a short fine-tuning (a few hundred images, ~25 steps) they had left
the network predicting one class for every test image, a chance score for weights that had learned (0.80 with the
batches' own statistics). Seeded: the same call gives the same number.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.optim import build_optimizer, param_groups


def finetune_top1(encoder: nn.Module, train_images: torch.Tensor, train_y, test_images: torch.Tensor, test_y, *,
                  epochs: int = 10, lr: float = 1e-3, weight_decay: float = 0.05, batch_size: int = 64,
                  layer_decay: float = 1.0, seed: int = 0) -> float:
    """Test top-1 after fine-tuning a copy of ``encoder`` (``(B, C, H, W) -> (B, embed_dim)``) with a new linear head
    on ``train_images: (N, C, H, W)`` / ``train_y: (N,)`` for ``epochs`` epochs; ``layer_decay`` < 1: a ViT's block i
    of depth learns at layer_decay ** (depth - i) of ``lr``, its embeddings at layer_decay ** (depth + 1), the head at
    ``lr``."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    train_y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    test_y = torch.as_tensor(np.asarray(test_y), dtype=torch.long)
    if train_images.shape[0] != train_y.shape[0] or test_images.shape[0] != test_y.shape[0]:
        raise ValueError("images and labels must have the same first dimension")
    classes = int(max(train_y.max(), test_y.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(encoder).requires_grad_(True)  # every weight, also one that pretraining froze (MoCo v3's)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # the head's init, dropout / drop-path draws: seeded, without touching the caller's RNG
        head = nn.Linear(model.embed_dim, classes).to(device)
        net = nn.Sequential(model, head)
        opt = build_optimizer(param_groups(net, weight_decay, layer_decay=layer_decay), "adamw", lr)
        steps = epochs * math.ceil(train_images.shape[0] / batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        net.train()
        for _ in range(epochs):
            order = torch.randperm(train_images.shape[0], generator=gen)
            for start in range(0, order.numel(), batch_size):
                idx = order[start : start + batch_size]
                if idx.numel() < 2:
                    continue  # BatchNorm cannot train on one sample
                loss = F.cross_entropy(net(train_images[idx].to(device)), train_y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        _recompute_batchnorm(net, train_images, batch_size, device)
        net.eval()
        with torch.no_grad():
            preds = torch.cat([net(test_images[i : i + 512].to(device)).argmax(1).cpu()
                               for i in range(0, test_images.shape[0], 512)])
    return float((preds == test_y).float().mean())


def _recompute_batchnorm(net: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> None:
    """Replace the running mean and variance of every BatchNorm layer of ``net`` with their average over ``images``
    (in batches of ``batch_size``) under the current weights; the other layers run in eval mode meanwhile (no dropout
    draws). No-op for a net without BatchNorm (a ViT)."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    net.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every batch weighs the same
        m.train()
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            if images.shape[0] - start >= 2:  # (a batch of one has no variance)
                net(images[start : start + batch_size].to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
