"""Typed run configuration: dataclasses are the schema, YAML recipes are the data.

``load_config("configs/simclr_digits.yaml", ["optim.lr=1e-3"])`` reads a recipe (which may derive from another through
``base:``), applies dotted overrides, checks every key and type, and runs each section's ``__post_init__`` checks. Any
problem raises :class:`ConfigError` with one line that names the key, before any worker starts.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.views import AugmentConfig

MAX_SEED = (2**32 - 1 - 1_000_000) // 1000
"""The largest ``job.seed``: each rank seeds numpy (seeds below 2**32) with seed x 1000 + 1 + rank (below 10**6)."""


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the key."""


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {problem}")


def _absolute(location: str) -> str:
    """A dataset location as every worker finds it: a local path made absolute (Ray's workers, a scheduler's job
    start in other directories), ``~`` expanded; a built-in source's name and a URL as they are."""
    from data_pipeline.remote import is_url
    from data_pipeline.shards import BUILTIN_VERSIONS

    if location in BUILTIN_VERSIONS or is_url(location) or not location:
        return location
    if location.startswith("file://"):  # a URL of a local path: the path (it had become <cwd>/file:/...)
        location = location[len("file://"):]
    return str(Path(location).expanduser().resolve())


@dataclass(kw_only=True)
class ModelConfig:
    backbone: str = "convnet"
    """Key into pretrain.models.BACKBONES (vit_tiny, vit_small, vit_base, vit_large, vit_huge, convnet, resnet18,
    resnet50)."""
    patch_size: int = 16
    """ViT patch size; the image size comes from data.image_size."""
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra constructor arguments for the backbone (e.g. width, depth, drop_path_rate)."""
    proj_hidden_dim: int = 512
    proj_out_dim: int = 128
    proj_layers: int = 2
    proj_last_bn: bool = False
    """BYOL, MoCo v3: the projector's last Linear (no bias then) followed by a BatchNorm without affine parameters, as
    MoCo v3's official projector (SimCLR's design); the predictor keeps a plain last Linear."""
    proj_last_bn_scale: bool = False
    """SimCLR, with ``proj_last_bn``: that BatchNorm learns a per-channel scale (no shift), as the official SimCLR
    head's last BatchNorm (``center=False``)."""
    sync_bn: bool = False
    """BatchNorm statistics of the global batch (every rank's samples) in training, in the backbone and the heads
    (SimCLR's and BYOL's global BN; pretrain.sync_bn): two small all-reduces per BatchNorm layer and forward. Off:
    each rank normalises by its own batch. No effect on one rank or on models without BatchNorm."""
    sync_bn_group: int = 0
    """With ``sync_bn``: the statistics of groups of this many consecutive ranks (apex's
    ``create_syncbn_process_group``, as SwAV's official ``--syncbn_process_group_size 8``); 0, or as many ranks as
    there are or more: every rank. Fewer than the ranks must divide their number."""
    compile: bool = False
    """torch.compile the training forward (the method's, loss included; ``nn.Module.compile``, in place: parameter
    names, checkpoints and the evaluation unchanged): the first step compiles (tens of seconds), later ones run the
    compiled graphs; the backward too. A resume may turn it on or off."""

    def __post_init__(self) -> None:
        _check(self.patch_size > 0, "patch_size", "must be > 0")
        _check(self.proj_hidden_dim > 0, "proj_hidden_dim", "must be > 0")
        _check(self.proj_out_dim > 0, "proj_out_dim", "must be > 0")
        _check(self.proj_layers >= 1, "proj_layers", "must be >= 1")
        _check(self.sync_bn_group >= 0, "sync_bn_group", f"must be >= 0 (0 = every rank), got {self.sync_bn_group}")


