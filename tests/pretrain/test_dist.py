"""pretrain.dist on real gloo process groups: gather_with_grad gives the single-process gradient, a plain all_gather
does not, shapes are checked, and everything is an identity in a world of one; the tests' spawned rank groups
(tests.util.spawn_ranks) run once more only after a rank dies by a signal."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain import dist as pdist
from tests.util import free_port, spawn_ranks

WORLD = 2
N_PER_RANK = 3
DIM_IN, DIM_OUT = 5, 4



def _setup() -> tuple[torch.Tensor, torch.nn.Linear]:
    """The whole batch (WORLD*N_PER_RANK, DIM_IN) and the shared model, identical in every process (fp64)."""
    torch.manual_seed(0)
    x = torch.randn(WORLD * N_PER_RANK, DIM_IN, dtype=torch.float64)
    model = torch.nn.Linear(DIM_IN, DIM_OUT).double()
    return x, model


def _coupled_loss(rows: torch.Tensor, cols: torch.Tensor, first_row: int) -> torch.Tensor:
    """Naive NT-Xent-like loss: rows (n, D) of the global batch starting at ``first_row`` against all columns (N, D).

    Row i's positive is column (i + N/2) mod N, itself is excluded, temperature 0.5; mean over the given rows.
    """
    n_total = cols.shape[0]
    idx = torch.arange(first_row, first_row + rows.shape[0])
    logits = F.normalize(rows, dim=1) @ F.normalize(cols, dim=1).T / 0.5
    logits[torch.arange(rows.shape[0]), idx] = float("-inf")
    return F.cross_entropy(logits, (idx + n_total // 2) % n_total)


def _rank_grads(x: torch.Tensor, model: torch.nn.Linear, r: int, gather) -> list[torch.Tensor]:
    """This rank's half of the batch through the model, the coupled loss, backward, grads averaged over ranks (DDP)."""
    model.zero_grad(set_to_none=True)
    z = model(x[r * N_PER_RANK : (r + 1) * N_PER_RANK])
    _coupled_loss(z, gather(z), r * N_PER_RANK).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for g in grads:
        dist.all_reduce(g)
        g /= WORLD
    return grads


def _plain_all_gather(z: torch.Tensor) -> torch.Tensor:
    """The usual bug: all_gather (no autograd) with this rank's own slice put back so its local gradient survives."""
    parts = [torch.empty_like(z) for _ in range(WORLD)]
    dist.all_gather(parts, z.detach())
    parts[dist.get_rank()] = z
    return torch.cat(parts)


