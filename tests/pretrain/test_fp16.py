"""zero.precision fp16: DeepSpeed engines at every ZeRO stage (and ZeRO 2 and 3 offloaded to the CPU) against torch's
own AMP loop (autocast to float16, a GradScaler, gradients averaged over the ranks, unscaled, clipped, stepped), on 2
real gloo processes: the same losses, loss scales and updates, a step whose gradients overflow skipped by both, the
schedule moving on at it; the scale through a checkpoint; a run whose gradients are never finite stopped.

Updates agree within 1e-3: weights ~1e-7 apart (clipping's norm summed in another order) can round to different
halves in the fp16 forward, which turns them into ~1e-4 of the next update. With ``zero.reduce_dtype: autocast``
DeepSpeed reduces the gradients of Linear and Conv layers in fp16, the reference in fp32: the first step's gradients
differ by that rounding (2e-4), and from the next the fp16 forward, whose weights then round to other halves here and
there, turns that into gradients a few % apart: that case is held to the same scales and skips, and updates within 20%
(DeepSpeed's own fp16 GradScaler under ZeRO, which LossScale replaces, made clipped updates 2**16 times too small: an
error of 1)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from tests.util import config_error, spawn_ranks

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "simclr_digits.yaml"
WORLD = 2
STAGES = (0, 1, 2, 3)
CASES = (*((stage, "fp32", "none") for stage in STAGES), (2, "autocast", "none"),
         (2, "fp32", "cpu"), (3, "fp32", "cpu"))
"""(ZeRO stage, zero.reduce_dtype, zero.offload)."""
FACTORS = (1.0, 1.0, 1e4, 1.0, 1.0, 1.0)
"""The loss is multiplied by these at each step: at the third, 1e4 x the loss scale overflows fp16 in the backward
(the scale-driven overflow a real fp16 run meets), so that step's gradients are inf."""
INIT = 2.0**10  # below the 2**16 of a run, at which this small model's first steps overflow (and are skipped) anyway
GROWTH = 2  # the scale doubles after 2 finite steps in a row (2000 in a run), to see it grow within the test
CLIP = 0.05  # below the gradient norm of every step: clipping is on throughout


def _cfg(stage: int, *extra: str):
    return load_config(RECIPE, [f"zero.stage={stage}", "zero.precision=fp16", "data.batch_size=8", "job.max_steps=10",
                                "optim.name=sgd", "optim.lr=0.5", "optim.warmup_steps=3", f"optim.grad_clip={CLIP}",
                                "model.backbone_kwargs={width: 0.25}", "model.proj_hidden_dim=32", *extra])


def _batches(rank: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(10 + rank)
    return [{"views": [torch.randn(8, 1, 16, 16, generator=g) for _ in range(2)]} for _ in range(n)]


def _params(engine, module) -> dict[str, torch.Tensor]:
    """The trained parameters of ``module`` (not BatchNorm's statistics), whole."""
    from pretrain.checkpoint import full_state_dict

    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v.clone() for k, v in full_state_dict(engine, module).items() if k in names}


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    for stage, reduce, offload in CASES:
        _against_amp(rank, stage, reduce, offload, root)
    for stage in (0, 2):
        _collapse(rank, stage, root)
    torch.distributed.destroy_process_group()


def _against_amp(rank: int, stage: int, reduce: str, offload: str, root: str) -> None:
    from pretrain.checkpoint import load_checkpoint, save_checkpoint
    from pretrain.engine import LossScale, Schedule, build_engine, optimizer_hyper, peak_lr
    from pretrain.optim import build_optimizer, config_param_groups
    from pretrain.trainer import build_method, schedule_lr

    cfg = _cfg(stage, f"zero.reduce_dtype={reduce}", f"zero.offload={offload}")
    torch.manual_seed(0)
    method = build_method(cfg, distributed=True)
    ref = copy.deepcopy(method)
    engine = build_engine(method, cfg)
    assert engine.fp16_scale is not None
    engine.fp16_scale = LossScale(engine, init_scale=INIT, growth_interval=GROWTH)
    opt = build_optimizer(config_param_groups(ref, cfg.optim), "sgd", peak_lr(cfg, WORLD), **optimizer_hyper(cfg))
    sched = Schedule(opt, cfg, WORLD)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT, growth_interval=GROWTH)
    batches = _batches(rank, len(FACTORS) + 2)
    buckets = sorted(str(d) for d in getattr(engine.optimizer, "ipg_buckets", {}))  # ZeRO 1-2: a reduction per dtype
    got = {"loss": [], "scale": [], "applied": [], "lr": [], "params": []}
    want = {"loss": [], "scale": [], "lr": [], "norm": [], "params": []}
    init = {k: v.detach().clone() for k, v in ref.backbone.named_parameters()}

    def engine_step(e, i):
        out = e(batches[i])
        e.backward(out["loss"] * FACTORS[i] if i < len(FACTORS) else out["loss"])
        e.step()
        return out["loss"].item(), e.fp16_scale.update()

    for i, factor in enumerate(FACTORS):
        loss, applied = engine_step(engine, i)
        got["loss"].append(loss)
        got["applied"].append(applied)
        got["scale"].append(engine.fp16_scale.scale)
        got["lr"].append(schedule_lr(engine))
        got["params"].append(_params(engine, engine.module.backbone))

        with torch.autocast("cpu", dtype=torch.float16):
            out = ref(batches[i])
        scaler.scale(out["loss"] * factor).backward()
        for p in ref.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(WORLD)
        scaler.unscale_(opt)
        want["norm"].append(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP).item())
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=True)
        want["loss"].append(out["loss"].item())
        want["scale"].append(scaler.get_scale())
        want["lr"].append(max(g["lr"] for g in opt.param_groups))
        want["params"].append({k: v.detach().clone() for k, v in ref.backbone.named_parameters()})

    # the scale through a checkpoint: a fresh engine loads it and both take the next steps alike
    save_checkpoint(engine, f"{root}/ckpt{stage}{reduce}{offload}", {"loss_scale": engine.fp16_scale.state_dict()})
    fresh = build_engine(build_method(cfg, distributed=True), cfg)
    fresh.fp16_scale = LossScale(fresh, init_scale=INIT, growth_interval=GROWTH)
    state = load_checkpoint(fresh, f"{root}/ckpt{stage}{reduce}{offload}")
    fresh.fp16_scale.load_state_dict(state["loss_scale"])
    restored = fresh.fp16_scale.state_dict()
    after = []
    for e in (engine, fresh):
        for i in range(len(FACTORS), len(FACTORS) + 2):
            engine_step(e, i)
        after.append((e.fp16_scale.state_dict(), _params(e, e.module.backbone)))
    if rank == 0:
        torch.save({"got": got, "want": want, "init": init, "saved": state["loss_scale"], "restored": restored,
                    "after": after, "buckets": buckets}, f"{root}/stage{stage}-{reduce}-{offload}.pt")


