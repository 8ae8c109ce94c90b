"""DINO inside real DeepSpeed engines on 2 gloo processes: the EMA teacher and the center under ZeRO 0, 2 and 3.

ZeRO-3 keeps only a partition of each parameter between steps (and small ones whole, ``ds_persist``), so the EMA must
work on what ZeRO keeps; stage 0 (every parameter whole on every rank) is the reference every stage must match.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from tests.util import spawn_ranks

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "dino_digits.yaml"
WORLD = 2
STAGES = (0, 2, 3)
STEPS = 4


def _cfg(stage: int):
    # freeze 2 steps (frozen prototypes under every stage), a steep temperature warmup, a fast teacher; the ConvNet's
    # BatchNorm weights are small enough that ZeRO-3 keeps them whole (ds_persist) while the convs are partitioned;
    # BatchNorm over both ranks' batches (model.sync_bn) inside the engines of every stage.
    return load_config(RECIPE, [f"zero.stage={stage}", "data.batch_size=8", f"job.max_steps={STEPS + 2}",
                                "optim.warmup_steps=1", "optim.lr=1e-2", "method.num_prototypes=96",
                                "model.proj_hidden_dim=32", "model.proj_out_dim=16",
                                "model.backbone_kwargs={width: 0.25}", "method.freeze_last_layer_steps=2",
                                "method.warmup_teacher_temp_steps=3", "method.teacher_momentum=0.5",
                                "model.sync_bn=true"])


def _views(rank: int, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return [torch.randn(8, 1, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(8, 1, 8, 8, generator=g) for _ in range(4)]


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    from pretrain.checkpoint import full_state_dict, load_checkpoint, save_checkpoint
    from pretrain.engine import build_engine
    from pretrain.eval.monitor import KnnMonitor
    from pretrain.trainer import build_method

    def step(engine, i: int) -> float:
        engine.module.on_step_start(i, STEPS + 2)
        loss = engine({"views": _views(rank, i)})["loss"]
        engine.backward(loss)
        engine.step()
        engine.module.on_step_end(i, STEPS + 2)
        return loss.item()

    def states(engine) -> dict:
        return {"teacher": full_state_dict(engine, engine.module.teacher),
                "student": full_state_dict(engine, engine.module.student),
                "center": engine.module.center.detach().clone()}

    for stage in STAGES:
        cfg = _cfg(stage)
        engine = build_engine(build_method(cfg, distributed=True), cfg)
        init = states(engine)
        losses = [step(engine, i) for i in range(2)]
        frozen = states(engine)  # after the 2 steps with frozen prototypes
        losses += [step(engine, i) for i in range(2, STEPS - 1)]
        save_checkpoint(engine, f"{root}/ckpt{stage}", {"step": STEPS - 1})
        trained = states(engine)
        # the kNN monitor on the live (partitioned) teacher backbone, between two steps: ranks hold 899 and 898 of
        # the 1797 digits, in batches of 449 rank 0 runs 3 and rank 1 pads with a throwaway third
        knn = KnnMonitor(cfg, rank=rank, world_size=WORLD, device=torch.device("cpu"), batch_size=449)
        scores = knn(engine.module.backbone)
        losses.append(step(engine, STEPS - 1))

        fresh = build_engine(build_method(cfg, distributed=True), cfg)
        load_checkpoint(fresh, f"{root}/ckpt{stage}")
        restored = states(fresh)
        resumed_loss = step(fresh, STEPS - 1)
        torch.save({"init": init, "frozen": frozen, "trained": trained, "restored": restored, "losses": losses,
                    "resumed_loss": resumed_loss, "knn": scores}, f"{root}/stage{stage}-rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dino_engine")
    spawn_ranks(_worker, WORLD, str(root))
    return {"root": root, **{(s, r): torch.load(root / f"stage{s}-rank{r}.pt", weights_only=False) for s in STAGES
                             for r in range(WORLD)}}


def _close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{what}: {k}")


@pytest.mark.parametrize("stage", STAGES[1:])
def test_zero_stage_matches_stage_0(stage, results):
    """Losses, student, EMA teacher and center after 3 steps under ZeRO-{2,3} equal those of stage 0 on both ranks."""
    ref, got = results[(0, 0)], results[(stage, 0)]
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-4)
    for part in ("student", "teacher"):
        _close(got["trained"][part], ref["trained"][part], f"stage {stage} {part}")
    torch.testing.assert_close(got["trained"]["center"], ref["trained"]["center"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stage", STAGES)
def test_teacher_moved_and_center_is_global(stage, results):
    """The teacher moved from its init (the EMA ran) but is not the student (momentum > 0); the center, an EMA of the
    teacher mean averaged over ranks, and the BatchNorm statistics (model.sync_bn: the global batch's) are the same on
    both ranks although their batches differ."""
    r0, r1 = results[(stage, 0)], results[(stage, 1)]
    init, trained = r0["init"]["teacher"], r0["trained"]["teacher"]
    conv = next(k for k in init if k.startswith("backbone.") and k.endswith("weight") and init[k].ndim == 4)
    assert not torch.allclose(trained[conv], init[conv])
    assert not torch.allclose(trained[conv], r0["trained"]["student"][conv])
    assert r0["trained"]["center"].abs().sum() > 0
    torch.testing.assert_close(r0["trained"]["center"], r1["trained"]["center"], rtol=0, atol=0)
    stats = [k for k in r0["trained"]["student"] if k.endswith(("running_mean", "running_var"))]
    assert len(stats) >= 8 and all(r0["trained"]["student"][k].abs().sum() > 0 for k in stats)
    for part in ("student", "teacher"):
        for k in stats:
            torch.testing.assert_close(r0["trained"][part][k], r1["trained"][part][k], rtol=1e-6, atol=1e-7)
    assert r0["losses"] != pytest.approx(r1["losses"], rel=1e-3)  # different data per rank


@pytest.mark.parametrize("stage", STAGES)
def test_prototypes_frozen_then_trained(stage, results):
    """During the 2 frozen steps the prototypes keep their directions (the rest of the head trains); the next step
    moves them."""
    r = results[(stage, 0)]
    unit = [torch.nn.functional.normalize(r[k]["student"]["head.last_layer.weight_v"], dim=1)
            for k in ("init", "frozen", "trained")]
    torch.testing.assert_close(unit[1], unit[0], rtol=1e-5, atol=1e-6)
    gain = [r[k]["student"]["head.last_layer.weight_g"] for k in ("init", "frozen")]
    torch.testing.assert_close(gain[1], gain[0], rtol=0, atol=0)  # trainable here (norm_last_layer: false)
    assert not torch.allclose(unit[2], unit[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(r["frozen"]["student"]["head.mlp.0.weight"], r["init"]["student"]["head.mlp.0.weight"])


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_restores_teacher_center_and_next_step(stage, results):
    """A fresh engine loaded from the checkpoint has the same teacher, student and center, and its next step gives the
    loss the uninterrupted engine gave."""
    r = results[(stage, 0)]
    for part in ("student", "teacher"):
        for k, v in r["trained"][part].items():
            assert torch.equal(v, r["restored"][part][k]), f"{part}.{k}"
    assert torch.equal(r["trained"]["center"], r["restored"]["center"])
    assert r["resumed_loss"] == pytest.approx(r["losses"][-1], rel=1e-6)  # the monitor before that step changed nothing


@pytest.mark.parametrize("stage", STAGES)
def test_knn_monitor_on_the_live_teacher(stage, results):
    """The monitor's kNN top-1, computed on 2 ranks from the engine's teacher backbone as it trains (under ZeRO-3 from
    its partitions), is the kNN top-1 of the end-of-run evaluation of that teacher's full weights; rank 1 gets None."""
    from pretrain.eval.dataset import load_eval_set
    from pretrain.eval.digits import split_indices
    from pretrain.eval.knn import knn_top1
    from pretrain.eval.report import extract_features
    from pretrain.trainer import build_method

    cfg = _cfg(stage)
    backbone = build_method(cfg, distributed=False).backbone
    teacher = results[(stage, 0)]["trained"]["teacher"]
    backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in teacher.items() if k.startswith("backbone.")})
    evalset = load_eval_set(cfg)
    feats = extract_features(backbone, evalset.images)
    train, test = split_indices(evalset.labels, seed=0)
    expected = knn_top1(feats[train], evalset.labels[train], feats[test], evalset.labels[test])
    assert results[(stage, 0)]["knn"]["knn_top1"] == pytest.approx(expected, abs=1 / len(test) + 1e-9)
    assert results[(stage, 1)]["knn"] is None


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_merges_offline(stage, results):
    """The checkpoint both ranks wrote, merged in this one process without DeepSpeed engines (pretrain extract's
    path): the whole method (student, the frozen EMA teacher, the center buffer) exactly as it was saved."""
    from pretrain.checkpoint import consolidated_state_dict
    from pretrain.trainer import build_method

    method = build_method(_cfg(stage), distributed=False)
    method.load_state_dict(consolidated_state_dict(results["root"] / f"ckpt{stage}", stage))
    saved = results[(stage, 0)]["trained"]
    for part in ("student", "teacher"):  # (full_state_dict: floating entries in fp32, BatchNorm's counts int64)
        merged = {k: v.float() if v.is_floating_point() else v for k, v in getattr(method, part).state_dict().items()}
        _close(merged, saved[part], f"stage {stage} {part}")
    assert torch.equal(method.center, saved["center"])
