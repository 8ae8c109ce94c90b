"""Projection and DINO heads: shapes, layer layout, weight normalisation of DINO's prototypes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.heads import DINOHead, ProjectionHead


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("use_bn", [True, False])
def test_projection_head_shape_and_layout(num_layers: int, use_bn: bool) -> None:
    """num_layers Linears, BatchNorm+ReLU only between them, a bare Linear last; (B, in) -> (B, out)."""
    head = ProjectionHead(in_dim=12, hidden_dim=20, out_dim=7, num_layers=num_layers, use_bn=use_bn)
    kinds = [type(m) for m in head.mlp]
    assert kinds.count(nn.Linear) == num_layers and kinds[-1] is nn.Linear
    assert kinds.count(nn.BatchNorm1d) == (num_layers - 1 if use_bn else 0)
    assert kinds.count(nn.ReLU) == num_layers - 1
    assert head(torch.randn(5, 12)).shape == (5, 7)


def test_projection_head_last_bn_standardises_each_output() -> None:
    """last_bn (MoCo v3's projector): the last Linear has no bias and a BatchNorm without affine parameters follows
    it, so in training each output feature has mean 0 and variance 1 over the batch; in eval the running statistics
    apply; the hidden layers are as without it."""
    torch.manual_seed(0)
    head = ProjectionHead(12, 20, 7, num_layers=3, last_bn=True)
    last_linear, last_bn = head.mlp[-2], head.mlp[-1]
    assert isinstance(last_bn, nn.BatchNorm1d) and not last_bn.affine and last_linear.bias is None
    assert [type(m) for m in head.mlp[:-1]] == [type(m) for m in ProjectionHead(12, 20, 7, num_layers=3).mlp]
    out = head(torch.randn(256, 12) * 3 + 1)
    torch.testing.assert_close(out.mean(0), torch.zeros(7), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(0, unbiased=False), torch.ones(7), atol=1e-3, rtol=0)
    assert not any(n.startswith("mlp.5.") for n, _ in head.named_parameters())  # statistics only: buffers
    head.eval()
    x = torch.randn(4, 12)
    pre = head.mlp[:-1](x)
    torch.testing.assert_close(head(x), (pre - last_bn.running_mean) / (last_bn.running_var + last_bn.eps).sqrt())


def test_projection_head_output_is_not_rectified() -> None:
    """No ReLU after the last layer: outputs take negative values."""
    torch.manual_seed(0)
    assert (ProjectionHead(8, 16, 4)(torch.randn(64, 8)) < 0).any()


@pytest.mark.parametrize("bad", [dict(num_layers=0), dict(out_dim=0), dict(hidden_dim=-1)])
def test_projection_head_rejects_bad_sizes(bad: dict) -> None:
    """Non-positive sizes raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=next(iter(bad))):
        ProjectionHead(8, **bad)


def test_dino_head_output_dim_and_cosine_range() -> None:
    """(B, in_dim) -> (B, out_dim); with unit prototypes and an L2-normalised bottleneck every logit is a cosine."""
    torch.manual_seed(0)
    head = DINOHead(in_dim=16, out_dim=50, hidden_dim=32, bottleneck_dim=8)
    head.last_layer.weight_v.data.mul_(7.0)  # the scale of v must not matter
    out = head(torch.randn(10, 16) * 100)
    assert out.shape == (10, 50)
    assert out.abs().max() <= 1.0 + 1e-6
    z = F.normalize(head.mlp(torch.randn(3, 16)), dim=-1)
    torch.testing.assert_close(head.last_layer(z), z @ F.normalize(head.last_layer.weight_v, dim=1).T)


def test_dino_head_norm_last_layer_freezes_gain() -> None:
    """norm_last_layer=True: prototypes are unit rows and the gain is frozen; False: the gain trains."""
    fixed = DINOHead(in_dim=16, out_dim=20, hidden_dim=32, bottleneck_dim=8, norm_last_layer=True)
    torch.testing.assert_close(fixed.last_layer.weight.norm(dim=1), torch.ones(20))
    assert not fixed.last_layer.weight_g.requires_grad
    free = DINOHead(in_dim=16, out_dim=20, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False)
    free(torch.randn(4, 16)).sum().backward()
    assert free.last_layer.weight_g.grad is not None and free.last_layer.weight_g.grad.abs().sum() > 0
    assert free.last_layer.weight_v.grad is not None


