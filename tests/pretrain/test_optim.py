"""pretrain.optim: LARS against its closed forms and against torch's SGD where the two coincide; LARC against apex's
LARC around torch's SGD (SwAV's optimizer); optim.name in the config. (On 2 DeepSpeed ranks: LARS in
tests/pretrain/test_engine.py, LARC under ZeRO 2 and 3 in tests/pretrain/test_larc_zero.py.)"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pretrain.optim import LARC, LARS, build_optimizer
from tests.util import config_error

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "simclr_digits.yaml"


def _param(*shape: int, seed: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))


def test_first_step_moves_each_layer_by_lr_eta_times_its_norm():
    """From rest, a layer's step is lr x eta x ||w|| along -(g + wd w), whatever the gradient's scale: the point of
    the trust ratio."""
    lr, eta, wd = 0.5, 0.02, 0.1
    steps = []
    for scale in (1e-3, 1.0, 1e3):
        w = _param(16, 8, seed=0)
        before = w.detach().clone()
        w.grad = scale * torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
        direction = w.grad + wd * before
        LARS([w], lr=lr, weight_decay=wd, trust_coefficient=eta).step()
        step = w.detach() - before
        assert torch.linalg.vector_norm(step).item() == pytest.approx(lr * eta * before.norm().item(), rel=1e-5)
        cos = torch.nn.functional.cosine_similarity(step.flatten(), -direction.flatten(), dim=0)
        assert cos.item() == pytest.approx(1.0, abs=1e-6)
        steps.append(step)
    # the weight decay's share shrinks as the gradient grows, so the steps differ in direction, never in length
    assert not torch.allclose(steps[0], steps[2], atol=1e-7)


def test_without_adaptation_it_is_sgd_with_momentum():
    """A group with lars=False (biases, norms) over steps at a constant lr is torch's SGD with momentum; a zero weight
    (an all-zero init) takes the plain gradient step too (trust ratio 1)."""
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(5, generator=g) for _ in range(4)]
    ours, torch_sgd, zero = _param(5, seed=3), _param(5, seed=3), torch.nn.Parameter(torch.zeros(5))
    lars = LARS([{"params": [ours], "lars": False}, {"params": [zero]}], lr=0.1, momentum=0.9, weight_decay=0.0)
    sgd = torch.optim.SGD([torch_sgd], lr=0.1, momentum=0.9)
    for grad in grads:
        ours.grad, torch_sgd.grad = grad.clone(), grad.clone()
        lars.step()
        sgd.step()
        torch.testing.assert_close(ours.detach(), torch_sgd.detach(), rtol=1e-6, atol=1e-7)
    zero_after_one = LARS([w := torch.nn.Parameter(torch.zeros(5))], lr=0.1)
    w.grad = grads[0].clone()
    zero_after_one.step()
    torch.testing.assert_close(w.detach(), -0.1 * grads[0])


def test_momentum_gathers_lr_scaled_updates():
    """Second step: v = m v1 + lr2 u2 (the lr inside the velocity, as SimCLR's and BYOL's LARS): a schedule that drops
    the lr to 0 leaves only m x the first step."""
    w = _param(4, 4, seed=4)
    opt = LARS([w], lr=1.0, momentum=0.9, trust_coefficient=0.01)
    w.grad = torch.ones(4, 4)
    start = w.detach().clone()
    opt.step()
    first = w.detach() - start
    opt.param_groups[0]["lr"] = 0.0
    w.grad = torch.randn(4, 4)
    before = w.detach().clone()
    opt.step()
    torch.testing.assert_close(w.detach() - before, 0.9 * first)


def test_build_optimizer_adapts_the_decaying_group_only():
    """build_optimizer over pretrain.optim.param_groups: LARS adapts (and decays) the >= 2-D weights, not biases and
    norms; adamw is torch's AdamW with the betas."""
    from pretrain.optim import param_groups

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    lars = build_optimizer(param_groups(model, 1e-6), "lars", 0.3, momentum=0.9, trust_coefficient=1e-3)
    assert isinstance(lars, LARS)
    assert [(g["lars"], g["weight_decay"], len(g["params"])) for g in lars.param_groups] == [(True, 1e-6, 1),
                                                                                           (False, 0.0, 3)]
    adamw = build_optimizer(param_groups(model, 0.05), "adamw", 1e-3, betas=(0.9, 0.95))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.9, 0.95)


