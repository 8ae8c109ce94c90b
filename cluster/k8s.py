"""Kubernetes: a run becomes an Indexed Job, one pod per node, whose pods form a Ray cluster and train on it.

``pretrain submit k8s`` validates the config and writes the run directory on the submitting host, which must see the
run's ReadWriteMany volume at the path the pods mount it at (``--mount-path``, by default ``job.out_dir``): Ray writes
the checkpoints of every worker there, from whichever pod the worker runs in, and the default MLflow store lies beside
them. It renders ``<run_dir>/k8s/job.yaml`` and hands it to ``kubectl create``. The manifest holds a headless Service,
which gives pod ``<job>-0`` the DNS name ``<job>-0.<job>``, and the Job: pod 0 runs a Ray head, every other pod a Ray
node that joins it, then pod 0 runs the driver ``pretrain train --resume <run_dir> --address <head>``
(``cluster.k8s_pod``). The Job is complete when pod 0 succeeds (``successPolicy``, GA in Kubernetes 1.33), and
Kubernetes then stops the other pods. A failed pod is started again (``--restarts`` = ``backoffLimit``), and because
the driver always resumes, the run goes on from its latest checkpoint, like a requeued Slurm job; preempted or evicted
pods, and node pods that only lost their head, are replaced without counting as failures (``podFailurePolicy``).

GPU nodes: ``gpus_per_node`` GPUs per pod, one Ray Train worker per GPU (``job.num_workers = nodes x gpus``). CPU
nodes: ``job.num_workers`` workers of one CPU each over ``nodes x cpus_per_node`` Ray CPUs.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from cluster.nodes import NotSubmitted, RayNodes, check_int
from data_pipeline.remote import AUTH_ENV

LOST_HEAD = 75  # exit status of a node pod whose Ray head went away (not the node's failure; see podFailurePolicy)
STOP_MARGIN = 50  # seconds of a stopped pod's grace kept for stopping the driver and Ray (20 s each) once the run ended
BAD_INPUT = 2  # exit status of `pretrain` on a config error: starting the pod again cannot help
STOPPED = 76  # exit status of pod 0 whose run stopped as `pretrain stop` asked: the Job ends (its driver's 75, the
# node pods' LOST_HEAD, would have had the pod started again and the run resumed, undoing the stop)
CONTAINER = "train"
DOWNWARD_API = {"POD_IP": "status.podIP", "POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
MAX_NAME = 52  # an Indexed Job's pods are named <job>-<index> as hosts, and a host name has at most 63 characters
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # DNS-1123 label: namespaces
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")  # PVC, account, class
_MEMORY = re.compile(r"\d+(\.\d+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)")  # a quantity with a unit; not "m" (milli-bytes)
_IMAGE = re.compile(r"\w[\w.:/@-]*")  # an image reference without spaces or quotes


@dataclass(kw_only=True)
class K8sJob(RayNodes):
    """What the Job asks Kubernetes for: ``nodes`` pods (each requests ``cpus_per_node`` CPUs and ``gpus_per_node``
    GPUs), and the options below. Errors are ``ValueError("--<option>: <problem>")``."""

    image: str | None = None
    """Container image with ssl-pretrain installed (``python -m cluster.k8s_pod`` must run in it)"""
    pvc: str | None = None
    """ReadWriteMany PersistentVolumeClaim holding job.out_dir, shared by all pods and the submitting host"""
    mount_path: str | None = None
    """Where the PVC is mounted in the pods, the same path the submitting host sees it at; None = job.out_dir"""
    memory_per_node: str | None = None
    """Memory each pod requests and is limited to, a Kubernetes quantity such as 64Gi; None = the namespace default"""
    namespace: str | None = None
    """None = the namespace of kubectl's current context"""
    service_account: str | None = None
    priority_class: str | None = None
    http_auth_secret: str | None = None
    """A Secret whose key ``authorization`` the pods take as PRETRAIN_HTTP_AUTHORIZATION (data served over HTTP(S)
    that wants a token); None = none"""
    ray_port: int = 6379
    dashboard_port: int = 8265
    restarts: int = 3
    """Pod failures the Job tolerates (backoffLimit); each new start resumes from the latest checkpoint"""
    termination_grace: int = 120
    """Seconds Kubernetes gives a pod it stops (terminationGracePeriodSeconds): all but :data:`STOP_MARGIN` of them the
    run has to checkpoint after the step it is on and end (``cluster.k8s_pod``) before the driver and Ray are stopped"""

    def __post_init__(self) -> None:
        for name in ("image", "pvc"):
            if getattr(self, name) is None:
                raise ValueError(f"--{name}: required ({_REQUIRED[name]})")
        if not _IMAGE.fullmatch(self.image):
            raise ValueError(f"--image: {self.image!r} is not an image reference (e.g. registry.example.com/ssl:1.0)")
        super().__post_init__()
        check_int("restarts", self.restarts, low=0)
        check_int("termination_grace", self.termination_grace, low=1)
        if self.termination_grace <= STOP_MARGIN:  # (as Slurm's --requeue-grace must leave time before --time)
            raise ValueError(f"--termination-grace: {self.termination_grace} s leaves a stopped pod's run no time to "
                             f"checkpoint after its step ({STOP_MARGIN} s are kept for stopping the driver and Ray); "
                             f"give more than {STOP_MARGIN}")
        for name in ("ray_port", "dashboard_port"):
            check_int(name, getattr(self, name), low=1, high=65535)
        if self.ray_port == self.dashboard_port:
            raise ValueError(f"--dashboard-port: {self.dashboard_port} is the --ray-port too")
        if self.memory_per_node is not None and not _MEMORY.fullmatch(self.memory_per_node):
            raise ValueError(f"--memory-per-node: {self.memory_per_node!r} is not a memory quantity with a unit "
                             "(e.g. 64Gi or 500M)")
        if self.namespace is not None and not _LABEL.fullmatch(self.namespace):
            raise ValueError(f"--namespace: {self.namespace!r} is not a Kubernetes namespace name (lowercase letters, "
                             "digits and '-', at most 63)")
        for name in ("pvc", "service_account", "priority_class", "http_auth_secret"):
            value = getattr(self, name)
            if value is not None and (len(value) > 253 or not _SUBDOMAIN.fullmatch(value)):
                raise ValueError(f"--{name.replace('_', '-')}: {value!r} is not a Kubernetes object name (lowercase "
                                 "letters, digits, '-' and '.')")
        if self.mount_path is not None and (not self.mount_path.startswith("/") or Path(self.mount_path) == Path("/")):
            raise ValueError(f"--mount-path: must be an absolute directory other than /, got {self.mount_path!r}")


