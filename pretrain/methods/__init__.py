"""Pretext tasks: ``METHODS[name](cfg, gather=..., reduce=..., rank=...)`` builds an :class:`SSLMethod`."""

import dataclasses

from pretrain.methods.base import SSLMethod
from pretrain.methods.beit import BEiT
from pretrain.methods.byol import BYOL
from pretrain.methods.clip import CLIP
from pretrain.methods.colorization import Colorization
from pretrain.methods.decorrelation import BarlowTwins, VICReg
from pretrain.methods.dino import DINO
from pretrain.methods.ibot import IBOT
from pretrain.methods.ijepa import IJEPA
from pretrain.methods.jigsaw import Jigsaw
from pretrain.methods.mae import MAE
from pretrain.methods.moco import MoCoV2, MoCoV3
from pretrain.methods.nnclr import NNCLR
from pretrain.methods.rotation import Rotation
from pretrain.methods.simclr import SimCLR
from pretrain.methods.simmim import SimMIM
from pretrain.methods.simsiam import SimSiam
from pretrain.methods.swav import SwAV
from pretrain.methods.vqvae import VQVAE

METHODS: dict[str, type[SSLMethod]] = {"simclr": SimCLR, "byol": BYOL, "dino": DINO, "ibot": IBOT, "mae": MAE,
                                       "clip": CLIP, "rotation": Rotation, "jigsaw": Jigsaw,
                                       "colorization": Colorization, "vqvae": VQVAE, "beit": BEiT,
                                       "barlow_twins": BarlowTwins, "vicreg": VICReg, "moco_v2": MoCoV2,
                                       "moco_v3": MoCoV3, "swav": SwAV, "ijepa": IJEPA, "nnclr": NNCLR,
                                       "simsiam": SimSiam, "simmim": SimMIM}

COMMON_KEYS = frozenset({"name", "gather_distributed"})
"""``method.*`` keys that apply to every method: the trainer reads them."""


def check_method_keys(method, only=None) -> None:
    """ValueError (one line) for a ``method.*`` key of ``method`` (a MethodConfig) set off its default that its
    method does not read (SimCLR's ``method.queue_size``): it would be ignored without a word. ``only``: check those
    keys alone (a resume's overrides; a finished run's config is not refused for what it was trained with)."""
    from pretrain.config import MethodConfig

    default, uses = MethodConfig(), METHODS[method.name].config_keys | COMMON_KEYS
    for f in dataclasses.fields(MethodConfig):
        value = getattr(method, f.name)
        same = list(value) == list(getattr(default, f.name)) if isinstance(value, (list, tuple)) else \
            value == getattr(default, f.name)
        if f.name in uses or same or (only is not None and f.name not in only):
            continue
        users = sorted(name for name, m in METHODS.items() if f.name in m.config_keys)
        raise ValueError(f"method.{f.name}: {method.name} does not use it (it is {', '.join(users)}'s); remove it, "
                         f"or set method.name to one of those")


__all__ = ["BEiT", "BYOL", "BarlowTwins", "CLIP", "COMMON_KEYS", "Colorization", "DINO", "IBOT", "IJEPA", "Jigsaw",
           "MAE", "METHODS", "MoCoV2", "MoCoV3", "NNCLR", "Rotation", "SSLMethod", "SimCLR", "SimMIM", "SimSiam",
           "SwAV", "VICReg", "VQVAE", "check_method_keys"]
