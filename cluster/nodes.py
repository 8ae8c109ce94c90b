"""What a job of either scheduler shares: ``nodes`` equal Ray nodes, and the Ray Train workers they imply.

Errors are ``ValueError("--<option>: <problem>")``, as the ``pretrain submit`` options are named.
"""

from __future__ import annotations

from dataclasses import dataclass


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

    def check_workers(self, num_workers: int) -> None:
        if self.gpus_per_node == 0 and num_workers > self.nodes * self.cpus_per_node:
            raise ValueError(f"job.num_workers: {num_workers} CPU workers need {num_workers} Ray CPUs, the job has "
                             f"{self.nodes * self.cpus_per_node} ({self.nodes} nodes x {self.cpus_per_node} "
                             "--cpus-per-node)")


def check_int(name: str, value, *, low: int, high: int | None = None) -> None:
    """ValueError("--<name>: ...") unless ``value`` is an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"--{name.replace('_', '-')}: must be an integer {bound}, got {value!r}")
