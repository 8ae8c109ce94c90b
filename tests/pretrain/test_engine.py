"""pretrain.engine: the DeepSpeed engine from config on 2 real gloo processes, for every ZeRO stage, with save/load."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import load_config
from tests.util import spawn_ranks

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "simclr_digits.yaml"
WORLD = 2



def _cfg(stage: int, precision: str, *extra: str, offload: str = "none"):
    return load_config(RECIPE, [f"zero.stage={stage}", f"zero.precision={precision}", f"zero.offload={offload}",
                                "data.batch_size=8",
                                "job.max_steps=10", "optim.warmup_steps=2", "optim.weight_decay_end=0.5",
                                "model.backbone_kwargs={width: 0.25}", "model.proj_hidden_dim=32", *extra])


CASES = ((0, "fp32", "none"), (1, "fp32", "none"), (2, "fp32", "none"), (3, "fp32", "none"), (2, "bf16", "none"),
         (2, "fp32", "cpu"), (3, "fp32", "cpu"))
"""(ZeRO stage, precision, offload); bf16 = torch.autocast inside DeepSpeed, which runs on the CPU too; offload cpu:
ZeRO-Offload's code path (the optimizer on CPU partitions, here beside a CPU module)."""


def _worker(rank: int, port: int, root: str) -> None:
    """Every stage in one pair of processes (importing DeepSpeed twice per stage would dominate the test)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    from pretrain import dist
    from pretrain.checkpoint import full_state_dict, load_checkpoint, save_checkpoint
    from pretrain.engine import build_engine
    from pretrain.trainer import build_method

    for stage, precision, offload in CASES:
        name = f"{stage}-{precision}-{offload}"
        _one_stage(stage, precision, offload, f"{root}/ckpt{name}", f"{root}/result{name}.pt", build_engine,
                   build_method, full_state_dict, load_checkpoint, save_checkpoint, dist.rank())
    _accumulation(rank, root, build_engine, build_method, full_state_dict)
    lars = ("optim.name=lars", "optim.lr=0.3", "optim.weight_decay=1e-3", "optim.grad_clip=0", "model.sync_bn=true",
            "optim.norm_bias_lr_mult=0.5")  # Barlow Twins' slower biases, here at half
    # SimSiam's recipe: SGD with momentum, here under ZeRO-2 (flat partitions: SGD is elementwise), its predictor's
    # rate fixed and every parameter decaying, as the paper's; a short run, for the cosine to fall by step 3
    sgd = load_config(ROOT / "configs" / "simsiam_digits.yaml", [
        "zero.stage=2", "data.batch_size=8", "job.max_steps=5", "optim.warmup_steps=2", "model.sync_bn=true",
        "optim.fixed_lr=[predictor]", "optim.decay_norms_and_biases=true", "optim.weight_decay=1e-2",
        "model.backbone_kwargs={width: 0.25}", "model.proj_hidden_dim=32", "model.proj_out_dim=32",
        "method.predictor_hidden_dim=8"])
    # LARS under ZeRO 1-3 too: each parameter's norms summed over the pieces the ranks' flat partitions hold
    lars_zero = [(f"lars-zero{stage}", _cfg(stage, "fp32", *lars)) for stage in (1, 2, 3)]
    lars_zero.append(("lars-zero2-offload", _cfg(2, "fp32", *lars, offload="cpu")))  # the CPU partitions
    # SwAV's LARC (every parameter adapted and decaying) under ZeRO 2 and 3, its norms summed over the pieces as LARS's
    larc = ("optim.name=larc", "optim.lr=0.3", "optim.weight_decay=1e-3", "optim.grad_clip=0", "model.sync_bn=true",
            "optim.decay_norms_and_biases=true")
    larc_zero = [(f"larc-zero{stage}", _cfg(stage, "fp32", *larc)) for stage in (2, 3)]
    for name, cfg in (("lars", _cfg(0, "fp32", *lars)), *lars_zero, *larc_zero, ("sgd", sgd)):
        _plain_optimizer(rank, root, name, cfg, build_engine, build_method, full_state_dict, load_checkpoint,
                         save_checkpoint)
    _moco_frozen_patches(rank, root, build_engine, build_method, full_state_dict, load_checkpoint, save_checkpoint)
    _swav_frozen_prototypes(rank, root, build_engine, build_method, full_state_dict, load_checkpoint, save_checkpoint)
    _layer_decay(rank, root, build_engine, build_method, full_state_dict, load_checkpoint, save_checkpoint)
    _ijepa(rank, root, build_engine, build_method, full_state_dict, load_checkpoint, save_checkpoint)
    _nnclr(rank, root, build_engine, build_method, load_checkpoint, save_checkpoint)
    _moco_v2(rank, root, build_engine, build_method, full_state_dict, load_checkpoint, save_checkpoint)
    _compiled(rank, root, build_engine, build_method, full_state_dict)
    torch.distributed.destroy_process_group()


def _compiled(rank: int, root: str, build_engine, build_method, full_state_dict) -> None:
    """SimCLR under ZeRO-2 for 3 steps eager and with model.compile on the same batches: losses, weights, and what
    Dynamo made of it. SGD: an update proportional to the gradient (AdamW's first steps are about lr x its sign, which
    turns rounding in a near-zero gradient into a whole step)."""
    from torch._dynamo.utils import counters

    out = {}
    for compiled in (False, True):
        cfg = _cfg(2, "fp32", f"model.compile={str(compiled).lower()}", "optim.name=sgd", "optim.lr=0.5")
        torch.manual_seed(0)
        engine = build_engine(build_method(cfg, distributed=True), cfg)
        g = torch.Generator().manual_seed(70 + rank)
        losses = []
        for _ in range(3):
            loss = engine({"views": [torch.randn(8, 1, 16, 16, generator=g) for _ in range(2)]})["loss"]
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        out[compiled] = {"losses": losses, "weights": full_state_dict(engine, engine.module),
                         "is_compiled": engine.module._compiled_call_impl is not None,
                         "graphs": counters["stats"]["unique_graphs"]}
    if rank == 0:
        torch.save(out, f"{root}/compiled.pt")


def _layer_decay(rank: int, root: str, build_engine, build_method, full_state_dict, load_checkpoint,
                 save_checkpoint) -> None:
    """iBOT with DINOv2's separate patch head, layer-wise lr decay 0.5 and the patch projection at 0.2 of its rate,
    under ZeRO-3, no warmup, weight decay or clipping: the weights before and after the first step (AdamW's first
    update of an element is lr x g / (|g| + eps): the group's lr where |g| >> eps); then a checkpoint converted to the
    universal form and loaded by a fresh engine (DeepSpeed's ZeRO-3 universal load gives every group the first one's
    settings: the multipliers must come back), and the next step from both."""
    from pretrain.checkpoint import to_universal
    from pretrain.trainer import optimizer_step

    cfg = load_config(ROOT / "configs" / "ibot_digits.yaml", [
        "zero.stage=3", "data.batch_size=8", "job.max_steps=10", "optim.warmup_steps=0", "optim.lr=1e-3",
        "optim.weight_decay=0", "optim.weight_decay_end=null", "optim.grad_clip=0", "optim.layer_decay=0.5",
        "optim.patch_embed_lr_mult=0.2", "method.patch_head=separate", "method.patch_prototypes=48",
        "method.num_prototypes=64", "method.freeze_last_layer_steps=0", "method.mask_prob=1.0",
        "model.proj_hidden_dim=32", "model.proj_out_dim=16",
        "model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2, global_pool: mean}"])
    engine = build_engine(build_method(cfg, distributed=True), cfg)
    g = torch.Generator().manual_seed(40 + rank)
    batches = [{"views": [torch.randn(8, 1, 16, 16, generator=g) for _ in range(2)] +
                [torch.randn(8, 1, 8, 8, generator=g) for _ in range(cfg.data.local_views)]} for _ in range(2)]
    init = full_state_dict(engine, engine.module.student)
    trained = [n for n, p in engine.module.student.named_parameters() if p.requires_grad]
    torch.manual_seed(50 + rank)
    optimizer_step(engine, iter(batches[:1]), 0, 10)
    first = full_state_dict(engine, engine.module.student)
    save_checkpoint(engine, f"{root}/ckpt-decay", {"step": 1, "epoch": 0})
    if rank == 0:
        to_universal(f"{root}/ckpt-decay", 3)
    torch.distributed.barrier()
    fresh = build_engine(build_method(cfg, distributed=True), cfg, universal=True)
    load_checkpoint(fresh, f"{root}/ckpt-decay", universal=True)
    groups = {name: [(gr.get("lr_mult"), gr["lr"], gr["weight_decay"]) for gr in e.optimizer.param_groups]
              for name, e in (("built", engine), ("loaded", fresh))}
    for e in (engine, fresh):
        torch.manual_seed(60 + rank)
        optimizer_step(e, iter(batches[1:]), 1, 10)
    if rank == 0:
        torch.save({"init": init, "first": first, "trained": trained, "groups": groups, "peak": cfg.optim.lr,
                    "continued": full_state_dict(engine, engine.module.student),
                    "resumed": full_state_dict(fresh, fresh.module.student)}, f"{root}/decay.pt")


def _ijepa(rank: int, root: str, build_engine, build_method, full_state_dict, load_checkpoint,
           save_checkpoint) -> None:
    """I-JEPA under ZeRO-3 (both encoders and the predictor partitioned, each rank drawing its own masks): the context
    encoder and the target encoder around 2 steps of linear momentum, then a checkpoint loaded by a fresh engine."""
    from pretrain.trainer import optimizer_step

    cfg = load_config(ROOT / "configs" / "ijepa_digits.yaml", [
        "zero.stage=3", "data.batch_size=8", "job.max_steps=10", "optim.warmup_steps=1", "method.teacher_momentum=0.5",
        "model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2, global_pool: mean, pos_embed: sincos}",
        "method.decoder_dim=16", "method.decoder_heads=2"])
    engine = build_engine(build_method(cfg, distributed=True), cfg)
    states = [{k: full_state_dict(engine, getattr(engine.module, k)) for k in ("encoder", "target")}]
    g = torch.Generator().manual_seed(70 + rank)
    batches = iter([{"views": [torch.randn(8, 1, 16, 16, generator=g)]} for _ in range(2)])
    torch.manual_seed(80 + rank)
    losses = []
    for step in range(2):
        losses.append(optimizer_step(engine, batches, step, 10)[0]["loss"].item())
        states.append({k: full_state_dict(engine, getattr(engine.module, k)) for k in ("encoder", "target")})
    save_checkpoint(engine, f"{root}/ckpt-ijepa", {"step": 2, "epoch": 0})
    fresh = build_engine(build_method(cfg, distributed=True), cfg)
    load_checkpoint(fresh, f"{root}/ckpt-ijepa")
    restored = {k: full_state_dict(fresh, getattr(fresh.module, k)) for k in ("encoder", "target")}
    if rank == 0:
        torch.save({"states": states, "restored": restored, "losses": losses}, f"{root}/ijepa.pt")


def _nnclr(rank: int, root: str, build_engine, build_method, load_checkpoint, save_checkpoint) -> None:
    """NNCLR under ZeRO-3 with bf16 autocast, a support set of 12 rows and a global batch of 8: 3 steps (the ring
    wraps), a checkpoint, and a fresh engine that loads it; then both take a 4th step on the same batch."""
    from pretrain.trainer import optimizer_step

    cfg = load_config(ROOT / "configs" / "nnclr_digits.yaml", [
        "zero.stage=3", "zero.precision=bf16", "data.batch_size=4", "job.max_steps=10", "optim.warmup_steps=1",
        "model.proj_hidden_dim=32", "model.proj_out_dim=16", "method.predictor_hidden_dim=24",
        "model.backbone_kwargs={width: 0.25}", "method.queue_size=12"])
    engine = build_engine(build_method(cfg, distributed=True), cfg)
    g = torch.Generator().manual_seed(90 + rank)
    batches = [{"views": [torch.randn(4, 1, 16, 16, generator=g) for _ in range(2)]} for _ in range(4)]
    losses = [optimizer_step(engine, iter(batches[step:]), step, 10)[0]["loss"].item() for step in range(3)]
    m = engine.module
    support = {"queue": m.queue.clone(), "ptr": int(m.queue_ptr), "filled": int(m.queue_filled)}
    save_checkpoint(engine, f"{root}/ckpt-nnclr", {"step": 3, "epoch": 0})
    fresh = build_engine(build_method(cfg, distributed=True), cfg)
    empty = int(fresh.module.queue_filled)
    load_checkpoint(fresh, f"{root}/ckpt-nnclr")
    f = fresh.module
    restored = {"queue": f.queue.clone(), "ptr": int(f.queue_ptr), "filled": int(f.queue_filled)}
    fourth = [optimizer_step(e, iter(batches[3:]), 3, 10)[0]["loss"].item() for e in (engine, fresh)]
    queues = [torch.empty_like(support["queue"]) for _ in range(2)]
    torch.distributed.all_gather(queues, support["queue"])
    if rank == 0:
        torch.save({"losses": losses, "support": support, "restored": restored, "empty": empty, "fourth": fourth,
                    "ranks_queues": queues}, f"{root}/nnclr.pt")


def _moco_v2(rank: int, root: str, build_engine, build_method, full_state_dict, load_checkpoint,
             save_checkpoint) -> None:
    """MoCo v2 with its recipe's SGD under ZeRO-3 (the momentum encoder partitioned, updated from partitions), a
    queue of 12 keys and a global batch of 8: 3 steps (the queue wraps), a checkpoint, a fresh engine that loads it;
    then both take a 4th step on the same batch."""
    from pretrain.trainer import optimizer_step

    cfg = load_config(ROOT / "configs" / "mocov2_digits.yaml", [
        "zero.stage=3", "data.batch_size=4", "job.max_steps=10", "model.proj_hidden_dim=32", "model.proj_out_dim=16",
        "model.backbone_kwargs={width: 0.25}", "method.queue_size=12", "method.teacher_momentum=0.5",
        "optim.warmup_steps=1"])
    engine = build_engine(build_method(cfg, distributed=True), cfg)
    g = torch.Generator().manual_seed(95 + rank)
    batches = [{"views": [torch.randn(4, 1, 16, 16, generator=g) for _ in range(2)]} for _ in range(4)]
    start = engine.module.queue.clone()
    target0 = full_state_dict(engine, engine.module.target)
    losses = [optimizer_step(engine, iter(batches[step:]), step, 10)[0]["loss"].item() for step in range(3)]
    m = engine.module
    queue = {"queue": m.queue.clone(), "ptr": int(m.queue_ptr)}
    states = {k: full_state_dict(engine, getattr(m, k)) for k in ("online", "target")}
    save_checkpoint(engine, f"{root}/ckpt-mocov2", {"step": 3, "epoch": 0})
    fresh = build_engine(build_method(cfg, distributed=True), cfg)
    load_checkpoint(fresh, f"{root}/ckpt-mocov2")
    restored = {"queue": fresh.module.queue.clone(), "ptr": int(fresh.module.queue_ptr),
                "target": full_state_dict(fresh, fresh.module.target)}
    fourth = [optimizer_step(e, iter(batches[3:]), 3, 10)[0]["loss"].item() for e in (engine, fresh)]
    queues = [torch.empty_like(queue["queue"]) for _ in range(2)]
    torch.distributed.all_gather(queues, queue["queue"])
    if rank == 0:
        torch.save({"losses": losses, "start": start, "queue": queue, "restored": restored, "fourth": fourth,
                    "ranks_queues": queues, "target0": target0, **states}, f"{root}/mocov2.pt")


def _swav_frozen_prototypes(rank: int, root: str, build_engine, build_method, full_state_dict, load_checkpoint,
                            save_checkpoint) -> None:
    """SwAV with LARS under ZeRO 0 (its ImageNet recipe's optimizer), multi-crop, sync BN, a queue of one global batch,
    the prototypes frozen for the first of 2 steps: the prototypes after each step, and the queue after a checkpoint
    is loaded into a fresh engine."""
    from pretrain.trainer import optimizer_step

    cfg = load_config(ROOT / "configs" / "swav_digits.yaml", [
        "zero.stage=0", "optim.name=lars", "optim.lr=0.3", "optim.weight_decay=1e-6", "optim.grad_clip=0",
        "model.sync_bn=true", "data.batch_size=8", "job.max_steps=10", "optim.warmup_steps=0",
        "method.freeze_last_layer_steps=1", "method.num_prototypes=12", "model.proj_hidden_dim=32",
        "model.proj_out_dim=16", "model.backbone_kwargs={width: 0.25}", "method.queue_size=16"])
    engine = build_engine(build_method(cfg, distributed=True), cfg)
    g = torch.Generator().manual_seed(30 + rank)
    views = [[torch.randn(8, 1, 16, 16, generator=g) for _ in range(2)] +
             [torch.randn(8, 1, 12, 12, generator=g) for _ in range(2)] for _ in range(2)]
    batches = iter([{"views": v} for v in views])
    prototypes = [full_state_dict(engine, engine.module.prototypes)["weight_v"]]
    for step in range(2):
        optimizer_step(engine, batches, step, 10)
        prototypes.append(full_state_dict(engine, engine.module.prototypes)["weight_v"])
    save_checkpoint(engine, f"{root}/ckpt-swav", {"step": 2, "epoch": 0})
    fresh = build_engine(build_method(cfg, distributed=True), cfg)
    load_checkpoint(fresh, f"{root}/ckpt-swav")
    queues = {"trained": engine.module.queue.clone(), "restored": fresh.module.queue.clone(),
              "filled": int(fresh.module.queue_filled)}
    all_queues = [torch.empty_like(queues["trained"]) for _ in range(2)]
    torch.distributed.all_gather(all_queues, queues["trained"])
    if rank == 0:
        torch.save({"prototypes": prototypes, "optimizer": type(engine.optimizer).__name__, "queues": queues,
                    "ranks_queues": all_queues}, f"{root}/swav.pt")


def _moco_frozen_patches(rank: int, root: str, build_engine, build_method, full_state_dict, load_checkpoint,
                         save_checkpoint) -> None:
    """MoCo v3 with a ViT whose patch projection is frozen (MoCo v3's random patch projection) under ZeRO-3, keys
    gathered from both ranks: 2 optimizer steps with the momentum update, a checkpoint, and a fresh engine that loads
    it."""
    from pretrain.trainer import optimizer_step

    cfg = load_config(ROOT / "configs" / "mocov3_digits.yaml", [
        "zero.stage=3", "data.batch_size=8", "job.max_steps=10", "optim.warmup_steps=1", "model.backbone=vit_tiny",
        "model.patch_size=4", "model.proj_hidden_dim=32", "model.proj_out_dim=16", "method.predictor_hidden_dim=24",
        "model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2, freeze_patch_embed: true}"])
    engine = build_engine(build_method(cfg, distributed=True), cfg)
    init = full_state_dict(engine, engine.module)
    g = torch.Generator().manual_seed(20 + rank)
    batches = iter([{"views": [torch.randn(8, 1, 16, 16, generator=g) for _ in range(2)]} for _ in range(2)])
    losses = [optimizer_step(engine, batches, step, 10)[0]["loss"].item() for step in range(2)]
    trained = full_state_dict(engine, engine.module)
    save_checkpoint(engine, f"{root}/ckpt-moco", {"step": 2, "epoch": 0})
    fresh = build_engine(build_method(cfg, distributed=True), cfg)
    load_checkpoint(fresh, f"{root}/ckpt-moco")
    restored = full_state_dict(fresh, fresh.module)
    if rank == 0:
        torch.save({"init": init, "trained": trained, "restored": restored, "losses": losses}, f"{root}/moco.pt")


def _plain_optimizer(rank: int, root: str, name: str, cfg, build_engine, build_method, full_state_dict, load_checkpoint,
                     save_checkpoint) -> None:
    """``cfg`` (its optim.name ``name``, model.sync_bn) for 3 steps through the engine, beside the same method stepped
    by the plain optimizer (and the schedule) on gradients averaged over the ranks by hand; then a fresh engine loads
    the checkpoint and both take a 4th step."""
    from pretrain.engine import Schedule, lr_lambda, optimizer_hyper, peak_lr
    from pretrain.optim import build_optimizer, config_param_groups

    engine = build_engine(build_method(cfg, distributed=True), cfg)
    ref = build_method(cfg, distributed=True)
    groups = config_param_groups(ref, cfg.optim)
    opt = build_optimizer(groups, cfg.optim.name, peak_lr(cfg, WORLD), **optimizer_hyper(cfg))
    schedule = Schedule(opt, cfg, WORLD)
    g = torch.Generator().manual_seed(20 + rank)
    batches = [{"views": [torch.randn(8, 1, 16, 16, generator=g) for _ in range(2)]} for _ in range(4)]
    for batch in batches[:3]:
        engine.backward(loss := engine(batch)["loss"])
        engine.step()
        ref(batch)["loss"].backward()
        for p in ref.parameters():
            torch.distributed.all_reduce(p.grad)
            p.grad /= WORLD
        opt.step()
        opt.zero_grad()
        schedule.step()
    trained = full_state_dict(engine, engine.module)
    stats = torch.cat([v.flatten() for k, v in trained.items() if k.endswith(("running_mean", "running_var"))])
    both = [torch.empty_like(stats) for _ in range(WORLD)]
    torch.distributed.all_gather(both, stats)
    save_checkpoint(engine, f"{root}/ckpt-{name}", {"step": 3, "epoch": 0})
    fresh = build_engine(build_method(cfg, distributed=True), cfg)
    load_checkpoint(fresh, f"{root}/ckpt-{name}")
    # each group's (fixed, decay, lr, weight decay) for step 4, in the engine that took 3 steps and in the fresh one
    groups = [[(bool(gr.get("fixed_lr")), gr["decay"], gr["lr"], gr["weight_decay"]) for gr in e.optimizer.param_groups]
              for e in (engine, fresh)]
    for e in (engine, fresh):
        e.backward(e(batches[3])["loss"])
        e.step()
    if rank == 0:
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO 1-3 wrap the client optimizer
        torch.save({"optimizer": type(inner).__name__, "split": _split_params(engine), "engine": trained,
                    "reference": ref.state_dict(),
                    "groups": groups, "peak": peak_lr(cfg, WORLD), "cosine": lr_lambda(cfg)(3),
                    "loss": loss.item(), "bn_stats": both, "continued": full_state_dict(engine, engine.module),
                    "resumed": full_state_dict(fresh, fresh.module), "init": build_method(cfg, distributed=False)
                    .state_dict()}, f"{root}/{name}.pt")


def _split_params(engine) -> int:
    """How many trained parameters this rank's ZeRO partitions hold only a part of (0 under ZeRO-0)."""
    zero = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        return sum(p.ds_tensor.numel() < p.numel() for group in zero.fp16_groups for p in group)
    if engine.zero_optimization_stage() in (1, 2):
        return sum(p._hp_mapping is not None and p._hp_mapping.hp_fragment_address.numel < p.numel()
                   for group in zero.bit16_groups for p in group)
    return 0


def _accumulation(rank: int, root: str, build_engine, build_method, full_state_dict) -> None:
    """MAE (LayerNorm only: nothing couples the samples of a batch) for 2 optimizer steps of 8 images per rank, as one
    batch of 8 (ZeRO-2) and as 2 micro-batches of 4 (optim.accum_steps=2) under ZeRO 2 and 3; the masks come from the
    same generator draws either way."""
    from pretrain.trainer import optimizer_step

    mae = ROOT / "configs" / "mae_digits.yaml"
    out = {}
    # (ZeRO-2 and -3 train alike: _one_stage's cases); the last: whole batches under ZeRO-3 with the encoder's blocks
    # recomputed in the backward (grad_checkpointing, DeepSpeed gathering their partitions again for it)
    for stage, accum, ckpt in ((2, 1, False), (2, 2, False), (3, 2, False), (3, 1, True)):
        cfg = load_config(mae, [f"zero.stage={stage}", f"data.batch_size={8 // accum}",
                                f"optim.accum_steps={accum}", "job.max_steps=10", "optim.warmup_steps=1",
                                "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2",
                                "model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2, "
                                f"grad_checkpointing: {str(ckpt).lower()}}}"])
        engine = build_engine(build_method(cfg, distributed=True), cfg)
        g = torch.Generator().manual_seed(10 + rank)
        images = [torch.randn(8, 1, 16, 16, generator=g) for _ in range(2)]
        batches = iter([{"views": [x[i:i + 8 // accum]]} for x in images for i in range(0, 8, 8 // accum)])
        torch.manual_seed(100 + rank)
        losses = [optimizer_step(engine, batches, step, 10, accum)[0]["loss"].item() for step in range(2)]
        out["checkpointing" if ckpt else (stage, accum)] = {
            "losses": losses, "backbone": full_state_dict(engine, engine.module.backbone), "lr": engine.get_lr()[0]}
    if rank == 0:
        torch.save(out, f"{root}/accumulation.pt")


def _one_stage(stage, precision, offload, ckpt, out, build_engine, build_method, full_state_dict, load_checkpoint,
               save_checkpoint, rank):
    cfg = _cfg(stage, precision, offload=offload)
    engine = build_engine(build_method(cfg, distributed=True), cfg)
    g = torch.Generator().manual_seed(rank)
    losses = []
    for _ in range(3):
        # 16 images a rank: at 8, the third step's gradients came from an ill-conditioned point, where on an Intel
        # Xeon at one thread the offloaded run's weights, 7e-8 from the plain run's, gave gradients 5% apart
        views = [torch.randn(16, 1, 16, 16, generator=g) for _ in range(2)]
        loss = engine({"views": views})["loss"]
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    lr_after = engine.get_lr()[0]
    wd_after = [g["weight_decay"] for g in engine.optimizer.param_groups]
    save_checkpoint(engine, ckpt, {"step": 3, "epoch": 0})
    trained = full_state_dict(engine, engine.module.backbone)

    fresh = build_engine(build_method(cfg, distributed=True), cfg)
    state = load_checkpoint(fresh, ckpt)
    restored = full_state_dict(fresh, fresh.module.backbone)
    # resumed under a config with another peak learning rate and betas: those are the new config's
    changed = _cfg(stage, precision, "optim.lr=0.5", "optim.betas=[0.8, 0.9]", offload=offload)
    other = build_engine(build_method(changed, distributed=True), changed)
    load_checkpoint(other, ckpt)
    extra = {"offloaded": bool(getattr(engine.optimizer, "cpu_offload", False)
                               or getattr(engine.optimizer, "offload_optimizer", False)),
             "fused": [g.get("fused") for g in engine.optimizer.param_groups]}
    if offload == "cpu":  # a resume may turn the offload on (the same run's checkpoint without it) or off (this one)
        turned_on = build_engine(build_method(cfg, distributed=True), cfg)
        load_checkpoint(turned_on, ckpt.replace(f"-{offload}", "-none"))
        extra["loaded_from_plain"] = full_state_dict(turned_on, turned_on.module.backbone)
        without = _cfg(stage, precision)
        turned_off = build_engine(build_method(without, distributed=True), without)
        load_checkpoint(turned_off, ckpt)
        extra["loaded_without"] = full_state_dict(turned_off, turned_off.module.backbone)
    if rank == 0:
        torch.save({**extra, "trained": trained, "restored": restored, "state": state, "losses": losses, "lr": lr_after,
                    "lr_restored": fresh.get_lr()[0], "wd": wd_after,
                    "wd_restored": [g["weight_decay"] for g in fresh.optimizer.param_groups],
                    "peak_lr": cfg.optim.lr, "lr_changed": other.get_lr(),
                    "betas_changed": [g["betas"] for g in other.optimizer.param_groups]}, out)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("engine")
    spawn_ranks(_worker, WORLD, str(root))
    return root


@pytest.mark.parametrize("stage", [2, 3])
def test_accumulated_micro_batches_make_the_whole_batch_step(stage, results):
    """Two micro-batches of 4 accumulated give the losses and weights of one batch of 8 (to float rounding); the
    schedule counts optimizer steps, not micro-batches."""
    r = torch.load(results / "accumulation.pt", weights_only=False)
    whole, accumulated = r[(2, 1)], r[(stage, 2)]
    assert accumulated["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    assert accumulated["lr"] == whole["lr"]
    for k, v in whole["backbone"].items():
        torch.testing.assert_close(accumulated["backbone"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert whole["losses"][1] != whole["losses"][0]  # it trained


@pytest.mark.parametrize("name, optimizer, split", [
    ("lars", "LARS", 0), ("lars-zero1", "LARS", 1), ("lars-zero2", "LARS", 1), ("lars-zero3", "LARS", 10),
    ("lars-zero2-offload", "LARS", 1), ("larc-zero2", "LARC", 1), ("larc-zero3", "LARC", 10), ("sgd", "SGD", 1)])
def test_engine_steps_as_the_plain_optimizer_and_resumes(results, name, optimizer, split):
    """LARS (SimCLR, its biases at half the rate as Barlow Twins' are slower) under ZeRO 0, which hands it each
    parameter whole, and under ZeRO 1, 2 and 3 (and 2 with its partitions offloaded to the CPU), whose flat partitions
    split parameters between the ranks (at least ``split`` of them on rank 0), LARC (SwAV's: every parameter adapted
    and decaying) under ZeRO 2 and 3, and SGD with momentum (SimSiam as its
    paper: the predictor at a fixed rate, every parameter decaying) under ZeRO-2: the weights after 3 steps on 2 ranks
    are those of the plain optimizer on the ranks' averaged gradients (a trust ratio from one rank's pieces would not
    match), and a fresh engine that loads the checkpoint (momentum, groups and their rates included) takes the same
    4th step. With model.sync_bn, both ranks' BatchNorm statistics are the global batch's: the same on each, though
    each rank saw other images."""
    r = torch.load(results / f"{name}.pt", weights_only=False)
    assert r["optimizer"] == optimizer and math.isfinite(r["loss"])
    assert r["split"] >= split if split else r["split"] == 0
    assert torch.equal(r["bn_stats"][0], r["bn_stats"][1]) and r["bn_stats"][0].numel() > 100
    for k, v in r["engine"].items():
        ref = r["reference"][k]  # full_state_dict: floating entries in fp32, BatchNorm's counts int64
        torch.testing.assert_close(v, ref.float() if ref.is_floating_point() else ref, rtol=1e-5, atol=1e-6, msg=k)
        assert torch.equal(r["resumed"][k], r["continued"][k]), k
    # it trained: every weight matrix and conv kernel moved from its init
    weights = [k for k, v in r["init"].items() if k.endswith("weight") and v.ndim >= 2]
    assert len(weights) >= 5 and all(not torch.equal(r["engine"][k], r["init"][k].float()) for k in weights)
    built, loaded = r["groups"]
    assert loaded == built  # the groups' flags, rates and decays come back with the checkpoint
    if optimizer == "LARS":  # SimCLR's: only the weights decay; every rate follows the schedule, the biases' at half
        assert [(fixed, decay) for fixed, decay, _, _ in built] == [(False, True), (False, False)]
        assert built[1][2] == pytest.approx(0.5 * built[0][2]) and built[0][2] > 0
    elif optimizer == "LARC":  # SwAV's: every parameter decays, at the scheduled rate and decay
        assert [decay for _, decay, _, _ in built] == [True] * len(built) and len({wd for *_, wd in built}) == 1
    else:  # SimSiam's, as its paper: every parameter decays; the predictor keeps the peak rate at step 4 of 5
        assert [(fixed, decay) for fixed, decay, _, _ in built] == [(False, True), (False, True), (True, True),
                                                                     (True, True)]
        assert r["cosine"] < 0.8
        assert [lr for _, _, lr, _ in built] == pytest.approx([r["peak"] * r["cosine"]] * 2 + [r["peak"]] * 2)
        assert all(wd == 1e-2 for _, _, _, wd in built)


def test_compiled_model_trains_as_eager(results):
    """model.compile: the method's forward and backward run as Dynamo's graphs (several: the chunked CPU loss breaks the
    graph where it skips chunks) and take the eager steps, to float rounding; the parameter names stay."""
    r = torch.load(results / "compiled.pt", weights_only=False)
    eager, compiled = r[False], r[True]
    assert (eager["is_compiled"], compiled["is_compiled"]) == (False, True)
    assert eager["graphs"] == 0 and compiled["graphs"] >= 1
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    assert compiled["weights"].keys() == eager["weights"].keys()
    for k, v in eager["weights"].items():
        torch.testing.assert_close(compiled["weights"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert eager["losses"][0] != eager["losses"][2]


def test_zero3_with_grad_checkpointing_steps_as_without(results):
    """ViT blocks recomputed in the backward under ZeRO-3 (their partitions gathered again): the losses and weights of
    plain ZeRO-2 steps on the same batches."""
    r = torch.load(results / "accumulation.pt", weights_only=False)
    plain, recomputed = r[(2, 1)], r["checkpointing"]
    assert recomputed["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    for k, v in plain["backbone"].items():
        torch.testing.assert_close(recomputed["backbone"][k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_moco_v3_with_frozen_patch_projection_under_zero3(results):
    """MoCo v3's frozen patch projection under ZeRO-3: after 2 steps the base encoder's patch projection is its
    init and every other base weight moved; the momentum encoder moved toward the base encoder (its patch projection
    the same frozen init); a fresh engine loads all of it back."""
    r = torch.load(results / "moco.pt", weights_only=False)
    assert all(math.isfinite(x) for x in r["losses"])
    init, trained = r["init"], r["trained"]
    for k, v in init.items():
        if k.startswith(("online.", "target.")) and "running_" not in k and "num_batches" not in k:
            assert torch.equal(trained[k], v) == (".patch_embed." in k), k
    assert any(".patch_embed." in k for k in init)
    assert r["restored"].keys() == trained.keys()
    for k, v in trained.items():
        assert torch.equal(r["restored"][k], v), k


def test_ijepa_target_follows_the_encoder_under_zero3(results):
    """I-JEPA under ZeRO-3: each step moves the context encoder, and the target encoder (on its partitions) becomes
    m * target + (1 - m) * encoder with m rising linearly from method.teacher_momentum (0.5, 0.55); a fresh engine
    loads both back from the checkpoint."""
    r = torch.load(results / "ijepa.pt", weights_only=False)
    assert all(math.isfinite(x) for x in r["losses"])
    states = r["states"]
    assert states[0]["encoder"].keys() == states[0]["target"].keys()
    for step, m in enumerate((0.5, 0.55)):
        before, after = states[step], states[step + 1]
        assert any(not torch.equal(after["encoder"][k], v) for k, v in before["encoder"].items())
        for k, v in before["target"].items():
            if v.is_floating_point():
                torch.testing.assert_close(after["target"][k], m * v + (1 - m) * after["encoder"][k], rtol=1e-5,
                                           atol=1e-6, msg=f"step {step}: {k}")
    for part in ("encoder", "target"):
        for k, v in states[-1][part].items():
            assert torch.equal(r["restored"][part][k], v), f"{part}.{k}"


def test_swav_prototypes_frozen_under_lars_and_queue_restored(results):
    """SwAV's frozen first step through the engine with LARS: a frozen prototype may change in length (LARS still
    applies weight decay to it) but not in direction, which is all the unit prototypes use; the next step turns
    them. Its queue is the same on both ranks and a checkpoint restores it."""
    r = torch.load(results / "swav.pt", weights_only=False)
    assert r["optimizer"] == "LARS"
    init, frozen, trained = (F.normalize(p, dim=1) for p in r["prototypes"])
    torch.testing.assert_close(frozen, init, rtol=1e-5, atol=1e-6)
    assert (trained - frozen).abs().max() > 1e-4
    # the queue (the last global batch's embeddings, alike on both ranks) comes back with the checkpoint
    q = r["queues"]
    assert q["filled"] == 16 and q["trained"].abs().sum() > 0
    assert torch.equal(q["restored"], q["trained"]) and torch.equal(r["ranks_queues"][0], r["ranks_queues"][1])


def test_nnclr_support_set_under_zero3_bf16_is_alike_on_ranks_and_restored(results):
    """NNCLR's support set through a ZeRO-3 engine under bf16 autocast: after 3 steps of 8 images it is full, its
    write position wrapped to 0 (8 + 8 + 8 rows through a ring of 12), of unit rows, the same on both ranks; a fresh
    engine (empty set) gets it back from the checkpoint, and then takes the same 4th step as the engine that saved it
    (with the set lost, the fresh engine's neighbours would be the batch's own embeddings)."""
    r = torch.load(results / "nnclr.pt", weights_only=False)
    assert all(math.isfinite(x) for x in r["losses"])
    s = r["support"]
    assert (s["ptr"], s["filled"], r["empty"]) == (0, 12, 0)
    torch.testing.assert_close(s["queue"].norm(dim=1), torch.ones(12), rtol=1e-5, atol=1e-5)
    assert torch.equal(r["ranks_queues"][0], r["ranks_queues"][1])
    assert torch.equal(r["restored"]["queue"], s["queue"])
    assert (r["restored"]["ptr"], r["restored"]["filled"]) == (s["ptr"], s["filled"])
    assert r["fourth"][0] == pytest.approx(r["fourth"][1], rel=1e-6)


def test_moco_v2_queue_and_momentum_encoder_under_zero3_are_alike_on_ranks_and_restored(results):
    """MoCo v2 through a ZeRO-3 engine with SGD: after 3 steps of 8 images the queue's write position has wrapped to 0
    (8 + 8 + 8 keys through 12 rows), every row a unit key of this run, not the random start, the same on both ranks;
    the momentum encoder moved from its init toward the query encoder; a fresh engine gets the queue, its position and
    the momentum encoder back from the checkpoint and takes the same 4th step as the engine that saved it."""
    r = torch.load(results / "mocov2.pt", weights_only=False)
    assert all(math.isfinite(x) for x in r["losses"])
    q = r["queue"]
    assert q["ptr"] == 0 and torch.equal(r["ranks_queues"][0], r["ranks_queues"][1])
    torch.testing.assert_close(q["queue"].norm(dim=1), torch.ones(12), rtol=1e-5, atol=1e-5)
    assert not torch.isclose(q["queue"], r["start"]).all(dim=1).any()  # every row written over
    params = [k for k in r["target"] if k.endswith(("weight", "bias"))]  # not BatchNorm's running statistics
    moved = [k for k in params if not torch.equal(r["target"][k], r["target0"][k])]
    assert moved and all(torch.isfinite(r["target"][k]).all() for k in moved)
    for k in moved:  # an EMA at momentum 0.5-ish: between where it started and the online encoder
        assert (r["target"][k] - r["online"][k]).norm() < (r["target0"][k] - r["online"][k]).norm() + 1e-6, k
    assert torch.equal(r["restored"]["queue"], q["queue"]) and r["restored"]["ptr"] == q["ptr"]
    for k, v in r["target"].items():
        assert torch.equal(r["restored"]["target"][k], v), k
    assert r["fourth"][0] == pytest.approx(r["fourth"][1], rel=1e-6)


def _expected_lr_mult(name: str) -> float:
    """The rate multiplier of the student's parameter ``name`` in ``_layer_decay`` (a depth-2 ViT, layer_decay 0.5, the
    patch projection x 0.2), written out by name."""
    if name.startswith(("head.", "patch_head.", "backbone.norm.")):
        return 1.0
    if name.startswith("backbone.blocks."):
        return 0.5 ** (2 - int(name.split(".")[2]))
    return 0.5 ** 3 * (0.2 if name.startswith("backbone.patch_embed.") else 1.0)


def test_layer_decay_gives_each_layer_its_rate_under_zero3_and_after_a_universal_load(results):
    """Layer-wise lr decay and the patch projection's multiplier through the ZeRO-3 engine: each trained tensor's
    largest first-step change is its layer's rate (AdamW's first update: lr x g / (|g| + eps)), the separate patch
    head's and the image-level head's the full rate; the groups' multipliers and rates come back from a universal
    checkpoint, and the resumed engine's next step is the uninterrupted one's."""
    r = torch.load(results / "decay.pt", weights_only=False)
    init, first, peak = r["init"], r["first"], r["peak"]
    seen = set()
    assert len(r["trained"]) > 20
    for name in r["trained"]:  # every parameter the optimizer holds
        step = (first[name] - init[name]).abs().max().item()
        expected = peak * _expected_lr_mult(name)
        # lr x |g| / (|g| + eps): the rate itself, or a little under it where every |g| is near 0 (the last norm's
        # bias, before the head's BatchNorm); the next rate down is half of it
        assert 0.9 * expected < step < expected * (1 + 2e-3), name
        seen.add(_expected_lr_mult(name))
    assert seen == {1.0, 0.5, 0.25, 0.125, 0.125 * 0.2}
    assert r["groups"]["loaded"] == r["groups"]["built"]
    assert sorted({m for m, _, _ in r["groups"]["built"]}) == sorted(seen)
    for k, v in r["continued"].items():
        torch.testing.assert_close(r["resumed"][k], v, rtol=1e-5, atol=1e-7, msg=k)
    assert any(not torch.equal(r["continued"][k], first[k]) for k in first)


def test_param_groups_by_layer():
    """param_groups: without multipliers the two groups of old (decaying, then not); with layer_decay and
    patch_embed_lr_mult one group per (decay, multiplier), every trainable parameter in exactly one, at the rate of
    its layer (a ViT's by layer, the rest full), the 1-D ones also times norm_bias_lr_mult; the teacher's frozen
    parameters in none. LARS's and AdamW's groups
    start at the peak rate x multiplier, and the schedule keeps the multipliers, follow_config too."""
    from pretrain.engine import Schedule, peak_lr
    from pretrain.optim import build_optimizer, param_groups
    from pretrain.trainer import build_method

    overrides = ["model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2}", "model.proj_hidden_dim=32",
                 "model.proj_out_dim=16", "method.num_prototypes=64", "optim.warmup_steps=2"]
    cfg = load_config(ROOT / "configs" / "ibot_digits.yaml", overrides)
    method = build_method(cfg, distributed=False)
    plain = param_groups(method, 0.04)
    assert [(g["decay"], g["lr_mult"], g["weight_decay"]) for g in plain] == [(True, 1.0, 0.04), (False, 1.0, 0.0)]
    groups = param_groups(method, 0.04, layer_decay=0.5, patch_embed_lr_mult=0.2)
    where = {id(p): g for g in groups for p in g["params"]}
    trainable = {n: p for n, p in method.named_parameters() if p.requires_grad}
    assert sum(len(g["params"]) for g in groups) == len(trainable) == len(where)
    for n, p in trainable.items():
        assert n.startswith("student.")
        assert where[id(p)]["lr_mult"] == pytest.approx(_expected_lr_mult(n.removeprefix("student."))), n
        assert where[id(p)]["decay"] == (p.ndim > 1), n
    decaying = [g["decay"] for g in groups]
    assert decaying == sorted(decaying, reverse=True)  # the decaying groups first: a fixed order on every rank
    # optim.norm_bias_lr_mult: the 1-D parameters' rate times it, on top of their layer's
    halved = param_groups(method, 0.04, layer_decay=0.5, patch_embed_lr_mult=0.2, norm_bias_lr_mult=0.5)
    where_halved = {id(p): g for g in halved for p in g["params"]}
    for n, p in trainable.items():
        scale = 0.5 if p.ndim <= 1 else 1.0
        assert where_halved[id(p)]["lr_mult"] == pytest.approx(scale * _expected_lr_mult(n.removeprefix("student."))), n
    hyper = {"adamw": {"betas": (0.9, 0.999)}, "lars": {"momentum": 0.9, "trust_coefficient": 1e-3},
             "sgd": {"momentum": 0.9}}
    for name, extra in hyper.items():
        opt = build_optimizer(groups, name, 0.01, **extra)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01 * g["lr_mult"] for g in groups])
        assert [g["weight_decay"] for g in opt.param_groups] == [g["weight_decay"] for g in groups]
    opt = build_optimizer(groups, "adamw", peak_lr(cfg, 1), betas=(0.9, 0.999))  # as build_engine makes it
    schedule = Schedule(opt, cfg, 1)
    for _ in range(2):
        opt.step()
        schedule.step()
    at_peak = [g["lr"] for g in opt.param_groups]
    assert at_peak == pytest.approx([cfg.optim.lr * g["lr_mult"] for g in groups])
    schedule.follow_config()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(at_peak)


def test_fixed_lr_and_decayed_norms_and_biases():
    """SimSiam as its paper trains it: optim.fixed_lr=[predictor] puts the predictor's parameters (and only them) in
    groups whose rate the schedule holds at the peak after the warmup while the others follow the cosine, follow_config
    too; optim.decay_norms_and_biases decays the 1-D parameters as well, and LARS still adapts only the weights. A
    prefix is a whole dotted component of the names."""
    from pretrain.config import ConfigError
    from pretrain.engine import Schedule, lr_lambda, peak_lr
    from pretrain.optim import build_optimizer, param_groups
    from pretrain.trainer import build_method

    cfg = load_config(ROOT / "configs" / "simsiam_digits.yaml", [
        "optim.fixed_lr=[predictor]", "optim.decay_norms_and_biases=true", "optim.warmup_steps=3", "job.max_steps=20",
        "model.backbone_kwargs={width: 0.25}", "model.proj_hidden_dim=32", "model.proj_out_dim=32",
        "method.predictor_hidden_dim=8"])
    method = build_method(cfg, distributed=False)
    o = cfg.optim
    groups = param_groups(method, 1e-4, fixed_lr=o.fixed_lr, decay_norms_and_biases=o.decay_norms_and_biases)
    assert [(g["matrix"], bool(g.get("fixed_lr")), g["decay"], g["weight_decay"]) for g in groups] == [
        (True, False, True, 1e-4), (False, False, True, 1e-4), (True, True, True, 1e-4), (False, True, True, 1e-4)]
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(method.named_parameters())
    assert len(where) == len(named)
    for n, p in named.items():
        assert bool(where[id(p)].get("fixed_lr")) == n.startswith("predictor."), n
        assert where[id(p)]["matrix"] == (p.ndim > 1), n
    lars = build_optimizer(groups, "lars", 0.3, momentum=0.9, trust_coefficient=1e-3)
    assert [g["lars"] for g in lars.param_groups] == [True, False, True, False]
    # without the options: the two groups of old, LARS adapting the decaying one
    plain = param_groups(method, 1e-4)
    assert [(g["decay"], g["weight_decay"]) for g in plain] == [(True, 1e-4), (False, 0.0)]
    assert [g["lars"] for g in build_optimizer(plain, "lars", 0.3, momentum=0.9, trust_coefficient=1e-3)
            .param_groups] == [True, False]

    peak = peak_lr(cfg, 1)
    opt = build_optimizer(groups, "sgd", peak, momentum=0.9)
    schedule = Schedule(opt, cfg, 1)
    rates = []
    for _ in range(cfg.job.max_steps):
        rates.append([g["lr"] for g in opt.param_groups])
        opt.step()
        schedule.step()
    cosine = lr_lambda(cfg)
    for step, lrs in enumerate(rates):
        held = (step + 1) / 3 if step < 3 else 1.0
        assert lrs == pytest.approx([peak * cosine(step)] * 2 + [peak * held] * 2), step
    assert rates[-1][0] < 0.05 * peak  # the others decayed
    before = [g["lr"] for g in opt.param_groups]
    schedule.follow_config()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(before)

    for bad in (["predictr"], ["pred"], ["predictor.mlp.99"]):
        with pytest.raises(ConfigError, match=f"optim.fixed_lr: '{bad[0]}' names no trainable parameter"):
            param_groups(method, 1e-4, fixed_lr=bad)


@pytest.mark.parametrize("stage, precision, offload", CASES)
def test_zero_stage_trains_saves_and_restores(stage, precision, offload, results):
    """Each ZeRO stage trains 3 steps on 2 ranks; a fresh engine loads the checkpoint: same weights, LR and step; one
    built from a config with another peak LR and betas loads it and goes on with those. With zero.offload cpu the
    ZeRO optimizer really offloads, AdamW runs fused, and the steps are those without it (to float rounding); an
    offloading engine loads the checkpoint of the run without the offload and the other way round (a resume may turn
    it on or off)."""
    r = torch.load(results / f"result{stage}-{precision}-{offload}.pt", weights_only=False)
    assert r["offloaded"] == (offload == "cpu") and r["fused"] == [offload == "cpu"] * 2
    if offload == "cpu":
        plain = torch.load(results / f"result{stage}-{precision}-none.pt", weights_only=False)
        assert r["losses"] == pytest.approx(plain["losses"], rel=1e-6)
        for k, v in plain["trained"].items():  # atol: 1/4000 of a step's lr (4e-3), what an AdamW slip would exceed
            torch.testing.assert_close(r["trained"][k], v, rtol=1e-5, atol=1e-6, msg=k)
            assert torch.equal(r["loaded_from_plain"][k], v), k
            assert torch.equal(r["loaded_without"][k], r["trained"][k]), k
    assert r["state"]["step"] == 3
    assert all(math.isfinite(x) for x in r["losses"])
    assert r["trained"].keys() == r["restored"].keys()
    for k, v in r["trained"].items():
        assert torch.equal(v, r["restored"][k]), k
    assert r["lr_restored"] == r["lr"]
    # a run resumed with another optim.lr / optim.betas trains with those (the schedule's step comes back)
    assert r["lr_changed"] == pytest.approx([r["lr"] * 0.5 / r["peak_lr"]] * 2)
    assert r["betas_changed"] == [(0.8, 0.9)] * 2
    # the decaying group's weight decay follows its schedule inside the ZeRO optimizer, and comes back with it
    from pretrain.engine import weight_decay_at

    expected = weight_decay_at(_cfg(stage, precision, offload=offload))(3)
    assert 1e-4 < expected < 0.5
    assert r["wd"] == pytest.approx([expected, 0.0]) and r["wd_restored"] == pytest.approx(r["wd"])


def test_lr_schedule_warmup_then_cosine():
    """Linear warmup to the peak, cosine down to min_lr_ratio x peak at max_steps."""
    from pretrain.engine import lr_lambda

    cfg = load_config(RECIPE, ["optim.warmup_steps=10", "job.max_steps=110", "optim.min_lr_ratio=0.1"])
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_lr_scaling_by_global_batch():
    """optim.lr_scaling: the peak is lr x (batch x ranks / base_batch_size), or its square root; the schedule warms up
    to it and a resume's follow_config keeps it."""
    from pretrain.engine import Schedule, peak_lr

    sets = ["data.batch_size=128", "optim.lr=1e-3", "optim.base_batch_size=256", "optim.warmup_steps=4"]
    assert peak_lr(load_config(RECIPE, sets), 8) == 1e-3  # none: as given, whatever the batch
    linear = load_config(RECIPE, [*sets, "optim.lr_scaling=linear"])
    assert peak_lr(linear, 8) == pytest.approx(4e-3) and peak_lr(linear, 1) == pytest.approx(5e-4)
    assert peak_lr(load_config(RECIPE, [*sets, "optim.lr_scaling=sqrt"]), 8) == pytest.approx(2e-3)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=peak_lr(linear, 8))  # as build_engine makes it
    schedule = Schedule(opt, linear, world_size=8)
    for _ in range(3):
        opt.step()
        schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(4e-3)  # step 3: the last of the warmup
    schedule.follow_config()
    assert opt.param_groups[0]["lr"] == pytest.approx(4e-3)


def test_weight_decay_schedule_cosine_to_end():
    """weight_decay at step 0, cosine to weight_decay_end at max_steps (then held); null keeps it constant."""
    from pretrain.engine import weight_decay_at

    cfg = load_config(RECIPE, ["optim.weight_decay=0.04", "optim.weight_decay_end=0.4", "job.max_steps=100"])
    f = weight_decay_at(cfg)
    assert f(0) == pytest.approx(0.04) and f(50) == pytest.approx(0.22) and f(100) == pytest.approx(0.4)
    assert f(150) == pytest.approx(0.4) and all(f(s) <= f(s + 1) for s in range(100))
    assert weight_decay_at(load_config(RECIPE, ["optim.weight_decay=0.04"]))(70) == 0.04


def test_autocast_follows_precision_setting():
    """precision auto means autocast only on CUDA; explicit values win; gradients are reduced in fp32 unless
    zero.reduce_dtype is autocast (DeepSpeed's "lower precision safe" modules, Linear and Conv, by default)."""
    from pretrain.engine import ds_config

    assert ("torch_autocast" in ds_config(load_config(RECIPE))) == torch.cuda.is_available()
    for precision, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        cast = ds_config(load_config(RECIPE, [f"zero.precision={precision}"]))["torch_autocast"]
        assert cast == {"enabled": True, "dtype": dtype, "lower_precision_safe_modules": []}
        cast = ds_config(load_config(RECIPE, [f"zero.precision={precision}", "zero.reduce_dtype=autocast"]))
        assert cast["torch_autocast"] == {"enabled": True, "dtype": dtype}
    assert "torch_autocast" not in ds_config(load_config(RECIPE, ["zero.precision=fp32"]))


def test_progress_bar_shows_each_log_once_with_its_own_loss():
    """Each log moves the bar in one write that shows that step's loss and rate: it had written each state twice (the
    step with the last log's loss, then with its own), which Ray's log collector, cutting the bar's \\r-separated writes
    into lines, showed side by side. (mininterval=0: every update is drawn, as when logs are seconds apart.)"""
    import io
    import re

    from tqdm import tqdm

    from pretrain.trainer import _show_progress

    out = io.StringIO()
    bar = tqdm(total=30, desc="train", unit="step", file=out, mininterval=0)
    for step, loss in ((10, 2.5), (20, 1.25), (30, 0.625)):
        _show_progress(bar, step, {"loss": loss, "images_per_s": 100.0 * step})
    bar.close()
    writes = [w for w in re.split(r"[\r\n]", out.getvalue()) if w.startswith("train:") and " 0/30" not in w]
    drawn = [(int(re.search(r" (\d+)/30", w).group(1)), re.search(r"loss=([\d.]+)", w).group(1)) for w in writes]
    assert sorted(set(drawn)) == [(10, "2.5000"), (20, "1.2500"), (30, "0.6250")], writes
    assert [n for n, _ in drawn].count(10) == 1 and [n for n, _ in drawn].count(20) == 1, writes
