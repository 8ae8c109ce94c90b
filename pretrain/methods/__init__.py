"""Pretext tasks: ``METHODS[name](cfg, gather=..., reduce=..., rank=...)`` builds an :class:`SSLMethod`."""

from pretrain.methods.base import SSLMethod
from pretrain.methods.dino import DINO
from pretrain.methods.simclr import SimCLR

METHODS: dict[str, type[SSLMethod]] = {"simclr": SimCLR, "dino": DINO}

__all__ = ["DINO", "METHODS", "SSLMethod", "SimCLR"]
