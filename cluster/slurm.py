"""Slurm: a run becomes one sbatch script that starts a Ray cluster over the job's nodes and trains on it.

``pretrain submit slurm`` validates the config and writes the run directory on the submitting host (a shared file
system is assumed, as on any Slurm cluster), renders ``<run_dir>/slurm/job.sbatch`` from ``templates/slurm.sbatch``
and hands it to ``sbatch``. In the job: a Ray head on the first node and a Ray node on each other one (``srun
--overlap``, one task per node, each advertising its Slurm ``NodeAddr``), a wait until all have joined, then the
driver ``pretrain train --resume <run_dir> --address <head>`` on the first node. ``--requeue`` is set, and because the
driver always resumes, a preempted and requeued job continues from the run's latest checkpoint (exactly, see
``data_pipeline.loader``); so does a plain ``sbatch <run_dir>/slurm/job.sbatch`` after a failure. Runs longer than
the partition's time limit go on by themselves: Slurm signals the batch script ``requeue_grace`` seconds before the
limit (``--signal=B:USR1@...``); the script asks the run to stop (``pretrain stop``: every rank checkpoints after the
step it is on, so the time since the last checkpoint is not trained again) and, once the driver has ended so, requeues
its own job.

GPU nodes: ``gpus_per_node`` GPUs per node, one Ray Train worker per GPU (``job.num_workers = nodes x gpus``). CPU
nodes: ``job.num_workers`` workers of one CPU each over ``nodes x cpus_per_node`` Ray CPUs.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from cluster.nodes import NotSubmitted, RayNodes, check_int

TEMPLATE = Path(__file__).resolve().parent / "templates" / "slurm.sbatch"
UNLIMITED = ("UNLIMITED", "INFINITE")
"""sbatch's words for no time limit (as is a time of 0): there is no end to requeue before."""
_TIME = re.compile(r"^(\d+-)?\d+(:\d\d){0,2}$")  # sbatch --time: MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]


