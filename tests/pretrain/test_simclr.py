"""SimCLR method: the loss implementations agree inside the method, the distributed form uses the gather, and
method.decoupled trains on DCL."""

import pytest
import torch
import torch.nn.functional as F

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


def _official(h1: torch.Tensor, h2: torch.Tensor, h1_large: torch.Tensor, h2_large: torch.Tensor, rank: int,
              temperature: float) -> torch.Tensor:
    """SimCLR's add_contrastive_loss (objective.py) written out: unit rows, labels on this replica's diagonal of the
    [ab | aa] and [ba | bb] logits, each sample's own column of aa / bb masked, loss_a + loss_b."""
    h1, h2, h1_large, h2_large = (F.normalize(h, dim=1) for h in (h1, h2, h1_large, h2_large))
    n, big = h1.shape[0], h1_large.shape[0]
    idx = torch.arange(n) + rank * n
    masks = F.one_hot(idx, big).float() * 1e9
    logits_aa, logits_bb = h1 @ h1_large.T / temperature - masks, h2 @ h2_large.T / temperature - masks
    logits_ab, logits_ba = h1 @ h2_large.T / temperature, h2 @ h1_large.T / temperature
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), idx)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), idx)
    return loss_a + loss_b


@pytest.mark.parametrize("impl", ["chunked", "ref"])
def test_loss_is_the_official_formula(impl):
    """The method's loss is the official loss_a + loss_b of its projections (the sum of the two views' mean NT-Xent,
    not their mean), alone and as rank 1 of 2 (a fake gather: the other rank's rows first, then this rank's)."""
    cfg = load_config(RECIPE, [f"method.loss_impl={impl}", "model.backbone_kwargs={width: 0.25}",
                               "model.proj_hidden_dim=64"])
    method = build_method(cfg, distributed=False).eval()
    g = torch.Generator().manual_seed(3)
    views = [torch.randn(8, 1, 16, 16, generator=g) for _ in range(2)]
    other = torch.randn(8, cfg.model.proj_out_dim, generator=g)
    t = cfg.method.temperature
    with torch.no_grad():
        z = method.projector(method.backbone(torch.cat(views)))
        z0, z1 = z[:8], z[8:]
        assert method({"views": views})["loss"].item() == pytest.approx(_official(z0, z1, z0, z1, 0, t).item(),
                                                                         rel=1e-5)
        gathered = iter([other, other.flip(0)])  # the other rank's view-0 rows, then its view-1 rows
        method.gather, method.rank = (lambda x: torch.cat([next(gathered), x])), 1
        expected = _official(z0, z1, torch.cat([other, z0]), torch.cat([other.flip(0), z1]), 1, t)
        assert method({"views": views})["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


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
        expected = 2 * ntxent_loss(z[:8], z[8:], cfg.method.temperature, decoupled=True)  # the two views' sum
        assert method({"views": views})["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert config_error("configs/byol_digits.yaml", ["method.decoupled=true"]).startswith(
        "method.decoupled: the decoupled contrastive loss is for simclr, moco_v3, moco_v2 and nnclr, got method.name "
        "'byol'")


def test_proj_last_bn_scale_is_the_official_heads_last_batchnorm():
    """model.proj_last_bn_scale: the projector's last BatchNorm has a learned scale and no shift, as SimCLR's official
    head (``batch_norm_relu(..., center=False)``): the output equals a BatchNorm1d with that weight and its bias held
    at 0, in training and in eval mode, and gradients reach the scale; the scale is 1-D, so it takes neither weight
    decay nor the trust ratio (as the official code exempts BatchNorm parameters); other heads refuse it in one line;
    the ImageNet recipe sets it, the recipes built on it do not inherit it."""
    from pretrain.config import ConfigError
    from pretrain.optim import param_groups

    cfg = load_config(RECIPE, ["model.backbone_kwargs={width: 0.25}", "model.proj_hidden_dim=64",
                               "model.proj_last_bn=true", "model.proj_last_bn_scale=true"])
    method = build_method(cfg, distributed=False)
    head = method.projector.mlp
    scale = head[-1].weight
    with torch.no_grad():
        scale.copy_(torch.linspace(0.5, 2.0, scale.numel()))
    reference = torch.nn.BatchNorm1d(scale.numel())  # what TF's BatchNormalization(center=False) computes
    with torch.no_grad():
        reference.weight.copy_(scale)
        reference.bias.zero_()
    h = torch.randn(32, head[0].in_features)
    before = torch.nn.Sequential(*list(head)[:-2])
    for mode in (True, False):
        head.train(mode), reference.train(mode)
        torch.testing.assert_close(head(h), reference(before(h)), atol=1e-5, rtol=1e-5)
    head.train()
    head(h).pow(2).sum().backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0
    groups = {g["decay"]: {id(p) for p in g["params"]} for g in param_groups(method, weight_decay=0.1)}
    assert id(scale) in groups[False] and id(scale) not in groups[True]
    with pytest.raises(ConfigError) as err:
        load_config(RECIPE, ["model.proj_last_bn_scale=true"])
    assert str(err.value) == ("model.proj_last_bn_scale: scales the projector's last BatchNorm: set "
                              "model.proj_last_bn=true too")
    with pytest.raises(ConfigError) as err:
        load_config("configs/byol_digits.yaml", ["model.proj_last_bn=true", "model.proj_last_bn_scale=true"])
    assert str(err.value) == ("model.proj_last_bn_scale: SimCLR's head reads it, byol's does not (its official head's "
                              "last BatchNorm has no scale)")
    imagenet = load_config("configs/simclr_resnet50_imagenet.yaml").model
    assert imagenet.proj_last_bn and imagenet.proj_last_bn_scale
    for recipe in ("byol", "simsiam", "mocov2", "swav", "barlow_twins", "vicreg"):
        assert not load_config(f"configs/{recipe}_resnet50_imagenet.yaml").model.proj_last_bn_scale


def test_proj_last_bn_ends_the_projector_in_batchnorm_and_methods_without_it_refuse_it():
    """model.proj_last_bn: SimCLR's projector ends in a BatchNorm without affine parameters (the official head ends in
    a BatchNorm; it had been ignored), so in training mode each output channel has mean 0 and variance 1 over the batch;
    a method whose head does not read the key refuses it in one line (it was ignored)."""
    from pretrain.config import ConfigError

    cfg = load_config(RECIPE, ["model.backbone_kwargs={width: 0.25}", "model.proj_hidden_dim=64",
                               "model.proj_last_bn=true"])
    method = build_method(cfg, distributed=False).train()
    last = list(method.projector.modules())[-1]
    assert isinstance(last, torch.nn.BatchNorm1d) and not last.affine
    z = method.projector(method.backbone(torch.randn(32, 1, 16, 16)))
    torch.testing.assert_close(z.mean(0), torch.zeros(z.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(z.shape[1]), atol=1e-3, rtol=0)
    for recipe in ("configs/vicreg_digits.yaml", "configs/mocov2_digits.yaml", "configs/dino_digits.yaml"):
        with pytest.raises(ConfigError) as err:
            load_config(recipe, ["model.proj_last_bn=true"])
        name = load_config(recipe).method.name
        assert str(err.value) == (f"model.proj_last_bn: {name} does not read it (its head would be as without it); "
                                  "it is for simclr, byol, moco_v3, nnclr, simsiam")
