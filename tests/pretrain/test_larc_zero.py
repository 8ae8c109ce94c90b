"""pretrain.optim.LARC (SwAV's optimizer) through the DeepSpeed engine under ZeRO 2 and 3 on 2 real gloo processes:
the flat partitions split parameters between the ranks, and each parameter's norms are summed over them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from tests.util import spawn_ranks

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
STAGES = (2, 3)


def _cfg(stage: int):
    """SimCLR on digits with a tiny ResNet, LARC over every parameter decaying (as the SwAV recipe), the weight decay
    moving along its schedule, BatchNorm over both ranks."""
    return load_config(ROOT / "configs" / "simclr_digits.yaml", [
        f"zero.stage={stage}", "zero.precision=fp32", "data.batch_size=8", "job.max_steps=10", "optim.warmup_steps=2",
        "optim.name=larc", "optim.lr=0.3", "optim.weight_decay=1e-3", "optim.weight_decay_end=0.5",
        "optim.decay_norms_and_biases=true", "optim.grad_clip=0", "model.sync_bn=true",
        "model.backbone_kwargs={width: 0.25}", "model.proj_hidden_dim=32"])


def _split(engine) -> int:
    """How many trained parameters this rank's ZeRO partitions hold only a part of."""
    zero = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        return sum(p.ds_tensor.numel() < p.ds_numel for group in zero.fp16_groups for p in group)
    return sum(p._hp_mapping is not None and p._hp_mapping.hp_fragment_address.numel < p.numel()
               for group in zero.bit16_groups for p in group)


def _worker(rank: int, port: int, root: str) -> None:
    """Per stage: 3 steps through the engine beside the same method stepped by plain LARC (and the schedule) on
    gradients averaged over the ranks by hand."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    from pretrain.checkpoint import full_state_dict
    from pretrain.engine import Schedule, build_engine, optimizer_hyper, peak_lr
    from pretrain.optim import build_optimizer, config_param_groups
    from pretrain.trainer import build_method

    for stage in STAGES:
        cfg = _cfg(stage)
        engine = build_engine(build_method(cfg, distributed=True), cfg)
        ref = build_method(cfg, distributed=True)
        opt = build_optimizer(config_param_groups(ref, cfg.optim), "larc", peak_lr(cfg, WORLD), **optimizer_hyper(cfg))
        schedule = Schedule(opt, cfg, WORLD)
        g = torch.Generator().manual_seed(30 + rank)
        for _ in range(3):
            batch = {"views": [torch.randn(8, 1, 16, 16, generator=g) for _ in range(2)]}
            engine.backward(engine(batch)["loss"])
            engine.step()
            ref(batch)["loss"].backward()
            for p in ref.parameters():
                torch.distributed.all_reduce(p.grad)
                p.grad /= WORLD
            opt.step()
            opt.zero_grad()
            schedule.step()
        trained = full_state_dict(engine, engine.module)
        inner = engine.optimizer.optimizer
        if rank == 0:
            torch.save({"optimizer": type(inner).__name__, "partitioned": inner.partitioned is not None,
                        "split": _split(engine), "decays": sorted({gr["weight_decay"] for gr in inner.param_groups}),
                        "engine": trained, "reference": ref.state_dict(),
                        "init": build_method(cfg, distributed=False).state_dict()}, f"{root}/larc-zero{stage}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("larc_zero")
    spawn_ranks(_worker, WORLD, str(root))
    return root


@pytest.mark.parametrize("stage", STAGES)
def test_larc_under_zero_steps_as_plain_larc(results, stage):
    """LARC under ZeRO ``stage``, whose flat partitions split parameters between the 2 ranks: the weights after 3
    steps are those of plain LARC on whole parameters and the ranks' averaged gradients, to float rounding (a rate
    from one rank's pieces would not match); every parameter decays, at the scheduled weight decay."""
    r = torch.load(results / f"larc-zero{stage}.pt", weights_only=False)
    assert r["optimizer"] == "LARC" and r["partitioned"] and r["split"] >= 1
    assert len(r["decays"]) == 1 and r["decays"][0] > 1e-3  # the schedule moved every group's decay
    for k, v in r["engine"].items():
        ref = r["reference"][k]
        torch.testing.assert_close(v, ref.float() if ref.is_floating_point() else ref, rtol=1e-5, atol=1e-6, msg=k)
    stats = ("running_mean", "running_var")
    moved = [k for k, v in r["init"].items() if v.is_floating_point() and not k.endswith(stats)]
    assert len(moved) >= 10 and all(not torch.equal(r["engine"][k], r["init"][k].float()) for k in moved)
