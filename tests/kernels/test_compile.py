"""The Triton launches are custom ops: torch.library's checks pass, and torch.compile keeps a whole step with every
op in one graph (fullgraph) with the same results as eager."""

import pytest
import torch

from kernels import contrastive, dino_loss, masked_gather
from kernels.dino_loss import ibot_patch_loss
from kernels.masked_gather import mask_token_replace
from kernels.ntxent import clip_loss, ntxent_loss


def _samples(device):
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, k = rnd(10, 24), rnd(12, 24)
    pos, excl = torch.randint(0, 12, (10,), generator=gen).to(device), torch.full((10,), -1, device=device)
    lse = contrastive.contrastive_fwd(q, k, pos, excl, False)[1]
    s, t, c, w = rnd(4, 3, 40), rnd(2, 3, 40), rnd(40), torch.full((3,), 0.1, device=device)
    _, _, lse_s, lse_t = dino_loss.dino_fwd(s, t, c, w, 0.1, 0.04, False)
    x, ids = rnd(2, 9, 16), torch.stack([torch.randperm(9, generator=gen)[:4] for _ in range(2)]).to(device)
    flags = (torch.rand(2, 9, generator=gen) < 0.5).to(device).view(torch.uint8)
    return [
        (contrastive.contrastive_fwd, (q, k, pos, excl, True)),
        (contrastive.contrastive_bwd, (q, k, pos, excl, lse, rnd(10), True)),
        (dino_loss.dino_fwd, (s, t, c, w, 0.1, 0.04, False)),
        (dino_loss.dino_bwd, (s, t, c, w, lse_s, lse_t, rnd(1), 0.1, 0.04, False)),
        (masked_gather.gather_rows, (x, ids)),
        (masked_gather.scatter_rows, (rnd(2, 4, 16), ids, 9)),
        (masked_gather.mask_token_fwd, (x, flags, rnd(16))),
        (masked_gather.mask_token_bwd, (x, flags)),
    ]


@pytest.mark.parametrize("index", range(8))
def test_custom_op_passes_torch_library_opcheck(index, device):
    """Schema, fake (meta) implementation and dispatch of each Triton op agree with its real implementation."""
    op, args = _samples(device)[index]
    torch.library.opcheck(op, args)


def _step(z0, z1, img, txt, scale, student, teacher, center, patches, mask, x, ids, token):
    loss = ntxent_loss(z0, z1, 0.2, impl="triton") + clip_loss(img, txt, scale, impl="triton")
    dino, teacher_mean = dino_loss.dino_loss(student, teacher, center, 0.1, 0.04, impl="triton")
    ibot, _ = ibot_patch_loss(patches, patches.detach() * 0.5, mask, center, 0.1, 0.04, impl="triton")
    kept = masked_gather.masked_gather(x, ids, impl="triton")
    replaced = mask_token_replace(x, mask[:, : x.shape[1]], token, impl="triton")
    return loss + dino + ibot + kept.square().mean() + replaced.sin().mean() + teacher_mean.mean()


def test_compiled_step_with_every_op_is_one_graph_and_matches_eager(device):
    """torch.compile(fullgraph=True) of a step using every op gives eager's loss and gradients."""
    gen = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    leaves = [rnd(16, 32), rnd(16, 32), rnd(8, 24), rnd(8, 24), torch.tensor(2.0, device=device),
              rnd(4, 3, 50), None, None, rnd(2, 9, 50), None, rnd(2, 9, 16), None, rnd(16)]
    leaves[6], leaves[7] = rnd(2, 3, 50), 0.1 * rnd(50)
    leaves[9] = (torch.rand(2, 9, generator=gen) < 0.5).to(device)
    leaves[11] = torch.stack([torch.randperm(9, generator=gen)[:5] for _ in range(2)]).to(device)
    grad_idx = [0, 1, 2, 3, 4, 5, 8, 10, 12]
    for i in grad_idx:
        leaves[i].requires_grad_()

    def run(fn):
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, [leaves[i] for i in grad_idx])]

    eager = run(_step)
    compiled = run(torch.compile(_step, fullgraph=True))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


def test_packed_ibot_loss_compiles_into_one_graph(device):
    """ibot_masked_patch_loss under torch.compile(fullgraph=True) gives eager's loss and gradient: its check of the
    rows against the mask's count, which a compiled graph cannot branch on, runs in eager only (it had broken the
    graph on CPU)."""
    gen = torch.Generator().manual_seed(2)
    mask = (torch.rand(2, 9, generator=gen) < 0.5).to(device)
    rows = int(mask.sum())
    student = torch.randn(rows, 40, generator=gen).to(device).requires_grad_()
    teacher, center = torch.randn(rows, 40, generator=gen).to(device), torch.randn(40, generator=gen).to(device)

    def step(s):
        return dino_loss.ibot_masked_patch_loss(s, teacher, mask, center, 0.1, 0.04, impl="triton")

    eager = step(student)
    compiled = torch.compile(step, fullgraph=True)(student)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(compiled, student)[0], torch.autograd.grad(eager, student)[0],
                               rtol=1e-5, atol=1e-6)
