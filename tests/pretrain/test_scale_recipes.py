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


@pytest.mark.parametrize("recipe", ["simsiam", "mocov2", "barlow_twins", "vicreg"])
def test_recipe_param_groups_follow_the_official_code(recipe):
    """The optimizer groups the engine builds from each ResNet-50 recipe (on the meta device): SimSiam's predictor at
    a fixed rate and, as MoCo v2's, every parameter decaying; Barlow Twins' biases and BatchNorm parameters at 0.0048 /
    0.2 of the weights' rate, VICReg's at the same rate, neither decaying; the ResNet's residual blocks starting as
    their shortcuts in the three recipes whose official code does."""
    from pretrain.optim import config_param_groups

    cfg = load_config(ROOT / "configs" / f"{recipe}_resnet50_imagenet.yaml")
    with torch.device("meta"):
        method = build_method(cfg, distributed=False)
    groups = config_param_groups(method, cfg.optim)
    names = {id(p): n for n, p in method.named_parameters()}
    fixed = {names[id(p)].split(".")[0] for g in groups if g.get("fixed_lr") for p in g["params"]}
    assert fixed == ({"predictor"} if recipe == "simsiam" else set())
    vectors = [g for g in groups if not any(p.ndim > 1 for p in g["params"])]
    assert vectors and all(g["decay"] == (recipe in ("simsiam", "mocov2")) for g in vectors)
    assert all(g["lr_mult"] == pytest.approx(0.024 if recipe == "barlow_twins" else 1.0) for g in vectors)
    assert all(g["decay"] and g["lr_mult"] == 1.0 for g in groups if g not in vectors)
    assert cfg.model.backbone_kwargs.get("zero_init_residual", False) == (recipe != "mocov2")