@dataclass(kw_only=True)
class MethodConfig:
    name: str = "simclr"
    """Key into pretrain.methods.METHODS."""
    temperature: float = 0.2
    """SimCLR: NT-Xent temperature; MoCo v3: its InfoNCE temperature (the paper's 0.2 for ViTs, 1.0 for ResNets);
    MoCo v2: its InfoNCE's (the paper's 0.2); NNCLR: its InfoNCE's (the paper's 0.1); SwAV: the prototype softmax's
    (the paper's 0.1)."""
    loss_impl: str = "auto"
    """auto (Triton on CUDA, PyTorch on CPU) | triton | chunked (SimCLR: memory-efficient PyTorch) | ref (naive)."""
    gather_distributed: bool = True
    """SimCLR: use the embeddings of every rank as negatives (gathered with gradients); MoCo v3: every rank's keys;
    NNCLR: every rank's predictions (required: its support set holds every rank's embeddings); MoCo v2: required (its
    queue holds every rank's keys)."""
    decoupled: bool = False
    """SimCLR, MoCo v3, MoCo v2, NNCLR: the decoupled contrastive loss (DCL, Yeh et al. 2022): each anchor's positive
    left out of its denominator, which then holds its negatives only (the paper's remedy for small batches, also paired
    there with NNCLR); computed from the contrastive kernel's per-row losses, at no extra cost (MoCo v2: from its
    logits against the queue)."""
    # --- DINO (the head's MLP is model.proj_*: hidden dim, layers, and proj_out_dim as the bottleneck) ---
    num_prototypes: int = 65536
    """DINO: K, the output dimension of the head's weight-normalised last layer; SwAV: its prototypes (3000)."""
    norm_last_layer: bool = True
    """DINO: prototypes of unit norm (frozen gain); false lets the gain train (better for ViT-S, less stable)."""
    head_bn: bool = False
    """DINO: BatchNorm between the head's MLP layers (official use_bn_in_head)."""
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    """DINO: teacher temperature after warmup (sharpening)."""
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0
    """DINO: teacher temperature rises linearly from warmup_teacher_temp to teacher_temp over these steps."""
    teacher_momentum: float = 0.996
    """DINO, BYOL, MoCo v2/v3, I-JEPA: EMA momentum of the teacher (target, momentum encoder) at step 0, raised to 1
    over job.max_steps by a cosine (I-JEPA: linearly, as the reference)."""
    center_momentum: float = 0.9
    """DINO: EMA momentum of the center (the mean teacher output over all ranks)."""
    koleo_weight: float = 0.0
    """DINO, iBOT: weight of DINOv2's KoLeo regularizer on the student's global-view features (each view's batch on
    this rank: -mean log distance to the nearest other feature), which spreads them out; DINOv2 uses 0.1. 0 = off."""
    centering: str = "ema"
    """DINO: how the teacher's outputs are centred: ``ema`` (DINO's: minus an EMA of their mean over all ranks, then
    softmax at the teacher temperature) or ``sinkhorn`` (DINOv2's Sinkhorn-Knopp centering: the teacher's
    distributions balanced over the prototypes across the global batch, sinkhorn_iters iterations at the teacher
    temperature; needs norm_last_layer)."""
    freeze_last_layer_steps: int = 0
    """DINO, SwAV: steps during which the prototypes get no gradient (stabilises the start)."""
    # --- iBOT (everything of DINO above, plus masked patches of the student's global views) ---
    mask_ratio_range: tuple[float, float] = (0.1, 0.5)
    """iBOT: a masked view hides a fraction drawn uniformly from this range, in blocks of patches."""
    mask_prob: float = 0.5
    """iBOT: probability that a global view is masked at all."""
    teacher_patch_temp: float = 0.07
    """iBOT: teacher temperature of the patch loss after warmup (from warmup_teacher_temp, like teacher_temp)."""
    patch_loss_weight: float = 1.0
    """iBOT: weight of the masked-patch loss next to the cls (DINO) loss."""
    patch_head: str = "shared"
    """iBOT: ``shared`` (iBOT's: one head maps the image-level and the patch tokens onto one set of prototypes) or
    ``separate`` (DINOv2's ibot.separate_head: the patch tokens get a head of their own, of the same shape, with its
    own prototypes and its own EMA teacher)."""
    patch_prototypes: int = 0
    """iBOT with ``patch_head: separate``: the patch head's prototypes (DINOv2's ibot.head_n_prototypes); 0 = as many
    as num_prototypes."""
    # --- BYOL (projector: model.proj_*; target momentum: teacher_momentum) ---
    predictor_hidden_dim: int = 512
    """BYOL, MoCo v3, NNCLR: hidden width of the 2-layer predictor (proj_out_dim -> this -> proj_out_dim)."""
    # --- MAE (loss_impl picks the masked-gather kernel: auto | triton | ref) ---
    mask_ratio: float = 0.75
    """MAE: fraction of patches hidden from the encoder (and reconstructed); SimMIM: fraction of its mask units hidden
    (rounded up; the paper's 0.6)."""
    mask_patch_size: int = 32
    """SimMIM: side in pixels of the square mask units, a multiple of model.patch_size dividing data.image_size (the
    paper's 32: 2 x 2 patches of ViT-B/16)."""
    norm_pix_loss: bool = True
    """MAE: targets are each patch's pixels normalised by the patch's own mean and std."""
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    # --- I-JEPA (predictor: decoder_dim, decoder_depth, decoder_heads; target momentum: teacher_momentum, linear) ---
    num_target_blocks: int = 4
    """I-JEPA: target blocks per image, each predicted from the context."""
    target_scale: tuple[float, float] = (0.15, 0.2)
    """I-JEPA: a target block covers a fraction of the patch grid drawn from this range (one shape per batch)."""
    target_aspect: tuple[float, float] = (0.75, 1.5)
    """I-JEPA: and has a height / width ratio drawn from this range."""
    context_scale: tuple[float, float] = (0.85, 1.0)
    """I-JEPA: the square context block covers a fraction drawn from this range, less every target patch."""
    min_context_patches: int = 10
    """I-JEPA: a context keeps at least this many patches (the reference's min_keep); where the targets leave fewer,
    the context is allowed to overlap them, one target at a time."""
    # --- Barlow Twins and VICReg (the projector: model.proj_*; both compare two views over the global batch) ---
    barlow_lambda: float = 0.0051
    """Barlow Twins: weight of the off-diagonal (redundancy-reduction) term: the paper's, which it found robust over
    an order of magnitude."""
    vicreg_invariance: float = 25.0
    vicreg_variance: float = 25.0
    vicreg_covariance: float = 1.0
    """VICReg: weights of its invariance, variance and covariance terms (the paper's 25, 25, 1)."""
    # --- SwAV (projector: model.proj_*; prototypes: num_prototypes, frozen for freeze_last_layer_steps) ---
    sinkhorn_eps: float = 0.05
    """SwAV: the codes are exp(scores / sinkhorn_eps), balanced over the prototypes: smaller is sharper."""
    sinkhorn_iters: int = 3
    """SwAV, and DINO's / iBOT's sinkhorn centering: Sinkhorn-Knopp iterations (each: prototypes' totals over the
    global batch, then each image's row)."""
    queue_size: int = 0
    """SwAV: embeddings of the last global batches (every rank's) kept per global view and balanced with the batch in
    Sinkhorn-Knopp, for global batches too small to share K prototypes (the official code's queue_length, e.g. 3840
    for 256 images); 0 = none. NNCLR: the support set the neighbours come from, the view-1 embeddings of the last
    this many images of every rank (the paper's 98,304); required. MoCo v2: the negatives, the keys of the last this
    many images of every rank (the paper's 65,536); required."""
    queue_start_steps: int = 0
    """SwAV: the queue fills from this step on and joins the codes once full (the official code starts it late: after
    15 epochs)."""
    # --- CLIP (image projection: model.proj_*; joint embedding: model.proj_out_dim; loss_impl as SimCLR's) ---
    context_length: int = 32
    """CLIP: text tokens per caption (UTF-8 bytes + begin and end); longer captions are cut."""
    text_width: int = 256
    text_depth: int = 4
    text_heads: int = 4
    logit_scale_init: float = 2.6593
    """CLIP: the learned log logit scale starts here (ln 1/0.07)."""
    logit_scale_max: float = 4.6052
    """CLIP: and is capped here (ln 100)."""
    # --- Colorization (the head's hidden width: model.proj_hidden_dim) ---
    color_bins: int = 10
    """Colorization: the (a, b) chroma plane over [-110, 110]^2 is cut into color_bins x color_bins classes."""
    color_rebalance: float | None = None
    """Colorization: Zhang et al.'s class rebalancing, lambda in (0, 1]: each cell's loss is weighted by
    ((1 - lambda) p + lambda / Q)^-1 (mean 1 under p), p the running frequency of its bin over all ranks; they use 0.5.
    null = off."""
    # --- Jigsaw (the head's MLP: model.proj_hidden_dim, proj_layers) ---
    jigsaw_grid: int = 3
    """Jigsaw: the view is cut into grid x grid cells (data.image_size must divide evenly)."""
    jigsaw_gap: int = 1
    """Jigsaw: a tile is its cell less this many pixels, cropped at a random offset (no edge matching)."""
    jigsaw_normalize_tiles: bool = True
    """Jigsaw: each tile to zero mean, unit variance on its own (the paper's guard against low-level shortcuts)."""
    jigsaw_permutations: int = 100
    """Jigsaw: the classes: this many permutations, far apart in Hamming distance (all 24 of a 2x2 grid)."""
    # --- VQ-VAE tokenizer (its decoder: decoder_dim, decoder_depth, decoder_heads) and BEiT ---
    vocab_size: int = 8192
    """VQ-VAE: codebook entries, the visual tokens' vocabulary (DALL-E's dVAE, BEiT's tokenizer, has 8192). BEiT takes
    its tokenizer's."""
    code_dim: int = 32
    """VQ-VAE: dimension of the l2-normalised code space the lookup runs in (ViT-VQGAN's factorised codes)."""
    commitment_weight: float = 0.25
    """VQ-VAE: weight of the commitment loss that keeps the encoder's outputs near their codes."""
    codebook_decay: float = 0.99
    """VQ-VAE: EMA decay of the codebook (each entry: the running mean direction of the outputs assigned to it)."""
    tokenizer: str | None = None
    """BEiT: a finished vqvae run directory (or its model.pt) whose tokens the masked patches are trained to predict;
    relative paths are taken from the directory the config is loaded in."""

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        choices = ("auto", "triton", "chunked", "ref")
        _check(self.loss_impl in choices, "loss_impl", f"must be one of {', '.join(choices)}, got {self.loss_impl!r}")
        _check(self.num_prototypes > 0, "num_prototypes", f"must be > 0, got {self.num_prototypes}")
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            _check(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        for key in ("teacher_momentum", "center_momentum"):
            _check(0 <= getattr(self, key) <= 1, key, f"must be in [0, 1], got {getattr(self, key)}")
        for key in ("warmup_teacher_temp_steps", "freeze_last_layer_steps"):
            _check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        _check(0 < self.mask_ratio < 1, "mask_ratio", f"must be in (0, 1), got {self.mask_ratio}")
        _check(self.mask_patch_size > 0, "mask_patch_size", f"must be > 0, got {self.mask_patch_size}")
        lo, hi = self.mask_ratio_range
        _check(0 <= lo <= hi < 1, "mask_ratio_range", f"need 0 <= low <= high < 1, got {list(self.mask_ratio_range)}")
        _check(0 <= self.mask_prob <= 1, "mask_prob", f"must be in [0, 1], got {self.mask_prob}")
        _check(self.num_target_blocks >= 1, "num_target_blocks", f"must be >= 1, got {self.num_target_blocks}")
        for key in ("target_scale", "context_scale"):
            lo, hi = getattr(self, key)
            _check(0 < lo <= hi <= 1, key, f"need 0 < low <= high <= 1, got {[lo, hi]}")
        lo, hi = self.target_aspect
        _check(0 < lo <= hi, "target_aspect", f"need 0 < low <= high, got {[lo, hi]}")
        _check(self.min_context_patches >= 1, "min_context_patches", f"must be >= 1, got {self.min_context_patches}")
        _check(self.teacher_patch_temp > 0, "teacher_patch_temp", f"must be > 0, got {self.teacher_patch_temp}")
        _check(self.patch_loss_weight >= 0, "patch_loss_weight", f"must be >= 0, got {self.patch_loss_weight}")
        _check(self.patch_head in ("shared", "separate"), "patch_head",
               f"must be shared or separate, got {self.patch_head!r}")
        _check(self.patch_prototypes >= 0, "patch_prototypes", f"must be >= 0, got {self.patch_prototypes}")
        _check(self.patch_head == "separate" or self.patch_prototypes in (0, self.num_prototypes), "patch_prototypes",
               f"{self.patch_prototypes} needs patch_head: separate (a shared head has its num_prototypes, "
               f"{self.num_prototypes}, for the patches too)")
        _check(self.centering in ("ema", "sinkhorn"), "centering", f"must be ema or sinkhorn, got {self.centering!r}")
        _check(self.sinkhorn_eps > 0, "sinkhorn_eps", f"must be > 0, got {self.sinkhorn_eps}")
        for key in ("queue_size", "queue_start_steps"):
            _check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        _check(self.sinkhorn_iters >= 1, "sinkhorn_iters", f"must be >= 1, got {self.sinkhorn_iters}")
        for key in ("koleo_weight", "barlow_lambda", "vicreg_invariance", "vicreg_variance", "vicreg_covariance"):
            _check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("predictor_hidden_dim", "decoder_dim", "decoder_depth", "decoder_heads", "text_width", "text_depth",
                    "text_heads"):
            _check(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        _check(self.color_rebalance is None or 0 < self.color_rebalance <= 1, "color_rebalance",
               f"must be in (0, 1] or null, got {self.color_rebalance}")
        _check(self.color_bins >= 2, "color_bins", f"must be >= 2, got {self.color_bins}")
        _check(self.jigsaw_grid >= 2, "jigsaw_grid", f"must be >= 2, got {self.jigsaw_grid}")
        _check(self.jigsaw_gap >= 0, "jigsaw_gap", f"must be >= 0, got {self.jigsaw_gap}")
        _check(self.jigsaw_permutations >= 2, "jigsaw_permutations", f"must be >= 2, got {self.jigsaw_permutations}")
        _check(self.vocab_size >= 2, "vocab_size", f"must be >= 2, got {self.vocab_size}")
        _check(self.code_dim >= 1, "code_dim", f"must be >= 1, got {self.code_dim}")
        _check(0 <= self.codebook_decay < 1, "codebook_decay", f"must be in [0, 1), got {self.codebook_decay}")
        _check(self.commitment_weight >= 0, "commitment_weight", f"must be >= 0, got {self.commitment_weight}")
        if self.tokenizer is not None:  # absolute, so workers that start elsewhere (Ray's) find the same run
            self.tokenizer = str(Path(self.tokenizer).expanduser().resolve())
        _check(self.context_length >= 3, "context_length", f"must be >= 3 (begin, a byte, end), got "
               f"{self.context_length}")


@dataclass(kw_only=True)
class DataConfig:
    source: str = "digits"
    """'digits' or 'samples' (built-in: shards built into cache_dir on first use) or a directory of shards with a
    manifest.parquet."""
    cache_dir: str = "~/.cache/ssl-pretrain"
    shard_size: int = 256
    """Samples per shard when shards are built on first use."""
    batch_size: int = 256
    """Per worker (DeepSpeed's micro-batch); the global batch is batch_size x num_workers."""
    num_loader_workers: int = 1
    dali_threads: int = 2
    """CPU threads of each worker's DALI pipeline (decoding, CPU ops); about the cores per GPU on GPU nodes"""
    shuffle_buffer: int = 1000
    image_size: int = 16
    channels: int = 3
    num_views: int = 2
    """Views at image_size per image (SimCLR: 2; DINO: the global crops, seen by the teacher too; MAE: 1)."""
    local_views: int = 0
    """Multi-crop: extra small views per image at local_size (DINO), cropped with local_crop_scale."""
    local_size: int = 8
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    """Area fraction range of the local crops (data.aug.crop_scale is the global views' range)."""
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    view_aug: list[dict[str, Any]] = field(default_factory=list)
    """Asymmetric views (BYOL, DINO): one mapping per global view of the data.aug keys that differ for it, e.g.
    [{blur_prob: 1.0}, {blur_prob: 0.1, solarize_prob: 0.2}]; empty = every view uses data.aug as it is. mean and std
    are data.aug's for every view."""
    local_aug: dict[str, Any] = field(default_factory=dict)
    """The data.aug keys that differ for the local crops (DINO: {blur_prob: 0.5}); their area range stays
    local_crop_scale."""

    def __post_init__(self) -> None:
        _check(bool(self.source), "source", "must not be empty")
        self.source = _absolute(self.source)
        if not self.cache_dir.startswith("~"):  # a relative one: as here, not in each worker's own directory
            self.cache_dir = str(Path(self.cache_dir).resolve())
        _check(self.shard_size > 0, "shard_size", "must be > 0")
        _check(self.batch_size >= 2, "batch_size", f"must be >= 2, got {self.batch_size}")
        _check(self.num_loader_workers >= 0, "num_loader_workers", "must be >= 0")
        _check(self.dali_threads >= 1, "dali_threads", f"must be >= 1, got {self.dali_threads}")
        _check(self.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0")
        _check(self.image_size > 0, "image_size", "must be > 0")
        _check(self.channels in (1, 3), "channels", f"must be 1 or 3, got {self.channels}")
        _check(self.num_views >= 1, "num_views", f"must be >= 1, got {self.num_views}")
        _check(self.local_views >= 0, "local_views", f"must be >= 0, got {self.local_views}")
        if self.local_views:  # the local keys mean nothing without local crops
            _check(0 < self.local_size <= self.image_size, "local_size",
                   f"must be in [1, image_size={self.image_size}], got {self.local_size}")
            lo, hi = self.local_crop_scale
            _check(0 < lo <= hi <= 1, "local_crop_scale",
                   f"need 0 < low <= high <= 1, got {list(self.local_crop_scale)}")
        try:
            self.aug.channel_stats(self.channels)
        except ValueError as e:
            raise ValueError(f"aug.{e}") from None
        _check(not self.view_aug or len(self.view_aug) == self.num_views, "view_aug",
               f"has {len(self.view_aug)} mappings for {self.num_views} global views (one each, or none)")
        _check(not self.local_aug or self.local_views > 0, "local_aug", "is set but there are no local_views")
        self.view_augments()
        self.local_augment()

    def _augment(self, key: str, changes: dict[str, Any], **fixed: Any) -> AugmentConfig:
        """data.aug with ``changes`` (the keys of ``key``) and ``fixed``, checked like data.aug itself."""
        if not isinstance(changes, dict):
            raise ValueError(f"{key}: expected a mapping of data.aug keys, got {changes!r}")
        known = {f.name for f in dataclasses.fields(AugmentConfig)} - {"mean", "std", *fixed}
        for name in changes:
            _check(name in known, f"{key}.{name}", "not a data.aug key that may differ per view (known: "
                   f"{', '.join(sorted(known))})")
        hints = typing.get_type_hints(AugmentConfig)
        try:  # typed as data.aug's own keys are (a number with an exponent, a list as a pair)
            changes = {name: _convert(v, hints[name], name) for name, v in changes.items()}
            return dataclasses.replace(self.aug, **changes, **fixed)
        except ValueError as e:
            raise ValueError(f"{key}.{e}") from None

    def view_augments(self) -> list[AugmentConfig] | None:
        """One augmentation per global view (data.aug with that view's view_aug), or None: data.aug for all."""
        if not self.view_aug:
            return None
        return [self._augment(f"view_aug[{i}]", changes) for i, changes in enumerate(self.view_aug)]

    def local_augment(self) -> AugmentConfig | None:
        """The local crops' augmentation (data.aug with local_aug, the area range local_crop_scale), or None without
        local crops."""
        if not self.local_views:
            return None
        return self._augment("local_aug", self.local_aug, crop_scale=tuple(self.local_crop_scale))


@dataclass(kw_only=True)
class OptimConfig:
    name: str = "adamw"
    """adamw | lars | larc | sgd. LARS (SimCLR's and BYOL's optimizer at large batch: per-layer trust ratio, momentum,
    the weights only adapted), any ZeRO stage (under 1-3 each parameter's norms are summed over the ranks' partitions);
    its lr is typically 0.3 (SimCLR) or 0.2 (BYOL) per 256 images, scaled linearly, with weight decay 1e-6 / 1.5e-6.
    larc: apex's LARC (clip=False) around torch's SGD, as the official SwAV code (``pretrain.optim.LARC``): every
    parameter adapted, biases and norms too, by ``trust_coefficient`` x ||w|| / (||g|| + wd ||w||), the lr outside the
    momentum; any ZeRO stage, as LARS. sgd: torch's SGD with heavy-ball ``momentum`` (SimSiam's: lr 0.05 per 256
    images, weight decay 1e-4; MoCo v2's: 0.03), any ZeRO stage."""
    lr: float = 1e-3
    """Peak learning rate (after warmup); with lr_scaling, the rate at a global batch of base_batch_size."""
    lr_scaling: str = "none"
    """none | linear | sqrt: the peak is lr x (global batch / base_batch_size), or its square root, the global batch
    being data.batch_size x job.num_workers x accum_steps (linear: Goyal et al., as DINO, iBOT and MAE set theirs;
    sqrt: LAMB, and what SimCLR found for large batches). A recipe then keeps its rate when it runs on more GPUs."""
    base_batch_size: int = 256
    """The global batch at which the peak learning rate is lr (lr_scaling)."""
    accum_steps: int = 1
    """Micro-batches of data.batch_size whose gradients make one optimizer step (gradient accumulation): the global
    batch is data.batch_size x ranks x accum_steps, as MAE reaches 4,096 on fewer GPUs. Contrastive losses (SimCLR,
    CLIP) still contrast within a micro-batch; per-step statistics (DINO's centers, the VQ-VAE codebook) use every
    micro-batch."""
    min_lr_ratio: float = 0.01
    """Cosine decay ends at lr x min_lr_ratio."""
    weight_decay: float = 1e-4
    weight_decay_end: float | None = None
    """Cosine from weight_decay at step 0 to this at job.max_steps (DINO: 0.04 -> 0.4); null = constant."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's."""
    momentum: float = 0.9
    """LARS's and SGD's heavy-ball momentum."""
    trust_coefficient: float = 1e-3
    """LARS's eta: a layer's step is about lr x eta x its weight norm."""
    warmup_steps: int = 50
    grad_clip: float = 1.0
    """Gradient-norm clipping; 0 disables."""
    layer_decay: float = 1.0
    """Layer-wise learning-rate decay of a ViT backbone (BEiT's, DINOv2's 0.9): block i of depth learns at
    layer_decay ** (depth - i) of the rate, the embeddings and tokens at layer_decay ** (depth + 1), the last norm and
    the heads at the full rate; 1 = off."""
    patch_embed_lr_mult: float = 1.0
    """A ViT's patch projection learns at this times its rate (DINOv2's 0.2); 1 = off."""
    norm_bias_lr_mult: float = 1.0
    """The 1-D parameters (biases, norm weights) learn at this times the rate of the weights beside them (Barlow
    Twins': 0.0048 / 0.2 = 0.024); 1 = off."""
    fixed_lr: list[str] = field(default_factory=list)
    """Parameter-name prefixes (whole dotted components of the method's parameter names, e.g. ``predictor``) whose
    learning rate is held at the peak after the warmup instead of following the cosine: SimSiam's predictor (the
    paper's "fixed lr", the official code's --fix-pred-lr). Each must name a trainable parameter of the method: checked
    before any worker starts."""
    decay_norms_and_biases: bool = False
    """Weight decay on the 1-D parameters too (biases, norm weights), as torch's SGD over every parameter in the
    official SimSiam and MoCo v2 code; off: only the weights decay (DINO's, BYOL's and SimCLR's groups). LARS still
    adapts only the weights."""

    def __post_init__(self) -> None:
        _check(self.name in ("adamw", "lars", "larc", "sgd"), "name",
               f"must be adamw, lars, larc or sgd, got {self.name!r}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.lr_scaling in ("none", "linear", "sqrt"), "lr_scaling",
               f"must be none, linear or sqrt, got {self.lr_scaling!r}")
        _check(self.base_batch_size >= 1, "base_batch_size", f"must be >= 1, got {self.base_batch_size}")
        _check(self.accum_steps >= 1, "accum_steps", f"must be >= 1, got {self.accum_steps}")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(self.weight_decay_end is None or self.weight_decay_end >= 0, "weight_decay_end",
               f"must be >= 0 or null, got {self.weight_decay_end}")
        _check(all(0 <= b < 1 for b in self.betas), "betas", "must be in [0, 1)")
        _check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        _check(0 < self.layer_decay <= 1, "layer_decay", f"must be in (0, 1], got {self.layer_decay}")
        _check(self.patch_embed_lr_mult > 0, "patch_embed_lr_mult", f"must be > 0, got {self.patch_embed_lr_mult}")
        _check(self.norm_bias_lr_mult > 0, "norm_bias_lr_mult", f"must be > 0, got {self.norm_bias_lr_mult}")
        _check(all(isinstance(x, str) and x and not x.startswith(".") and not x.endswith(".") for x in self.fixed_lr),
               "fixed_lr", f"must be a list of parameter-name prefixes such as predictor, got {self.fixed_lr!r}")
        _check(len(set(self.fixed_lr)) == len(self.fixed_lr), "fixed_lr", f"lists a prefix twice: {self.fixed_lr!r}")
        _check(self.trust_coefficient > 0, "trust_coefficient", f"must be > 0, got {self.trust_coefficient}")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _check(self.grad_clip >= 0, "grad_clip", "must be >= 0")


@dataclass(kw_only=True)
class ZeroConfig:
    stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    precision: str = "auto"
    """auto (bf16 on GPUs that have it, fp16 on older ones: V100, T4; fp32 on CPU) | fp32 | bf16 | fp16. bf16 and
    fp16 are torch.autocast over fp32 master weights; fp16 with a dynamic loss scale (pretrain.engine.LossScale), as
    the official DINO and MAE code train."""
    reduce_dtype: str = "fp32"
    """The dtype gradients are averaged over the ranks in under bf16 / fp16 (ZeRO 1-3): fp32 (as torchtitan's
    default), or autocast (DeepSpeed's torch-autocast default: the Linear and Conv layers' gradients in bf16 / fp16,
    half the traffic, each rounded to the half type's 8 / 11 bits)."""
    offload: str = "none"
    """none | cpu: ZeRO-Offload, ZeRO 1-3 only: each rank's partition of the fp32 master weights and the optimizer's
    state live in CPU memory and the optimizer steps there (AdamW, SGD: torch's fused CPU kernels), the accelerator
    keeping the module's weights, activations and gradients: a model too large for the GPUs' memory, for CPU time and
    PCIe traffic each step."""

    def __post_init__(self) -> None:
        _check(self.stage in (0, 1, 2, 3), "stage", f"must be 0, 1, 2 or 3, got {self.stage}")
        _check(self.reduce_dtype in ("fp32", "autocast"), "reduce_dtype",
               f"must be fp32 or autocast, got {self.reduce_dtype!r}")
        _check(self.offload in ("none", "cpu"), "offload", f"must be none or cpu, got {self.offload!r}")
        _check(self.offload == "none" or self.stage > 0, "offload",
               f"{self.offload} moves the optimizer's ZeRO partitions, which stage 0 does not have: needs stage 1-3, "
               f"got {self.stage}")
        _check(self.precision in ("auto", "fp32", "bf16", "fp16"), "precision",
               f"must be auto, fp32, bf16 or fp16, got {self.precision!r}")


@dataclass(kw_only=True)
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI; empty = sqlite file <job.out_dir>/mlflow.db."""
    experiment: str = "ssl-pretrain"
    system_metrics_s: float = 10.0
    """Every this many seconds MLflow's system metrics of each node (CPU, memory, disk, network; GPU utilisation,
    memory and power where NVML sees GPUs) go to the run as system/...; 0 = off."""

    def __post_init__(self) -> None:
        if self.uri.startswith("sqlite:///") and not self.uri.startswith("sqlite:////"):  # relative to here, not
            self.uri = "sqlite:///" + str(Path(self.uri[len("sqlite:///"):]).expanduser().resolve())  # to a worker's
        _check(bool(self.experiment and self.experiment.strip()), "experiment", "must name an MLflow experiment, got "
               f"{self.experiment!r}")
        _check(self.system_metrics_s >= 0, "system_metrics_s", f"must be >= 0 (0 = off), got {self.system_metrics_s}")


@dataclass(kw_only=True)
class EvalConfig:
    enabled: bool = True
    """Evaluate the frozen backbone at the end of training."""
    dataset: str = "digits"
    """What the backbone is evaluated on: digits (scikit-learn's digits, resized to data.image_size), or a labelled
    shard dataset: a built-in source (samples) or a directory written by `pretrain data shards` (e.g. from folder:PATH,
    one sub-folder per class; labels and class names from its manifest), decoded and resized like the training views
    without augmentation, undecodable samples skipped and counted."""
    max_samples: int = 5000
    """At most this many samples, a seeded draw (of digits, stratified), are evaluated (held in memory as float32
    images: 5000 at 3x224x224 take 3 GB)."""
    embedding_map: bool = True
    """Also draw the test split's frozen features in 2-D (t-SNE; at most 1000 points, a stratified draw), trained beside
    random init and raw pixels, coloured by class, to eval-map.png beside eval.json (and to MLflow)."""
    finetune_epochs: int = 0
    """Also fine-tune a copy of the whole backbone (and of its random init) with a linear head for this many epochs on
    the labelled split and report the test accuracy (finetune_top1); 0 = skip (it costs more than the other protocols
    together)."""
    finetune_layer_decay: float = 1.0
    """Fine-tuning a ViT: layer-wise lr decay (MAE's 0.75 for ViT-B, BEiT's 0.65): block i of depth learns at this **
    (depth - i) of the rate, the embeddings at this ** (depth + 1), the linear head at the full rate; 1 = off."""
    knn_every: int = 0
    """While training, every this many steps (and at step 0), the backbone's kNN top-1 on eval.dataset (the protocol of
    eval.json's knn_top1) goes to MLflow as knn_top1, each rank embedding its share; 0 = off."""

    def __post_init__(self) -> None:
        _check(bool(self.dataset), "dataset", "must not be empty (digits, samples or a shard directory)")
        self.dataset = _absolute(self.dataset)
        _check(self.max_samples >= 2 * 8, "max_samples", f"must be >= 16, got {self.max_samples}")
        _check(self.finetune_epochs >= 0, "finetune_epochs", f"must be >= 0, got {self.finetune_epochs}")
        _check(0 < self.finetune_layer_decay <= 1, "finetune_layer_decay",
               f"must be in (0, 1], got {self.finetune_layer_decay}")
        _check(self.knn_every >= 0, "knn_every", f"must be >= 0 (0 = off), got {self.knn_every}")

    @property
    def reads_dataset(self) -> bool:
        """Whether training reads ``dataset``: at the end (``enabled``) or while it runs (``knn_every``)."""
        return self.enabled or self.knn_every > 0


@dataclass(kw_only=True)
class JobConfig:
    max_steps: int = 600
    num_workers: int = 2
    """Ray Train workers (one per GPU on GPU nodes)."""
    use_gpu: str = "auto"
    """auto | true | false."""
    seed: int = 0
    out_dir: str = "runs"
    run_name: str = ""
    """Empty = '<method>-<timestamp>'."""
    log_every: int = 10
    ckpt_every: int = 200
    keep_checkpoints: int = 3
    """How many checkpoints are kept, the newest (Ray's and torchrun's each of their own); 0 keeps all."""
    max_failures: int = 0
    """Ray: times the worker group is started again after a worker dies (a node lost, a process killed), each time
    resuming from the latest checkpoint; 0 = the run fails with the first. (Slurm and Kubernetes restart whole jobs
    themselves: --requeue, --restarts.)"""
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self.max_steps > 0, "max_steps", f"must be > 0, got {self.max_steps}")
        _check(0 <= self.seed <= MAX_SEED, "seed", f"must be in 0..{MAX_SEED} (each rank seeds numpy, whose seeds are "
               f"below 2**32, with seed x 1000 + 1 + its rank), got {self.seed}")
        _check(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        if self.use_gpu.lower() in YAML11_BOOLS:  # use_gpu: yes
            self.use_gpu = "true" if YAML11_BOOLS[self.use_gpu.lower()] else "false"
        _check(self.use_gpu in ("auto", "true", "false"), "use_gpu",
               f"must be auto, true or false, got {self.use_gpu!r}")
        _check(self.log_every > 0, "log_every", "must be > 0")
        _check(self.ckpt_every > 0, "ckpt_every", "must be > 0")
        _check(self.keep_checkpoints >= 0, "keep_checkpoints", "must be >= 0")
        _check(self.max_failures >= 0, "max_failures", f"must be >= 0, got {self.max_failures}")
        _check("/" not in self.run_name, "run_name", "must not contain '/'")
        _check(self.run_name.isprintable(), "run_name", f"must not contain control characters (a newline, a tab), got "
               f"{self.run_name!r}")


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    job: JobConfig = field(default_factory=JobConfig)

    def __post_init__(self) -> None:
        from pretrain.methods import METHODS
        from pretrain.models import BACKBONES

        _check(self.method.name in METHODS, "method.name",
               f"unknown method {self.method.name!r}; known: {', '.join(METHODS)}")
        _check(
            self.model.backbone in BACKBONES,
            "model.backbone",
            f"unknown backbone {self.model.backbone!r}; known: {', '.join(BACKBONES)}",
        )
        if self.model.backbone.startswith("vit"):
            _check(
                self.data.image_size % self.model.patch_size == 0,
                "model.patch_size",
                f"{self.model.patch_size} does not divide data.image_size {self.data.image_size}",
            )
            _check(
                self.data.local_views == 0 or self.data.local_size % self.model.patch_size == 0,
                "model.patch_size",
                f"{self.model.patch_size} does not divide data.local_size {self.data.local_size}",
            )
        METHODS[self.method.name].check_config(self)
        _check(not self.model.proj_last_bn or METHODS[self.method.name].reads_proj_last_bn, "model.proj_last_bn",
               f"{self.method.name} does not read it (its head would be as without it); it is for "
               + ", ".join(n for n, m in METHODS.items() if m.reads_proj_last_bn))
        _check(not self.model.proj_last_bn_scale or self.method.name == "simclr", "model.proj_last_bn_scale",
               f"SimCLR's head reads it, {self.method.name}'s does not (its official head's last BatchNorm has no "
               "scale)")
        _check(not self.model.proj_last_bn_scale or self.model.proj_last_bn, "model.proj_last_bn_scale",
               "scales the projector's last BatchNorm: set model.proj_last_bn=true too")
        _check(not self.model.sync_bn_group or self.model.sync_bn, "model.sync_bn_group",
               "groups the ranks of model.sync_bn's statistics: set model.sync_bn=true too")
        group, workers = self.model.sync_bn_group, self.job.num_workers
        _check(group == 0 or workers <= group or workers % group == 0, "model.sync_bn_group",
               f"{self.model.sync_bn_group} ranks a group does not divide job.num_workers {self.job.num_workers}")
        _check(self.optim.warmup_steps < self.job.max_steps, "optim.warmup_steps",
               f"must be < job.max_steps, got {self.optim.warmup_steps} and {self.job.max_steps}; for a short run "
               "lower it too (--set optim.warmup_steps=N)")
        for key, value in (("optim.layer_decay", self.optim.layer_decay),
                           ("optim.patch_embed_lr_mult", self.optim.patch_embed_lr_mult),
                           ("eval.finetune_layer_decay", self.eval.finetune_layer_decay)):
            _check(value == 1 or self.model.backbone.startswith("vit"), key,
                   f"{value} needs a ViT backbone (it scales a ViT's layers), got model.backbone "
                   f"{self.model.backbone!r}")
        _check(not self.method.decoupled or self.method.name in ("simclr", "moco_v3", "moco_v2", "nnclr"),
               "method.decoupled", "the decoupled contrastive loss is for simclr, moco_v3, moco_v2 and nnclr, got "
               f"method.name {self.method.name!r}")


YAML11_BOOLS = {"yes": True, "on": True, "no": False, "off": False}
"""The words YAML 1.1 reads as booleans, which the recipe loader leaves as text; a bool field takes them."""


# --- building dataclasses from plain dicts, with checks -----------------------------------------------------------


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:  # a section whose keys are all commented out: its defaults
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, str) and value.lower() in YAML11_BOOLS:  # as YAML 1.1 reads them
            return YAML11_BOOLS[value.lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML reads `use_gpu: true` (and --set job.use_gpu=true) as a bool
            return "true" if value else "false"
        if isinstance(value, int):  # a run named 2026: the digits as written (a leading zero keeps it text)
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # a schema bug, not a user error


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted((k for k in data if k not in names), key=repr)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # __post_init__ names the field; add where it sits
        raise ConfigError(f"{prefix}.{e}" if prefix else str(e)) from None


REPLACED = {("model", "backbone_kwargs")}
"""Mappings a derived recipe replaces whole instead of merging into: a backbone's options belong to that backbone (a
ViT recipe derived from a ConvNet one must not inherit ``norm: gn``)."""


def _deep_merge(base: dict, top: dict, path: tuple[str, ...] = ()) -> dict:
    out = dict(base)
    for k, v in top.items():
        if v is None and isinstance(out.get(k), dict) and (*path, k) not in REPLACED:
            continue  # a section whose keys are all commented out changes nothing
        merge = isinstance(v, dict) and isinstance(out.get(k), dict) and (*path, k) not in REPLACED
        out[k] = _deep_merge(out[k], v, (*path, k)) if merge else v
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: object, first: int, again: int) -> None:
        super().__init__(f"key {key!r} is given twice (lines {first} and {again}); YAML would keep only the second")


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's reading of plain scalars, and a key repeated within one mapping an error.

    YAML 1.1 (PyYAML's) reads ``no``, ``on`` and ``off`` as booleans, ``12:30`` as 750, ``0755`` as 493, ``2026-12-03``
    as a date and ``1e-5`` (no dot) as text: a run named ``no`` became ``false``, a ``layer_scale: 1e-5`` failed in
    the workers. Here only true/false are booleans (a bool field takes yes/no/on/off as well: ``_convert``), an
    integer is decimal (no leading zero: ``0755`` stays text), ``0x``/``0o`` prefixed, a float may have an exponent
    without a dot, and there are no dates or sexagesimals. Merge keys (``<<: *defaults``) merge. YAML quietly keeps
    the last of a repeated key, so a recipe's second ``optim:`` section would drop every setting of its first."""

    yaml_implicit_resolvers: dict = {}

    def construct_mapping(self, node, deep=False):
        lines: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # merged keys may be set again: that is what merging is
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)):  # an unhashable key is refused by PyYAML itself
                if key in lines:
                    raise _DuplicateKey(key, lines[key], line)
                lines[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
        return sign * int(digits, 16 if digits[:2] == "0x" else 8 if digits[:2] == "0o" else 10)


for _tag, _pattern, _first in (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("int", r"^(?:[-+]?(?:0|[1-9][0-9]*)|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    ("float", r"^(?:[-+]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
              r"|\.(?:nan|NaN|NAN))$", "-+0123456789."),
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("merge", r"^(?:<<)$", "<"),
):
    _RecipeLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), list(_first))
_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _RecipeLoader.construct_yaml_int)


