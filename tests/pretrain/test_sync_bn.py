"""pretrain.sync_bn on 2 real gloo processes: each rank holding half of a batch gives what BatchNorm gives the whole
batch in one process (outputs, gradients of the parameters and the inputs, running statistics), for BatchNorm1d and
2d, over two training steps and then in evaluation mode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain.sync_bn import SyncBatchNorm, convert_sync_bn
from tests.util import spawn_ranks

WORLD, PER_RANK = 2, 4


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6),
                        nn.BatchNorm1d(6, momentum=None))  # momentum None: the cumulative average
    with torch.no_grad():  # BatchNorm's affine parameters away from 1 and 0, so their gradients are all exercised
        for bn in (net[1], net[5]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    # a large offset: the centred second pass keeps the variance exact where E[x^2] - E[x]^2 would lose it
    return 3 + torch.randn(WORLD * PER_RANK, 3, 6, 6, generator=g) * 2, torch.randn(WORLD * PER_RANK, 6, generator=g)


def _step(net: nn.Module, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Output, parameter gradients and input gradient of the mean over the samples of (out * w).sum(1)."""
    x = x.clone().requires_grad_(True)
    out = net(x)
    net.zero_grad()
    (out * w).sum(1).mean().backward()
    return out.detach(), {k: p.grad.clone() for k, p in net.named_parameters()}, x.grad


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    net = convert_sync_bn(_net())
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    steps = []
    for step in range(2):
        x, w = _data(step)
        out, grads, x_grad = _step(net, x[rows], w[rows])
        for g in grads.values():  # what DeepSpeed does with parameter gradients: the mean over ranks
            torch.distributed.all_reduce(g)
            g /= WORLD
        steps.append({"out": out, "grads": grads, "x_grad": x_grad})
    net.eval()
    x, _ = _data(5)
    torch.save({"steps": steps, "state": net.state_dict(), "eval": net(x[rows]).detach(),
                "types": [type(m).__name__ for m in net]}, f"{root}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("syncbn")
    spawn_ranks(_worker, WORLD, str(root))
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _reference() -> tuple[list[dict], dict, torch.Tensor]:
    net = _net()
    steps = []
    for step in range(2):
        x, w = _data(step)
        out, grads, x_grad = _step(net, x, w)
        steps.append({"out": out, "grads": grads, "x_grad": x_grad})
    net.eval()
    return steps, net.state_dict(), net(_data(5)[0]).detach()


def test_two_ranks_normalise_as_one_batch(ranks):
    steps, state, evaluated = _reference()
    assert ranks[0]["types"][1] == "SyncBatchNorm" and ranks[0]["types"][5] == "SyncBatchNorm"
    for r, got in enumerate(ranks):
        rows = slice(r * PER_RANK, (r + 1) * PER_RANK)
        for step, want in enumerate(steps):
            mine = got["steps"][step]
            torch.testing.assert_close(mine["out"], want["out"][rows], rtol=1e-5, atol=1e-5)
            for k, g in want["grads"].items():
                torch.testing.assert_close(mine["grads"][k], g, rtol=1e-4, atol=1e-6, msg=f"rank {r} step {step} {k}")
            # each rank's input gradient is that of the sum of both ranks' losses: twice the mean loss's
            torch.testing.assert_close(mine["x_grad"] / WORLD, want["x_grad"][rows], rtol=1e-4, atol=1e-7)
        for k, v in state.items():  # running statistics of the whole batch (unbiased variance), the same on each rank
            torch.testing.assert_close(got["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(got["eval"], evaluated[rows], rtol=1e-5, atol=1e-5)


def test_per_rank_batchnorm_would_differ(ranks):
    """The check above can fail: each rank normalising by its own half gives other outputs and statistics."""
    steps, state, _ = _reference()
    net = _net()
    x, w = _data(0)
    out, _, _ = _step(net, x[:PER_RANK], w[:PER_RANK])
    assert not torch.allclose(out, steps[0]["out"][:PER_RANK], atol=1e-3)


def test_conversion_keeps_tensors_and_keys():
    """The converted module holds the very parameters and buffers (an EMA pairing by parameter order survives) and
    saves BatchNorm's keys; out of a process group it is plain BatchNorm."""
    net = _net()
    params, keys = list(net.parameters()), list(net.state_dict())
    converted = convert_sync_bn(net)
    assert all(a is b for a, b in zip(converted.parameters(), params, strict=True))
    assert list(converted.state_dict()) == keys
    assert isinstance(converted[1], SyncBatchNorm) and converted[1].running_mean is net[1].running_mean
    plain = _net()
    x, w = _data(0)
    torch.testing.assert_close(_step(converted, x, w)[0], _step(plain, x, w)[0])
    alone = convert_sync_bn(nn.BatchNorm1d(3).eval())
    assert isinstance(alone, SyncBatchNorm) and not alone.training


def test_recipes_that_ask_for_it_convert():
    """model.sync_bn: build_method converts every BatchNorm of the method (backbone, heads, an EMA target) when it is
    distributed, none otherwise."""
    from pretrain.config import load_config
    from pretrain.trainer import build_method

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "byol_digits.yaml", ["model.sync_bn=true"])
    # distributed=True outside a process group: converted, and running as plain BatchNorm
    method = build_method(cfg, distributed=True)
    norms = [m for m in method.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, SyncBatchNorm) for m in norms)
    assert not any(isinstance(m, SyncBatchNorm) for m in build_method(cfg, distributed=False).modules())