def _collapse(rank: int, stage: int, root: str) -> None:
    """Gradients that are NaN at every scale (a loss x NaN): the third skipped step in a row stops the run on both
    ranks, with the message."""
    from pretrain.engine import LossScale, LossScaleCollapsed, build_engine
    from pretrain.trainer import build_method

    cfg = _cfg(stage)
    engine = build_engine(build_method(cfg, distributed=True), cfg)
    engine.fp16_scale = LossScale(engine, max_skipped_in_a_row=3)
    message = None
    for i, batch in enumerate(_batches(rank, 3)):
        out = engine(batch)
        engine.backward(out["loss"] * float("nan"))
        engine.step()
        try:
            engine.fp16_scale.update()
        except LossScaleCollapsed as e:
            message = (i, str(e))
            break
    torch.save(message, f"{root}/collapse{stage}-{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    spawn_ranks(_worker, WORLD, str(root))
    return root


def _update_error(got: dict, want: dict, init: dict) -> float:
    """|the engine's update - the reference's| / |the reference's|, over every parameter since the start."""
    g = torch.cat([(got[k] - init[k]).flatten() for k in init])
    w = torch.cat([(want[k] - init[k]).flatten() for k in init])
    return ((g - w).norm() / w.norm()).item()


@pytest.mark.parametrize(("stage", "reduce", "offload"), CASES)
def test_every_stage_steps_as_torch_amp_with_the_same_scale(results, stage, reduce, offload):
    r = torch.load(results / f"stage{stage}-{reduce}-{offload}.pt", weights_only=False)
    got, want, init = r["got"], r["want"], r["init"]
    assert min(want["norm"][:2] + want["norm"][3:]) > CLIP  # clipping on at every applied step
    assert got["applied"] == [True, True, False, True, True, True]
    assert got["scale"] == want["scale"] == [INIT, 2 * INIT, INIT, INIT, 2 * INIT, 2 * INIT]
    assert got["lr"] == pytest.approx(want["lr"], rel=1e-6)  # the schedule moved on at the skipped step
    assert got["lr"][2] != got["lr"][3]
    tol = 1e-3 if reduce == "fp32" else 0.2  # the module docstring
    if stage in (1, 2):
        assert r["buckets"] == (["torch.float16", "torch.float32"] if reduce == "autocast" else ["torch.float32"])
    assert got["loss"] == pytest.approx(want["loss"], rel=tol)
    errors = [_update_error(g, w, init) for g, w in zip(got["params"], want["params"])]
    assert max(errors) < tol, errors
    assert all(torch.equal(got["params"][2][k], got["params"][1][k]) for k in init)  # no update at the overflow
    moved = max((got["params"][-1][k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-3  # SGD at 0.5 with clipped gradients: updates of the clip's size, not 2**16 times smaller


@pytest.mark.parametrize(("stage", "reduce", "offload"), CASES)
def test_the_scale_comes_back_from_a_checkpoint(results, stage, reduce, offload):
    r = torch.load(results / f"stage{stage}-{reduce}-{offload}.pt", weights_only=False)
    assert r["saved"]["scale"] == 2 * INIT and r["saved"]["skipped"] == 1 and r["saved"]["good"] == 1
    assert {k: r["restored"][k] for k in ("scale", "good", "skipped", "in_a_row")} == \
        {k: r["saved"][k] for k in ("scale", "good", "skipped", "in_a_row")}
    (cont_state, cont), (res_state, res) = r["after"]
    assert cont_state == res_state
    assert cont_state["scale"] == 4 * INIT and cont_state["good"] == 1  # doubled at the first step after (good 2)
    assert all(torch.equal(cont[k], res[k]) for k in cont)


@pytest.mark.parametrize("stage", (0, 2))
def test_gradients_never_finite_stop_the_run_on_every_rank(results, stage):
    for rank in range(WORLD):
        i, message = torch.load(results / f"collapse{stage}-{rank}.pt", weights_only=False)
        assert i == 2
        assert "not finite at 3 steps in a row" in message and "zero.precision bf16 or fp32" in message
        assert f"{2.0**13:g}" in message  # 2**16 halved three times


def test_precision_names_fp16():
    assert load_config(RECIPE, ["zero.precision=fp16"]).zero.precision == "fp16"
    assert "must be auto, fp32, bf16 or fp16, got 'fp8'" in config_error(RECIPE, ["zero.precision=fp8"])
    assert "zero.reduce_dtype: must be fp32 or autocast, got 'bf16'" in config_error(RECIPE, ["zero.reduce_dtype=bf16"])