def _yaml(text: str):
    """``text`` read as a recipe is (:class:`_RecipeLoader`)."""
    return yaml.load(text, Loader=_RecipeLoader)


class _RecipeDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting every string that YAML 1.1 or the recipe loader would read as something else (a
    run named ``1e5`` or ``0o17``): a run's config.yaml reads back as it was written."""

    yaml_implicit_resolvers: dict = {}


for _first, _resolvers in [*yaml.SafeDumper.yaml_implicit_resolvers.items(),
                           *_RecipeLoader.yaml_implicit_resolvers.items()]:
    _RecipeDumper.yaml_implicit_resolvers.setdefault(_first, []).extend(_resolvers)


def _read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"base: recipe {path} derives from itself")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a YAML recipe")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = _yaml(path.read_text(encoding="utf-8"))
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (a YAML recipe is)") from None
    if data is None:  # (a file cut short or saved empty by mistake, not a wish for the defaults)
        raise ConfigError(f"{path}: empty (no keys); a recipe sets at least the method (configs/ has one for each)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: expected the path of one recipe, got {base!r}")
    return _deep_merge(_read_recipe(path.parent / base, (*seen, path)), data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides; ``c`` is parsed as YAML (``1e-3``, ``true``, ``[0.5, 1.0]``) as a recipe is; a
    mapping is merged into the section there, as a derived recipe's is (``data={batch_size: 64}`` keeps the other
    data keys)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-3")
        try:
            value = _yaml(raw)
        except (yaml.YAMLError, _DuplicateKey):
            raise ConfigError(f"{key}: cannot parse value {raw!r}") from None
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {p} is not a section")
            node = child
        merge = isinstance(value, dict) and isinstance(node.get(parts[-1]), dict) and tuple(parts) not in REPLACED
        node[parts[-1]] = _deep_merge(node[parts[-1]], value, tuple(parts)) if merge else value  # as `base:` merges
    return data


