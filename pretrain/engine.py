"""Where DeepSpeed is imported: the engine from config, the schedule, the loss scale, op prebuild (checkpoints:
``pretrain.checkpoint``, on this import of DeepSpeed).

On a machine without CUDA, DeepSpeed runs with its ``cpu`` accelerator (gloo, fp32); on GPUs with bf16 autocast (fp16
with a dynamic loss scale, ``LossScale``, on GPUs without bf16). The
optimizer (torch's AdamW or SGD, or ``pretrain.optim.LARS``) is handed to DeepSpeed as a client optimizer, so no
CUDA/CPU-Adam extension has to be built.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _own_extensions_dir() -> str | None:
    """A directory inside this virtual environment for the ops torch JIT-builds for DeepSpeed, or None outside one (or
    in one not writable). Two installs sharing torch's default (~/.cache/torch_extensions) rebuild the op over each
    other, each seeing the other's build as stale: builds that a killed process can leave locked for both."""
    if sys.prefix == sys.base_prefix or not os.access(sys.prefix, os.W_OK):
        return None
    return os.path.join(sys.prefix, "torch_extensions")


# set before any build; processes started from this one (spawned ranks, Ray's workers, torchrun's) inherit it
if own := _own_extensions_dir():
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", own)

STALE_BUILD_LOCK_S = 600.0
"""A JIT build's lock this old was left by a process killed while building (a build takes ~40 s): removed, where
torch would wait on it forever."""

# DeepSpeed's autotuner imports MLflow at DeepSpeed's import where it is installed (~2 s of every worker's start on a
# 2-core VM), for autotuning experiments this project does not run: hidden from that import unless already loaded, so
# that only the rank that tracks the run loads MLflow (pretrain.tracking).
_hide_mlflow = "mlflow" not in sys.modules
if _hide_mlflow:
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError; DeepSpeed's autotuner then goes without
try:
    import deepspeed  # noqa: E402
finally:
    if _hide_mlflow:
        del sys.modules["mlflow"]

# DeepSpeed 0.19 still calls the deprecated all_gather_into_tensor and (ZeRO-3) reduce_scatter_tensor names every step;
# the warnings say nothing to users and, repeated by every Ray worker, flood the log.
warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
                        category=FutureWarning)

# fp16: a step skipped for gradients that are not finite (LossScale) leaves the optimizer unstepped and the schedule
# moving on, as intended; torch takes that for a misordered loop and warns.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`",
                        category=UserWarning)

from pretrain.config import Config  # noqa: E402
from pretrain.optim import LARS, Fragments, build_optimizer, config_param_groups  # noqa: E402


def autocast_dtype(cfg: Config) -> torch.dtype | None:
    """The dtype ``zero.precision`` runs matmuls and convolutions in under torch.autocast, or None for fp32. ``auto``:
    bf16 on GPUs that have it (compute capability 8+: A100, H100), fp16 on older ones (V100, T4), fp32 on the CPU."""
    precision = cfg.zero.precision
    if precision == "auto":
        if not torch.cuda.is_available():
            return None
        precision = "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def peak_lr(cfg: Config, world_size: int) -> float:
    """The learning rate after warmup: ``optim.lr``, scaled by ``optim.lr_scaling`` from ``optim.base_batch_size`` to
    the global batch, ``data.batch_size`` x the ``world_size`` ranks that train (job.num_workers under Ray; under
    torchrun, its processes) x ``optim.accum_steps``."""
    o = cfg.optim
    ratio = cfg.data.batch_size * world_size * o.accum_steps / o.base_batch_size
    return o.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[o.lr_scaling]


