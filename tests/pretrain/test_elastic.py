"""Resuming on another number of ranks: a ZeRO checkpoint of N ranks converted to DeepSpeed's universal form
(``pretrain.checkpoint.to_universal``) and loaded by engines of M ranks, on real gloo processes, for DINO (an EMA
teacher that ZeRO-3 partitions without training it, a center buffer, BatchNorm over the global batch) under ZeRO 2 and 3
with AdamW (and ZeRO-3 offloaded to the CPU), LARS (its momentum carried through DeepSpeed's Adam-only converter under
Adam's names; its trust ratio from partitions of another layout after the move) under ZeRO 2 and 3, SGD under ZeRO-1,
and ZeRO 0 loaded as it is.

The check is exact continuation: the same global batches split over 2 ranks or given whole to 1 make the same steps,
so a run that goes 2 ranks -> checkpoint -> 1 rank (and 1 -> 2) must end where the uninterrupted run ends. Without the
optimizer's moments, or with the teacher or the center lost in the conversion, it would not.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pretrain.config import load_config
from tests.util import free_port

ROOT = Path(__file__).resolve().parents[2]
CASES = ((0, "adamw"), (2, "adamw"), (3, "adamw"), (2, "lars"), (3, "lars"), (1, "sgd"), (3, "adamw-offload"))
"""(ZeRO stage, optim.name, with "-offload" for zero.offload cpu); ZeRO-0 checkpoints hold every parameter whole: they
load under any number of ranks as they are."""
ZERO = [case for case in CASES if case[0] > 0]
GLOBAL = 8  # images per view in a global batch: 4 on each of 2 ranks, or 8 on 1
STEPS = 6


def _cfg(stage: int, optim: str, world: int):
    name, offload = optim.removesuffix("-offload"), "cpu" if optim.endswith("-offload") else "none"
    return load_config(ROOT / "configs" / "dino_digits.yaml", [
        f"zero.stage={stage}", f"optim.name={name}", f"zero.offload={offload}", f"data.batch_size={GLOBAL // world}",
        f"job.max_steps={STEPS}",
        "optim.warmup_steps=1", "optim.lr=1e-2", "method.num_prototypes=96", "model.proj_hidden_dim=32",
        "model.proj_out_dim=16", "model.backbone_kwargs={width: 0.25}", "method.freeze_last_layer_steps=1",
        "method.warmup_teacher_temp_steps=3", "method.teacher_momentum=0.5", "model.sync_bn=true"])


def _views(step: int, rank: int, world: int) -> list[torch.Tensor]:
    """Global batch ``step`` (2 global crops, 4 local ones), this rank's share of it."""
    g = torch.Generator().manual_seed(step)
    views = [torch.randn(GLOBAL, 1, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(GLOBAL, 1, 8, 8, generator=g) for _ in range(4)]
    share = GLOBAL // world
    return [v[rank * share:(rank + 1) * share] for v in views]


def _phase(rank: int, world: int, port: int, root: str, phase: str) -> None:
    """One group of ``world`` ranks, for each stage: ``a`` trains steps 0-1 from the init, checkpoints, goes on to step
    3; ``b`` loads a's checkpoint (in universal form under ZeRO 1-3), takes steps 2-3, checkpoints, goes on to step 5;
    ``c`` loads b's likewise and takes steps 4-5, checkpoints, and a fresh engine loads that checkpoint (plain: the
    next resume at this size)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from pretrain.checkpoint import full_state_dict, load_checkpoint, save_checkpoint
    from pretrain.engine import build_engine
    from pretrain.trainer import build_method

    def step(engine, i: int) -> None:
        engine.module.on_step_start(i, STEPS)
        engine.backward(engine({"views": _views(i, rank, world)})["loss"])
        engine.step()
        engine.module.on_step_end(i, STEPS)

    def state(engine) -> dict:
        return full_state_dict(engine, engine.module)  # parameters (frozen teacher too) and buffers (the center)

    for stage, optim in CASES:
        cfg, case = _cfg(stage, optim, world), f"{optim}{stage}"
        results = {}
        start, source = {"a": (0, None), "b": (2, "a"), "c": (4, "b")}[phase]
        universal = source is not None and stage > 0
        engine = build_engine(build_method(cfg, distributed=world > 1), cfg, universal=universal)
        if source:
            load_checkpoint(engine, f"{root}/{source}-{case}", universal=universal)
            results["loaded"] = state(engine)
        for i in range(start, start + 2):
            step(engine, i)
        save_checkpoint(engine, f"{root}/{phase}-{case}", {"step": start + 2, "epoch": 0, "world_size": world})
        results[start + 2] = state(engine)
        if phase == "c":
            fresh = build_engine(build_method(cfg, distributed=world > 1), cfg)
            load_checkpoint(fresh, f"{root}/{phase}-{case}")
            results["reloaded"] = state(fresh)
        else:
            for i in range(start + 2, start + 4):
                step(engine, i)
            results[start + 4] = state(engine)
        if rank == 0:
            torch.save(results, f"{root}/{phase}-{case}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def phases(tmp_path_factory) -> dict:
    from pretrain.checkpoint import UNIVERSAL_TAG, to_universal

    root = tmp_path_factory.mktemp("elastic")
    converted = {}
    for phase, world in (("a", 2), ("b", 1), ("c", 2)):
        if phase != "a":  # the previous phase's checkpoints, in universal form
            for stage, optim in ZERO:
                ckpt = root / f"{'ab'[phase == 'c']}-{optim}{stage}"
                before = {p.name: p.stat().st_size for p in (ckpt / "state").iterdir()}
                out, seconds = to_universal(ckpt, stage)
                converted[(phase, f"{optim}{stage}")] = (out, seconds, before, {p.name: p.stat().st_size
                                                                    for p in (ckpt / "state").iterdir()})
                assert out == ckpt / UNIVERSAL_TAG and to_universal(ckpt, stage) == (out, 0.0)  # done once
        mp.spawn(_phase, args=(world, free_port(), str(root), phase), nprocs=world, join=True)
    return {"root": root, "converted": converted,
            **{(p, f"{o}{s}"): torch.load(root / f"{p}-{o}{s}.pt", weights_only=False)
               for p in "abc" for s, o in CASES}}


def _same(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{what}: {k}: {m}")


@pytest.mark.parametrize("stage, optim", CASES)
def test_two_ranks_resumed_on_one_continue_the_run(stage, optim, phases):
    """2 ranks' checkpoint of step 2, loaded by 1 rank: the model, teacher and center as saved, and steps 2-3 on the
    whole batches land where the 2 ranks went on to (which also needs Adam's moments or the momentum back)."""
    a, b = phases[("a", f"{optim}{stage}")], phases[("b", f"{optim}{stage}")]
    _same(b["loaded"], a[2], f"ZeRO-{stage} {optim} loaded on 1 rank")
    _same(b[4], a[4], f"ZeRO-{stage} {optim} step 4 on 1 rank")
    assert b["loaded"]["center"].abs().sum() > 0
    assert not torch.allclose(a[4]["teacher.backbone.features.0.weight"], a[2]["teacher.backbone.features.0.weight"])


@pytest.mark.parametrize("stage, optim", CASES)
def test_one_rank_resumed_on_two_continue_the_run(stage, optim, phases):
    """The 1-rank run's own checkpoint of step 4, loaded by 2 ranks: steps 4-5 on half batches land where the 1 rank
    went on to; the checkpoint that 2-rank engine writes loads plainly into a fresh one (the next resume)."""
    b, c = phases[("b", f"{optim}{stage}")], phases[("c", f"{optim}{stage}")]
    _same(c["loaded"], b[4], f"ZeRO-{stage} {optim} loaded on 2 ranks")
    _same(c[6], b[6], f"ZeRO-{stage} {optim} step 6 on 2 ranks")
    _same(c["reloaded"], c[6], f"ZeRO-{stage} {optim} reloaded")


@pytest.mark.parametrize("stage, optim", ZERO)
def test_conversion_leaves_the_zero_checkpoint_as_it_was(stage, optim, phases):
    """The universal form is written beside the ZeRO partitions, which stay as they were."""
    for phase in "bc":
        out, seconds, before, after = phases["converted"][(phase, f"{optim}{stage}")]
        assert seconds > 0 and before == after and any(out.iterdir())
        assert not out.with_name(out.name + ".partial").exists() and not out.with_name(out.name + ".input").exists()


@pytest.mark.parametrize("stage, optim", CASES)
def test_consolidated_state_is_the_whole_model(stage, optim, phases):
    """What `pretrain extract` and `pretrain eval --step` load from a checkpoint of any stage, offline: every parameter
    and buffer of the model as the engine held it when it saved (the frozen teacher too, which ZeRO-1's checkpoint
    lists nowhere but in its model states)."""
    from pretrain.checkpoint import consolidated_state_dict

    whole = consolidated_state_dict(phases["root"] / f"a-{optim}{stage}", stage)
    saved = phases[("a", f"{optim}{stage}")][2]
    assert whole.keys() == saved.keys() and any(k.startswith("teacher.") for k in whole)
    for k, v in saved.items():
        assert torch.equal(whole[k], v), k
