"""masked_gather / mask_token_replace / packed_gather: Triton path against the PyTorch references."""

import pytest
import torch

import kernels.utils
from kernels.masked_gather import (
    mask_token_replace,
    mask_token_replace_ref,
    masked_gather,
    masked_gather_ref,
    packed_gather,
    packed_gather_ref,
)
from kernels.testing import max_err

DTYPES = [torch.float32, torch.float16]


def _x(b, length, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, length, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("l_keep", [0, 5, 13])  # none kept, some, all (L = 13)
def test_masked_gather_matches_torch_gather(l_keep, dtype, device):
    """Forward and scatter backward are bit-identical to torch.gather's."""
    x = _x(3, 13, 130, dtype, device)
    ids = torch.rand(3, 13, generator=torch.Generator().manual_seed(1)).argsort(dim=1)[:, :l_keep].to(device)
    g = torch.randn(3, l_keep, 130).to(device=device, dtype=dtype)
    out, ref = masked_gather(x, ids, impl="triton"), masked_gather_ref(x, ids)
    assert torch.equal(out, ref)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_masked_gather_out_of_range_ids_raise():
    """ids_keep outside [0, L) is a ValueError (checked on CPU, where it costs no sync)."""
    with pytest.raises(ValueError, match="ids_keep"):
        masked_gather(torch.randn(2, 4, 8), torch.tensor([[0, 4], [1, 2]]), impl="triton")


# ids are checked where that is free, on the CPU (on a GPU it would cost a host sync): Triton there is the interpreter's
@pytest.mark.parametrize("impl", ["triton", "ref"] if kernels.utils.INTERPRET else ["ref"])
def test_masked_gather_repeated_ids_raise(impl):
    """An id kept twice in a row of a gather with a backward: a ValueError (the backward, a scatter, would give it one
    of the gradients, not their sum), on every path; distinct ids in any order are taken, and so are repeated ones
    where there is no backward (I-JEPA's overlapping target blocks)."""
    x = torch.randn(2, 4, 8, requires_grad=True)
    repeated = torch.tensor([[0, 1, 1], [2, 1, 0]])
    masked_gather(x, torch.tensor([[3, 0, 1], [2, 1, 0]]), impl=impl)
    with pytest.raises(ValueError, match="ids_keep values must be distinct within each row"):
        masked_gather(x, repeated, impl=impl)
    with torch.no_grad():
        torch.testing.assert_close(masked_gather(x, repeated, impl=impl), masked_gather_ref(x, repeated))
    torch.testing.assert_close(masked_gather(x.detach(), repeated, impl=impl), masked_gather_ref(x.detach(), repeated))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_token_replace_matches_where(dtype, device):
    """Output and x-gradient match torch.where exactly; the token gradient matches an fp32 sum of masked grads."""
    x = _x(4, 37, 130, dtype, device)
    gen = torch.Generator().manual_seed(2)
    mask = (torch.rand(4, 37, generator=gen) < 0.4).to(device)
    tok = torch.randn(130, generator=gen).to(device).requires_grad_()
    g = torch.randn(4, 37, 130, generator=gen).to(device=device, dtype=dtype)
    out, ref = mask_token_replace(x, mask, tok, impl="triton"), mask_token_replace_ref(x, mask, tok)
    assert torch.equal(out, ref)
    dx, dtok = torch.autograd.grad(out, [x, tok], g)
    assert torch.equal(dx, torch.autograd.grad(ref, x, g, retain_graph=True)[0])
    want = g.float()[mask].sum(0)
    assert max_err(dtok, want) <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("fill", [0.0, 0.3, 1.0])  # no masked rows, some (varying per sample), all
def test_packed_gather_matches_boolean_index(fill, device):
    """(M, D) rows in row-major order and their scatter backward match x[mask]."""
    x = _x(3, 17, 40, torch.float32, device)
    mask = (torch.rand(3, 17, generator=torch.Generator().manual_seed(3)) < fill).to(device)
    out, ref = packed_gather(x, mask, impl="triton"), packed_gather_ref(x, mask)
    assert out.shape == (int(mask.sum()), 40) and torch.equal(out, ref)
    g = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_mask_shape_mismatch_raises():
    """A mask whose shape is not (B, L) is a ValueError."""
    with pytest.raises(ValueError, match="mask"):
        packed_gather(torch.randn(2, 4, 8), torch.ones(2, 5, dtype=torch.bool))
