"""DINO and iBOT-patch losses: Triton path against the official-style references, closed form, teacher mean."""

import math

import pytest
import torch

from kernels.dino_loss import (
    dino_loss,
    dino_loss_ref,
    ibot_masked_patch_loss,
    ibot_masked_patch_loss_ref,
    ibot_patch_loss,
    ibot_patch_loss_ref,
)
from kernels.testing import assert_lowp_close, max_err

# (S, T, B, K); K never a power of two. The forward splits K across programs: 1, 2 and 5 chunks (ragged last) here.
CASES = [(2, 2, 5, 37), (4, 2, 3, 1000), (10, 2, 2, 300), (3, 1, 4, 96), (4, 2, 2, 5000)]


def _outs(s, t, b, k, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(s, b, k, generator=gen)).to(device=device, dtype=dtype).requires_grad_()
    teacher = (3 * torch.randn(t, b, k, generator=gen)).to(device=device, dtype=dtype)
    center = (0.1 * torch.randn(k, generator=gen)).to(device)
    return student, teacher, center


@pytest.mark.parametrize("s,t,b,k", CASES)
def test_fp32_matches_reference(s, t, b, k, device):
    """Loss, teacher mean and student gradient (random upstream) match the reference: the loss and mean that in
    fp32; the gradient its fp64 form to 5e-5 of its largest element (softmax at tau_t = 0.04 exponentiates logits
    / 0.04, up to ~100, whose fp32 rounding alone is ~1e-5 relative: the H200's error was 1.4e-5, the interpreter's
    less)."""
    student, teacher, center = _outs(s, t, b, k, torch.float32, device)
    g = torch.tensor(0.6, device=device)
    loss, mean = dino_loss(student, teacher, center, 0.1, 0.04, impl="triton")
    loss_r, mean_r = dino_loss_ref(student, teacher, center, 0.1, 0.04)
    assert max_err(loss, loss_r) <= 1e-5 * loss_r.abs().item()
    assert max_err(mean, mean_r) <= 1e-6
    student64 = student.detach().double().requires_grad_()
    loss64 = dino_loss_ref(student64, teacher.double(), center.double(), 0.1, 0.04)[0]
    gs, gs_r = torch.autograd.grad(loss, student, g)[0], torch.autograd.grad(loss64, student64, g.double())[0]
    assert max_err(gs, gs_r) <= 5e-5 * gs_r.abs().max().item()


def test_fp16_within_twice_torch_fp16_error(device):
    """fp16 logits: loss and gradient errors are at most 2x those of the reference computed in fp16."""
    student, teacher, center = _outs(4, 2, 3, 1000, torch.float16, device)
    out = dino_loss(student, teacher, center, 0.1, 0.04, impl="triton")[0]
    r32 = dino_loss_ref(student, teacher, center, 0.1, 0.04, upcast=True)[0]
    r16 = dino_loss_ref(student, teacher, center, 0.1, 0.04)[0]
    assert_lowp_close(out, r32, r16, atol=1e-4)
    grads = [torch.autograd.grad(x, student)[0] for x in (out, r32, r16)]
    assert_lowp_close(*grads, atol=1e-6)


def test_teacher_equal_to_center_gives_log_k(device):
    """Teacher logits equal to the center give uniform targets; with a uniform student each pair costs ln K."""
    k = 300
    center = torch.randn(k, device=device)
    teacher = center.expand(2, 3, k).contiguous()
    student = torch.zeros(4, 3, k, device=device)
    loss, _ = dino_loss(student, teacher, center, 0.1, 0.04, impl="triton")
    assert loss.item() == pytest.approx(math.log(k), rel=1e-6)


