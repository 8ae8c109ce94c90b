"""The losses keep their fp32 contract inside a bf16 or fp16 autocast region (how zero.precision bf16 / fp16 training
runs them)."""

import pytest
import torch

from kernels.dino_loss import dino_loss
from kernels.ntxent import ntxent_loss

HALF = pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])


@HALF
@pytest.mark.parametrize("impl", ["chunked", "ref"])
def test_ntxent_under_autocast_matches_fp32(impl, half):
    """Under torch.autocast(bf16 / fp16) the NT-Xent loss and gradients equal the fp32 ones for fp32 inputs."""
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(37, 130, generator=g), torch.randn(37, 130, generator=g)
    results = []
    for autocast in (False, True):
        a, b = z0.clone().requires_grad_(), z1.clone().requires_grad_()
        with torch.autocast("cpu", dtype=half, enabled=autocast):
            loss = ntxent_loss(a, b, 0.2, impl=impl)
        loss.backward()
        assert loss.dtype == torch.float32
        results.append((loss.detach(), a.grad, b.grad))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@HALF
def test_dino_under_autocast_matches_fp32(half):
    """Under torch.autocast(bf16 / fp16) the DINO loss and teacher mean equal the fp32 ones."""
    g = torch.Generator().manual_seed(1)
    s, t, c = torch.randn(4, 6, 257, generator=g), torch.randn(2, 6, 257, generator=g), torch.randn(257, generator=g)
    plain = dino_loss(s, t, c, 0.1, 0.04, impl="ref")
    with torch.autocast("cpu", dtype=half):
        mixed = dino_loss(s, t, c, 0.1, 0.04, impl="ref")
    torch.testing.assert_close(plain[0], mixed[0])
    torch.testing.assert_close(plain[1], mixed[1])
