"""NNCLR: the nearest-neighbour lookup, the loss against the paper's formula, the support set (a FIFO of every rank's
embeddings), 2 ranks = one process, short training on the digits and config errors. Under a DeepSpeed engine (ZeRO-3,
bf16): tests/pretrain/test_engine.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import load_config
from pretrain.methods.nnclr import nearest_neighbours, nnclr_loss
from pretrain.trainer import build_method
from tests.util import (
    assert_ranks_match_one_process,
    config_error,
    dcl_from_logits,
    short_training,
    two_ranks,
)

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "nnclr_digits.yaml"
SMALL = ["model.proj_hidden_dim=32", "model.proj_out_dim=16", "method.predictor_hidden_dim=24",
         "model.backbone_kwargs={width: 0.25}"]


def _paper(nn: torch.Tensor, p_all: torch.Tensor, t: float, offset: int, decoupled: bool = False) -> torch.Tensor:
    """The paper's L_i = -log exp(nn_i . p_i / T) / sum_k exp(nn_i . p_k / T) on unit vectors, as solo-learn's
    nnclr_loss_func writes it: logits nn @ p_all.T / T, labels on the rank's diagonal, the mean cross-entropy;
    ``decoupled``: DCL of the same logits (each positive out of its row's denominator)."""
    nn, p_all = F.normalize(nn.float(), dim=1), F.normalize(p_all.float(), dim=1)
    logits, labels = nn @ p_all.T / t, torch.arange(nn.shape[0]) + offset
    return dcl_from_logits(logits, labels) if decoupled else F.cross_entropy(logits, labels)


def _lookup(z: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Each row's neighbour, one support row at a time in Python: the row of the largest cosine."""
    z = F.normalize(z.float(), dim=1)
    best = [max(range(support.shape[0]), key=lambda j, zi=zi: float(zi @ support[j])) for zi in z]
    return support[best]


def _method(*overrides: str):
    return build_method(load_config(RECIPE, [*SMALL, *overrides]), distributed=False)


def _views(b: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 1, 16, 16, generator=g) for _ in range(2)]


def test_nearest_neighbours_are_the_most_similar_support_rows():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(9, 13, generator=g), dim=1)
    support = F.normalize(torch.randn(31, 13, generator=g), dim=1)
    assert torch.equal(nearest_neighbours(z, support), _lookup(z, support))
    assert torch.equal(nearest_neighbours(z, support[:0]), z)  # nothing to look up yet: each row its own
    # under bf16 autocast the lookup stays fp32: a bf16 matmul would round these two near-equal candidates together
    close = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1e-3], [1.0, 2e-3]]), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(nearest_neighbours(close[2:], close[:2]), close[1:2])


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("impl", ["ref", "chunked"])
def test_loss_is_the_paper_formula(impl, decoupled):
    """An odd batch of 7 neighbours at offset 10 among 37 gathered predictions of width 130; the gradient reaches the
    predictions only. All neighbours and predictions alike: every logit 1/T, so ln N (DCL, the positive out:
    ln(N - 1))."""
    g = torch.Generator().manual_seed(1)
    nn = torch.randn(7, 130, generator=g, requires_grad=True)
    p_all = torch.randn(37, 130, generator=g, requires_grad=True)
    loss = nnclr_loss(nn, p_all[10:17], 0.1, p_all=p_all, offset=10, impl=impl, decoupled=decoupled)
    p_ref = p_all.detach().clone().requires_grad_(True)
    expected = _paper(nn.detach(), p_ref, 0.1, 10, decoupled)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(p_all.grad, p_ref.grad, rtol=1e-4, atol=1e-6)
    assert nn.grad is None
    same = torch.ones(5, 4)
    assert nnclr_loss(same, 3 * same, 0.5, impl=impl, decoupled=decoupled).item() == pytest.approx(
        math.log(4 if decoupled else 5), rel=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        nnclr_loss(nn, p_all[10:17], 0.1, p_all=p_all, offset=31, impl=impl)


def _embed(method, views):
    """z (projector) and p (predictor) of both views as the method computes them, in the views' order: each view
    through the networks on its own (train mode: BatchNorm statistics per view, as solo-learn's)."""
    with torch.no_grad():
        z = [method.projector(method.backbone(v)) for v in views]
        return torch.cat(z), torch.cat([method.predictor(zv) for zv in z])


@pytest.mark.parametrize("decoupled", [False, True])
def test_method_loss_contrasts_each_views_neighbours_with_the_other_views_predictions(decoupled):
    """With 5 rows in the support set: loss = (paper(nn(z of view 0), p of view 1) + paper(nn(z of view 1), p of view
    0)) / 2, the neighbours looked up one by one among the 5 filled rows (not the empty rest); on the first step, with
    nothing in it, each embedding is its own neighbour; with method.decoupled, DCL's."""
    method = _method(f"method.decoupled={str(decoupled).lower()}")
    views = _views()
    t = method.temperature
    z, p = _embed(method, views)
    first = method({"views": views})
    zn = F.normalize(z, dim=1)
    torch.testing.assert_close(first["loss"], (_paper(zn[:6], p[6:], t, 0, decoupled) +
                                               _paper(zn[6:], p[:6], t, 0, decoupled)) / 2, rtol=1e-5, atol=1e-6)
    assert first["nn_similarity"].item() == pytest.approx(1.0)

    support = F.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(3)), dim=1)
    with torch.no_grad():
        method.queue.zero_()
        method.queue[:5] = support
        method.queue_filled.fill_(5)
        method.queue_ptr.fill_(5)
    out = method({"views": views})
    nn0, nn1 = _lookup(z[:6], support), _lookup(z[6:], support)
    torch.testing.assert_close(out["loss"], (_paper(nn0, p[6:], t, 0, decoupled) +
                                             _paper(nn1, p[:6], t, 0, decoupled)) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["nn_similarity"], (nn0 * zn[:6]).sum(1).mean(), rtol=1e-5, atol=1e-6)
    assert out["nn_similarity"] < 0.99


