"""`pretrain submit k8s`: option checks, the rendered manifests against Kubernetes' own schemas, and the pods they
describe run for real on this machine (two "pods" on 127.0.0.2 and 127.0.0.3, each in its own PID, mount and UTS
namespaces with the pod's hostname and the head's DNS name in a private /etc/hosts), including a restart that
resumes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from cluster.k8s import STOPPED
from tests.util import free_port, run_cli, worker_placement

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "simclr_digits.yaml"
REQUIRED = ["--image", "registry.example.com/ssl-pretrain:0.1.0", "--pvc", "runs"]
POD_IPS = ("127.0.0.2", "127.0.0.3")  # loopback addresses, as in tests/slurm_fixture.py: two hosts, no traffic out


def _submit(args: list[str], tmp_path: Path, *, env: dict | None = None):
    """`pretrain submit k8s` with the digits recipe into ``tmp_path``, in this process (tests.util.run_cli)."""
    return run_cli(["submit", "k8s", "--config", str(RECIPE), "--set", f"job.out_dir={tmp_path / 'runs'}",
                    "--set", f"data.cache_dir={tmp_path / 'cache'}", *args], env=env)


def _manifests(run: Path) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((run / "k8s" / "job.yaml").read_text())}


@pytest.mark.parametrize("args, message", [
    (["--pvc", "runs"], "--image: required (the container image that has ssl-pretrain installed"),
    (["--image", "ssl:1"], "--pvc: required (a ReadWriteMany PersistentVolumeClaim"),
    ([*REQUIRED, "--nodes", "0"], "--nodes: must be an integer >= 1, got 0"),
    ([*REQUIRED, "--memory-per-node", "512m"], "--memory-per-node: '512m' is not a memory quantity with a unit"),
    ([*REQUIRED, "--namespace", "ML_team"], "--namespace: 'ML_team' is not a Kubernetes namespace name"),
    ([*REQUIRED, "--ray-port", "70000"], "--ray-port: must be an integer in 1..65535, got 70000"),
    ([*REQUIRED, "--termination-grace", "0"], "--termination-grace: must be an integer >= 1, got 0"),
    # (it had switched the checkpoint at a pod's stop off, silently)
    ([*REQUIRED, "--termination-grace", "50"], "--termination-grace: 50 s leaves a stopped pod's run no time to "
                                               "checkpoint after its step (50 s are kept for stopping the driver and "
                                               "Ray); give more than 50"),
    ([*REQUIRED, "--mount-path", "runs"], "--mount-path: must be an absolute directory other than /, got 'runs'"),
    ([*REQUIRED, "--cpus-per-node", "1", "--set", "job.num_workers=3"], "job.num_workers: 3 CPU workers need 3 Ray "
                                                                        "CPUs, the job has 1 (1 nodes x 1 --cpus-"),
    ([*REQUIRED, "--nodes", "3", "--set", "job.num_workers=2"], "job.num_workers: 2 CPU workers leave at least 1 of "
                                                                "the 3 --nodes idle; give --nodes 2 or more"),
    # a relative dataset is the one beside the command (pretrain.config), here not on the volume
    ([*REQUIRED, "--set", "data.source=shards/digits"], f"data.source: {Path.cwd() / 'shards/digits'} is not under "
                                                        "--mount-path "),
    ([*REQUIRED, "--set", "eval.dataset=shards/mine"], f"eval.dataset: {Path.cwd() / 'shards/mine'} is not under "
                                                       "--mount-path "),
    ([*REQUIRED, "--set", "job.nope=1"], "job.nope"),
])
def test_bad_options_fail_before_anything_is_written(tmp_path, args, message):
    """A bad option or config is one line on stderr, exit status 2, and no run directory."""
    proc = _submit([*args, "--set", "job.run_name=bad", "--dry-run"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("run_name, expected", [
    ("simclr-20261127-190000", "ssl-simclr-20261127-190000"),
    ("My_Run", None), ("my-run", "ssl-my-run"), ("___", None), ("r" * 48, "ssl-" + "r" * 48), ("r" * 49, None),
])
def test_job_names_are_dns_labels_that_fit_pod_hostnames(run_name, expected):
    """A run name that is a DNS label is kept; any other is made one, with a hash of the original, short enough that
    the pods' hostnames <job>-<index> fit 63 characters."""
    from cluster.k8s import MAX_NAME, job_name

    name = job_name(run_name)
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= MAX_NAME == 52
    if expected:
        assert name == expected
    else:
        assert re.search(r"-[0-9a-f]{6}$", name) and name != job_name(run_name.upper() + "x")


