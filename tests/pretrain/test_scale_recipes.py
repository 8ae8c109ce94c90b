"""The ImageNet-scale recipes (configs/*_imagenet.yaml) at their real sizes: each loads, its method builds with the
recipe's backbone and head (ViT-S/16 with 65,536 prototypes, ViT-B/16 with MAE's decoder, ResNet-50 with BYOL's
4096-wide MLPs, MoCo v3's ViT-S/16 with a frozen patch projection, DINOv2's ViT-L/16 and I-JEPA's ViT-H/14, stepped
with 2 of their 24 and 32 blocks, ...), and takes a training step on a batch of 2 images per view at the recipe's crop
sizes, the loss finite and near where it starts in the papers. Training them to their published accuracy needs GPUs;
this is what a CPU can check."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.trainer import build_method
from tests.util import train_steps

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs").glob("*_imagenet.yaml"))


def test_there_are_scale_recipes():
    assert {p.name for p in RECIPES} >= {"dino_vits16_imagenet.yaml", "ibot_vits16_imagenet.yaml",
                                         "dinov2_vitl16_imagenet.yaml", "mae_vitb16_imagenet.yaml",
                                         "simclr_resnet50_imagenet.yaml", "byol_resnet50_imagenet.yaml",
                                         "mocov3_vits16_imagenet.yaml", "swav_resnet50_imagenet.yaml",
                                         "ijepa_vith14_imagenet.yaml", "simsiam_resnet50_imagenet.yaml",
                                         "mocov2_resnet50_imagenet.yaml", "barlow_twins_resnet50_imagenet.yaml",
                                         "vicreg_resnet50_imagenet.yaml", "simmim_vitb16_imagenet.yaml"}


SHALLOW = {"vit_large": (2, 303.3e6), "vit_huge": (2, 632e6)}
"""Backbones too slow to step at full depth on the CI's 2 cores (a ViT-L step there takes minutes, a ViT-H longer):
the recipe is built whole on the meta device (no memory, no compute; its parameters counted), then stepped with this
many of its blocks, at its width, heads and crop sizes."""


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_builds_and_steps_at_its_sizes(recipe):
    cfg = load_config(recipe)
    if cfg.model.backbone in SHALLOW:
        depth, params = SHALLOW[cfg.model.backbone]
        with torch.device("meta"):
            whole = build_method(cfg, distributed=False).backbone
        assert abs(sum(p.numel() for p in whole.parameters()) - params) / params < 0.02
        cfg = load_config(recipe, [f"model.backbone_kwargs.depth={depth}"])
    d = cfg.data
    method = build_method(cfg, distributed=False)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(2, d.channels, d.image_size, d.image_size, generator=g) for _ in range(d.num_views)]
    views += [torch.randn(2, d.channels, d.local_size, d.local_size, generator=g) for _ in range(d.local_views)]
    batch = {"views": views, "label": torch.zeros(2, dtype=torch.long)}
    method.on_step_start(0, cfg.job.max_steps)
    with torch.no_grad():
        out = method(batch)
    if cfg.method.name in ("dino", "ibot"):  # student and teacher start near uniform over the K prototypes
        image_level = out["cls_loss" if cfg.method.name == "ibot" else "loss"].item()
        assert abs(image_level - math.log(cfg.method.num_prototypes)) < 1.5
    assert math.isfinite(out["loss"].item())
    train_steps(method, iter([batch]), 1, lr=1e-4)
    method.on_step_end(0, cfg.job.max_steps)
    assert math.isfinite(method(batch)["loss"].item())


@pytest.mark.parametrize("recipe", ["simsiam", "mocov2", "barlow_twins", "vicreg", "swav"])
def test_recipe_param_groups_follow_the_official_code(recipe):
    """The optimizer groups the engine builds from each ResNet-50 recipe (on the meta device): SimSiam's predictor at
    a fixed rate and, as MoCo v2's and SwAV's (torch's SGD over model.parameters(), inside apex's LARC for SwAV), every
    parameter decaying; SwAV's every parameter adapted too (LARC); Barlow Twins' biases and BatchNorm parameters at
    0.0048 / 0.2 of the weights' rate, VICReg's at the same rate, neither decaying; the ResNet's residual blocks
    starting as their shortcuts in the three recipes whose official code does."""
    from pretrain.engine import optimizer_hyper
    from pretrain.optim import LARC, LARS, build_optimizer, config_param_groups

    cfg = load_config(ROOT / "configs" / f"{recipe}_resnet50_imagenet.yaml")
    with torch.device("meta"):
        method = build_method(cfg, distributed=False)
    groups = config_param_groups(method, cfg.optim)
    names = {id(p): n for n, p in method.named_parameters()}
    fixed = {names[id(p)].split(".")[0] for g in groups if g.get("fixed_lr") for p in g["params"]}
    assert fixed == ({"predictor"} if recipe == "simsiam" else set())
    vectors = [g for g in groups if not any(p.ndim > 1 for p in g["params"])]
    assert vectors and all(g["decay"] == (recipe in ("simsiam", "mocov2", "swav")) for g in vectors)
    assert all(g["lr_mult"] == pytest.approx(0.024 if recipe == "barlow_twins" else 1.0) for g in vectors)
    assert all(g["decay"] and g["lr_mult"] == 1.0 for g in groups if g not in vectors)
    assert cfg.model.backbone_kwargs.get("zero_init_residual", False) == (recipe not in ("mocov2", "swav"))
    # the optimizer: SGD (SimSiam, MoCo v2), LARC adapting every group (SwAV), LARS adapting the weights only
    optimizer = build_optimizer(groups, cfg.optim.name, 1.0, **optimizer_hyper(cfg))
    assert cfg.optim.name == {"simsiam": "sgd", "mocov2": "sgd", "swav": "larc"}.get(recipe, "lars")
    if isinstance(optimizer, LARC):
        assert (cfg.optim.trust_coefficient, cfg.optim.momentum) == (1e-3, 0.9) and all(
            "lars" not in g for g in optimizer.param_groups)
    elif isinstance(optimizer, LARS):
        assert [g["lars"] for g in optimizer.param_groups] == [g not in vectors for g in groups]


GPUS = {"dino_vits16": 16, "ibot_vits16": 16, "dinov2_vitl16": 32, "mae_vitb16": 32, "simmim_vitb16": 16,
        "ijepa_vith14": 16, "mocov3_vits16": 32, "mocov2_resnet50": 8, "byol_resnet50": 32, "simclr_resnet50": 32,
        "simsiam_resnet50": 8, "swav_resnet50": 32, "barlow_twins_resnet50": 8, "vicreg_resnet50": 8}
"""The GPUs each recipe's header counts its steps for (data.batch_size per GPU): the official runs' global batches."""

OFFICIAL = {
    # recipe: (global batch, epochs, peak lr there, final lr there, {dotted key: value})
    # facebookresearch/dino main_dino.py defaults; README: ViT-S/16 on 2 nodes of 8 GPUs x 64
    "dino_vits16": (1024, 100, 2e-3, 1e-6, {
        "optim.weight_decay": 0.04, "optim.weight_decay_end": 0.4, "optim.grad_clip": 3.0, "optim.warmup_steps": 12510,
        "method.num_prototypes": 65536, "method.teacher_momentum": 0.996, "method.teacher_temp": 0.04,
        "method.freeze_last_layer_steps": 1251, "data.aug.crop_scale": (0.4, 1.0), "data.local_views": 8,
        "data.local_crop_scale": (0.05, 0.4), "model.backbone_kwargs.drop_path_rate": 0.1}),
    # bytedance/ibot README's ViT-S/16 command (its 800 epochs trimmed to 100, as the recipe states)
    "ibot_vits16": (1024, 100, 2e-3, 1e-6, {
        "method.num_prototypes": 8192, "method.norm_last_layer": False, "method.teacher_temp": 0.07,
        "method.warmup_teacher_temp_steps": 37530, "method.teacher_patch_temp": 0.07, "data.local_views": 10,
        "data.aug.crop_scale": (0.25, 1.0), "data.local_crop_scale": (0.05, 0.25),
        "method.mask_ratio_range": (0.1, 0.5), "method.mask_prob": 0.5}),
    # facebookresearch/dinov2 ssl_default_config.yaml; README: vitl16_short.yaml on 4 nodes of 8 GPUs x 64
    "dinov2_vitl16": (2048, None, 0.004 * math.sqrt(2), 1e-6, {
        "job.max_steps": 125000, "optim.warmup_steps": 12500, "method.warmup_teacher_temp_steps": 37500,
        "method.freeze_last_layer_steps": 1250, "method.teacher_momentum": 0.992, "method.koleo_weight": 0.1,
        "optim.layer_decay": 0.9, "optim.patch_embed_lr_mult": 0.2, "model.backbone_kwargs.drop_path_rate": 0.3,
        "model.backbone_kwargs.layer_scale": 1e-5, "data.aug.crop_scale": (0.32, 1.0),
        "data.local_crop_scale": (0.05, 0.32), "data.local_views": 8}),
    # facebookresearch/mae PRETRAIN.md (blr 1.5e-4, batch 4096; the recipe's 400 epochs stated)
    "mae_vitb16": (4096, 400, 2.4e-3, 0.0, {
        "optim.betas": (0.9, 0.95), "optim.weight_decay": 0.05, "optim.warmup_steps": 12520, "optim.grad_clip": 0.0,
        "method.mask_ratio": 0.75, "method.norm_pix_loss": True, "data.aug.crop_scale": (0.2, 1.0)}),
    # microsoft/SimMIM simmim_pretrain__vit_base__img224__800ep.yaml + config.py defaults, lr per 512 images
    "simmim_vitb16": (2048, 800, 4e-4, 2e-5, {
        "optim.weight_decay": 0.05, "optim.grad_clip": 5.0, "optim.warmup_steps": 6250, "method.mask_ratio": 0.6,
        "method.mask_patch_size": 32, "model.backbone_kwargs.layer_scale": 0.1, "data.aug.crop_scale": (0.67, 1.0)}),
    # facebookresearch/ijepa configs/in1k_vith14_ep300.yaml (16 GPUs x 128)
    "ijepa_vith14": (2048, 300, 1e-3, 1e-6, {
        "optim.weight_decay": 0.04, "optim.weight_decay_end": 0.4, "optim.warmup_steps": 25000,
        "method.teacher_momentum": 0.996, "method.decoder_dim": 384, "method.decoder_depth": 12,
        "method.target_scale": (0.15, 0.2), "method.context_scale": (0.85, 1.0), "data.aug.crop_scale": (0.3, 1.0)}),
    # facebookresearch/moco-v3 CONFIG.md ViT-Small (batch 4096) and vits.py vit_small (12 heads)
    "mocov3_vits16": (4096, 300, 2.4e-3, 0.0, {
        "optim.weight_decay": 0.1, "optim.warmup_steps": 12520, "method.temperature": 0.2,
        "method.teacher_momentum": 0.99, "model.backbone_kwargs.num_heads": 12, "model.proj_hidden_dim": 4096,
        "model.proj_out_dim": 256, "model.proj_layers": 3, "data.aug.crop_scale": (0.08, 1.0)}),
    # facebookresearch/moco main_moco.py with --mlp --aug-plus --cos (8 GPUs, batch 256)
    "mocov2_resnet50": (256, 200, 0.03, 0.0, {
        "optim.weight_decay": 1e-4, "optim.warmup_steps": 0, "method.queue_size": 65536, "method.temperature": 0.2,
        "method.teacher_momentum": 0.999, "data.aug.crop_scale": (0.2, 1.0), "data.aug.blur_prob": 0.5}),
    # google-deepmind byol/configs/byol.py, 300 epochs: _LR_PRESETS 0.3, _WD_PRESETS 1e-6, _EMA_PRESETS 0.99
    "byol_resnet50": (4096, 300, 4.8, 0.0, {
        "optim.weight_decay": 1e-6, "method.teacher_momentum": 0.99, "optim.warmup_steps": 3130,
        "model.proj_hidden_dim": 4096, "model.proj_out_dim": 256, "method.predictor_hidden_dim": 4096}),
    # google-research/simclr README (v1): lr 0.3, wd 1e-6, temperature 0.1, batch 4096, 100 epochs
    "simclr_resnet50": (4096, 100, 4.8, 0.0, {
        "optim.weight_decay": 1e-6, "method.temperature": 0.1, "optim.warmup_steps": 3130,
        "data.aug.brightness": 0.8, "data.aug.hue": 0.2, "data.aug.blur_prob": 0.5}),
    # facebookresearch/simsiam README: batch 512, lr 0.05 per 256, --fix-pred-lr
    "simsiam_resnet50": (512, 100, 0.1, 0.0, {
        "optim.weight_decay": 1e-4, "optim.warmup_steps": 0, "optim.fixed_lr": ["predictor"],
        "model.proj_out_dim": 2048, "method.predictor_hidden_dim": 512, "data.aug.crop_scale": (0.2, 1.0)}),
    # facebookresearch/swav scripts/swav_200ep_pretrain.sh: 64 GPUs x 64, base_lr 4.8, final_lr 0.0048
    "swav_resnet50": (4096, 200, 4.8, 0.0048, {
        "optim.name": "larc", "optim.trust_coefficient": 1e-3, "optim.momentum": 0.9,
        "optim.decay_norms_and_biases": True,  # LARC(SGD(model.parameters(), ...), 0.001, clip=False) in main_swav.py
        "optim.weight_decay": 1e-6, "optim.warmup_steps": 3130, "method.freeze_last_layer_steps": 313,
        "method.num_prototypes": 3000, "method.temperature": 0.1, "method.sinkhorn_eps": 0.05,
        "data.local_views": 6, "data.aug.crop_scale": (0.14, 1.0), "data.local_crop_scale": (0.05, 0.14)}),
    # facebookresearch/barlowtwins main.py defaults (weights 0.2, biases 0.0048 per 256; end at 0.001)
    "barlow_twins_resnet50": (2048, 1000, 1.6, 1.6e-3, {
        "optim.weight_decay": 1e-6, "optim.norm_bias_lr_mult": 0.0048 / 0.2, "optim.warmup_steps": 6250,
        "method.barlow_lambda": 0.0051, "model.proj_hidden_dim": 8192, "model.proj_out_dim": 8192}),
    # facebookresearch/vicreg README's 1000-epoch command: batch 2048, base lr 0.2
    "vicreg_resnet50": (2048, 1000, 1.6, 1.6e-3, {
        "optim.weight_decay": 1e-6, "optim.warmup_steps": 6250, "method.vicreg_invariance": 25.0,
        "method.vicreg_variance": 25.0, "method.vicreg_covariance": 1.0, "model.proj_out_dim": 8192}),
}
"""Each recipe's settings against its official source (the file named beside it): the lr after warmup and at the end
at the official global batch, the epochs, and the keys the papers' tables list."""