def test_support_set_is_a_fifo_of_view_one_that_only_training_fills():
    """queue_size 10, batches of 4: each training forward writes view 1's unit embeddings over the oldest rows (ring
    order: rows 0-3, 4-7, then 8, 9, 0, 1), an eval forward writes nothing; the buffers are in the state dict (a
    checkpoint keeps them); gradients reach backbone, projector and predictor."""
    method = _method("method.queue_size=10")
    batches = [_views(4, seed) for seed in range(4)]
    embeds = [F.normalize(_embed(method, b)[0][:4], dim=1) for b in batches]
    for i, b in enumerate(batches[:3]):
        out = method({"views": b})
        if i == 0:
            out["loss"].backward()
    expected = torch.cat([embeds[2][2:], embeds[0][2:], embeds[1], embeds[2][:2]])
    torch.testing.assert_close(method.queue, expected, rtol=1e-5, atol=1e-6)
    assert (int(method.queue_ptr), int(method.queue_filled)) == (2, 10)
    method.eval()
    method({"views": batches[3]})
    torch.testing.assert_close(method.queue, expected)
    assert (int(method.queue_ptr), int(method.queue_filled)) == (2, 10)
    assert {"queue", "queue_ptr", "queue_filled"} <= method.state_dict().keys()
    for part in (method.backbone, method.projector, method.predictor):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters() if p.requires_grad)
    # a global batch larger than the support set keeps its last rows
    small = _method("method.queue_size=3")
    small({"views": batches[0]})
    torch.testing.assert_close(small.queue, F.normalize(_embed(small, batches[0])[0][1:4], dim=1), rtol=1e-5,
                               atol=1e-6)
    assert (int(small.queue_ptr), int(small.queue_filled)) == (0, 3)


QUEUE = "method.queue_size=12"  # 2 global batches of 8: the second step looks up among the first's 8 rows


def test_two_ranks_give_the_whole_batch_support_set_loss_and_gradients(tmp_path):
    """On 2 gloo ranks with half the images each (predictions gathered with gradients, BatchNorm over both), over two
    steps: both ranks hold the whole batch's embeddings in the support set in rank order, and the ranks' mean loss and
    averaged gradients are one process's on the whole batches (the second step's neighbours come from it)."""
    batches = [{"views": _views(8, seed)} for seed in range(2)]
    ranks = two_ranks(tmp_path, RECIPE, [*SMALL, QUEUE], batches, buffers=("queue", "queue_ptr"))
    method = _method(QUEUE)
    loss = sum(method(batch)["loss"] for batch in batches)  # two steps' forwards, as each rank's
    loss.backward()
    assert_ranks_match_one_process(ranks, method, loss, queue_ptr=4)


def _positive_rank(method, batch: dict) -> float:
    """Instance discrimination: the mean rank of each view-0 prediction's own view-1 embedding among the batch's by
    similarity, 0 = first; (B - 1) / 2 by chance."""
    v0, v1 = batch["views"]
    with torch.no_grad():
        p = method.predictor(method.projector(method.backbone(v0)))
        z = method.projector(method.backbone(v1))
    s = F.normalize(p, dim=1) @ F.normalize(z, dim=1).T
    return (s > s.diag()[:, None]).sum(1).float().mean().item()


def test_short_training_learns_to_tell_the_images_apart(digits_shards):
    """40 AdamW steps on real DALI views of the digits, the support set filling from the first: the loss on fresh
    views falls from about ln(batch), and each view's prediction finds the other view's embedding far above chance
    among the batch's 128 (63.5). Measured: loss 5.19 -> 3.88, rank 62 -> 24."""
    method, cfg, (start, start_rank), (end, end_rank) = short_training(digits_shards, RECIPE, _positive_rank)
    assert start > 0.9 * math.log(128) and end < 0.85 * start, (start, end)
    assert start_rank > 40 and end_rank < 0.5 * start_rank, (start_rank, end_rank)
    assert int(method.queue_filled) == cfg.method.queue_size


def test_config_errors():
    assert config_error(RECIPE, ["data.num_views=3"]).startswith("data.num_views: nnclr contrasts two views")
    assert config_error(RECIPE, ["data.local_views=2"]).startswith("data.num_views: nnclr")
    assert config_error(RECIPE, ["method.queue_size=0"]).startswith(
        "method.queue_size: nnclr keeps a support set of past embeddings")
    assert config_error(RECIPE, ["method.gather_distributed=false"]).startswith("method.gather_distributed: nnclr")
    assert config_error(RECIPE, ["method.temperature=0"]).startswith("method.temperature")
