"""Small helpers shared by tests."""

import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn, nprocs: int, *args) -> None:
    """``fn(rank, port, *args)`` in ``nprocs`` spawned processes (a gloo group on a free loopback port), joined.

    A rank that raises fails the call at once, with its traceback. A rank killed by a signal (seen once in a long CI
    run: gloo's C++ aborting one rank of a 2-rank DeepSpeed group under load, "terminate called without an active
    exception", not reproduced in isolation) runs the whole group once more, on a new port, with a warning: a crash
    that our code causes comes back the second time and fails the test. The files in which failing ranks hand their
    tracebacks over (torch's /tmp/pytorch-errorfile-*.pickle, which mp.spawn leaves) are removed."""
    import warnings

    import torch.multiprocessing as mp

    for attempt in (1, 2):
        group = mp.start_processes(fn, args=(free_port(), *args), nprocs=nprocs, join=False, start_method="spawn")
        try:
            while not group.join():
                pass
            return
        except mp.ProcessExitedException as e:
            if attempt == 2 or not e.signal_name:
                raise
            warnings.warn(f"rank {e.error_index} of {fn.__name__} died by {e.signal_name}; running the ranks once more",
                          stacklevel=2)
        finally:
            for path in group.error_files:
                Path(path).unlink(missing_ok=True)


def run_cli(args: list[str], env: dict | None = None):
    """``pretrain ARGS`` in this process, as a ``subprocess.CompletedProcess`` (exit status, stdout, stderr), with
    ``env`` as the whole environment for the call if given: the CLI's own code path without an interpreter and torch
    to start (seconds a call). For commands that start no Ray cluster and no training in-process."""
    import contextlib
    import io
    import os
    import subprocess

    from pretrain.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def dcl_from_logits(logits, labels):
    """The decoupled contrastive loss (DCL) written out from a (n, C) logits matrix and each row's positive column:
    the mean over rows of the log-sum-exp over the other columns less the positive's logit."""
    import torch

    rows = torch.arange(logits.shape[0])
    positive = logits[rows, labels]
    others = logits.clone()
    others[rows, labels] = float("-inf")
    return (torch.logsumexp(others, dim=1) - positive).mean()


def config_error(recipe, overrides: list[str]) -> str:
    """The one-line ConfigError that loading ``recipe`` with ``overrides`` raises (fails if it raises none)."""
    import pytest

    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(recipe, overrides)
    assert "\n" not in str(e.value)
    return str(e.value)


def train_steps(method, batches, steps: int, lr: float, max_steps: int | None = None) -> None:
    """``steps`` plain AdamW steps of ``method`` on ``next(batches)`` (short-training checks of a pretext task); with
    ``max_steps``, each step also runs the method's schedules and after-step updates (EMA, queues) as the trainer
    does, for a run of that length."""
    import torch

    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        if max_steps is not None:
            method.on_step_start(step, max_steps)
        loss = method(next(batches))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if max_steps is not None:
            method.on_step_end(step, max_steps)


def short_training(shards, recipe, measure, steps: int = 40):
    """The short-training check of a two-view method: ``recipe`` at half width on real DALI views of ``shards`` in
    batches of 128, ``steps`` steps of ``train_steps`` (schedules and after-step updates included). Returns the method,
    its config and, on a fresh batch before and after training, ``(loss, measure(method, batch))``, both without
    gradients (a training-mode forward still updates the method's queues and BatchNorm statistics)."""
    import torch

    from pretrain.config import load_config
    from pretrain.trainer import build_method

    cfg = load_config(recipe, ["model.backbone_kwargs={width: 0.5}"])
    method = build_method(cfg, distributed=False)

    def probe(batch):
        with torch.no_grad():
            return method(batch)["loss"].item(), measure(method, batch)

    with train_stream(shards, cfg, batch_size=128) as stream:
        batches = iter(stream)
        before = probe(next(batches))
        train_steps(method, batches, steps, cfg.optim.lr, max_steps=cfg.job.max_steps)
        after = probe(next(batches))
    return method, cfg, before, after


def assert_grads_close(module, grads: dict, rtol: float = 1e-5) -> None:
    """Every parameter of ``module`` named in ``grads`` has that gradient (another path's: Triton against PyTorch),
    each judged against its own scale: fp32 sums in another order, carried back through a network."""
    import torch

    for n, p in module.named_parameters():
        if n in grads:
            scale = grads[n].abs().max().item()
            torch.testing.assert_close(p.grad, grads[n], rtol=rtol, atol=rtol * scale, msg=lambda m, n=n: f"{n}: {m}")