_REQUIRED = {
    "image": "the container image that has ssl-pretrain installed, e.g. registry.example.com/ssl-pretrain:0.1.0",
    "pvc": "a ReadWriteMany PersistentVolumeClaim that holds job.out_dir, for the checkpoints all pods write",
}


def job_name(run_name: str) -> str:
    """``ssl-<run name>`` as a DNS-1123 label of at most ``MAX_NAME`` characters (also the Service's name). A run name
    that had to be changed to fit gets a hash of itself appended, so that different run names keep different Jobs."""
    name = "ssl-" + re.sub(r"[^a-z0-9]+", "-", run_name.lower()).strip("-")
    if name != f"ssl-{run_name}" or len(name) > MAX_NAME:
        digest = hashlib.sha256(run_name.encode()).hexdigest()[:6]
        name = f"{name[:MAX_NAME - 7].rstrip('-')}-{digest}"
    return name


def mount_path(job: K8sJob, run_dir: Path) -> Path:
    """Where the PVC is mounted: ``--mount-path``, else the run's ``job.out_dir``."""
    # ('..' and '.' taken out: /pvc/runs/../runs had been called a symbolic link to /pvc/runs)
    return Path(os.path.normpath(job.mount_path)) if job.mount_path else Path(run_dir).resolve().parent


def check_shared(job: K8sJob, run_dir: Path, paths: dict[str, str]) -> Path:
    """The resolved run directory; ValueError naming the config key whose path (``paths``: key -> path the pods open)
    does not lie on the PVC, the only file system the pods share with this host and with each other."""
    run_dir = Path(run_dir).resolve()
    mount = mount_path(job, run_dir)
    for key, path in {"job.out_dir": str(run_dir.parent), **paths}.items():
        if not Path(path).is_absolute():
            raise ValueError(f"{key}: {path!r} is relative, and the pods start elsewhere; give an absolute path under "
                             f"--mount-path {mount}")
        if not Path(path).resolve().is_relative_to(mount):
            linked = (f" (--mount-path {mount} is a symbolic link to {mount.resolve()}, and the pods are given paths "
                      "as this host resolves them: give that one)" if mount.resolve() != mount else "")
            raise ValueError(f"{key}: {Path(path).resolve()} is not under --mount-path {mount}, where the pods mount "
                             f"--pvc {job.pvc}; they would not see it{linked}")
    return run_dir


