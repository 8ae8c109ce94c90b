"""``python -m cluster.wait_nodes --address HOST:PORT --nodes N``: block until a Ray cluster has N live nodes.

The Slurm job script (``cluster/templates/slurm.sbatch``) starts one Ray node per machine in the background and calls
this before the driver, so a node that never joins ends the job with one clear line instead of a run that waits for
resources forever.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as in cluster.ray_launcher: every process of a cluster agrees

import ray  # noqa: E402


def wait_for_nodes(address: str, nodes: int, timeout: float) -> int:
    """Live node count once it reaches ``nodes``; TimeoutError naming what joined if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:  # the head may still be starting
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            break
        except (ConnectionError, RuntimeError) as e:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no Ray head answered at {address} within {timeout:.0f} s ({e})") from None
            time.sleep(2)
    try:
        while True:
            alive = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
            if len(alive) >= nodes:
                return len(alive)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(alive)} of {nodes} Ray nodes joined {address} within {timeout:.0f} s: "
                                   f"{sorted(alive)}")
            time.sleep(1)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.wait_nodes")
    p.add_argument("--address", required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    try:
        n = wait_for_nodes(args.address, args.nodes, args.timeout)
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Ray cluster at {args.address}: {n} nodes up", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