def test_lars_state_round_trips():
    """The momentum comes back from state_dict: a restored optimizer takes the same next step."""
    w1, w2 = _param(3, 3, seed=5), _param(3, 3, seed=5)
    a, b = LARS([w1], lr=0.2), LARS([w2], lr=0.2)
    w1.grad = torch.randn(3, 3, generator=torch.Generator().manual_seed(6))
    a.step()
    with torch.no_grad():
        w2.copy_(w1)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as from a file: not a's own buffers
    w1.grad = w2.grad = torch.randn(3, 3, generator=torch.Generator().manual_seed(7))
    a.step()
    b.step()
    assert torch.equal(w1, w2)


def test_config_names_the_optimizer_and_its_settings():
    """A bad optimizer name or setting is refused in one line; LARS takes any ZeRO stage (test_engine steps it under
    each against plain LARS)."""
    from pretrain.config import load_config

    assert config_error(RECIPE, ["optim.name=sgdw"]) == "optim.name: must be adamw, lars, larc or sgd, got 'sgdw'"
    assert load_config(RECIPE, ["optim.name=larc", "zero.stage=3"]).optim.name == "larc"
    assert config_error(RECIPE, ["optim.name=lars", "zero.stage=0", "optim.momentum=1"]).startswith("optim.momentum")
    for stage in range(4):
        cfg = load_config(RECIPE, ["optim.name=lars", f"zero.stage={stage}"])
        assert (cfg.optim.name, cfg.zero.stage) == ("lars", stage)


