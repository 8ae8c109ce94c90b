"""A real MLflow tracking server on 127.0.0.1 for the whole test session.

Import the fixture into a conftest (``from tests.mlflow_fixture import mlflow_server``). The server runs with a sqlite
backend and proxied artifacts in a temporary folder, and its whole process group is killed at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.util import free_port

START_TIMEOUT_S = 90.0



def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=1.0) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def serving(root, port: int):
    """``mlflow server`` on 127.0.0.1:``port`` over the sqlite store and artifacts in ``root`` until the block ends
    (its process group killed then); yields its http URI. The same ``root`` and ``port`` serve the same runs again."""
    uri = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "mlartifacts"),
    ]  # fmt: skip
    # the server's background job runner spawns several huey consumers; tests need none of them
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "ab")  # noqa: SIM115 - closed after the server stops
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (root / "server.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"mlflow server did not come up at {uri} (exit code {proc.poll()}):\n{tail}")
            time.sleep(0.25)
        yield uri
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the CLI, uvicorn and its workers share this new process group
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers (uvicorn workers) still in the group
        except ProcessLookupError:
            pass
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """http URI of a live ``mlflow server`` (sqlite backend, artifacts served from a tmp folder)."""
    with serving(tmp_path_factory.mktemp("mlflow_server"), free_port()) as uri:
        yield uri