def _half_batches_worker(rank: int, port: int, root: str, recipe, overrides: list[str], batches: list[dict],
                         buffers: tuple[str, ...]) -> None:
    """Rank ``rank`` of ``two_ranks``: its half of every batch, see there."""
    import os

    import torch

    from pretrain import dist
    from pretrain.config import load_config
    from pretrain.trainer import build_method

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    method = build_method(load_config(recipe, [*overrides, "model.sync_bn=true"]), distributed=True)
    loss = 0
    for batch in batches:
        half = batch["views"][0].shape[0] // 2
        loss = loss + method({"views": [v[half * rank:half * (rank + 1)] for v in batch["views"]]})["loss"]
    loss.backward()
    grads = {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}
    for g in grads.values():  # what DeepSpeed does with the ranks' gradients
        torch.distributed.all_reduce(g)
        g /= 2
    state = method.state_dict()
    torch.save({"loss": dist.all_reduce_mean(loss.detach()), "grads": grads, **{b: state[b] for b in buffers}},
               f"{root}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def two_ranks(root, recipe, overrides: list[str], batches: list[dict], buffers: tuple[str, ...] = ()) -> list[dict]:
    """The method of ``recipe`` with ``overrides`` on 2 gloo ranks (model.sync_bn: BatchNorm over both), each taking
    its half of the images of every batch in ``batches``, one forward per batch, the losses summed and backpropagated:
    per rank, the ranks' mean loss (``loss``), the gradients averaged over the ranks as DeepSpeed averages them
    (``grads``) and the named ``buffers`` after the forwards, for comparison with one process on the whole batches."""
    import torch

    spawn_ranks(_half_batches_worker, 2, str(root), recipe, overrides, batches, buffers)
    return [torch.load(f"{root}/rank{r}.pt", weights_only=False) for r in range(2)]


def assert_ranks_grads_close(module, grads: dict, msg: str = "") -> None:
    """The gradients the ranks averaged (``grads``, by name) are ``module``'s from one process on the whole batch, for
    every parameter that has one: each to float rounding at its own scale, or at 1e-3 of the network's largest
    gradient where that is more. A gradient that is 0 but for rounding (a bias whose shift a BatchNorm or a batch
    standardisation removes) is a sum of terms at the network's scale and rounds at it, by an amount that differs
    between CPUs (measured 1.3e-6 apart at a largest gradient of 61 on an AMD EPYC)."""
    import torch

    largest = max(p.grad.abs().max().item() for p in module.parameters() if p.grad is not None)
    for k, p in module.named_parameters():
        if p.grad is not None:
            scale = max(p.grad.abs().max().item(), 1e-2, 1e-3 * largest)
            torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-4 * scale, msg=f"{msg} {k}".strip())


def assert_ranks_match_one_process(ranks: list[dict], method, loss, *, queue_ptr: int) -> None:
    """For a method with a ring of every rank's rows (``queue``, ``queue_ptr``): each of ``two_ranks``' results holds
    one process's whole-batch ``loss`` (backpropagated), its queue and pointer (at ``queue_ptr``), and its gradients,
    for exactly the parameters that got one."""
    import torch

    trained = {k for k, p in method.named_parameters() if p.grad is not None}
    for res in ranks:
        torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res["queue"], method.queue, rtol=1e-4, atol=1e-5)
        assert int(res["queue_ptr"]) == int(method.queue_ptr) == queue_ptr
        assert res["grads"].keys() == trained
        assert_ranks_grads_close(method, res["grads"])


def sinkhorn_reference(scores, eps: float, iters: int):
    """The official Sinkhorn-Knopp of SwAV's main_swav.py and DINOv2's teacher centering, in one process: scores
    (B, K) -> codes (B, K), each row summing to 1, the prototypes sharing the batch about equally."""
    import torch

    q = torch.exp(scores.float() / eps).t()  # (K, B)
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def train_stream(shards, cfg, batch_size: int):
    """One process's stream of batches of ``cfg.data``'s views (its global views and local crops, augmented as the
    recipe says) of ``shards``, to be entered with ``with``."""
    from data_pipeline.loader import make_train_stream

    d = cfg.data
    return make_train_stream(shards, batch_size=batch_size, aug=d.aug, image_size=d.image_size, channels=d.channels,
                             rank=0, world_size=1, num_workers=1, num_views=d.num_views, local_views=d.local_views,
                             local_size=d.local_size, local_crop_scale=d.local_crop_scale)


def write_run(run_dir, recipe: str, cache, *overrides: str) -> None:
    """A finished run directory as the trainer leaves it (backbone.pt; model.pt for CLIP), with the seeded initial
    weights of ``configs/<recipe>`` with ``overrides`` (its shards cached in ``cache``)."""
    from pathlib import Path

    import torch

    from pretrain.config import load_config, to_dict
    from pretrain.steps import MODEL_FILE
    from pretrain.trainer import build_method

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / recipe, [f"data.cache_dir={cache}", *overrides])
    method = build_method(cfg, distributed=False)
    Path(run_dir).mkdir(parents=True)
    torch.save({"config": to_dict(cfg), "state_dict": method.backbone.state_dict()}, Path(run_dir) / "backbone.pt")
    if method.needs_text:
        torch.save({"config": to_dict(cfg), "state_dict": method.state_dict()}, Path(run_dir) / MODEL_FILE)


def worker_placement(log: str) -> dict[str, str]:
    """``{rank: node address}`` from the line in which a Ray run's rank 0 says where its workers run (the last such
    line of ``log``; {} if there is none)."""
    import re

    lines = re.findall(r"Ray Train workers \(\d+\): (.*)", log)
    return dict(re.findall(r"(\d+) on ([0-9.]+)", lines[-1])) if lines else {}
