"""The local directories ranks write checkpoints in before the session copies them
(``pretrain.checkpoint.staging_dir``): a process killed while holding one leaves it behind, and the next one made on
that host removes it."""

import os
import signal
import socket
import subprocess
import sys
import tempfile

from pretrain.checkpoint import STAGE_PREFIX, staging_dir

HOLD = """
import time
from pretrain.checkpoint import staging_dir
stage = staging_dir()
open(stage.name + "/partition.pt", "wb").write(b"x" * 1000)
print(stage.name, flush=True)
time.sleep(600)
"""


def _holding(tmp_path) -> tuple[subprocess.Popen, str]:
    """A process holding a stage with a file in it (the temp dir is ``tmp_path``), and the stage's path."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    return proc, proc.stdout.readline().strip()


def test_a_killed_process_stage_is_removed_by_the_next_one_and_a_running_one_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    killed, killed_stage = _holding(tmp_path)
    running, running_stage = _holding(tmp_path)
    try:
        killed.send_signal(signal.SIGKILL)  # as a preempted worker: no cleanup of its own
        killed.wait()
        host = socket.gethostname()
        assert os.path.basename(killed_stage).startswith(f"{STAGE_PREFIX}{host}-{killed.pid}-")
        assert os.path.isfile(f"{killed_stage}/partition.pt")
        elsewhere = tmp_path / f"{STAGE_PREFIX}other-{host}-{killed.pid}-abc_12"  # another host's, same pid
        elsewhere.mkdir()
        unknown = tmp_path / f"{STAGE_PREFIX}{host}-notapid-x"
        unknown.mkdir()
        with staging_dir() as mine:
            assert os.path.basename(mine).startswith(f"{STAGE_PREFIX}{host}-{os.getpid()}-")
            assert not os.path.exists(killed_stage)
            assert os.path.isfile(f"{running_stage}/partition.pt")
            assert elsewhere.is_dir() and unknown.is_dir()
        assert not os.path.exists(mine)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [os.path.basename(running_stage), elsewhere.name, unknown.name])
    finally:
        running.kill()
        running.wait()
