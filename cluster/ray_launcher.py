"""Ray Train orchestration: a private local Ray cluster (or ``--address``), a TorchTrainer, checkpoints via Ray.

Each Ray worker runs ``pretrain.trainer.train`` with a :class:`RaySession`, so checkpoints go through
``ray.train.report`` and a resumed run (same run directory) starts from Ray's latest reported checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

# Ray 2.60 may have written ~/.ray/auth_token, which turns on token auth for some processes and not others; every
# process of a cluster must agree, so the mode is fixed before Ray is imported and inherited by all that Ray starts.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
# Ray Train copies worker print() into its log files *and* the console stream, so every line reached the driver twice.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

import ray  # noqa: E402
import ray.train  # noqa: E402
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from pretrain.config import Config, config_from_dict, to_dict  # noqa: E402


class TrainingFailed(RuntimeError):
    """A worker raised; the run directory keeps every checkpoint reported before it."""


class Interrupted(RuntimeError):
    """SIGINT (Ctrl-C) or SIGTERM (``kill``, a scheduler stopping the job) stopped the training: Ray Train aborted its
    workers; the run directory keeps every checkpoint reported before it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def _graceful_stop(on_stop: Callable[[int], None] | None) -> Iterator[list[int]]:
    """SIGTERM handled as Ray Train handles SIGINT once ``fit()`` runs (it aborts the workers and the controller; the
    driver's own handler, which Ray installs, exits mid-call, and Ray's C++ core aborts the process), after
    ``on_stop(signum)``: a scheduler that stops a job stops its whole Ray cluster at once and may kill this process
    before the abort returns. Yields the list the SIGTERMs received go into. Both handlers are put back after the body
    (``fit()`` leaves its SIGINT one)."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield []
        return
    received: list[int] = []

    def on_sigterm(signum, frame):
        first = not received
        received.append(signum)
        if first:
            print("Stopping (SIGTERM): aborting the workers", flush=True)
            if on_stop is not None:
                on_stop(signum)
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):
            raise KeyboardInterrupt
        # Ray Train's (or Python's KeyboardInterrupt before fit() installs it), without its line about a SIGINT
        quiet = logging.getLogger("ray.train.v2.api.data_parallel_trainer")
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            handler(signal.SIGINT, frame)
        finally:
            quiet.setLevel(level)

    saved = signal.getsignal(signal.SIGINT), signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


def _first_failure(error: Exception) -> str:
    """``": rank R: <its exception's last line>"`` for the lowest rank that raised (what went wrong, in the one line the
    CLI prints), or "" when Ray names no worker."""
    failures = getattr(error, "worker_failures", None) or {}
    if not failures:
        return ""
    rank, failure = min(failures.items(), key=lambda item: item[0])
    lines = [line.strip() for line in str(failure).splitlines() if line.strip()]
    return f": rank {rank}: {lines[-1]}" if lines else ""


class RaySession:
    """:class:`pretrain.trainer.Session` on top of ``ray.train``."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        """Ray's latest checkpoint, or a newer one that torchrun wrote into the run (``checkpoints/step_*``: a run
        taken on with ``python -m pretrain.train`` and back to Ray), which Ray's record does not know."""
        from pretrain.steps import checkpoint_info, list_checkpoints

        checkpoint = ray.train.get_checkpoint()
        found = list_checkpoints(self.run_dir)
        newest = found[max(found)] if found else None
        if checkpoint is None:
            yield newest
            return
        with checkpoint.as_directory() as d:
            yield newest if newest is not None and max(found) > checkpoint_info(d)["step"] else Path(d)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)  # every rank reports: Ray merges their ZeRO partitions


def _print_placement(rank: int, node: str) -> None:
    """Rank 0 prints where every worker runs, in one line: one line per worker would differ only in numbers, which
    Ray's log deduplication folds into one ("[repeated 2x across cluster]"), hiding the others."""
    import torch.distributed as td

    placed = [(rank, node)]
    if td.is_initialized() and td.get_world_size() > 1:
        placed = [None] * td.get_world_size()
        td.all_gather_object(placed, (rank, node))
    if rank == 0:
        print(f"Ray Train workers ({len(placed)}): " + ", ".join(f"{r} on {n}" for r, n in sorted(placed)), flush=True)


