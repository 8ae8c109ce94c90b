"""``python -m cluster.k8s_pod``: what every pod of a ``pretrain submit k8s`` Job runs (see ``cluster/k8s.py``).

Its settings are the environment the manifest sets (``PRETRAIN_*``; ``POD_IP`` from the downward API) and
``JOB_COMPLETION_INDEX``, which Kubernetes sets in the pods of an Indexed Job.

Pod 0 starts a Ray head on its IP, waits until all ``PRETRAIN_NODES`` Ray nodes have joined (``cluster.wait_nodes``),
runs the driver ``python -m pretrain.cli train --resume <run_dir> --address <pod ip>:<port>`` and exits with its
status: the Job is complete when this pod succeeds; a run stopped by ``pretrain stop`` exits ``STOPPED``, which fails
the Job (its pods are not started again, which would resume the run). Every other pod waits until the head's name
resolves (the headless Service publishes it once the head pod has an IP) and its port answers, then runs a Ray node
joined to it until the pod is stopped.

SIGTERM (pod deletion, preemption, the end of the Job): pod 0 asks the run to stop (``pretrain stop``: every rank
checkpoints after the step it is on) and waits up to ``PRETRAIN_STOP_WAIT`` seconds for the driver to end so, while
every other pod keeps its Ray node (the run's workers on it) up as long as the head answers, for as long; then the
driver, then Ray, are stopped and the pod exits with 143. A new start of the pods goes on from that step.

Restarts: because the driver always resumes, a Job that starts pods again after a failure (``backoffLimit``) or a
preemption goes on from the run's latest checkpoint, like a requeued Slurm job. A node pod whose head went away (the
head pod failed, or was replaced: its name now resolves to another IP) stops its Ray node and exits with ``LOST_HEAD``,
which the Job does not count as a failure; its replacement joins the new head.

Everything a pod prints, its children included, also goes to ``<run_dir>/k8s/pod-<index>.log`` on the run's volume.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.k8s import BAD_INPUT, LOST_HEAD, STOPPED

STOP_GRACE = 20.0  # seconds a child has to stop after SIGTERM before its process group is killed
PROBE_EVERY = 5.0  # seconds between a node's checks that its head is still there
HEAD_GRACE = 30.0  # seconds a head may be unreachable before a node gives up on it


class Terminated(Exception):
    """SIGTERM: the pod is being stopped."""


class PodError(Exception):
    """Why this pod cannot go on; one line."""


@dataclass(frozen=True, kw_only=True)
class Pod:
    index: int
    ip: str
    head_host: str
    run_dir: Path
    ray_port: int
    dashboard_port: int
    nodes: int
    cpus: int
    gpus: int
    join_timeout: int
    stop_wait: int = 0
    """Seconds a stopped pod gives the run to checkpoint and end (``PRETRAIN_STOP_WAIT``; a manifest without it: 0)"""

    @classmethod
    def from_environ(cls, env: dict[str, str]) -> Pod:
        """ValueError naming the variable that is missing or wrong."""

        def get(name: str, kind=str):
            if not env.get(name):
                raise ValueError(f"{name}: not set (this runs in the pods of a Job written by `pretrain submit k8s`)")
            try:
                return kind(env[name])
            except ValueError:
                raise ValueError(f"{name}: {env[name]!r} is not a {kind.__name__}") from None

        return cls(index=get("JOB_COMPLETION_INDEX", int), ip=get("POD_IP"), head_host=get("PRETRAIN_HEAD_HOST"),
                   run_dir=Path(get("PRETRAIN_RUN_DIR")), ray_port=get("PRETRAIN_RAY_PORT", int),
                   dashboard_port=get("PRETRAIN_DASHBOARD_PORT", int), nodes=get("PRETRAIN_NODES", int),
                   cpus=get("PRETRAIN_CPUS_PER_NODE", int), gpus=get("PRETRAIN_GPUS_PER_NODE", int),
                   join_timeout=get("PRETRAIN_JOIN_TIMEOUT", int),
                   stop_wait=get("PRETRAIN_STOP_WAIT", int) if env.get("PRETRAIN_STOP_WAIT") else 0)

    def ray_start(self, temp_dir: str, *args: str) -> list[str]:
        """``ray start --block`` for this pod's node, with its private ``temp_dir`` (short: Ray puts unix sockets
        there)."""
        ray = Path(sys.executable).parent / "ray"
        return [str(ray) if ray.is_file() else "ray", "start", "--block", f"--node-ip-address={self.ip}",
                f"--num-cpus={self.cpus}", f"--num-gpus={self.gpus}", f"--temp-dir={temp_dir}",
                "--disable-usage-stats", *args]


class Children:
    """Processes this pod started, each in its own session; on exit they are stopped in reverse order (SIGTERM, then
    SIGKILL to the process group, which holds what they started: ``ray start --block`` leads its Ray processes)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, start_new_session=True)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_GRACE)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()


