"""Where DeepSpeed's JIT-compiled op is built, and the build locks a killed process leaves behind."""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_virtual_environment_builds_into_itself():
    """Inside a virtual environment the op is built in it (two installs never rebuild over each other's build);
    a TORCH_EXTENSIONS_DIR set by the user is kept."""
    code = "import os, pretrain.engine; print(os.environ['TORCH_EXTENSIONS_DIR'])"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if sys.prefix != sys.base_prefix:
        assert out.stdout.strip() == os.path.join(sys.prefix, "torch_extensions")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "TORCH_EXTENSIONS_DIR": "/tmp/mine"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "/tmp/mine"


def test_only_stale_build_locks_are_removed(tmp_path, monkeypatch, capsys):
    """A lock older than a build could take is removed, saying so; a build's current lock and the built op stay."""
    from pretrain.engine import STALE_BUILD_LOCK_S, clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    # torch's layout under a set TORCH_EXTENSIONS_DIR (an op's folder) and under its default (a folder above it)
    stale, fresh = tmp_path / "op_a" / "lock", tmp_path / "py311_cpu" / "op_b" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
        (lock.parent / f"{lock.parent.name}.so").write_bytes(b"\x7fELF")
    old = time.time() - STALE_BUILD_LOCK_S - 60
    os.utime(stale, (old, old))
    assert clear_stale_build_locks() == [stale]
    os.utime(fresh, (old, old))
    assert clear_stale_build_locks(max_age_s=2 * STALE_BUILD_LOCK_S) == []
    os.utime(fresh, None)
    assert not stale.exists() and fresh.exists() and (stale.parent / "op_a.so").exists()
    out = capsys.readouterr().out
    assert f"Removed {stale}, a build lock 11 min old left by a process killed while building" in out
    assert clear_stale_build_locks() == []
