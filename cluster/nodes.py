"""What a job of either scheduler shares: ``nodes`` equal Ray nodes, and the Ray Train workers they imply.

Errors are ``ValueError("--<option>: <problem>")``, as the ``pretrain submit`` options are named.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class NotSubmitted(ValueError):
    """The scheduler refused the job (``sbatch``, ``kubectl create``): nothing of it runs or waits to, and a new
    run's directory could go again."""


@dataclass(kw_only=True)
class RayNodes:
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int = 8
    """CPUs per node, all given to that node's Ray (loader workers and DALI threads live inside them)"""
    join_timeout: int = 300
    """Seconds to wait for every Ray node to join (on Kubernetes also a node pod for its head) before failing"""

    def __post_init__(self) -> None:
        for name in ("nodes", "cpus_per_node", "join_timeout"):
            check_int(name, getattr(self, name), low=1)
        check_int("gpus_per_node", self.gpus_per_node, low=0)

    @property
    def num_workers(self) -> int | None:
        """Ray Train workers the job implies on GPU nodes (one per GPU); None on CPU nodes (the config decides)."""
        return self.nodes * self.gpus_per_node if self.gpus_per_node else None

    def check_workers(self, num_workers: int, *, use_gpu: str | None = None, overrides: Sequence[str] = ()) -> None:
        """ValueError naming the config key where the run's workers do not fit the job: ``num_workers`` and
        ``use_gpu`` as the run's config has them (the job's GPUs already applied), ``overrides`` the user's own
        ``--set KEY=VALUE``, which must not ask for what GPU nodes overrule (one worker per GPU, on the GPU)."""
        if self.gpus_per_node:
            _check_gpu_overrides(self, overrides)
            return
        if use_gpu == "true":  # Ray gets no GPUs (--num-gpus=0): the workers would wait for them for ever
            raise ValueError("job.use_gpu: true gives each worker a GPU, and the job asks for none; give "
                             "--gpus-per-node N (one worker per GPU), or set job.use_gpu=false for CPU workers")
        if num_workers > self.nodes * self.cpus_per_node:
            raise ValueError(f"job.num_workers: {num_workers} CPU workers need {num_workers} Ray CPUs, the job has "
                             f"{self.nodes * self.cpus_per_node} ({self.nodes} nodes x {self.cpus_per_node} "
                             "--cpus-per-node)")
        if num_workers < self.nodes:  # a worker runs on one node; nothing else of the run uses a node's Ray
            raise ValueError(f"job.num_workers: {num_workers} CPU workers leave at least {self.nodes - num_workers} "
                             f"of the {self.nodes} --nodes idle; give --nodes {num_workers} or more job.num_workers")


def _check_gpu_overrides(job: RayNodes, overrides: Sequence[str]) -> None:
    """ValueError where the user's ``--set`` asks a GPU job for other workers than its GPUs give: ``job.num_workers``
    other than nodes x GPUs, or ``job.use_gpu`` false (auto resolves to the GPUs there, so it is no conflict)."""
    from pretrain.config import YAML11_BOOLS, ConfigError, apply_overrides

    try:
        given = apply_overrides({}, list(overrides)).get("job")  # job.use_gpu=x and job={use_gpu: x} alike
    except ConfigError:  # the config was resolved from these already, so it does not happen; its error says it
        return
    if not isinstance(given, dict):
        return
    gpus = f"--nodes {job.nodes} x --gpus-per-node {job.gpus_per_node}"
    if "num_workers" in given and str(given["num_workers"]) != str(job.num_workers):  # '4' is 4 to the config
        raise ValueError(f"job.num_workers: --set gives {given['num_workers']!r}, and the job's GPUs make it "
                         f"{job.num_workers} (one worker per GPU: {gpus}); leave it out, or change --nodes or "
                         "--gpus-per-node")
    use_gpu = given.get("use_gpu")
    if isinstance(use_gpu, str):
        use_gpu = YAML11_BOOLS.get(use_gpu.lower(), use_gpu.lower())
    if use_gpu in (False, "false"):
        raise ValueError(f"job.use_gpu: --set gives false, and the job's GPUs make it true (one worker per GPU: "
                         f"{gpus}); leave it out, or leave out --gpus-per-node for CPU workers")


def check_int(name: str, value, *, low: int, high: int | None = None) -> None:
    """ValueError("--<name>: ...") unless ``value`` is an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"--{name.replace('_', '-')}: must be an integer {bound}, got {value!r}")