def config_from_dict(data: dict) -> Config:
    return _build(Config, data, "")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a recipe (or the defaults when ``path`` is None), apply overrides, validate."""
    data = _read_recipe(Path(path)) if path else {}
    return config_from_dict(apply_overrides(data, overrides or []))


def set_keys(path: str | Path | None, overrides: list[str] | None = None, section: str = "method") -> set[str]:
    """The ``<section>.*`` keys (``method``, ``optim``) that the recipe at ``path`` itself (not the base recipes it
    derives from: those may be another method's or optimizer's) and ``overrides`` set; the recipe's are left out where
    the overrides set another ``<section>.name``."""
    keys: set[str] = set()
    renamed = any(item.partition("=")[0] == f"{section}.name" for item in overrides or [])
    if path and not renamed:
        try:
            data = _yaml(Path(path).read_text())
        except (OSError, yaml.YAMLError, _DuplicateKey):  # load_config reports it
            data = None
        if isinstance(data, dict) and isinstance(data.get(section), dict):
            keys |= {str(k) for k in data[section]}
    for item in overrides or []:
        key, _, raw = item.partition("=")
        if key.startswith(f"{section}."):
            keys.add(key.split(".")[1])
        elif key == section:
            try:
                value = _yaml(raw)
            except (yaml.YAMLError, _DuplicateKey):
                continue
            keys |= {str(k) for k in value} if isinstance(value, dict) else set()
    return keys


OPTIM_KEYS = {"betas": ("adamw",), "momentum": ("lars", "larc", "sgd"), "trust_coefficient": ("lars", "larc")}
"""The ``optim.*`` keys that only some optimizers read, and those optimizers."""


def check_optim_keys(optim: OptimConfig, only: set[str] | None = None) -> None:
    """ConfigError (one line) for an ``optim.*`` key set off its default that ``optim.name`` does not read (AdamW's
    betas under LARS): it would be ignored without a word. ``only``: check those keys alone (set by the recipe itself
    or the overrides; a resume's changes)."""
    default = OptimConfig()
    for key, users in OPTIM_KEYS.items():
        value = getattr(optim, key)
        same = list(value) == list(getattr(default, key)) if isinstance(value, (list, tuple)) else \
            value == getattr(default, key)
        if optim.name in users or same or (only is not None and key not in only):
            continue
        raise ConfigError(f"optim.{key}: {optim.name} does not use it (it is {', '.join(users)}'s); remove it, or set "
                          f"optim.name to one of those")


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists), ready for YAML, JSON or MLflow params."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def config_changes(before: Config, after: Config) -> str:
    """The values ``after`` changes, as ``key old -> new, ...`` in the config's order ("" where none)."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
        return out

    old, new = flat(to_dict(before)), flat(to_dict(after))
    return ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.dump(to_dict(cfg), Dumper=_RecipeDumper, sort_keys=False))