def test_teacher_gets_no_gradient(device):
    """Only the student receives a gradient."""
    student, teacher, center = _outs(2, 2, 3, 40, torch.float32, device)
    teacher.requires_grad_()
    loss, _ = dino_loss(student, teacher, center, 0.1, 0.04, impl="triton")
    loss.backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ibot_patch_loss_matches_reference(dtype, device):
    """Masked-patch loss (an image with no masked patch included), teacher mean and gradient match iBOT's form."""
    gen = torch.Generator().manual_seed(5)
    b, length, k = 3, 7, 50
    student = (3 * torch.randn(b, length, k, generator=gen)).to(device=device, dtype=dtype).requires_grad_()
    teacher = (3 * torch.randn(b, length, k, generator=gen)).to(device=device, dtype=dtype)
    center = (0.1 * torch.randn(k, generator=gen)).to(device)
    mask = torch.rand(b, length, generator=gen) < 0.4
    mask[0] = False
    mask = mask.to(device)
    loss, mean = ibot_patch_loss(student, teacher, mask, center, 0.1, 0.04, impl="triton")
    loss_r, mean_r = ibot_patch_loss_ref(student, teacher, mask, center, 0.1, 0.04, upcast=True)
    assert max_err(loss, loss_r) <= 1e-5 * loss_r.abs().item()
    assert max_err(mean, mean_r) <= 1e-5
    gs, gs_r = torch.autograd.grad(loss, student)[0], torch.autograd.grad(loss_r, student)[0]
    assert max_err(gs, gs_r) <= 2e-3 * gs_r.abs().max().item()
    assert torch.all(gs[~mask] == 0)


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_patch_loss_is_the_patch_loss_on_packed_rows(dtype, impl, device):
    """The packed form (the masked rows only, in row-major order) gives iBOT's full-tensor loss, and the full loss's
    gradient at the masked rows; images without a masked patch count in the mean as zeros, as there."""
    gen = torch.Generator().manual_seed(6)
    b, length, k = 4, 9, 70
    student = (3 * torch.randn(b, length, k, generator=gen)).to(device=device, dtype=dtype).requires_grad_()
    teacher = (3 * torch.randn(b, length, k, generator=gen)).to(device=device, dtype=dtype)
    center = (0.1 * torch.randn(k, generator=gen)).to(device)
    mask = torch.rand(b, length, generator=gen) < 0.4
    mask[1] = False
    mask[2, :3] = True
    mask = mask.to(device)
    loss_r, _ = ibot_patch_loss_ref(student, teacher, mask, center, 0.1, 0.04, upcast=True)
    packed = student[mask]
    loss = ibot_masked_patch_loss(packed, teacher[mask], mask, center, 0.1, 0.04, impl=impl)
    assert loss.dtype == torch.float32
    assert max_err(loss, loss_r) <= 1e-5 * loss_r.abs().item()
    g, g_r = torch.autograd.grad(loss, student)[0], torch.autograd.grad(loss_r, student)[0]
    assert max_err(g, g_r) <= 2e-3 * g_r.abs().max().item()
    ref = ibot_masked_patch_loss_ref(packed.float(), teacher[mask].float(), mask, center, 0.1, 0.04)
    assert max_err(loss, ref) <= 1e-5 * ref.abs().item()


def test_masked_patch_loss_without_masked_patches_and_bad_rows(device):
    """Nothing masked: a zero loss with a (zero) gradient; rows that are not the mask's count: a ValueError."""
    student = torch.randn(0, 8, device=device, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool, device=device)
    loss = ibot_masked_patch_loss(student, torch.randn(0, 8, device=device), mask, torch.zeros(8, device=device), 0.1,
                                  0.04, impl="triton")
    assert loss.item() == 0.0 and loss.requires_grad
    # the row count is checked where that is free, on the CPU (on a GPU it would cost a host sync)
    mask = mask.cpu()
    mask[0, 1] = True
    with pytest.raises(ValueError, match="1 patches"):
        ibot_masked_patch_loss(torch.randn(3, 8), torch.randn(3, 8), mask, torch.zeros(8), 0.1, 0.04)


@pytest.mark.parametrize(
    "shapes,match",
    [(((2, 3, 8), (3, 3, 8), (8,)), "T <= S"), (((2, 3, 8), (2, 3, 8), (7,)), "center")],
)
def test_bad_shapes_raise(shapes, match):
    """More teacher views than student views, or a wrong center size, is a ValueError."""
    s, t, c = (torch.randn(*x) for x in shapes)
    with pytest.raises(ValueError, match=match):
        dino_loss(s, t, c, 0.1, 0.04)


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_center_is_k_or_1_by_k_without_gradient_on_every_path(impl, device):
    """A center of shape (K,) or (1, K) gives the same loss on every path and no gradient (only the student gets one;
    the reference had broadcast a (K, 1) center against the batch, and given the center a gradient); any other shape,
    a center on another device and empty sizes are a ValueError."""
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 4, generator=gen).to(device).requires_grad_()
    t, center = torch.randn(2, 4, 4, generator=gen).to(device), torch.randn(4, generator=gen).to(device)
    want = dino_loss_ref(s.double(), t.double(), center.double(), 0.1, 0.04)[0].item()
    for c in (center, center[None]):
        c = c.clone().requires_grad_()
        loss = dino_loss(s, t, c, 0.1, 0.04, impl=impl)[0]
        loss.backward()
        assert loss.item() == pytest.approx(want, rel=1e-5) and c.grad is None and s.grad is not None
    for bad, match in ((center[:, None], r"center must be a float tensor of shape \(4,\) or \(1, 4\)"),
                       (center.to("meta"), f"center on meta but the logits on {s.device}")):
        with pytest.raises(ValueError, match=match):
            dino_loss(s, t, bad, 0.1, 0.04, impl=impl)
    with pytest.raises(ValueError, match="at least one image"):
        dino_loss(s[:, :0], t[:, :0], center, 0.1, 0.04, impl=impl)
    with pytest.raises(ValueError, match="K >= 1"):
        dino_loss(s[..., :0], t[..., :0], center[:0], 0.1, 0.04, impl=impl)
    mask = torch.ones(2, 4, dtype=torch.bool, device=device)  # iBOT's patch loss: (B=2, L=4, K=4) logits
    for bad_mask in (mask.to("meta"), mask[:, :3]):
        with pytest.raises(ValueError, match="mask must be bool"):
            ibot_patch_loss(s[:2], t, bad_mask, center, 0.1, 0.04, impl=impl)