def wait_alongside(proc: subprocess.Popen, ray: subprocess.Popen) -> int:
    """``proc``'s exit status; PodError if this pod's Ray node ``ray`` ends first."""
    while True:
        try:
            return proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            if (status := ray.poll()) is not None:
                raise PodError(f"the Ray head exited with status {status} (its log is above)") from None


def run_head(pod: Pod, temp_dir: str) -> int:
    address = f"{pod.ip}:{pod.ray_port}"
    print(f"ssl-pretrain: pod 0 of {pod.nodes}: Ray head {address} ({pod.head_host}), run {pod.run_dir}", flush=True)
    with Children() as children:
        ray = children.start(pod.ray_start(temp_dir, "--head", f"--port={pod.ray_port}", "--dashboard-host=0.0.0.0",
                                           f"--dashboard-port={pod.dashboard_port}"))
        joined = children.start([sys.executable, "-m", "cluster.wait_nodes", "--address", address,
                                 "--nodes", str(pod.nodes), "--timeout", str(pod.join_timeout)])
        if wait_alongside(joined, ray) != 0:
            return 1  # wait_nodes said which nodes joined
        driver = children.start([sys.executable, "-m", "pretrain.cli", "train", "--resume", str(pod.run_dir),
                                 "--address", address])
        try:
            status = wait_alongside(driver, ray)
        except Terminated:
            if _stopped_as_asked(pod, driver):
                print(f"ssl-pretrain: the driver exited with status {driver.returncode}", flush=True)
            raise
        print(f"ssl-pretrain: the driver exited with status {status}", flush=True)
        from pretrain.steps import STOPPED_EXIT  # (torch's import: only once the driver has ended)

        if status == STOPPED_EXIT:  # `pretrain stop`, not this pod's SIGTERM (that raised Terminated above)
            job = pod.run_dir / "k8s" / "job.yaml"
            print(f"ssl-pretrain: the run stopped as asked, checkpointed; the Job ends here (status {STOPPED}, which "
                  f"fails it rather than start the pod again); start it again to go on: kubectl delete -f {job} "
                  f"--ignore-not-found; kubectl create -f {job}", flush=True)
            return STOPPED
        return 128 - status if status < 0 else status  # killed by a signal: the shell's convention, not 256 - n


def _stopped_as_asked(pod: Pod, driver: subprocess.Popen) -> bool:
    """The pod is being stopped: the run asked to stop (``pretrain stop``), and whether the driver ended within
    ``pod.stop_wait`` seconds."""
    if not pod.stop_wait:
        return False
    from pretrain.steps import STOP_FILE

    print(f"ssl-pretrain: SIGTERM: asking the run to checkpoint after the step it is on and stop (up to "
          f"{pod.stop_wait} s)", flush=True)
    try:
        (pod.run_dir / STOP_FILE).write_text("")
        driver.wait(timeout=pod.stop_wait)
        return True
    except OSError as e:
        print(f"ssl-pretrain: could not ask the run to stop ({e})", flush=True)
    except subprocess.TimeoutExpired:
        print(f"ssl-pretrain: the run did not stop within {pod.stop_wait} s", flush=True)
    return False


def resolve(host: str) -> str | None:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return None


def answers(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=3):
            return True
    except OSError:
        return False


def find_head(pod: Pod) -> str:
    """The head's IP once its name resolves and its Ray port answers; PodError after ``join_timeout`` seconds."""
    deadline = time.monotonic() + pod.join_timeout
    while True:
        ip = resolve(pod.head_host)
        if ip is not None and answers(ip, pod.ray_port):
            return ip
        if time.monotonic() > deadline:
            seen = f"it is {ip}, whose port {pod.ray_port} does not answer" if ip else "its name does not resolve"
            raise PodError(f"no Ray head at {pod.head_host}:{pod.ray_port} within {pod.join_timeout} s ({seen})")
        time.sleep(2)


def run_node(pod: Pod, temp_dir: str) -> int:
    head_ip = find_head(pod)
    address = f"{head_ip}:{pod.ray_port}"
    print(f"ssl-pretrain: pod {pod.index} of {pod.nodes}: Ray node {pod.ip} joining {address} ({pod.head_host})",
          flush=True)
    with Children() as children:
        ray = children.start(pod.ray_start(temp_dir, f"--address={address}"))
        try:
            status = _watch_head(pod, ray, head_ip)
        except Terminated:
            _serve_the_stop(pod, ray, head_ip)
            raise
        if status is None:
            return LOST_HEAD
    print(f"ssl-pretrain: the Ray node exited with status {status}", flush=True)
    return LOST_HEAD if resolve(pod.head_host) != head_ip or not answers(head_ip, pod.ray_port) else (status or 1)