def lr_lambda(cfg: Config, *, fixed: bool = False):
    """Linear warmup to the peak, then cosine to ``min_lr_ratio`` x peak at ``max_steps``; ``fixed``: held at the
    peak after the warmup (``optim.fixed_lr``)."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.job.max_steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if fixed:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def weight_decay_at(cfg: Config):
    """``optim.weight_decay`` at step 0 along a half cosine to ``optim.weight_decay_end`` at ``max_steps`` (DINO: 0.04
    to 0.4); constant when ``weight_decay_end`` is null."""
    start, end, total = cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.job.max_steps

    def value(step: int) -> float:
        if end is None:
            return start
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))

    return value


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """Warmup + cosine learning rate (``lr_lambda``; held at the peak after the warmup in the groups of
    ``optim.fixed_lr``) and the weight decay of the decaying groups
    (``weight_decay_at``), both set for the coming step whenever the learning rate is. A function of the step alone:
    a resumed run (its ``last_epoch`` restored from the checkpoint) continues both exactly."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: Config, world_size: int = 1) -> None:
        self.weight_decay = weight_decay_at(cfg)
        self.peak_lr, self.hyper = peak_lr(cfg, world_size), optimizer_hyper(cfg)
        super().__init__(optimizer, [lr_lambda(cfg, fixed=bool(g.get("fixed_lr"))) for g in optimizer.param_groups])

    def follow_config(self) -> None:
        """After a checkpoint is loaded: the peak learning rate and the optimizer's settings (Adam's betas, LARS's
        momentum and trust coefficient, SGD's momentum) of this run's config, not of the run that saved it (a run
        resumed with another ``optim.lr`` uses it), and the learning rate for the coming step from them; unchanged
        values give back exactly what was saved."""
        self.base_lrs = [self.peak_lr * group.get("lr_mult", 1.0) for group in self.optimizer.param_groups]
        for group, base, factor in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas):
            group.update(initial_lr=base, lr=base * factor(self.last_epoch), **self.hyper)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    CONFIG_VALUES = ("weight_decay", "peak_lr", "hyper")
    """Functions and values of the config, like lr_lambdas: rebuilt from the running config, never saved or loaded."""

    def state_dict(self) -> dict:
        state = super().state_dict()
        for name in self.CONFIG_VALUES:
            state.pop(name, None)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = {k: v for k, v in state_dict.items() if k not in self.CONFIG_VALUES}
        super().load_state_dict(state_dict)

    def get_lr(self) -> list[float]:
        for group in self.optimizer.param_groups:
            if group.get("decay"):
                group["weight_decay"] = self.weight_decay(self.last_epoch)
        return super().get_lr()


def optimizer_hyper(cfg: Config) -> dict:
    """The param-group settings of ``optim.name``'s optimizer other than lr and weight decay."""
    o = cfg.optim
    if o.name in ("lars", "larc"):
        return {"momentum": o.momentum, "trust_coefficient": o.trust_coefficient}
    # under ZeRO-Offload torch's optimizers step the CPU partitions: their fused CPU kernels are ~5x their foreach ones
    fused = cfg.zero.offload == "cpu"
    if o.name == "sgd":
        return {"momentum": o.momentum, "fused": fused}
    return {"betas": tuple(o.betas), "fused": fused}


def ds_config(cfg: Config, *, universal: bool = False) -> dict:
    """DeepSpeed's config for ``cfg``; ``universal``: the engine will load a universal checkpoint
    (``pretrain.checkpoint.to_universal``)."""
    out = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.accum_steps,  # engine.step() steps the optimizer every that many
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.zero.stage},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # an offloaded torch optimizer (AdamW fused) in place of DeepSpeed's
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.zero.offload == "cpu":
        out["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    dtype = autocast_dtype(cfg)
    if dtype is not None:
        # torch.autocast rather than DeepSpeed's "bf16"/"fp16" modes: fp32 master weights, BatchNorm statistics and
        # inputs stay fp32 (a half-cast module breaks BatchNorm and needs every input cast), matmuls and convs run in
        # bf16 / fp16. fp16's loss scale: LossScale.
        out["torch_autocast"] = {"enabled": True, "dtype": str(dtype).removeprefix("torch.")}
        if cfg.zero.reduce_dtype == "fp32":  # no module's gradients reduced in the autocast dtype
            out["torch_autocast"]["lower_precision_safe_modules"] = []
    if universal:
        out["checkpoint"] = {"load_universal": True}
    return out


def build_engine(model: nn.Module, cfg: Config, *, universal: bool = False):
    """Wrap ``model`` in a DeepSpeed engine (ZeRO stage, AdamW, LARS or SGD, warmup + cosine, weight-decay schedule,
    clipping; ``model`` compiled first with ``model.compile``) from the config; ``universal``: one that loads a
    universal checkpoint (``pretrain.checkpoint.load_checkpoint(universal=)``).

    Call after the process group exists (Ray Train or torchrun set it up); DeepSpeed reuses it.
    """
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if not torch.cuda.is_available():
        clear_stale_build_locks()  # DeepSpeed builds (or loads) its CPU comm op in initialize
    o = cfg.optim
    if cfg.model.compile:  # in place: the same parameters, state dict and checkpoints
        model.compile()
    groups = config_param_groups(model, o)
    optimizer = build_optimizer(groups, o.name, peak_lr(cfg, world), **optimizer_hyper(cfg))
    scheduler = Schedule(optimizer, cfg, world)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(cfg, universal=universal)
    )
    engine.fp16_scale = LossScale(engine) if autocast_dtype(cfg) == torch.float16 else None
    if isinstance(optimizer, LARS) and engine.zero_optimization():
        optimizer.partitioned = ZeroLayout(engine.optimizer, engine.device)
    return engine


