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


def _group_worker(rank: int, port: int, root: str) -> None:
    """4 ranks, groups of 2: ranks 0-1 and 2-3 each normalise by their pair's batch; and a recipe's method built with
    model.sync_bn_group=2."""
    from pretrain.dist import consecutive_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=4)
    try:
        consecutive_group(3)
    except ValueError as err:  # raised by every rank before any group is made: no rank waits on another
        refused = str(err)
    net = convert_sync_bn(_net(), consecutive_group(2))
    x, w = _data(0)  # 8 samples: 2 a rank
    rows = slice(rank * 2, (rank + 1) * 2)
    out, _, x_grad = _step(net, x[rows], w[rows])
    from pretrain.config import load_config
    from pretrain.trainer import build_method

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "byol_digits.yaml",
                      ["model.sync_bn=true", "model.sync_bn_group=2", "job.num_workers=4"])
    built = build_method(cfg, distributed=True)  # the recipe's method: each BatchNorm over this rank's pair
    sizes = {torch.distributed.get_world_size(m.group) for m in built.modules() if isinstance(m, SyncBatchNorm)}
    torch.save({"out": out, "x_grad": x_grad, "state": net.state_dict(), "refused": refused, "sizes": sizes},
               f"{root}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_groups_of_ranks_normalise_as_their_own_batches(tmp_path):
    """model.sync_bn_group=2 over 4 ranks (SwAV's official BatchNorm groups of 8 GPUs, at 2): each pair of consecutive
    ranks gives what BatchNorm gives the pair's batch in one process, outputs, input gradients and running statistics,
    and the two pairs' statistics differ; a group size that does not divide the ranks is one line on every rank."""
    spawn_ranks(_group_worker, 4, str(tmp_path))
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    assert got[0]["refused"] == "model.sync_bn_group: 3 ranks a group does not divide the 4 ranks"
    assert all(g["sizes"] == {2} for g in got)  # build_method's conversion, from the config
    x, w = _data(0)
    for pair in (0, 1):
        rows = slice(pair * 4, pair * 4 + 4)
        net = _net()
        out, _, x_grad = _step(net, x[rows], w[rows])
        for r in (2 * pair, 2 * pair + 1):
            mine = slice((r - 2 * pair) * 2, (r - 2 * pair) * 2 + 2)
            torch.testing.assert_close(got[r]["out"], out[mine], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[r]["x_grad"] / 2, x_grad[mine], rtol=1e-4, atol=1e-7)  # the pair's 2 losses
            for k, v in net.state_dict().items():
                torch.testing.assert_close(got[r]["state"][k], v, rtol=1e-5, atol=1e-6, msg=f"rank {r} {k}")
    assert not torch.allclose(got[0]["state"]["1.running_mean"], got[2]["state"]["1.running_mean"])


def test_a_group_size_is_checked_against_the_workers():
    """model.sync_bn_group needs model.sync_bn, must divide job.num_workers where it is fewer, and is every rank where
    it is as many or more (a recipe's 8 on a run of 2 workers)."""
    from pretrain.config import ConfigError, load_config

    recipe = Path(__file__).resolve().parents[2] / "configs" / "byol_digits.yaml"
    for sets, message in ((["model.sync_bn=false", "model.sync_bn_group=2"], "model.sync_bn_group: groups the ranks "
                           "of model.sync_bn's statistics: set model.sync_bn=true too"),
                          (["model.sync_bn=true", "model.sync_bn_group=4", "job.num_workers=6"], "model.sync_bn_group: "
                           "4 ranks a group does not divide job.num_workers 6"),
                          (["model.sync_bn_group=-1"], "model.sync_bn_group: must be >= 0 (0 = every rank), got -1")):
        with pytest.raises(ConfigError) as err:
            load_config(recipe, sets)
        assert str(err.value) == message
    assert load_config(recipe, ["model.sync_bn=true", "model.sync_bn_group=8", "job.num_workers=2"])
    swav = load_config(Path(__file__).resolve().parents[2] / "configs" / "swav_resnet50_imagenet.yaml")
    assert swav.model.sync_bn and swav.model.sync_bn_group == 8
