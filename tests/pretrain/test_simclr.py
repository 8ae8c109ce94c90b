"""SimCLR method: the loss implementations agree inside the method, the distributed form uses the gather, and
method.decoupled trains on DCL."""

import pytest
import torch

from pretrain.config import load_config
from pretrain.trainer import build_method

RECIPE = "configs/simclr_digits.yaml"


def _grads(impl: str, *extra: str):
    cfg = load_config(RECIPE, [f"method.loss_impl={impl}", "model.backbone_kwargs={width: 0.25}",
                               "model.proj_hidden_dim=64", *extra])
    method = build_method(cfg, distributed=False)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(24, 1, 16, 16, generator=g) for _ in range(2)]
    loss = method({"views": views})["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def test_chunked_kernel_path_matches_naive_reference():
    """The chunked NT-Xent (what CPU training uses) and the naive 2N x 2N reference give the same loss and gradients."""
    loss_c, grads_c = _grads("chunked")
    loss_r, grads_r = _grads("ref")
    assert loss_c.item() == pytest.approx(loss_r.item(), rel=1e-5)
    assert grads_c.keys() == grads_r.keys()
    for name in grads_c:
        torch.testing.assert_close(grads_c[name], grads_r[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gather_is_used_for_negatives():
    """With a gather passed in, the loss sees the gathered columns (here: a fake second rank's copy of the batch)."""
    cfg = load_config(RECIPE, ["model.backbone_kwargs={width: 0.25}", "model.proj_hidden_dim=64"])
    torch.manual_seed(0)
    views = [torch.randn(8, 1, 16, 16) for _ in range(2)]
    alone = build_method(cfg, distributed=False).eval()
    doubled = build_method(cfg, distributed=False).eval()
    doubled.gather = lambda z: torch.cat([z, z.flip(0)])  # a second "rank" with other rows
    with torch.no_grad():
        assert doubled({"views": views})["loss"] > alone({"views": views})["loss"]  # more negatives, higher loss


def test_decoupled_trains_on_dcl_of_the_projections():
    """method.decoupled: the method's loss is DCL of its projections (the kernel's decoupled form, checked against
    DCL written out in tests/kernels/test_ntxent.py), on the chunked path as on the naive one, gradients too; other
    methods refuse the key in one line."""
    from kernels.ntxent import ntxent_loss
    from tests.util import config_error

    loss_c, grads_c = _grads("chunked", "method.decoupled=true")
    loss_r, grads_r = _grads("ref", "method.decoupled=true")
    plain, _ = _grads("chunked")
    assert loss_c.item() == pytest.approx(loss_r.item(), rel=1e-5) and loss_c.item() < plain.item()
    for name in grads_c:
        torch.testing.assert_close(grads_c[name], grads_r[name], rtol=1e-4, atol=1e-6, msg=name)
    cfg = load_config(RECIPE, ["method.decoupled=true", "model.backbone_kwargs={width: 0.25}",
                               "model.proj_hidden_dim=64"])
    method = build_method(cfg, distributed=False).eval()
    views = [torch.randn(8, 1, 16, 16) for _ in range(2)]
    with torch.no_grad():
        z = method.projector(method.backbone(torch.cat(views)))
        expected = ntxent_loss(z[:8], z[8:], cfg.method.temperature, decoupled=True)
        assert method({"views": views})["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert config_error("configs/byol_digits.yaml", ["method.decoupled=true"]).startswith(
        "method.decoupled: the decoupled contrastive loss is for simclr, moco_v3, moco_v2 and nnclr, got method.name "
        "'byol'")
