"""CLIP loss: tiled paths against the open_clip-style reference, logit-scale gradient, distributed form."""

import math

import pytest
import torch

from kernels.ntxent import clip_loss, clip_loss_ref
from kernels.testing import assert_lowp_close, max_err


def _towers(n, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    txt = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    scale = torch.tensor(math.log(1 / 0.07), device=device).requires_grad_()
    return img, txt, scale


def _run(fn, img, txt, scale, g):
    loss = fn(img, txt, scale)
    return (loss, *torch.autograd.grad(loss, [img, txt, scale], g))


@pytest.mark.parametrize("impl", ["triton", "chunked"])
@pytest.mark.parametrize("n,d", [(37, 130), (70, 33)])
def test_fp32_matches_reference(impl, n, d, device):
    """fp32 loss and gradients to both towers and to logit_scale match the reference."""
    img, txt, scale = _towers(n, d, torch.float32, device)
    g = torch.tensor(0.7, device=device)
    out = _run(lambda a, b, s: clip_loss(a, b, s, impl=impl), img, txt, scale, g)
    ref = _run(lambda a, b, s: clip_loss_ref(a, b, s), img, txt, scale, g)
    for o, r in zip(out, ref):
        assert max_err(o, r) <= 1e-5 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_fp16_within_twice_torch_fp16_error(impl, device):
    """fp16 towers: error vs the fp32 reference is at most 2x that of the reference computed in fp16."""
    img, txt, scale = _towers(37, 130, torch.float16, device)
    g = torch.tensor(1.0, device=device)
    out = _run(lambda a, b, s: clip_loss(a, b, s, impl=impl), img, txt, scale, g)
    ref32 = _run(lambda a, b, s: clip_loss_ref(a, b, s, upcast=True), img, txt, scale, g)
    ref16 = _run(lambda a, b, s: clip_loss_ref(a, b, s), img, txt, scale, g)
    for o, r32, r16 in zip(out, ref32, ref16):
        assert_lowp_close(o, r32, r16, atol=1e-3)


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_distributed_form_sums_to_full_batch(impl, device):
    """Simulated ranks: per-rank losses and gradients sum to world x the full-batch ones."""
    world, n = 2, 19
    img, txt, scale = _towers(world * n, 24, torch.float32, device, seed=4)
    full = _run(lambda a, b, s: clip_loss_ref(a, b, s), img, txt, scale, None)
    total = _run(lambda a, b, s: sum(
        clip_loss(a[r * n:(r + 1) * n], b[r * n:(r + 1) * n], s, img_all=a, txt_all=b, offset=r * n, impl=impl)
        for r in range(world)), img, txt, scale, None)
    for o, r in zip(total, full):
        assert max_err(o, world * r) <= 1e-5 * max(1.0, world * r.abs().max().item())


def test_identical_towers_with_orthogonal_rows_have_known_loss(device):
    """img = txt = orthonormal rows: each direction's CE is log(1 + (n-1) e^-s) exactly."""
    n, s = 8, 2.0
    eye = torch.eye(n, 16, device=device)
    loss = clip_loss(eye, eye.clone(), torch.tensor(math.log(s), device=device), impl="triton")
    assert loss.item() == pytest.approx(math.log(1 + (n - 1) * math.exp(-s)), rel=1e-5)


def test_bad_logit_scale_raises():
    """A logit_scale that is not a one-element tensor is a ValueError."""
    with pytest.raises(ValueError, match="logit_scale"):
        clip_loss(torch.randn(4, 8), torch.randn(4, 8), 2.0)
