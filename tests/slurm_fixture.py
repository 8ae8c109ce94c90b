"""A real two-node Slurm cluster on this machine for the tests: munged, slurmctld and two slurmd (nodes n1, n2).

Everything is private to the fixture: its own munge key and socket, ports, spool/state/log directories and
``SLURM_CONF``. The nodes' addresses are 127.0.0.2 and 127.0.0.3 (loopback: no traffic leaves the machine), so what
runs on them, Ray nodes included, sees two hosts with two addresses. Needs Debian's slurmctld, slurmd, slurm-client
and munge (``.ci/run`` installs them); without them the tests that use it are skipped, saying so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.util import free_port

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "squeue", "scancel")
NODES = {"n1": "127.0.0.2", "n2": "127.0.0.3"}


def slurm_missing() -> str | None:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"Slurm not installed ({', '.join(missing)}): apt-get install slurmctld slurmd slurm-client munge"
    if os.geteuid() != 0:
        return "the private Slurm cluster runs its daemons as root"
    return None


def _conf(root: Path, cpus: int) -> str:
    nodes = "\n".join(f"NodeName={name} NodeHostname=localhost NodeAddr={addr} Port={free_port()} CPUs={cpus} "
                      f"RealMemory=4000 State=UNKNOWN" for name, addr in NODES.items())
    return f"""ClusterName=ssltest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdTimeout=60
KillWait=5
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@pytest.fixture(scope="module")
def slurm_cluster():
    """Environment (``SLURM_CONF``) of a running private 2-node Slurm cluster; stopped at the end of the module."""
    why = slurm_missing()
    if why:
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="sslslurm-", dir="/tmp"))  # short: unix socket paths are limited
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (root / "slurm.conf").write_text(_conf(root, cpus=os.cpu_count() or 2))
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    subprocess.run(["munged", f"--key-file={key}", f"--socket={root}/munge.sock", f"--pid-file={root}/munged.pid",
                    f"--log-file={root}/log/munged.log", f"--seed-file={root}/munge.seed", "--force"],
                   check=True, env=env)
    subprocess.run(["slurmctld"], check=True, env=env)
    for name in NODES:
        subprocess.run(["slurmd", "-N", name], check=True, env=env)
    deadline = time.monotonic() + 60
    while True:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        if len(states) == len(NODES) and all(s == "idle" for s in states.values()):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"Slurm nodes not idle: {states}\n" + (root / "log" / "slurmctld.log").read_text()[-2000:])
        time.sleep(1)
    try:
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--partition=debug"], env=env, capture_output=True)  # this cluster's jobs
        deadline = time.monotonic() + 30
        while subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip():
            if time.monotonic() > deadline:
                break
            time.sleep(1)
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)  # stops slurmctld and the slurmd
        pids = []
        for pid_file in ["munged.pid", "slurmctld.pid", *(f"slurmd-{n}.pid" for n in NODES)]:
            path = root / pid_file
            if path.is_file():
                try:
                    pids.append(int(path.read_text().split()[0]))
                    os.kill(pids[-1], 15)
                except (ProcessLookupError, ValueError):
                    pass
        deadline = time.monotonic() + 15  # the daemons gone before their state, spool and logs are removed
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        return not Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")  # a zombie has exited
    except OSError:
        return False