class ZeroLayout:
    """Where the trained parameters lie in the flat fp32 partitions that a ZeRO 1-3 optimizer hands its inner optimizer
    (one per param group under ZeRO 1-2, per sub-group under ZeRO-3): called with such a partition, its
    ``pretrain.optim.Fragments``, for LARS's per-parameter norms (``LARS.partitioned``). Read from DeepSpeed 0.19's
    own bookkeeping: under ZeRO 1-2 the fragment each parameter has in this rank's partition (``_hp_mapping``, what
    DeepSpeed's ``safe_get_local_fp32_param`` reads); under ZeRO-3 each parameter is split over the ranks on its own,
    rank r holding its elements [r·n, (r + 1)·n) of a padded length, one after another in the partition. ``device``:
    the engine's, where the collectives run."""

    def __init__(self, zero_optimizer, device: torch.device) -> None:
        self.zero, self.device = zero_optimizer, device
        self._found: dict[int, tuple[torch.Tensor, Fragments]] = {}

    def __call__(self, flat: torch.Tensor) -> Fragments:
        found = self._found.get(id(flat))
        if found is None or found[0] is not flat:
            found = self._found[id(flat)] = (flat, self._locate(flat))
        return found[1]

    def _locate(self, flat: torch.Tensor) -> Fragments:
        zero = self.zero
        if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
            for i, partition in enumerate(zero.fp32_partitioned_groups_flat):
                if partition is flat:
                    group = zero.sub_group_process_groups[i]
                    rank = torch.distributed.get_rank(group)
                    pieces, offset = [], 0
                    for slot, p in enumerate(zero.fp16_groups[i]):
                        size = p.partition_numel()
                        numel = min(size, p.ds_numel - rank * size)  # the last ranks' pieces end in padding
                        if numel > 0:
                            pieces.append((slot, offset, numel))
                        offset += size
                    return Fragments.of(pieces, len(zero.fp16_groups[i]), group, self.device)
        else:
            for i, partition in enumerate(zero.single_partition_of_fp32_groups):
                if partition is flat:
                    params = zero.bit16_groups[i]
                    addresses = [(slot, p._hp_mapping.hp_fragment_address) for slot, p in enumerate(params)
                                 if p._hp_mapping is not None]
                    return Fragments.of([(slot, a.start, a.numel) for slot, a in addresses], len(params),
                                        zero.real_dp_process_group[i], self.device)
        raise RuntimeError("LARS under ZeRO: a tensor that is none of the ZeRO optimizer's partitions")


class LossScaleCollapsed(RuntimeError):
    """fp16: the gradients stayed inf or NaN however low the loss scale went; the run stops."""