@dataclass(kw_only=True)
class SlurmJob(RayNodes):
    """What the job asks Slurm for: ``nodes`` nodes (``cpus_per_node`` CPUs and ``gpus_per_node`` GPUs each), and the
    options below. Errors are ``ValueError("--<option>: <problem>")``."""

    partition: str | None = None
    time: str | None = None
    """Wall-clock limit as sbatch takes it, e.g. 24:00:00 or 2-00:00:00"""
    account: str | None = None
    sbatch_args: list[str] = field(default_factory=list)
    """Further sbatch options, one directive each, e.g. --qos=high or --constraint=h100"""
    requeue_grace: int = 300
    """Seconds before the time limit at which the run checkpoints and stops and the job requeues itself (SIGUSR1);
    0 = never"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("requeue_grace", self.requeue_grace, low=0)
        if self.time is not None and not (_TIME.match(self.time) or self.time.upper() in UNLIMITED):
            raise ValueError(f"--time: {self.time!r} is not an sbatch time (e.g. 24:00:00 or 2-00:00:00)")
        limited = self.time is not None and self.time.upper() not in UNLIMITED and time_seconds(self.time) > 0
        if limited and self.requeue_grace and self.requeue_grace >= time_seconds(self.time):
            raise ValueError(f"--requeue-grace: {self.requeue_grace} s is not shorter than --time {self.time} "
                             f"({time_seconds(self.time)} s): every start would requeue at once; give more --time or "
                             "less grace (0: never requeue)")
        for name in ("partition", "account"):
            value = getattr(self, name)
            if value is not None and not re.fullmatch(r"[\w.,-]+", value):
                raise ValueError(f"--{name.replace('_', '-')}: {value!r} has characters sbatch would not take")
        for arg in self.sbatch_args:
            if not arg.startswith("--") or any(c in arg for c in "\n\r"):
                raise ValueError(f"--sbatch-arg: {arg!r} must be one long option, e.g. --qos=high")
            instead = _set_by_the_script(arg)
            if instead:
                raise ValueError(f"--sbatch-arg: {arg!r} would change what the job script sets itself; {instead}")


_SCRIPT_SETS = {
    "nodes": "use --nodes", "partition": "use --partition", "time": "use --time", "account": "use --account",
    "cpus-per-task": "use --cpus-per-node", "gpus-per-node": "use --gpus-per-node", "gpus": "use --gpus-per-node",
    "ntasks": "each node runs one task (its Ray node)", "ntasks-per-node": "each node runs one task (its Ray node)",
    "output": "the log is <run>/slurm/<job id>.out, where `pretrain submit --wait` and requeues find it",
    "error": "the log is <run>/slurm/<job id>.out, where `pretrain submit --wait` and requeues find it",
    "open-mode": "a requeued job appends to its log", "job-name": "the job is named ssl-<job.run_name>",
    "requeue": "the job requeues itself before its time limit (--requeue-grace)",
    "no-requeue": "a job preempted or on a failed node is requeued and resumes from its last checkpoint",
    "signal": "use --requeue-grace (the seconds before the time limit at which the job requeues itself)",
    "array": "one job trains one run",
    # GPUs: each node's one task (its Ray node) gets all the node's --gpus-per-node, as many as Ray is told it has
    "gpus-per-task": "use --gpus-per-node", "gpus-per-socket": "use --gpus-per-node",
    "gpu-bind": "each node's one task (its Ray node) gets all the node's GPUs",
    "cpus-per-gpu": "use --cpus-per-node", "ntasks-per-gpu": "each node runs one task (its Ray node)",
    "tres-bind": "each node's one task (its Ray node) gets all the node's GPUs",
    # what would have the script not run as written, or not submitted as `pretrain submit` submits it
    "wrap": "the job runs the script written for the run",
    "test-only": "--dry-run writes the script without submitting",
    "wait": "use `pretrain submit slurm --wait`", "time-min": "use --time (a lower limit Slurm may pick would come "
    "before the --requeue-grace warning)", "export": "the job's steps need the environment the script is submitted "
    "with (RAY_AUTH_MODE among it)",
}
_GPU_VALUED = ("gres", "tres-per-task")  # options that ask for GPUs where their value names them (gres/gpu:2)


def _set_by_the_script(arg: str) -> str | None:
    """What to do instead of ``arg`` where it is an option the job script sets (sbatch takes any unambiguous start of
    an option's name, so one is matched from 3 letters on), else None; ``--gres`` and ``--tres-per-task`` only where
    they ask for GPUs."""
    name, _, value = arg[2:].partition("=")
    if len(name) < 3:
        return None
    if any(option.startswith(name) for option in _GPU_VALUED):
        return "use --gpus-per-node" if any(k in value.lower() for k in ("gpu", "shard")) else None  # (shard: a GPU's)
    return next((why for option, why in _SCRIPT_SETS.items() if option.startswith(name)), None)


def time_seconds(time: str) -> int:
    """Seconds of an sbatch ``--time`` (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)."""
    days, _, rest = time.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if len(parts) == 1:  # MM
        return parts[0] * 60
    if len(parts) == 2:  # MM:SS
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def check_run_dir(run_dir: Path) -> Path:
    """The resolved run directory; ValueError if an #SBATCH directive (its --output) could not name it: whitespace,
    which a directive cannot carry, or a %, which sbatch expands in a file name (%j: the job id)."""
    run_dir = Path(run_dir).resolve()
    if any(c.isspace() for c in str(run_dir)):
        raise ValueError(f"job.out_dir: the run directory {str(run_dir)!r} has whitespace, which #SBATCH directives "
                         "cannot carry")
    if "%" in str(run_dir):
        raise ValueError(f"job.run_name: the run directory {str(run_dir)!r} has a %, which sbatch would expand in the "
                         "job's log path (%j: the job id), writing the log elsewhere")
    return run_dir


def render_sbatch(job: SlurmJob, run_dir: Path, *, python: str = sys.executable, workdir: Path | None = None) -> str:
    """The job script for ``run_dir`` (which holds the validated ``config.yaml``)."""
    from pretrain.steps import STOPPED_EXIT

    run_dir = check_run_dir(run_dir)
    ray = Path(python).parent / "ray"
    workdir = Path(workdir or Path.cwd()).resolve()
    directives = [f"--gpus-per-node={job.gpus_per_node}"] if job.gpus_per_node else []
    directives += [f"--{k}={v}" for k, v in (("partition", job.partition), ("time", job.time),
                                            ("account", job.account)) if v]
    if job.requeue_grace:
        directives.append(f"--signal=B:USR1@{job.requeue_grace}")
    directives += job.sbatch_args
    return Template(TEMPLATE.read_text()).substitute(
        run_dir=str(run_dir),
        script=str(run_dir / "slurm" / "job.sbatch"),
        job_name=f"ssl-{run_dir.name}"[:64],
        nodes=job.nodes,
        cpus_per_node=job.cpus_per_node,
        gpus_per_node=job.gpus_per_node,
        # the Ray node's step asks for the node's GPUs itself (Slurm sets its CUDA_VISIBLE_DEVICES from that)
        step_gpus=f" --gpus-per-node={job.gpus_per_node}" if job.gpus_per_node else "",
        directives="\n".join(f"#SBATCH {d}" for d in directives),
        q_python=shlex.quote(python),
        q_ray=shlex.quote(str(ray)),
        q_run_dir=shlex.quote(str(run_dir)),
        q_workdir=shlex.quote(str(workdir)),
        join_timeout=job.join_timeout,
        requeue_grace=job.requeue_grace,
        # the driver's time to checkpoint and end before the job requeues regardless: most of the grace, the rest
        # for Slurm to stop the steps (KillWait)
        stop_wait=max(job.requeue_grace - 60, job.requeue_grace // 2) if job.requeue_grace else 240,
        stopped_exit=STOPPED_EXIT,
    )


def write_sbatch(job: SlurmJob, run_dir: Path, **kw) -> Path:
    """Render the script into ``<run_dir>/slurm/job.sbatch``; returns its path."""
    path = Path(run_dir).resolve() / "slurm" / "job.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_sbatch(job, run_dir, **kw))
    path.chmod(0o755)
    return path


def find_sbatch() -> str:
    """Path of ``sbatch``; ValueError when this host cannot submit Slurm jobs."""
    found = shutil.which("sbatch")
    if found is None:
        raise ValueError("sbatch: not found on PATH (submit from a Slurm login node, or use --dry-run)")
    return found


def submit(script: Path, *, wait: bool = False) -> tuple[str, int]:
    """``sbatch`` the script; returns (job id, exit status). With ``wait`` it returns when the job ends, with the
    job's exit status."""
    cmd = [find_sbatch(), "--parsable", *(["--wait"] if wait else []), str(script)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    first = proc.stdout.readline().strip()  # --parsable prints "jobid[;cluster]" at submission, before --wait blocks
    job_id = first.split(";")[0]
    if not job_id:
        status = proc.wait()
        raise NotSubmitted(f"sbatch: refused {script} (exit status {status}; its message is above); the run is "
                           f"written: once Slurm takes it, `sbatch {script}` or `pretrain submit slurm --resume "
                           f"{Path(script).resolve().parent.parent}` and the job options")
    print(f"Submitted Slurm job {job_id}: {script}", flush=True)
    rest = proc.stdout.read()
    status = proc.wait()
    if rest.strip():
        print(rest.strip(), flush=True)
    return job_id, status