def _watch_head(pod: Pod, ray: subprocess.Popen, head_ip: str) -> int | None:
    """The Ray node's exit status once it ends; None (with a line) as soon as its head is gone: replaced (the head's
    name resolves to another IP) or unreachable for ``HEAD_GRACE`` seconds."""
    unreachable_since = None
    while True:
        try:
            return ray.wait(timeout=PROBE_EVERY)
        except subprocess.TimeoutExpired:
            pass
        now_ip = resolve(pod.head_host)
        if now_ip is not None and now_ip != head_ip:
            print(f"ssl-pretrain: {pod.head_host} is now {now_ip}: a new head; leaving the old one", flush=True)
            return None
        if now_ip is not None and answers(head_ip, pod.ray_port):
            unreachable_since = None
        elif unreachable_since is None:
            unreachable_since = time.monotonic()
        elif time.monotonic() - unreachable_since > HEAD_GRACE:
            print(f"ssl-pretrain: the Ray head {head_ip}:{pod.ray_port} is gone", flush=True)
            return None


def _serve_the_stop(pod: Pod, ray: subprocess.Popen, head_ip: str) -> None:
    """The pod is being stopped: its Ray node (the run's workers on it, which checkpoint as the head's pod asked) kept
    up for up to ``pod.stop_wait`` seconds, until the head no longer answers."""
    deadline = time.monotonic() + pod.stop_wait
    while time.monotonic() < deadline and ray.poll() is None and answers(head_ip, pod.ray_port):
        time.sleep(1)


def log_to_run(pod: Pod) -> list[subprocess.Popen]:
    """Send this pod's output, and its children's, also to ``<run_dir>/k8s/pod-<index>.log`` (appended: every start of
    the pod adds to it), so the run keeps its pods' logs as a Slurm run keeps its job's: ``kubectl logs`` goes with the
    pod. stdout and stderr each pass through a ``tee`` to where they went before; returns the tees (none if they could
    not start: the pod's own log still has everything)."""
    path = pod.run_dir / "k8s" / f"pod-{pod.index}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    tees = []
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for fd in (1, 2):
            out = os.dup(fd)  # where this stream went so far; fd itself is about to become the tee's pipe
            try:
                # its own session: a signal to this pod's processes must not cut the log short
                tees.append(subprocess.Popen(["tee", "-a", str(path)], stdin=subprocess.PIPE, stdout=out,
                                             start_new_session=True))
            finally:
                os.close(out)
    except OSError as e:
        for tee in tees:
            tee.kill()
        print(f"ssl-pretrain: pod output not copied to {path} ({e})", flush=True)
        return []
    for fd, tee in zip((1, 2), tees):
        os.dup2(tee.stdin.fileno(), fd)
        tee.stdin.close()
    print(f"ssl-pretrain: pod {pod.index} started {time.strftime('%Y-%m-%d %H:%M:%S %Z')} on {socket.gethostname()}",
          flush=True)
    return tees


def close_log(tees: list[subprocess.Popen]) -> None:
    """Let the tees write the last lines before the pod ends (the container's other processes die with its main one)."""
    if not tees:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)  # the pipes' last write ends close: each tee reads to its end and exits
    os.close(devnull)
    for tee in tees:
        try:
            tee.wait(timeout=10)
        except subprocess.TimeoutExpired:
            tee.kill()


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the cleanup that follows must not be cut short
    raise Terminated


def main() -> int:
    try:
        pod = Pod.from_environ(dict(os.environ))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    # On SIGTERM `ray start --block` first drains its node (for Ray Serve) for up to 30 s; here the driver has
    # stopped by then and the drain only waits, out of the pod's grace period.
    os.environ.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    signal.signal(signal.SIGTERM, _terminate)
    tees = []
    # Ray's session dir, in the container's /tmp: nothing can read it once this process ends and the container with
    # it, so it goes as soon as this pod's Ray has stopped (where pods run as plain processes, as in the tests, it
    # would otherwise stay on the host); named after the pod, for a /tmp that the node shares
    temp_dir = tempfile.mkdtemp(prefix=f"sslray-{socket.gethostname()}-", dir="/tmp")
    try:
        tees = log_to_run(pod)
        return run_head(pod, temp_dir) if pod.index == 0 else run_node(pod, temp_dir)
    except PodError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except Terminated:
        print(f"ssl-pretrain: pod {pod.index} stopped (SIGTERM)", flush=True)
        return 128 + signal.SIGTERM
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
        close_log(tees)


if __name__ == "__main__":
    sys.exit(main())