def _simclr_lars_step(params, grads, velocities, lr, momentum, wd, eta, adapt):
    """One step of SimCLR's TF ``LARSOptimizer`` (classic momentum, no Nesterov), translated: weight decay and the
    trust ratio on the parameters ``adapt`` marks, ``v = momentum v + lr x ratio x (g + wd w)``, ``w -= v``."""
    for i, (w, g) in enumerate(zip(params, grads, strict=True)):
        ratio = torch.tensor(1.0)
        if adapt[i]:
            g = g + wd * w
            w_norm, g_norm = w.norm(), g.norm()
            ratio = torch.where((w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm, torch.tensor(1.0))
        velocities[i] = momentum * velocities[i] + lr * ratio * g
        params[i] = w - velocities[i]


def test_lars_is_simclrs_over_steps_with_a_schedule():
    """LARS over pretrain.optim.param_groups of a small MLP with a BatchNorm, four steps at a falling lr, gives the
    weights of SimCLR's TF LARS (written out above) that adapts and decays the >= 2-D weights only."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    from pretrain.optim import param_groups

    opt = build_optimizer(param_groups(model, 1e-2), "lars", 0.5, momentum=0.9, trust_coefficient=1e-3)
    ref = [p.detach().clone() for p in model.parameters()]
    adapt = [p.ndim > 1 for p in model.parameters()]
    velocities = [torch.zeros_like(p) for p in ref]
    for step in range(4):
        grads = [torch.randn_like(p) for p in ref]
        lr = 0.5 * (1 - step / 4)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_mult"]
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g.clone()
        opt.step()
        _simclr_lars_step(ref, grads, velocities, lr, 0.9, 1e-2, 1e-3, adapt)
    for got, want in zip(model.parameters(), ref, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


class _ApexLARC:
    """apex.parallel.LARC (NVIDIA/apex apex/parallel/LARC.py) around ``optim``, as SwAV's main_swav.py builds it
    (clip=False), its step written out: each group's weight decay taken from the group (and zeroed for the inner step),
    each gradient decayed and scaled by the adaptive lr where both norms are non-zero, then the inner optimizer's
    step."""

    def __init__(self, optim: torch.optim.Optimizer, trust_coefficient: float, eps: float = 1e-8) -> None:
        self.optim, self.trust_coefficient, self.eps = optim, trust_coefficient, eps
        self.param_groups = optim.param_groups

    def step(self) -> None:
        with torch.no_grad():
            weight_decays = []
            for group in self.optim.param_groups:
                weight_decay = group["weight_decay"] if "weight_decay" in group else 0
                weight_decays.append(weight_decay)
                group["weight_decay"] = 0
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    param_norm = torch.norm(p.data)
                    grad_norm = torch.norm(p.grad.data)
                    if param_norm != 0 and grad_norm != 0:
                        adaptive_lr = (self.trust_coefficient * param_norm
                                       / (grad_norm + param_norm * weight_decay + self.eps))
                        p.grad.data += weight_decay * p.data
                        p.grad.data *= adaptive_lr
        self.optim.step()
        for i, group in enumerate(self.optim.param_groups):
            group["weight_decay"] = weight_decays[i]


def _larc_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        model[3].bias.zero_()  # a zero-norm parameter: apex leaves its gradient undecayed and unscaled
    return model


def _step_larc_and_apex(name: str):
    """``name``'s optimizer (build_optimizer over param_groups with every parameter decaying, as the SwAV recipe) and
    apex's LARC over torch's SGD, on copies of one model, five steps with a moving lr and weight decay: a frozen
    parameter (no gradient) at the first step, a zero gradient at the third. Returns both models' parameters."""
    from pretrain.optim import param_groups

    model, ref = _larc_model(), _larc_model()
    opt = build_optimizer(param_groups(model, 1e-2, decay_norms_and_biases=True), name, 0.5, momentum=0.9,
                          trust_coefficient=1e-2)
    groups = param_groups(ref, 1e-2, decay_norms_and_biases=True)
    apex = _ApexLARC(torch.optim.SGD(groups, lr=0.5, momentum=0.9, weight_decay=1e-2), trust_coefficient=1e-2)
    g = torch.Generator().manual_seed(8)
    for step in range(5):
        lr, wd = 0.5 * (1 + step) / 3 if step < 2 else 0.5 * (1 - step / 5), 1e-2 * (1 + 10 * step)
        for o in (opt, apex):
            for group in o.param_groups:
                group["lr"], group["weight_decay"] = lr, wd
        for a, b in zip(model.parameters(), ref.parameters(), strict=True):
            grad = 3 * torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        if step == 0:
            model[0].weight.grad = ref[0].weight.grad = None
        if step == 2:
            model[3].weight.grad.zero_()
            ref[3].weight.grad.zero_()
        opt.step()
        apex.step()
    return list(model.parameters()), list(ref.parameters())


def test_larc_is_apex_larc_around_torch_sgd():
    """LARC over a small MLP with a BatchNorm and a zero-norm bias, every parameter decaying, five steps with a moving
    lr and weight decay, a frozen parameter and a zero gradient: the weights of apex's LARC (clip=False) around torch's
    SGD with momentum, as SwAV trains, to float rounding; the zero-norm bias moved by the plain gradient step."""
    ours, apex = _step_larc_and_apex("larc")
    for got, want in zip(ours, apex, strict=True):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-6, atol=1e-7)
    assert all(not torch.equal(p, q) for p, q in zip(ours, _larc_model().parameters()))  # every parameter moved


def test_larc_is_not_lars():
    """On the same steps LARS (the weights' trust ratio of ||g + wd w||, the lr inside the momentum, biases and norms
    unadapted) ends far from apex's LARC: the test above tells the two apart."""
    ours, apex = _step_larc_and_apex("lars")
    gap = max((p - q).abs().max().item() for p, q in zip(ours, apex))
    assert gap > 1e-3  # 10,000 x the tolerance above


def test_larc_lr_multiplies_the_momentum():
    """Second step: w -= lr2 (m v1 + u2) (torch's SGD: the lr outside the velocity): a schedule that drops the lr to 0
    stops the weights at once, where LARS would go on by m x its first step; the step reads the group's weight decay."""
    w = _param(4, 4, seed=4)
    opt = LARC([w], lr=1.0, momentum=0.9, trust_coefficient=0.01, weight_decay=0.5)
    assert isinstance(opt, LARS) and "lars" not in opt.param_groups[0]
    w.grad = torch.ones(4, 4)
    start = w.detach().clone()
    opt.step()
    w_norm = start.norm()
    rate = 0.01 * w_norm / (w.grad.norm() + 0.5 * w_norm + 1e-8)
    torch.testing.assert_close(w.detach() - start, -rate * (w.grad + 0.5 * start))
    opt.param_groups[0]["lr"] = 0.0
    w.grad = torch.randn(4, 4)
    before = w.detach().clone()
    opt.step()
    assert torch.equal(w.detach(), before)