class LossScale:
    """fp16's dynamic loss scale at every ZeRO stage, as ``torch.amp.GradScaler`` moves it: 2**16 at the start,
    halved at every step whose gradients are not finite (that step is skipped: no update), doubled after
    ``growth_interval`` finite steps in a row. ``build_engine`` attaches one to an fp16 engine as ``engine.fp16_scale``;
    ``update()`` follows every optimizer step (``pretrain.trainer.optimizer_step``).

    Stage 0 keeps DeepSpeed's own GradScaler (given this one's growth interval), which unscales before clipping. Under
    ZeRO 1-3 DeepSpeed 0.19.8's torch-autocast GradScaler is wrong twice: the ZeRO optimizer clips the still-scaled
    gradients against the unscaled threshold before the GradScaler unscales them (a clipped update comes out 2**16
    times too small: the run barely moves), and a skipped step never reaches the GradScaler's backoff (the scale never
    falls: a run that overflows at 2**16 skips every step). There the scale is the ZeRO optimizer's external loss
    scale instead (``override_loss_scale``), by which it scales the loss, then unscales and clips correctly, skipping a
    step whose gradients are not finite; this class moves it. Either way the learning-rate schedule advances at every
    step, skipped or not (DeepSpeed holds it back at a skip under ZeRO), as in the reference AMP loops (DINO's, MAE's).

    A run stops with ``LossScaleCollapsed`` after ``max_skipped_in_a_row`` skipped steps in a row (the scale down by
    2**30 from where it was): gradients that are not finite at any scale, which no further step would mend."""

    def __init__(self, engine, *, init_scale: float = 2.0**16, growth_interval: int = 2000,
                 max_skipped_in_a_row: int = 30) -> None:
        self.engine, self.zero = engine, bool(engine.zero_optimization())
        self.growth_interval, self.max_skipped_in_a_row = growth_interval, max_skipped_in_a_row
        self.scale, self.good, self.skipped, self.in_a_row = float(init_scale), 0, 0, 0
        if self.zero:
            engine.optimizer.torch_autocast_gradscaler = None
            engine.optimizer.override_loss_scale(self.scale)
        else:
            engine.torch_autocast_z0_gradscaler = torch.amp.GradScaler(
                engine.device.type, init_scale=init_scale, growth_interval=growth_interval)

    def update(self) -> bool:
        """After the engine's step at a gradient-accumulation boundary: moves the scale; returns whether the step
        updated the weights."""
        if self.zero:
            applied = self.engine.was_step_applied()
            if not applied:
                self.engine.lr_scheduler.step()  # the one DeepSpeed skipped with the update
            self.good = self.good + 1 if applied else 0
            if self.good == self.growth_interval:
                self.scale, self.good = self.scale * 2, 0
            elif not applied:
                self.scale /= 2
            self.engine.optimizer.override_loss_scale(self.scale)
        else:  # the GradScaler lowers its scale only at a step it skipped, raises it only at the end of an interval
            scale = self.engine.torch_autocast_z0_gradscaler.get_scale()
            applied = scale >= self.scale
            self.good = (0 if scale > self.scale else self.good + 1) if applied else 0
            self.scale = scale
        self.skipped += not applied
        self.in_a_row = 0 if applied else self.in_a_row + 1
        if self.in_a_row >= self.max_skipped_in_a_row:
            raise LossScaleCollapsed(
                f"zero.precision fp16: the gradients were not finite at {self.in_a_row} steps in a row, the loss scale "
                f"down to {self.scale:g}; the run stopped: resume from its last checkpoint with zero.precision bf16 "
                "or fp32, a lower optim.lr or more optim.warmup_steps")
        return applied

    def state_dict(self) -> dict:
        state = {"scale": self.scale, "good": self.good, "skipped": self.skipped, "in_a_row": self.in_a_row}
        if not self.zero:
            state["grad_scaler"] = self.engine.torch_autocast_z0_gradscaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's scale (of the same ZeRO stage: a resume refuses another)."""
        self.scale, self.good, self.skipped, self.in_a_row = (
            float(state["scale"]), int(state["good"]), int(state["skipped"]), int(state["in_a_row"]))
        if self.zero:
            self.engine.optimizer.override_loss_scale(self.scale)
        else:
            self.engine.torch_autocast_z0_gradscaler.load_state_dict(state["grad_scaler"])


def _extensions_root() -> Path:
    """Where torch builds and finds JIT-compiled ops (as torch.utils.cpp_extension decides it)."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove the build locks of JIT-compiled ops older than ``max_age_s`` (each said in a line): a process killed
    while building leaves its lock, and every later build or load of that op then waits for it forever, silently.
    Returns the locks removed."""
    removed = []
    root = _extensions_root()  # torch's default has a folder per Python and device above the ops; a set one has not
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            age = time.time() - lock.stat().st_mtime
            if age > max_age_s:
                lock.unlink()
                removed.append(lock)
                print(f"Removed {lock}, a build lock {age / 60:.0f} min old left by a process killed while building "
                      "(torch would wait on it forever)", flush=True)
        except FileNotFoundError:  # another rank removed it, or the build finished
            pass
    return removed


def prebuild_ops() -> None:
    """Build (or load from the cache) the ops DeepSpeed JIT-compiles at ``initialize``, saying so.

    On CPU that is ``deepspeed_shm_comm`` (~40 s the first time), built into TORCH_EXTENSIONS_DIR (the virtual
    environment's own, set at import), which workers inherit and find it built in.
    """
    if torch.cuda.is_available():
        return  # CUDA runs use torch's optimizers (AdamW, SGD, or LARS in plain torch) and NCCL: nothing to JIT-compile
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible():
        return
    root = _extensions_root()
    clear_stale_build_locks()
    built = any(root.glob(f"{builder.NAME}/*.so")) or any(root.glob(f"*/{builder.NAME}/*.so"))
    if not built:
        print(f"Building DeepSpeed's {builder.NAME} op once into {root} (about 40 s; cached afterwards) ...",
              flush=True)
    t0 = time.perf_counter()
    builder.load(verbose=False)
    if not built:
        print(f"Built {builder.NAME} in {time.perf_counter() - t0:.0f} s.", flush=True)