def _quiet_report_lines() -> None:
    """Ray Train logs each ``ray.train.report`` of every rank with its whole metrics dict ("Reporting training result
    N: TrainingReport(...)"), lines that bury the run's own; its logger is named after its module file."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _worker_loop(config: dict) -> None:
    """Runs on each Ray Train worker; the process group is Ray's (gloo on CPU, NCCL on GPU)."""
    from pretrain.trainer import train

    _quiet_report_lines()
    _print_placement(ray.train.get_context().get_world_rank(), ray.util.get_node_ip_address())
    train(config_from_dict(config["cfg"]), Path(config["run_dir"]), RaySession(Path(config["run_dir"])))


def check_address(address: str, timeout_s: float = 5.0) -> str:
    """The Ray cluster at ``address`` (``host:port`` of its head, or ``auto``: the one ``ray start`` began on this
    machine, or RAY_ADDRESS), as Ray resolves it; ConnectionError (one line) where none answers there. Ray's own
    join retries for minutes, one line a second, before it fails."""
    import socket

    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        resolved = canonicalize_bootstrap_address_or_die(address)
    except ConnectionError:
        raise ConnectionError(f"--address {address}: no Ray cluster was started on this machine (`ray start --head`) "
                              "and RAY_ADDRESS is not set") from None
    host, _, port = resolved.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return resolved
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise ConnectionError(f"--address {address}: no Ray cluster answers at {resolved} ({reason}); start its head "
                              "with `ray start --head`, or check the address") from None


@contextlib.contextmanager
def ray_cluster(address: str | None, *, num_cpus: int | None = None) -> Iterator[None]:
    """Join ``address`` or start a private local cluster on loopback with its own temp dir (never a foreign one),
    removed with Ray's logs in it once the body has finished, kept (and its logs named) where it raised."""
    if ray.is_initialized():
        yield
        return
    if address:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        # Ray Train's placement-group cleaner asks the cluster's state API, which it finds by RAY_ADDRESS or else by
        # looking for a Ray on its machine (a traceback each poll where there are several): the job's processes get
        # the address of the cluster they are in
        gcs = canonicalize_bootstrap_address_or_die(address)
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": {"RAY_ADDRESS": gcs}})
    else:
        # Short path: Ray puts unix sockets under the temp dir, and those are limited to ~107 characters.
        temp_dir = tempfile.mkdtemp(prefix="sslray-", dir="/tmp")
        # The dashboard also serves the state API that Ray Train's placement-group cleaner polls (free loopback port).
        # The cleaner finds it by RAY_API_SERVER_ADDRESS, which the cluster's processes inherit from here: without it,
        # it looks for a Ray on this machine and fails (a traceback each poll) where another Ray runs beside this one.
        port = _free_port()
        saved = os.environ.get(API_SERVER)
        os.environ[API_SERVER] = f"http://127.0.0.1:{port}"
        try:
            ctx = ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=port,
                _temp_dir=temp_dir,
                _node_ip_address="127.0.0.1",
                log_to_driver=True,
            )
        except BaseException:
            _restore_env(API_SERVER, saved)
            raise
        print(f"Local Ray cluster: temp dir {temp_dir}, dashboard http://{ctx.dashboard_url}", flush=True)
    finished = False
    try:
        yield
        finished = True
    finally:
        ray.shutdown(wait_for_processes=True)  # its processes stopped (or killed) before their temp dir goes
        if not address:
            _restore_env(API_SERVER, saved)
            # Ray's logs (a few MB a run) are worth keeping only where something went wrong
            if finished:
                shutil.rmtree(temp_dir, ignore_errors=True)
            else:
                print(f"Ray's logs of this run are kept in {temp_dir}/session_latest/logs", flush=True)