def _worker(r: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=WORLD,
                           timeout=timedelta(seconds=60))
    try:
        x, model = _setup()
        result: dict = {"rank": pdist.rank(), "world_size": pdist.world_size(), "initialized": pdist.is_initialized()}
        with torch.no_grad():
            result["gathered"] = pdist.gather_with_grad(model(x[r * N_PER_RANK : (r + 1) * N_PER_RANK]))
        result["grads"] = _rank_grads(x, model, r, pdist.gather_with_grad)
        result["plain_grads"] = _rank_grads(x, model, r, _plain_all_gather)
        result["mean"] = pdist.all_reduce_mean(torch.tensor([float(r + 1), 10.0 * r]))
        try:
            pdist.gather_with_grad(torch.zeros(3 - r, 2))  # rank 0 has 3 rows, rank 1 has 2
        except ValueError as err:
            result["unequal_error"] = str(err)
        torch.save(result, Path(out_dir) / f"rank{r}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Results of one real 2-process gloo run (spawned once for all tests here)."""
    out = tmp_path_factory.mktemp("dist")
    spawn_ranks(_worker, WORLD, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _single_process_grads() -> list[torch.Tensor]:
    x, model = _setup()
    z = model(x)
    _coupled_loss(z, z, 0).backward()
    return [p.grad for p in model.parameters()]


def test_rank_and_world_size_inside_group(ranks: list[dict]) -> None:
    """rank(), world_size(), is_initialized() report the gloo group."""
    assert [(r["rank"], r["world_size"], r["initialized"]) for r in ranks] == [(0, 2, True), (1, 2, True)]


def test_gather_with_grad_concatenates_in_rank_order(ranks: list[dict]) -> None:
    """Every rank sees the whole batch's embeddings, rank 0's rows first."""
    x, model = _setup()
    with torch.no_grad():  # each rank's rows as that rank computed them: a GEMM's rounding may depend on its row count
        full = torch.cat([model(x[r * N_PER_RANK : (r + 1) * N_PER_RANK]) for r in range(WORLD)])
    for r in ranks:
        torch.testing.assert_close(r["gathered"], full, rtol=0, atol=0)


def test_gather_with_grad_matches_single_process_gradient(ranks: list[dict]) -> None:
    """Rank-averaged grads through gather_with_grad equal one process's grads of the mean loss over the whole batch."""
    expected = _single_process_grads()
    for r in ranks:
        for got, want in zip(r["grads"], expected):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_plain_all_gather_gives_wrong_gradient(ranks: list[dict]) -> None:
    """A no-grad all_gather (own slice kept) loses the other ranks' share: its gradient is measurably off."""
    expected = _single_process_grads()
    err = max((got - want).abs().max() / want.abs().max() for got, want in zip(ranks[0]["plain_grads"], expected))
    assert err > 0.05


def test_all_reduce_mean_averages_over_ranks(ranks: list[dict]) -> None:
    """all_reduce_mean of [r+1, 10r] over two ranks is [1.5, 5]."""
    for r in ranks:
        torch.testing.assert_close(r["mean"], torch.tensor([1.5, 5.0]))


def test_unequal_rows_raise_on_every_rank(ranks: list[dict]) -> None:
    """Different row counts per rank raise ValueError on all ranks, naming the shapes."""
    for r in ranks:
        assert "same shape on every rank" in r.get("unequal_error", "") and "(3, 2), (2, 2)" in r["unequal_error"]


def test_identity_without_process_group() -> None:
    """Not initialised: rank 0 of 1, gather_with_grad returns its input, all_reduce_mean too."""
    assert not pdist.is_initialized() and (pdist.rank(), pdist.world_size()) == (0, 1)
    x = torch.randn(4, 3, requires_grad=True)
    assert pdist.gather_with_grad(x) is x
    assert pdist.all_reduce_mean(x) is x


def test_identity_in_world_of_one() -> None:
    """In a real 1-process gloo group, gather_with_grad and all_reduce_mean leave tensors and gradients unchanged."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        x = torch.randn(4, 3, requires_grad=True)
        out = pdist.gather_with_grad(x)
        assert out is x and pdist.world_size() == 1
        torch.testing.assert_close(pdist.all_reduce_mean(x.detach()), x.detach())
    finally:
        dist.destroy_process_group()


def test_local_rank_reads_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """local_rank() is LOCAL_RANK when set and 0 otherwise."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert pdist.local_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pdist.local_rank() == 3


def _aborts_once(rank: int, port: int, root: str) -> None:
    """Rank 1 aborts (SIGABRT, as a C++ terminate) the first time it runs; every rank then marks its run."""
    marker = Path(root) / "aborted"
    if rank == 1 and not marker.exists():
        marker.touch()
        os.abort()
    (Path(root) / f"ran{rank}-{port}").touch()


def _raises(rank: int, port: int, root: str) -> None:
    (Path(root) / f"raised{rank}-{port}").touch()
    raise ValueError(f"rank {rank} fails")


def test_spawned_ranks_run_once_more_only_after_a_signal(tmp_path):
    """tests.util.spawn_ranks: a rank killed by a signal runs the group once more, on another port (with a warning);
    a rank that raises fails at once, its exception named (the file that handed it over removed); a rank killed both
    times fails."""
    import torch.multiprocessing as mp

    with pytest.warns(UserWarning, match="rank 1 of _aborts_once died by SIGABRT; running the ranks once more"):
        spawn_ranks(_aborts_once, 2, str(tmp_path))
    ran = {p.name for p in tmp_path.glob("ran*")}  # rank 0 may have finished before rank 1 aborted, the first time
    again = [port for port in {n[5:] for n in ran} if {f"ran0-{port}", f"ran1-{port}"} <= ran]
    assert len(again) == 1 and sum(n.startswith("ran1") for n in ran) == 1
    import tempfile

    handed_over = set(Path(tempfile.gettempdir()).glob("pytorch-errorfile-*"))
    with pytest.raises(mp.ProcessRaisedException, match="rank . fails"):
        spawn_ranks(_raises, 2, str(tmp_path))
    assert set(Path(tempfile.gettempdir()).glob("pytorch-errorfile-*")) == handed_over  # the traceback's file removed
    assert len(list(tmp_path.glob("raised*"))) >= 1 and len({p.name[8:] for p in tmp_path.glob("raised*")}) == 1
    (tmp_path / "aborted").unlink()
    with pytest.warns(UserWarning), pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        spawn_ranks(_aborts_always, 2, str(tmp_path))


def _aborts_always(rank: int, port: int, root: str) -> None:
    if rank == 1:
        os.abort()