def test_dino_head_layout() -> None:
    """num_layers Linears with GELU between, the last into the bottleneck; optional BatchNorm; bias-free prototypes."""
    head = DINOHead(in_dim=16, out_dim=20, hidden_dim=32, bottleneck_dim=8, num_layers=3, use_bn=True)
    kinds = [type(m) for m in head.mlp]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear]
    assert head.mlp[0].bias is None and head.mlp[3].bias is None and head.mlp[-1].bias is not None  # none before BN
    assert head.mlp[-1].out_features == 8
    assert set(dict(head.last_layer.named_parameters())) == {"weight_v", "weight_g"}


def test_dino_head_copies_as_plain_parameters() -> None:
    """A deep copy (EMA teacher) gives the same output; the prototypes are the plain parameters ``weight_v`` /
    ``weight_g`` (the checkpoint keys), read at each forward: after an EMA update that moves the teacher onto a changed
    student, the teacher gives the student's new output (nothing cached from the copy)."""
    from pretrain.ema import ema_update_

    torch.manual_seed(0)
    student = DINOHead(in_dim=16, out_dim=20, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False)
    teacher = copy.deepcopy(student)
    x = torch.randn(4, 16)
    torch.testing.assert_close(teacher(x), student(x))
    keys = {k for k in teacher.state_dict() if k.startswith("last_layer.")}
    assert keys == {"last_layer.weight_v", "last_layer.weight_g"}
    with torch.no_grad():
        student.last_layer.weight_v.add_(torch.randn(20, 8))
        student.last_layer.weight_g.mul_(2.0)
    before = teacher(x)
    ema_update_(teacher, student, 0.0)
    assert not torch.allclose(teacher(x), before)
    torch.testing.assert_close(teacher(x), student(x))


class _OfficialDINOHead(nn.Module):
    """facebookresearch/dino's ``DINOHead`` written out (its ``nn.utils.weight_norm`` last layer, gain filled with 1 and
    frozen with ``norm_last_layer``), to compare ours with."""

    def __init__(self, in_dim, out_dim, norm_last_layer=True, nlayers=3, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch deprecates nn.utils.weight_norm, which DINO uses
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_is_the_official_one(num_layers: int, norm_last_layer: bool) -> None:
    """Given the same weights (a prototype matrix of another scale, trained gains), DINOHead gives the official head's
    logits and the same gradients: the MLP's, the gain's, and v's (up to the 1/||v|| that weight normalisation puts on
    them)."""
    torch.manual_seed(0)
    ours = DINOHead(12, 30, hidden_dim=20, bottleneck_dim=8, num_layers=num_layers, norm_last_layer=norm_last_layer)
    ref = _OfficialDINOHead(12, 30, norm_last_layer, nlayers=num_layers, hidden_dim=20, bottleneck_dim=8)
    ours_linear = [m for m in ours.mlp.modules() if isinstance(m, nn.Linear)]
    ref_linear = [m for m in ref.mlp.modules() if isinstance(m, nn.Linear)]
    assert len(ours_linear) == len(ref_linear) == num_layers
    with torch.no_grad():
        for a, b in zip(ref_linear, ours_linear, strict=True):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
        ref.last_layer.weight_v.copy_(4.0 * ours.last_layer.weight_v)  # another scale, exact (3x had rounded)
        if not norm_last_layer:
            ours.last_layer.weight_g.mul_(torch.rand(30) + 0.5)
            ref.last_layer.weight_g.copy_(ours.last_layer.weight_g[:, None])
    # in float64: the two compute the same function in another order, and in float32 an element of a gradient where
    # terms cancel had come out 1.5e-4 apart, relatively, on an Intel Xeon (within 1e-4 on an AMD EPYC)
    ours, ref = ours.double(), ref.double()
    x, upstream = torch.randn(6, 12, dtype=torch.float64), torch.randn(6, 30, dtype=torch.float64)
    out_ours, out_ref = ours(x), ref(x)
    torch.testing.assert_close(out_ours, out_ref)
    (out_ours * upstream).sum().backward()
    (out_ref * upstream).sum().backward()
    for a, b in zip(ours_linear, ref_linear, strict=True):
        torch.testing.assert_close(a.weight.grad, b.weight.grad)
    torch.testing.assert_close(ours.last_layer.weight_v.grad, 4.0 * ref.last_layer.weight_v.grad)
    if norm_last_layer:
        assert ours.last_layer.weight_g.grad is None and ref.last_layer.weight_g.grad is None
    else:
        torch.testing.assert_close(ours.last_layer.weight_g.grad, ref.last_layer.weight_g.grad[:, 0])