API_SERVER = "RAY_API_SERVER_ADDRESS"


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resource_shortfall(resources: dict, num_workers: int, *, gpu: bool) -> str | None:
    """What a joined cluster (``ray.cluster_resources()``) lacks for ``num_workers`` Train workers of a CPU each
    (and a GPU each with ``gpu``), said as "has ..."; None when it has enough."""
    lacking = [f"{int(resources.get(kind, 0))} {kind}s for {num_workers} workers" for kind in ("CPU", "GPU")
               if (kind == "CPU" or gpu) and resources.get(kind, 0) < num_workers]
    return "has " + " and ".join(lacking) if lacking else None


def use_gpu(cfg: Config, resources: dict | None = None) -> bool:
    """Whether the workers take a GPU each: ``job.use_gpu``, where ``auto`` is whether the Ray cluster has GPUs
    (``resources``: ``ray.cluster_resources()``), else this machine. A CPU job on a node whose GPUs its driver sees
    anyway (a Slurm node that does not hide them, a pod under NVIDIA's default runtime) had asked its GPU-less Ray
    for GPUs and waited for ever."""
    if cfg.job.use_gpu == "auto":
        if resources is not None:
            return resources.get("GPU", 0) > 0
        import torch

        return torch.cuda.is_available()
    return cfg.job.use_gpu == "true"


def run_ray(cfg: Config, run_dir: Path, *, address: str | None = None,
            on_stop: Callable[[int], None] | None = None) -> ray.train.Result:
    """Train ``cfg`` with ``job.num_workers`` Ray Train workers; the run's storage is ``run_dir``. SIGINT and SIGTERM
    abort the workers and raise :class:`Interrupted`; ``on_stop(signum)`` is called at the first SIGTERM, before the
    abort."""
    run_dir = Path(run_dir).resolve()
    passed = ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "RAY_AUTH_MODE", "PRETRAIN_HTTP_AUTHORIZATION")
    env = {k: v for k, v in os.environ.items() if k in passed}
    # Workers need a CPU each plus what their loader uses; locally, size the cluster to fit the job.
    num_cpus = None if address else max(os.cpu_count() or 1, cfg.job.num_workers + 1)
    with ray_cluster(address, num_cpus=num_cpus):
        gpu = use_gpu(cfg, ray.cluster_resources())
        if not gpu:  # CPU workers: Ray's gloo group, which a worker that still saw its node's GPUs would put on them
            env["CUDA_VISIBLE_DEVICES"] = ""
        if address:
            short = resource_shortfall(ray.cluster_resources(), cfg.job.num_workers, gpu=gpu)
            if short:
                print(f"Warning: the cluster at {address} {short}; Ray Train waits for nodes to join (an autoscaling "
                      "cluster adds them), retrying every minute", flush=True)
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={"cfg": to_dict(cfg), "run_dir": str(run_dir)},
            scaling_config=ScalingConfig(num_workers=cfg.job.num_workers, use_gpu=gpu, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(
                name=run_dir.name,
                storage_path=str(run_dir.parent),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.job.keep_checkpoints or None),
                failure_config=FailureConfig(max_failures=cfg.job.max_failures),  # each restart resumes
                worker_runtime_env={"env_vars": env},
            ),
        )
        with _graceful_stop(on_stop) as received:
            try:
                return trainer.fit()
            except ray.train.TrainingFailedError as e:  # the workers' traceback is already in the log above
                raise TrainingFailed(f"training failed on the workers ({type(e).__name__}{_first_failure(e)}); see "
                                     "their log above") from e
            # Ray Train's SIGINT handler ends fit() with SystemExit once it has aborted the run (RayActorError where
            # the controller was gone first); SIGINT before fit() runs is a KeyboardInterrupt
            except (KeyboardInterrupt, SystemExit, ray.exceptions.RayActorError) as e:
                if isinstance(e, ray.exceptions.RayActorError) and not received:
                    raise
                raise Interrupted(received[0] if received else signal.SIGINT) from None