def test_run_dir_off_the_volume_is_refused(tmp_path):
    """A run directory the pods would not see (not under --mount-path, where the PVC is) is refused up front."""
    proc = _submit([*REQUIRED, "--mount-path", "/mnt/runs", "--set", "job.run_name=off", "--dry-run"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: job.out_dir: {tmp_path / 'runs'} is not under "
                                                     "--mount-path /mnt/runs, where the pods mount --pvc runs; they "
                                                     "would not see it")
    assert not (tmp_path / "runs").exists()


def test_a_tokenizer_off_the_volume_and_a_linked_mount_path_are_refused(tmp_path):
    """BEiT's tokenizer run is opened by the pods too: off the volume, refused like the data (it had been let through);
    a --mount-path that is a symbolic link is refused saying so and naming the folder it links to (the pods are given
    the paths this host resolves); one with '..' in it is taken as the folder it names."""
    from tests.pretrain.test_beit import SMALL, _save_tokenizer

    volume = tmp_path / "volume"
    tok = _save_tokenizer(tmp_path / "tok")
    beit = ROOT / "configs" / "beit_digits.yaml"
    proc = run_cli(["submit", "k8s", "--config", str(beit), *REQUIRED, "--set", f"job.out_dir={volume}",
                    "--set", f"data.cache_dir={volume / 'cache'}", "--set", f"method.tokenizer={tok}",
                    *(x for s in SMALL[:1] for x in ("--set", s)), "--set", "job.run_name=b", "--dry-run"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: method.tokenizer: {tok} is not under --mount-path {volume}, where the pods mount --pvc runs; they "
        "would not see it"), proc.stderr
    volume.mkdir()
    (tmp_path / "link").symlink_to(volume)
    proc = _submit([*REQUIRED, "--mount-path", str(tmp_path / "link"), "--set", f"job.out_dir={tmp_path / 'link'}",
                    "--set", "job.run_name=l", "--dry-run"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: job.out_dir: {volume} is not under --mount-path {tmp_path / 'link'}, where the pods mount --pvc "
        f"runs; they would not see it (--mount-path {tmp_path / 'link'} is a symbolic link to {volume}, and the pods "
        "are given paths as this host resolves them: give that one)"), proc.stderr
    # a '..' in it is no link: taken out, the path is the volume's (it had been refused as a link to itself)
    proc = _submit([*REQUIRED, "--mount-path", str(volume / ".." / "volume"), "--set", f"job.out_dir={volume}",
                    "--set", "job.run_name=d", "--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    job = _manifests(volume / "d")["Job"]
    assert job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == str(volume)


def test_no_kubectl_is_one_line(tmp_path):
    """Submitting from a host without kubectl says so before writing the run."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # the venv's bin: python, no kubectl
    proc = _submit([*REQUIRED, "--set", "job.run_name=nokc"], tmp_path, env=env)
    assert proc.returncode == 2 and "kubectl: not found on PATH" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs").exists()


def test_kubectl_refusal_is_one_line(tmp_path):
    """A Job kubectl cannot create (here: its API server refuses connections) ends the command with one line and
    status 2; the run and its manifests are kept, and the line says how to submit them: with --resume, which takes the
    run (the same submit again would find the run directory taken)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "none", "cluster": {"server": f"https://127.0.0.1:{free_port()}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "none", "user": "u"}}]}))
    proc = _submit([*REQUIRED, "--set", "job.run_name=kr"], tmp_path, env={**os.environ, "KUBECONFIG": str(kubeconfig)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    manifest = tmp_path / "runs" / "kr" / "k8s" / "job.yaml"
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: kubectl: refused {manifest} (exit status 1;")
    assert f"the run is written: once the cluster takes it, `kubectl create -f {manifest}` or `pretrain submit k8s " \
           f"--resume {manifest.parent.parent}` and the job options" in last
    assert manifest.is_file()
    again = run_cli(["submit", "k8s", "--resume", str(manifest.parent.parent), *REQUIRED, "--dry-run"])
    assert again.returncode == 0 and f"Kubernetes manifests: {manifest}" in again.stdout, again.stderr


def test_use_gpu_true_without_gpus_is_refused(tmp_path):
    """use_gpu true on pods that request no nvidia.com/gpu (Ray is told of none: the workers would wait for GPUs for
    ever) is one line, and nothing is written."""
    proc = _submit([*REQUIRED, "--set", "job.use_gpu=true", "--set", "job.run_name=g2", "--dry-run"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: job.use_gpu: true gives each worker a GPU, and the job asks for none; give --gpus-per-node N (one "
        "worker per GPU), or set job.use_gpu=false for CPU workers"), proc.stderr
    assert not (tmp_path / "runs").exists()


def test_gpu_dry_run_writes_config_and_valid_manifests(tmp_path):
    """On GPU nodes one worker per GPU: the run's config says 16 workers on GPU, and the manifests pass Kubernetes'
    OpenAPI schemas strictly (an unknown field fails) and ask for an Indexed Job of 2 pods with 8 GPUs each, done when
    pod 0 succeeds, with the PVC mounted over job.out_dir (64 digits a GPU: 16 x the recipe's 256 would be more than
    the 1,797 digits)."""
    import kubernetes_validate

    proc = _submit([*REQUIRED, "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-node", "64", "--memory-per-node",
                    "512Gi", "--namespace", "ml", "--priority-class", "high", "--restarts", "5",
                    "--termination-grace", "300", "--set", "job.run_name=g_1", "--set", "data.batch_size=64",
                    "--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "g_1"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["job"]["num_workers"] == 16 and cfg["job"]["use_gpu"] == "true"
    docs = _manifests(run)
    assert sorted(docs) == ["Job", "Service"]
    for version in ("1.33", kubernetes_validate.latest_version()):  # 1.33: successPolicy is GA
        for doc in docs.values():
            kubernetes_validate.validate(doc, version, strict=True)
    service, job = docs["Service"], docs["Job"]
    name = job["metadata"]["name"]
    assert re.fullmatch(r"ssl-g-1-[0-9a-f]{6}", name)  # "g_1" is no DNS label: changed, so made unique by a hash
    assert service["metadata"] == job["metadata"] and job["metadata"]["namespace"] == "ml"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == ("Indexed", 2,
                                                                                                         2, 5)
    assert spec["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    assert spec["podFailurePolicy"]["rules"][0] == {  # a config error, or a run stopped as asked: no new start
        "action": "FailJob", "onExitCodes": {"containerName": "train", "operator": "In", "values": [2, STOPPED]}}
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] and pod["restartPolicy"] == "Never"
    assert pod["priorityClassName"] == "high"
    assert pod["shareProcessNamespace"] is True  # PID 1 is the pause container, which reaps what Ray orphans
    assert pod["terminationGracePeriodSeconds"] == 300
    (container,) = pod["containers"]
    assert container["image"] == REQUIRED[1] and container["command"] == ["python", "-m", "cluster.k8s_pod"]
    assert container["resources"] == {"requests": {"cpu": "64", "memory": "512Gi"},
                                      "limits": {"memory": "512Gi", "nvidia.com/gpu": 8}}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}} and env["RAY_AUTH_MODE"] == "disabled"
    assert env["PRETRAIN_HEAD_HOST"] == f"{name}-0.{name}" and env["PRETRAIN_RUN_DIR"] == str(run)
    assert (env["PRETRAIN_NODES"], env["PRETRAIN_GPUS_PER_NODE"], env["PRETRAIN_RAY_PORT"]) == ("2", "8", "6379")
    assert env["PRETRAIN_STOP_WAIT"] == "250"  # the run's time to checkpoint and end: all but 50 s of the grace
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["run"]["persistentVolumeClaim"] == {"claimName": "runs"} and mounts["run"] == str(tmp_path / "runs")
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"} and mounts["dshm"] == "/dev/shm"


def _pod_env(container: dict, index: int, ip: str, root: Path) -> dict[str, str]:
    """The container's environment as Kubernetes sets it: the manifest's variables (POD_IP from the downward API)
    and JOB_COMPLETION_INDEX, over this machine's environment standing in for the image's, with this venv's python
    first on PATH as the image's is. Only python: the venv's other tools stay out of PATH (its ninja is not the
    system's that the rest of the suite builds DeepSpeed's op with, and the two would rebuild it for each other)."""
    image_bin = root / "image-bin"
    image_bin.mkdir(exist_ok=True)
    if not (image_bin / "python").is_file():  # written once: rewritten for the next pod while this pod's shell looked
        # it up, it was half there, and the shell took the next python on PATH (not the venv's: No module 'cluster')
        script = image_bin / "python.tmp"
        script.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
        script.chmod(0o755)
        script.replace(image_bin / "python")
    env = {**os.environ, "PATH": f"{image_bin}:{os.environ['PATH']}"}
    job = next(var["value"] for var in container["env"] if var["name"] == "PRETRAIN_K8S_JOB")
    pod = {"status.podIP": ip, "metadata.name": f"{job}-{index}-{uuid.uuid4().hex[:5]}",
           "metadata.namespace": "ml"}  # what the downward API gives; the name changes with every start
    for var in container["env"]:
        env[var["name"]] = pod[var["valueFrom"]["fieldRef"]["fieldPath"]] if "valueFrom" in var else var["value"]
    return {**env, "JOB_COMPLETION_INDEX": str(index)}


def _namespaces_missing() -> str | None:
    if os.geteuid() != 0:
        return "running the pods in their own mount and PID namespaces needs root"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) not installed"
    return None


def _start_pod(job: dict, index: int, log: Path) -> subprocess.Popen:
    """Pod ``index`` of ``job`` as Kubernetes would run it: the manifest's command as PID 1 of new PID, mount and UTS
    namespaces (all its processes end with it), the hostname <job>-<index>, and an /etc/hosts as the kubelet writes
    it (the pod's own names) plus the cluster DNS's answer for the head's name."""
    pod_spec = job["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    hostname = f"{job['metadata']['name']}-{index}"
    head_host = next(e["value"] for e in container["env"] if e["name"] == "PRETRAIN_HEAD_HOST")
    hosts = log.with_suffix(".hosts")
    hosts.write_text(f"127.0.0.1 localhost\n{POD_IPS[index]} {hostname}.{pod_spec['subdomain']} {hostname}\n"
                     f"{POD_IPS[0]} {head_host}\n")
    cmd = ["unshare", "--mount", "--uts", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c",
           'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"', str(hosts), hostname,
           *container["command"], *container.get("args", [])]
    with log.open("ab") as out:
        return subprocess.Popen(cmd, env=_pod_env(container, index, POD_IPS[index], log.parent), stdout=out,
                                stderr=subprocess.STDOUT, cwd=log.parent)


def _stop_pods(*procs: subprocess.Popen, timeout: float = 60) -> list[int]:
    """SIGTERM to each pod's PID 1, as the kubelet sends it; their exit statuses."""
    for proc in procs:
        if proc.poll() is None:
            for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
                os.kill(int(pid), signal.SIGTERM)
    return [proc.wait(timeout=timeout) for proc in procs]


def _registered_checkpoints(run: Path) -> list:
    """Checkpoints Ray has registered (every rank reported; a checkpoint_* directory alone may be half written)."""
    try:
        return json.loads((run / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []


def test_data_server_token_goes_to_the_pods_through_a_secret(tmp_path):
    """Data served over HTTP with a token (PRETRAIN_HTTP_AUTHORIZATION here, checked against a real server on
    127.0.0.1): without --http-auth-secret the pods would get 401s, so submit refuses in one line; with it the pods
    take the token from the Secret (not written into the manifest), and the manifests still pass the schemas."""
    import kubernetes_validate

    from data_pipeline.shards import write_shards
    from tests.http_fixture import serve

    write_shards("digits", tmp_path / "served" / "digits", progress=False)
    env = {**os.environ, "PRETRAIN_HTTP_AUTHORIZATION": "Bearer s3cr3t"}
    with serve(tmp_path / "served", token="Bearer s3cr3t") as (base, _):
        source = ["--set", f"data.source={base}/digits"]
        proc = _submit([*REQUIRED, *source, "--set", "job.run_name=tok", "--dry-run"], tmp_path, env=env)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
            "error: data.source: its server takes the PRETRAIN_HTTP_AUTHORIZATION set here, which the pods would not "
            "have; put it in a Secret (kubectl create secret generic NAME --from-literal=authorization="
            "\"$PRETRAIN_HTTP_AUTHORIZATION\") and pass --http-auth-secret NAME")
        assert not (tmp_path / "runs" / "tok").exists()
        proc = _submit([*REQUIRED, *source, "--http-auth-secret", "data-token", "--set", "job.run_name=tok",
                        "--dry-run"], tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
    job = _manifests(tmp_path / "runs" / "tok")["Job"]
    env_vars = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "PRETRAIN_HTTP_AUTHORIZATION",
            "valueFrom": {"secretKeyRef": {"name": "data-token", "key": "authorization"}}} in env_vars
    assert "s3cr3t" not in (tmp_path / "runs" / "tok" / "k8s" / "job.yaml").read_text()
    kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)


def test_pod_without_its_settings_is_one_line():
    """The pod entrypoint outside a Job's pod: one line naming the missing variable, exit status 2 (FailJob)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRETRAIN_") and k != "JOB_COMPLETION_INDEX"}
    proc = subprocess.run([sys.executable, "-m", "cluster.k8s_pod"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: JOB_COMPLETION_INDEX: not set")


def test_node_pod_without_a_head_fails_after_join_timeout(tmp_path):
    """A node pod whose head never answers gives up after --join-timeout with one line, exit status 1."""
    from cluster.k8s import K8sJob, render_manifests

    job = K8sJob(image=REQUIRED[1], pvc="runs", nodes=2, ray_port=free_port(), join_timeout=2)
    docs = {d["kind"]: d for d in yaml.safe_load_all(render_manifests(job, tmp_path / "nohead"))}
    (container,) = docs["Job"]["spec"]["template"]["spec"]["containers"]
    env = {**_pod_env(container, 1, POD_IPS[1], tmp_path), "PRETRAIN_HEAD_HOST": "localhost"}  # nothing listens there
    started = time.monotonic()
    pod = subprocess.run(container["command"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert pod.returncode == 1 and time.monotonic() - started < 30
    assert pod.stderr.strip().splitlines()[-1].startswith(f"error: no Ray head at localhost:{env['PRETRAIN_RAY_PORT']}"
                                                          " within 2 s (it is 127.0.0.1, whose port")


@pytest.mark.slow
def test_pods_train_over_two_nodes_and_a_restart_resumes(tmp_path):
    """The rendered pods, started as Kubernetes would (command and environment from job.yaml, JOB_COMPLETION_INDEX,
    a pod IP each, the head's name resolvable), form a 2-node Ray cluster with one Train worker per node. Both pods are
    stopped (SIGTERM, as on preemption) after the first checkpoint: pod 0 asks the run to stop, the node pod keeps its
    Ray node up meanwhile, both ranks checkpoint after the step they are on and end, and the pods exit cleanly; a second
    start of the same pods (the Job starting them again) resumes from that very step, and a user's `pretrain stop` then
    ends it and the Job (pod 0 exits STOPPED, which the Job fails on, not starting it again); a third start resumes
    from that step and completes every step, each once; pod 0 exits 0 (the Job's success) and the node pod stops when
    told to, as Kubernetes then tells it; no pod leaves its Ray session dir behind."""
    why = _namespaces_missing()
    if why:
        pytest.skip(why)
    sets = ["job.max_steps=48", "job.log_every=1", "job.ckpt_every=8", "optim.warmup_steps=1", "data.batch_size=32",
            "eval.enabled=false", "eval.knn_every=0", "job.progress=false", "job.run_name=k8", "job.num_workers=2"]
    proc = _submit([*REQUIRED, "--nodes", "2", "--cpus-per-node", "1", "--ray-port", str(free_port()),
                    "--dashboard-port", str(free_port()), "--join-timeout", "120"]
                   + [a for s in sets for a in ("--set", s)] + ["--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "k8"
    job = _manifests(run)["Job"]
    head_host = next(e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
                     if e["name"] == "PRETRAIN_HEAD_HOST")
    # DeepSpeed's CPU op, built (or found) here as the image would have it: a pod killed while building it would leave
    # the shared build directory locked
    from pretrain.engine import prebuild_ops

    prebuild_ops()
    logs = [tmp_path / f"pod-{i}.log" for i in range(2)]
    pod_ray_dirs = f"sslray-{job['metadata']['name']}-*"  # each pod's Ray session dir, named after the pod
    pods: list[subprocess.Popen] = []
    try:
        # first start: stopped (as on preemption or a deleted pod) once a checkpoint is registered
        pods = [_start_pod(job, i, logs[i]) for i in range(2)]
        deadline = time.monotonic() + 300
        while not _registered_checkpoints(run):
            assert time.monotonic() < deadline and pods[0].poll() is None, logs[0].read_text()[-6000:]
            time.sleep(0.5)
        assert len(list(Path("/tmp").glob(pod_ray_dirs))) == 2
        assert _stop_pods(*pods, timeout=150) == [143, 143], logs[0].read_text()[-6000:]
        first = [log.read_text() for log in logs]
        assert "ssl-pretrain: pod 0 stopped (SIGTERM)" in first[0] and "pod 1 stopped (SIGTERM)" in first[1]
        assert "SIGTERM: asking the run to checkpoint after the step it is on and stop (up to 70 s)" in first[0]
        stopped = re.search(r"Stopped at step (\d+) as asked, checkpointed; resume with --resume", first[0])
        assert stopped and "ssl-pretrain: the driver exited with status 75" in first[0], first[0][-6000:]

        # second start: resumes; a user's `pretrain stop` (not Kubernetes' SIGTERM) has the run checkpoint and end,
        # and pod 0 exits STOPPED, which fails the Job (the driver's 75 had been the node pods' LOST_HEAD, which the
        # Job ignores: it would have started pod 0 again and resumed the run, undoing the stop)
        pods = [_start_pod(job, i, logs[i]) for i in range(2)]
        while "reading on from its data position" not in logs[0].read_text()[len(first[0]):]:
            assert time.monotonic() < deadline + 300 and pods[0].poll() is None, logs[0].read_text()[-6000:]
            time.sleep(0.2)
        asked = subprocess.run([sys.executable, "-m", "pretrain.cli", "stop", str(run)], capture_output=True,
                               text=True, cwd=ROOT)
        assert asked.returncode == 0, asked.stderr
        assert pods[0].wait(timeout=150) == STOPPED, logs[0].read_text()[-6000:]
        assert _stop_pods(pods[1]) == [143]  # what the Job does to its other pods once it failed
        second = [log.read_text()[len(f):] for log, f in zip(logs, first)]
        again = re.search(r"Stopped at step (\d+) as asked, checkpointed; resume with --resume", second[0])
        assert again and "ssl-pretrain: the driver exited with status 75\nssl-pretrain: the run stopped as asked, " \
            f"checkpointed; the Job ends here (status {STOPPED}, which fails it rather than start the pod again)" \
            in second[0], second[0][-6000:]
        assert int(again.group(1)) < 48

        # third start of the same pods: resumes and completes
        pods = [_start_pod(job, i, logs[i]) for i in range(2)]
        assert pods[0].wait(timeout=300) == 0, logs[0].read_text()[-6000:]
        assert _stop_pods(pods[1]) == [143]  # what the Job does to the other pods once pod 0 succeeded
    finally:
        running = [p for p in pods if p.poll() is None]
        try:
            _stop_pods(*running)
        except subprocess.TimeoutExpired:
            for p in running:
                p.kill()  # unshare --kill-child: the pod's PID 1 goes, and its namespace with it
                p.wait()
    assert not list(Path("/tmp").glob(pod_ray_dirs))  # each start's Ray session dir went with its pod
    text = logs[0].read_text()[len(first[0]) + len(second[0]):]
    assert text.count(f"Ray head {POD_IPS[0]}:") == 1 and "2 nodes up" in text
    node_log = logs[1].read_text()[len(first[1]) + len(second[1]):]
    assert f"Ray node {POD_IPS[1]} joining {POD_IPS[0]}:" in node_log and f"({head_host})" in node_log
    resume = r"Resumed from .* at step (\d+) \(epoch \d+\), reading on from its data position"
    assert re.search(resume, second[0]).group(1) == stopped.group(1), second[0][-6000:]
    resumed = re.search(resume, text)
    assert resumed and resumed.group(1) == again.group(1), text[-6000:]
    placed = worker_placement(text)
    assert sorted(placed) == ["0", "1"] and set(placed.values()) == set(POD_IPS), placed
    with (run / "metrics.csv").open() as f:
        steps = [int(line.split(",")[0]) for line in list(f)[1:]]
    assert steps == list(range(1, 49))  # each step trained once
    # the MLflow run names the Job, its namespace and the pod rank 0 ran in
    from mlflow import MlflowClient

    tags = MlflowClient(f"sqlite:///{run.parent / 'mlflow.db'}").get_run(
        (run / "mlflow_run_id").read_text().strip()).data.tags
    name = job["metadata"]["name"]
    assert tags["k8s.job"] == name and tags["k8s.namespace"] == "ml", tags
    assert re.fullmatch(rf"{name}-[01]-[0-9a-f]{{5}}", tags["k8s.pod"]), tags
    # the run keeps every start's log of each pod, as its pods printed it
    kept = [(run / "k8s" / f"pod-{i}.log").read_text() for i in range(2)]
    assert kept[0].count("ssl-pretrain: pod 0 started") == 3 and "pod 0 stopped (SIGTERM)" in kept[0]
    assert kept[0].rstrip().endswith("ssl-pretrain: the driver exited with status 0") and resumed.group(0) in kept[0]
    assert kept[1].count(f"Ray node {POD_IPS[1]} joining") == 3 and kept[1].count("pod 1 stopped (SIGTERM)") == 3