def render_manifests(job: K8sJob, run_dir: Path, *, python: str = "python", workdir: str | None = None) -> str:
    """The Service and the Job for ``run_dir`` (which holds the validated ``config.yaml``), as multi-document YAML.

    ``python``: the interpreter on the image's PATH that has ssl-pretrain; ``workdir``: the pods' working directory
    (default: the image's)."""
    run_dir = Path(run_dir).resolve()
    name = job_name(run_dir.name)
    head = f"{name}-0.{name}"  # the pod's hostname in the Service's subdomain (the pods' DNS search path completes it)
    labels = {"app.kubernetes.io/name": "ssl-pretrain", "app.kubernetes.io/instance": name}
    meta = {"name": name, **({"namespace": job.namespace} if job.namespace else {}), "labels": labels}
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": copy.deepcopy(meta),
        "spec": {
            "clusterIP": "None",
            "selector": {"batch.kubernetes.io/job-name": name},
            "publishNotReadyAddresses": True,  # the head's name resolves as soon as it has an IP (no readiness probe)
            "ports": [{"name": "ray", "port": job.ray_port}],
        },
    }
    settings = {
        "PRETRAIN_RUN_DIR": str(run_dir), "PRETRAIN_HEAD_HOST": head, "PRETRAIN_RAY_PORT": job.ray_port,
        "PRETRAIN_DASHBOARD_PORT": job.dashboard_port, "PRETRAIN_NODES": job.nodes,
        "PRETRAIN_CPUS_PER_NODE": job.cpus_per_node, "PRETRAIN_GPUS_PER_NODE": job.gpus_per_node,
        "PRETRAIN_JOIN_TIMEOUT": job.join_timeout, "PRETRAIN_K8S_JOB": name,
        "PRETRAIN_STOP_WAIT": max(job.termination_grace - STOP_MARGIN, 0),
        # every process of the Ray cluster must agree on token auth (Ray may have turned it on through ~/.ray)
        "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
        "PYTHONUNBUFFERED": "1",
    }
    # from the downward API: the pod's IP (its Ray node's address), and its name and namespace (MLflow tags of the run)
    env = [{"name": var, "valueFrom": {"fieldRef": {"fieldPath": field}}}
           for var, field in DOWNWARD_API.items()]
    env += [{"name": k, "value": str(v)} for k, v in settings.items()]
    if job.http_auth_secret:  # the token stays in the Secret, out of the manifest written to the run directory
        env.append({"name": AUTH_ENV, "valueFrom": {"secretKeyRef": {"name": job.http_auth_secret,
                                                                          "key": "authorization"}}})
    # CPU is requested, not limited (a limit throttles the loader threads); memory is both, so the pod is never killed
    # for memory its node lent it; GPUs are limits by Kubernetes' rule for extended resources.
    requests = {"cpu": str(job.cpus_per_node), **({"memory": job.memory_per_node} if job.memory_per_node else {})}
    limits = {**({"memory": job.memory_per_node} if job.memory_per_node else {}),
              **({"nvidia.com/gpu": job.gpus_per_node} if job.gpus_per_node else {})}
    container = {
        "name": CONTAINER, "image": job.image, "command": [python, "-m", "cluster.k8s_pod"],
        **({"workingDir": workdir} if workdir else {}),
        "env": env,
        "ports": [{"name": "ray", "containerPort": job.ray_port},
                  {"name": "dashboard", "containerPort": job.dashboard_port}],
        "resources": {"requests": requests, **({"limits": limits} if limits else {})},
        "volumeMounts": [{"name": "run", "mountPath": str(mount_path(job, run_dir))},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    pod = {
        "subdomain": name,  # with the Service of that name: pod <job>-<i> is <job>-<i>.<job> in DNS
        "restartPolicy": "Never",
        # the pod's pause container is PID 1 and reaps the processes Ray orphans; with the supervisor as PID 1 (it
        # waits for its own children only) they would stay zombies for the life of a weeks-long run
        "shareProcessNamespace": True,
        # SIGTERM: the run checkpoints and ends, then the driver and Ray stop (cluster.k8s_pod); give them time to
        "terminationGracePeriodSeconds": job.termination_grace,
        **({"serviceAccountName": job.service_account} if job.service_account else {}),
        **({"priorityClassName": job.priority_class} if job.priority_class else {}),
        "containers": [container],
        "volumes": [{"name": "run", "persistentVolumeClaim": {"claimName": job.pvc}},
                    # Ray's object store and the loaders' shared memory: a container's own /dev/shm is 64 MB
                    {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    spec = {
        "completionMode": "Indexed",
        "completions": job.nodes,
        "parallelism": job.nodes,
        "successPolicy": {"rules": [{"succeededIndexes": "0"}]},  # the head's driver succeeded: the run is done
        "backoffLimit": job.restarts,
        "podFailurePolicy": {"rules": [  # the first rule that matches a failed pod decides
            {"action": "FailJob",  # a config error, which no new start can fix; a run stopped as asked
             "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [BAD_INPUT, STOPPED]}},
            {"action": "Ignore",  # a node pod whose head failed or was replaced: its replacement joins the new head
             "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [LOST_HEAD]}},
            {"action": "Ignore",  # preemption, eviction, node drain: start again and resume, as Slurm requeues
             "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": {"metadata": {"labels": dict(labels)}, "spec": pod},  # copies: no YAML anchors
    }
    job_doc = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}
    path = run_dir / "k8s" / "job.yaml"
    ns = f" -n {job.namespace}" if job.namespace else ""
    header = (f"# Written by `pretrain submit k8s` for the run in {run_dir}.\n"
              f"# A headless Service (the pods' DNS names) and an Indexed Job of {job.nodes} pods: a Ray head in pod "
              "0, a Ray node in each\n"
              f"# other, then `pretrain train --resume {run_dir}` in pod 0. Every start of the Job resumes from "
              "the latest checkpoint.\n"
              f"# Start it again: kubectl{ns} delete -f {path} --ignore-not-found; kubectl{ns} create -f {path}\n")
    return header + yaml.safe_dump_all([service, job_doc], sort_keys=False)


def write_manifests(job: K8sJob, run_dir: Path, **kw) -> Path:
    """Render the manifests into ``<run_dir>/k8s/job.yaml``; returns its path."""
    path = Path(run_dir).resolve() / "k8s" / "job.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_manifests(job, run_dir, **kw))
    return path


def find_kubectl() -> str:
    """Path of ``kubectl``; ValueError when this host cannot submit to Kubernetes."""
    found = shutil.which("kubectl")
    if found is None:
        raise ValueError("kubectl: not found on PATH (install it and point its context at the cluster, or use "
                         "--dry-run)")
    return found


def submit(manifest: Path, *, wait: bool = False) -> int:
    """``kubectl create`` the manifest's Service and Job; returns 0, or with ``wait``, when the Job has ended, 0 if it
    is complete and 1 if it failed.

    ``create``, not ``apply``: applying the manifest of a finished Job of the same run would leave it finished and
    start nothing."""
    docs = [d for d in yaml.safe_load_all(Path(manifest).read_text()) if d]
    meta = next(d for d in docs if d["kind"] == "Job")["metadata"]
    kubectl = [find_kubectl(), *(["--namespace", meta["namespace"]] if "namespace" in meta else [])]
    status = subprocess.run([*kubectl, "create", "-f", str(manifest)]).returncode
    if status != 0:  # the run directory stays (a resume's must): say how to submit it, not as a new run again
        raise NotSubmitted(f"kubectl: refused {manifest} (exit status {status}; its message is above); the run is "
                           f"written: once the cluster takes it, `kubectl create -f {manifest}` or `pretrain submit "
                           f"k8s --resume {Path(manifest).resolve().parent.parent}` and the job options. If a Job of "
                           f"this run is still there: kubectl delete -f {manifest}")
    name = meta["name"]
    print(f"Submitted Kubernetes Job {name}; the driver's log: kubectl logs -f -l "
          f"batch.kubernetes.io/job-name={name},batch.kubernetes.io/job-completion-index=0", flush=True)
    return wait_for(kubectl, name) if wait else 0


def wait_for(kubectl: list[str], name: str) -> int:
    """0 once Job ``name`` is Complete, 1 once it Failed. ``kubectl wait`` waits for one condition only, so one waits
    for each and the first to be met decides."""
    waits = {cond: subprocess.Popen([*kubectl, "wait", f"--for=condition={cond}", "--timeout=8760h", f"job/{name}"],
                                    stdout=subprocess.DEVNULL)
             for cond in ("Complete", "Failed")}
    try:
        while True:
            for cond, proc in waits.items():
                status = proc.poll()
                if status == 0:
                    print(f"Kubernetes Job {name}: {cond}", flush=True)
                    return 0 if cond == "Complete" else 1
                if status is not None:
                    raise ValueError(f"kubectl wait: stopped with status {status} before Job {name} ended (its "
                                     "message is above)")
            time.sleep(1)
    finally:
        for proc in waits.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
