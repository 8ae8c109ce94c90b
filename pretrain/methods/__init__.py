"""Pretext tasks: ``METHODS[name](cfg, gather=..., reduce=..., rank=...)`` builds an :class:`SSLMethod`."""

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

__all__ = ["BEiT", "BYOL", "BarlowTwins", "CLIP", "Colorization", "DINO", "IBOT", "IJEPA", "Jigsaw", "MAE", "METHODS",
           "MoCoV2", "MoCoV3", "NNCLR", "Rotation", "SSLMethod", "SimCLR", "SimMIM", "SimSiam", "SwAV", "VICReg",
           "VQVAE"]
