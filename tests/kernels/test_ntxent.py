"""NT-Xent: tiled Triton and chunked paths against the naive 2N x 2N reference, closed form, distributed form."""

import math

import pytest
import torch

import kernels.utils
from kernels import contrastive
from kernels.contrastive import contrastive_rows_loss, contrastive_rows_loss_ref
from kernels.ntxent import ntxent_loss, ntxent_loss_ref
from kernels.testing import assert_lowp_close, max_err

# odd D (one 256-wide slice in 16 bits, 128-wide slices in fp32), one tile, rows spanning several 64-row tiles
# (2n = 140), and D in 128-wide slices in 16 bits too
SHAPES = [(37, 130), (5, 16), (70, 33), (9, 300)]


def _views(n, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z0 = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    z1 = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    return z0, z1


def _loss_and_grads(fn, z0, z1, g):
    loss = fn(z0, z1)
    return (loss, *torch.autograd.grad(loss, [z0, z1], g))


@pytest.mark.parametrize("impl", ["triton", "chunked"])
@pytest.mark.parametrize("n,d", SHAPES)
def test_fp32_matches_reference(impl, n, d, device):
    """fp32 loss and gradients (random upstream scalar) match the naive reference to ~1e-5."""
    z0, z1 = _views(n, d, torch.float32, device)
    g = torch.rand((), device=device) + 0.5
    out = _loss_and_grads(lambda a, b: ntxent_loss(a, b, 0.1, impl=impl), z0, z1, g)
    ref = _loss_and_grads(lambda a, b: ntxent_loss_ref(a, b, 0.1), z0, z1, g)
    for o, r in zip(out, ref):
        assert max_err(o, r) <= 1e-5 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("impl", ["triton", "chunked"])
@pytest.mark.parametrize("n,d", [(37, 130), (70, 33)])
def test_fp16_within_twice_torch_fp16_error(impl, n, d, device):
    """fp16 inputs: error vs the fp32 reference is at most 2x that of the reference computed in fp16."""
    z0, z1 = _views(n, d, torch.float16, device)
    g = torch.tensor(1.3, device=device)
    out = _loss_and_grads(lambda a, b: ntxent_loss(a, b, 0.1, impl=impl), z0, z1, g)
    ref32 = _loss_and_grads(lambda a, b: ntxent_loss_ref(a, b, 0.1, upcast=True), z0, z1, g)
    ref16 = _loss_and_grads(lambda a, b: ntxent_loss_ref(a, b, 0.1), z0, z1, g)
    for o, r32, r16 in zip(out, ref32, ref16):
        assert_lowp_close(o, r32, r16, atol=1e-4)


@pytest.mark.parametrize("impl", ["triton", "chunked", "ref"])
def test_collinear_embeddings_give_log_2n_minus_1(impl, device):
    """All rows identical: every logit equals 1/tau, so the loss is log(2N - 1)."""
    n = 37
    z = torch.randn(1, 130).expand(n, 130).contiguous().to(device)
    loss = ntxent_loss(z, z.clone(), 0.2, impl=impl)
    assert loss.item() == pytest.approx(math.log(2 * n - 1), rel=1e-5)


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_core_random_per_row_gradient(impl, device):
    """Core op with excluded columns, a random per-row upstream gradient and 1-row chunks matches the reference."""
    gen = torch.Generator().manual_seed(1)
    m, c, d = 45, 83, 40
    q = torch.randn(m, d, generator=gen).to(device).requires_grad_()
    k = torch.randn(c, d, generator=gen).to(device).requires_grad_()
    pos = torch.randint(0, c, (m,), generator=gen)
    excl = torch.where(torch.rand(m, generator=gen) < 0.5, (pos + 1) % c, -1).to(device)
    pos, g = pos.to(device), torch.randn(m, generator=gen).to(device)
    out = contrastive_rows_loss(q, k, pos, excl, impl=impl, chunk_elems=1)
    ref = contrastive_rows_loss_ref(q, k, pos, excl)
    assert max_err(out, ref) <= 1e-5 * ref.abs().max().item()
    for a, b in zip(torch.autograd.grad(out, [q, k], g), torch.autograd.grad(ref, [q, k], g)):
        assert max_err(a, b) <= 1e-5 * b.abs().max().item()


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("impl", ["triton", "chunked", "ref"])
def test_distributed_form_sums_to_full_batch(impl, decoupled, device):
    """Simulated ranks (slices + offset): per-rank losses sum to world x full loss, and so do the gradients; DCL's
    too."""
    world, n, d = 3, 13, 24
    z0, z1 = _views(world * n, d, torch.float32, device, seed=2)
    full = ntxent_loss_ref(z0, z1, 0.1, decoupled=decoupled)
    g_full = torch.autograd.grad(full, [z0, z1])
    total = sum(
        ntxent_loss(z0[r * n:(r + 1) * n], z1[r * n:(r + 1) * n], 0.1, z0_all=z0, z1_all=z1, offset=r * n,
                    impl=impl, decoupled=decoupled)
        for r in range(world)
    )
    assert total.item() == pytest.approx(world * full.item(), rel=1e-5)
    for a, b in zip(torch.autograd.grad(total, [z0, z1]), g_full):
        assert max_err(a, world * b) <= 1e-5 * b.abs().max().item() * world


def _dcl_written_out(z0, z1, tau):
    """DCL from its definition: for each of the 2N anchors of [z0; z1] (unit rows), minus its positive's logit plus
    the log-sum-exp of its logits against the 2N - 2 negatives (neither itself nor its positive), averaged."""
    q = torch.nn.functional.normalize(torch.cat([z0, z1]).float(), dim=1)
    logits = q @ q.T / tau
    two_n = q.shape[0]
    n = two_n // 2
    losses = []
    for i in range(two_n):
        positive = (i + n) % two_n
        negatives = [j for j in range(two_n) if j not in (i, positive)]
        losses.append(torch.logsumexp(logits[i, negatives], dim=0) - logits[i, positive])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("impl", ["triton", "chunked", "ref"])
@pytest.mark.parametrize("n,d", [(37, 130), (5, 16)])
def test_decoupled_is_dcl_written_out(impl, n, d, device):
    """decoupled=True (DCL, from the kernel's per-anchor losses) against DCL written out from its definition: the
    loss and the gradients of a random upstream scalar; it sits below NT-Xent (the positive left out of the
    denominator)."""
    z0, z1 = _views(n, d, torch.float32, device, seed=4)
    g = torch.rand((), device=device) + 0.5
    out = _loss_and_grads(lambda a, b: ntxent_loss(a, b, 0.2, impl=impl, decoupled=True), z0, z1, g)
    ref = _loss_and_grads(lambda a, b: _dcl_written_out(a, b, 0.2), z0, z1, g)
    for o, r in zip(out, ref):
        assert max_err(o, r) <= 1e-5 * max(1.0, r.abs().max().item())
    assert out[0].item() < ntxent_loss(z0, z1, 0.2, impl=impl).item()


@pytest.mark.parametrize("impl", ["triton", "chunked", "ref"])
def test_decoupled_collinear_embeddings_give_log_2n_minus_2(impl, device):
    """All rows identical: every logit is 1/tau, so DCL is log(2N - 2) (NT-Xent's log(2N - 1) less the positive)."""
    n = 37
    z = torch.randn(1, 130).expand(n, 130).contiguous().to(device)
    assert ntxent_loss(z, z.clone(), 0.2, impl=impl, decoupled=True).item() == pytest.approx(math.log(2 * n - 2),
                                                                                              rel=1e-5)


def test_decoupled_rows_is_stable_at_both_ends():
    """log(exp(x) - 1) for the per-anchor losses: finite with finite gradients from 1e-6 up to 100 (where exp
    overflows fp32's range in the naive form); below 1e-6 held there."""
    from kernels.ntxent import decoupled_rows

    x = torch.tensor([1e-9, 1e-6, 1e-3, 1.0, 20.0, 100.0], requires_grad=True)
    y = decoupled_rows(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert y[3].item() == pytest.approx(math.log(math.e - 1)) and y[5].item() == pytest.approx(100.0)
    assert y[0].item() == y[1].item() == pytest.approx(math.log(1e-6), rel=1e-3) and x.grad[0] == 0


def test_distributed_reference_matches_tiled_per_rank(device):
    """One rank's loss and gradients in the distributed form match the reference's distributed form."""
    z0, z1 = _views(20, 16, torch.float32, device, seed=3)
    args = dict(z0_all=z0, z1_all=z1, offset=10)
    out = _loss_and_grads(lambda a, b: ntxent_loss(a[10:15], b[10:15], 0.1, impl="triton", **args), z0, z1, None)
    ref = _loss_and_grads(lambda a, b: ntxent_loss_ref(a[10:15], b[10:15], 0.1, **args), z0, z1, None)
    for o, r in zip(out, ref):
        assert max_err(o, r) <= 1e-5 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(z0_all=torch.zeros(8, 4)), "both"),
        (dict(z0_all=torch.zeros(8, 4), z1_all=torch.zeros(8, 4), offset=6), "offset"),
        (dict(z0_all=torch.zeros(8, 4), z1_all=torch.zeros(8, 4), offset=2.7), "offset must be an int"),
        (dict(z0_all=torch.zeros(8, 4), z1_all=torch.zeros(8, 4, dtype=torch.float16)), r"z1_all \(8, 4\) "
                                                                                          "torch.float16"),
        (dict(z0_all=torch.zeros(8, 4), z1_all=torch.zeros(8, 4, dtype=torch.float64)), "must be"),
        (dict(impl="fast"), "impl"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    """Bad arguments fail with a ValueError naming the problem."""
    with pytest.raises(ValueError, match=match):
        ntxent_loss(torch.zeros(4, 4), torch.zeros(4, 4), **kwargs)


# pos / excl are checked where that is free, on the CPU (on a GPU it would cost a host sync): Triton there is the
# interpreter's
@pytest.mark.parametrize("impl", ["triton", "chunked", "ref"] if kernels.utils.INTERPRET else ["chunked", "ref"])
def test_rows_out_of_range_are_a_value_error_on_every_path(impl):
    """contrastive_rows_loss's pos / excl outside the columns, or an excluded column that is the positive: one
    ValueError naming the argument, on every path (the Triton kernel had read past k and returned a finite loss)."""
    q, k = torch.randn(4, 8), torch.randn(6, 8)

    def ids(*v):
        return torch.tensor(v)

    pos, excl = ids(0, 1, 2, 5), ids(1, 2, 3, -1)
    contrastive_rows_loss(q, k, pos, excl, impl=impl)  # in range: taken
    for bad_pos, bad_excl, match in ((ids(0, 1, 2, 6), excl, r"pos values must lie in \[0, C=6\)"),
                                     (ids(0, 1, 2, -1), excl, "pos values"),
                                     (pos, ids(1, 2, 3, 6), "excl values"),
                                     (pos, ids(1, 2, 3, -2), "excl values"),
                                     (pos, ids(0, 2, 3, -1), "excl must never equal pos")):
        with pytest.raises(ValueError, match=match):
            contrastive_rows_loss(q, k, bad_pos, bad_excl, impl=impl)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    """impl='triton' on a CPU tensor without the interpreter is a clear ValueError."""
    monkeypatch.setattr(kernels.utils, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        ntxent_loss(torch.randn(4, 8), torch.randn(4, 8), impl="triton")


def test_auto_on_cpu_uses_chunked_path():
    """impl='auto' resolves to the chunked path for CPU tensors."""
    assert kernels.utils.resolve_impl("auto", torch.zeros(1), has_chunked=True) == "chunked"


def test_auto_keeps_the_dot_kernels_to_ampere_and_later():
    """On CUDA, 'auto' runs Triton from compute capability 8 (A100, H100); on V100 / T4 (7.x) the ops with a chunked
    path take it (their tl.dot kernels spill there), the others (DINO's, the gathers) still run Triton; off CUDA the
    chunked path or the reference."""
    auto = kernels.utils.auto_impl
    if kernels.utils.HAS_TRITON:
        assert [auto(True, cap, has_chunked=True) for cap in (7, 8, 9, 10)] == ["chunked", "triton", "triton", "triton"]
        assert [auto(True, cap, has_chunked=False) for cap in (7, 9)] == ["triton", "triton"]
    assert auto(False, None, has_chunked=True) == "chunked" and auto(False, None, has_chunked=False) == "ref"


def test_chunked_bf16_within_twice_torch_bf16_error(device):
    """bf16 on the chunked path (pure PyTorch, so no interpreter caveat) follows flash-attn's rule."""
    z0, z1 = _views(300, 64, torch.bfloat16, device, seed=6)
    out = _loss_and_grads(lambda a, b: ntxent_loss(a, b, 0.1, impl="chunked"), z0, z1, None)
    ref32 = _loss_and_grads(lambda a, b: ntxent_loss_ref(a, b, 0.1, upcast=True), z0, z1, None)
    ref16 = _loss_and_grads(lambda a, b: ntxent_loss_ref(a, b, 0.1), z0, z1, None)
    for o, r32, r16 in zip(out, ref32, ref16):
        assert_lowp_close(o, r32, r16)


def _assert_fp16_ntxent_close(z0, z1):
    """Triton NT-Xent loss and gradients (upstream 0.7) within 2x torch's fp16 error of the fp32 reference."""
    g = torch.tensor(0.7, device=z0.device)
    out = _loss_and_grads(lambda a, b: ntxent_loss(a, b, 0.1, impl="triton"), z0, z1, g)
    r32 = _loss_and_grads(lambda a, b: ntxent_loss_ref(a, b, 0.1, upcast=True), z0, z1, g)
    r16 = _loss_and_grads(lambda a, b: ntxent_loss_ref(a, b, 0.1), z0, z1, g)
    for o, a, b in zip(out, r32, r16):
        assert_lowp_close(o, a, b, atol=1e-4)


@pytest.mark.parametrize("cfg", range(max(len(contrastive.FWD_TUNE), len(contrastive.DK_TUNE))))
def test_every_autotuning_config_matches_reference(cfg, device, monkeypatch):
    """The autotuned launch path, pinned to each candidate block configuration in turn (autotuning picks whichever
    is fastest, so each must be right), gives fp16 NT-Xent loss and gradients within 2x torch's fp16 error."""
    fwd, dk = contrastive.FWD_TUNE, contrastive.DK_TUNE
    monkeypatch.setattr(contrastive, "_tuned", lambda q: True)
    monkeypatch.setattr(contrastive._fwd_tuned, "configs", contrastive._configs([fwd[cfg % len(fwd)]]))
    monkeypatch.setattr(contrastive._dk_tuned, "configs", contrastive._configs([dk[cfg % len(dk)]]))
    z0, z1 = _views(150, 64, torch.float16, device, seed=cfg)  # 2n = 300: ragged last tile for every block size
    _assert_fp16_ntxent_close(z0, z1)


WIDE_TABLES = (("_fwd_wide_tuned", "FWD_WIDE_TUNE"), ("_dq_wide_tuned", "DQ_WIDE_TUNE"),
               ("_dk_wide_tuned", "DK_WIDE_TUNE"))


@pytest.mark.parametrize("d", [200, 300])
@pytest.mark.parametrize("cfg", range(max(len(getattr(contrastive, table)) for _, table in WIDE_TABLES)))
def test_every_wide_autotuning_config_matches_reference(cfg, d, device, monkeypatch):
    """The same for 16-bit D > 128 (its forward, dq and dk kernels tuned), each candidate pinned in turn, at D = 200
    (one wide slice) and D = 300 (128-wide slices)."""
    monkeypatch.setattr(contrastive, "_tuned", lambda q: True)
    used = set()
    for name, table in WIDE_TABLES:
        rows, tuner = getattr(contrastive, table), getattr(contrastive, name)
        monkeypatch.setattr(tuner, "configs", contrastive._configs([rows[cfg % len(rows)]]))
        monkeypatch.setattr(tuner, "run", lambda *a, _r=tuner.run, _n=name, **kw: used.add(_n) or _r(*a, **kw))
    z0, z1 = _views(150, d, torch.float16, device, seed=cfg)
    _assert_fp16_ntxent_close(z0, z1)
    assert used == {name for name, _ in WIDE_TABLES}


def test_size_class_buckets_by_factors_of_four_up_to_65536():
    """Autotuning buckets: 4096 and 16384 differ, 65,536 and 1,048,576 share one."""
    sc = contrastive._size_class
    assert sc(4096) != sc(16384) != sc(65536) and sc(65536) == sc(262144) == sc(1 << 20) and sc(0) == sc(1)


@pytest.mark.parametrize("dtype,tau", [(torch.float32, 0.05), (torch.float16, 0.02)])
def test_correlated_views_jump_the_running_max(dtype, tau, device):
    """Views that nearly agree put each row's positive ~30 logits above the other columns of the first tile: the
    forward must raise its running max there (a missed raise overflows fp16's p @ k); results match the reference."""
    gen = torch.Generator().manual_seed(3)
    z0 = torch.randn(150, 64, generator=gen)
    z1 = z0 + 0.1 * torch.randn(150, 64, generator=gen)
    z0, z1 = (z.to(device=device, dtype=dtype).requires_grad_() for z in (z0, z1))
    g = torch.tensor(1.3, device=device)
    out = _loss_and_grads(lambda a, b: ntxent_loss(a, b, tau, impl="triton"), z0, z1, g)
    r32 = _loss_and_grads(lambda a, b: ntxent_loss_ref(a, b, tau, upcast=True), z0, z1, g)
    if dtype == torch.float32:
        for o, r in zip(out, r32):
            assert max_err(o, r) <= 1e-5 * max(1.0, r.abs().max().item())
    else:
        r16 = _loss_and_grads(lambda a, b: ntxent_loss_ref(a, b, tau), z0, z1, g)
        for o, a, b in zip(out, r32, r16):
            assert torch.isfinite(o).all()
            assert_lowp_close(o, a, b, atol=1e-4)


def test_autotuned_launch_times_candidates_and_keeps_the_fastest(device, monkeypatch):
    """Through the autotuner (its timer replaced by a fixed table: the CPU has no GPU timer), each candidate runs,
    the fastest is kept per (D, size class) and reported, and the result still matches the reference."""
    timings = iter([3.0, 1.0, 2.0, 4.0] * 4)  # the second candidate "wins" for both kernels

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        t = next(timings)
        return [t, t, t]

    monkeypatch.setattr(contrastive, "_tuned", lambda q: True)
    for tuner in contrastive.TUNERS.values():
        monkeypatch.setattr(tuner, "cache", {})
    for tuner in (contrastive._fwd_tuned, contrastive._dk_tuned):
        monkeypatch.setattr(tuner, "_do_bench", fake_bench)
    z0, z1 = _views(100, 32, torch.float16, device, seed=4)
    out = _loss_and_grads(lambda a, b: ntxent_loss(a, b, 0.1, impl="triton"), z0, z1, None)
    r32 = _loss_and_grads(lambda a, b: ntxent_loss_ref(a, b, 0.1, upcast=True), z0, z1, None)
    r16 = _loss_and_grads(lambda a, b: ntxent_loss_ref(a, b, 0.1), z0, z1, None)
    for o, a, b in zip(out, r32, r16):
        assert_lowp_close(o, a, b, atol=1e-4)
    report = contrastive.tuning_report()
    fwd_bm, fwd_bn = contrastive.FWD_TUNE[1][:2]
    dk_bm, dk_bn = contrastive.DK_TUNE[1][:2]
    assert len(report) == 2, report
    assert report[0].startswith(f"fwd (32, {contrastive._size_class(200)}, True") and \
        f"BLOCK_M={fwd_bm},BLOCK_N={fwd_bn}" in report[0], report
    assert report[1].startswith(f"dk (32, {contrastive._size_class(200)}") and \
        f"BLOCK_M={dk_bm},BLOCK_N={dk_bn}" in report[1], report