def _get(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_recipe_matches_its_official_settings(name):
    """The recipe at its stated GPUs reaches the official global batch, peak and final lr, epochs and pinned keys."""
    from pretrain.engine import peak_lr

    cfg = load_config(ROOT / "configs" / f"{name}_imagenet.yaml")
    batch, epochs, lr, final_lr, keys = OFFICIAL[name]
    assert cfg.data.batch_size * GPUS[name] * cfg.optim.accum_steps == batch
    peak = peak_lr(cfg, GPUS[name])
    assert peak == pytest.approx(lr, rel=1e-4)
    assert peak * cfg.optim.min_lr_ratio == pytest.approx(final_lr, rel=1e-3, abs=1e-12)
    if epochs is not None:  # ImageNet-1k's 1,281,167 images, an epoch's steps rounded either way
        assert cfg.job.max_steps * batch / 1_281_167 == pytest.approx(epochs, rel=2e-3)
    for key, want in keys.items():
        got = _get(cfg, key)
        assert (tuple(got) if isinstance(want, tuple) else got) == (pytest.approx(want) if isinstance(want, float)
                                                                   else want), key


def test_official_table_covers_every_recipe():
    """Every ImageNet recipe has its official settings pinned above."""
    assert {p.name.removesuffix("_imagenet.yaml") for p in RECIPES} == set(OFFICIAL) == set(GPUS)
