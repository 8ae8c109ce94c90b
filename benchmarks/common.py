"""What every benchmark stamps on its results (the machine and the code it measured), and how they time and measure
memory."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


class Parser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (its usage block had come first, 3-6 lines), as the benchmarks'
    own refusals are."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the options)\n")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform's guess elsewhere) and the core count."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def git_sha() -> str:
    """Short HEAD sha, '+dirty' when the tree has changes; 'unknown' outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout
        return sha + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


CPU_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
"""A fixed mmap threshold turns off glibc's adaptive one, so every large buffer is mmapped and returned on free: RSS
then follows live memory and a warm-up's freed buffers do not hide the measured step's peak."""


def print_result(row: dict) -> None:
    """A worker process's answer to ``run_worker``: one ``RESULT <json>`` line on stdout."""
    print("RESULT " + json.dumps(row), flush=True)


def run_worker(script: str | Path, spec: dict, *, timeout_s: float,
               env: dict[str, str] | None = None) -> tuple[dict | None, str]:
    """``python script --worker <spec as JSON>`` in a fresh process (a CPU case whose peak RSS must be its own) ->
    (the row its ``print_result`` line carries, or None; why there is none: a timeout, or the exit status and the end
    of its stderr)."""
    try:
        proc = subprocess.run([sys.executable, str(script), "--worker", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout_s:.0f}s"
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]), ""
    last = (proc.stderr.strip().splitlines() or [""])[-1]  # the exception's line, not the middle of its traceback
    return None, f"worker failed (rc {proc.returncode}): {last[-300:]}"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, budget_s: float, max_reps: int = 100) -> float:
    """Median time of fn() in ms: warm-up (a second call unless the first took over budget_s / 4), then repeats
    until budget_s or max_reps (at least 3). On CUDA each repeat times a batch of calls lasting >= ~2 ms between
    CUDA events (launch overhead amortised, as in triton.testing.do_bench)."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    if first < budget_s / 4:
        t0 = time.perf_counter()
        fn()
        sync(device)
        first = time.perf_counter() - t0
    inner = max(1, min(1000, int(2e-3 / max(first, 1e-7)))) if device == "cuda" else 1
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_mb(step, device: str) -> tuple[float, str]:
    """Peak memory (MiB) of one step() above what was allocated before it, and how it was measured: on CUDA
    max_memory_allocated; on the CPU the peak RSS (VmHWM, reset through /proc/self/clear_refs), which counts
    everything the process touched (run each case in a fresh process with a fixed glibc mmap threshold, so freed
    buffers leave RSS: ``CPU_MALLOC_ENV``)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20, "cuda max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        method = "cpu peak RSS (VmHWM) delta"
    except OSError:
        method = "cpu ru_maxrss delta (lower bound)"
    before = rss_kb("VmRSS")
    step()
    return max(0, rss_kb("VmHWM") - before) / 1024, method


def at_least(low: float, kind: type = int):
    """An argparse ``type``: a number of ``kind`` that is ``>= low`` (argparse's one-line error names the option)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value

    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a number > 0."""
    value = at_least(0.0, float)(text)
    if not value > 0:  # 0, and NaN (which no comparison refuses)
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def csv_header(path: Path) -> list[str] | None:
    """The column names on the first line of the CSV at ``path``; None for a missing or empty file."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with path.open(newline="", errors="replace") as f:
        return next(csv.reader(f), [])


def csv_out(parser: argparse.ArgumentParser, option: str, path: Path, fields: list[str]) -> Path:
    """``path`` as the CSV a benchmark appends its rows (columns ``fields``) to, or ``parser.error`` (before anything is
    measured) for a directory, a path that cannot be written, or a file whose header is not this benchmark's: its
    columns, or an older version of them (a subset that has the first three, the stamp columns; ``append_csv`` rewrites
    such a file under the current header). A foreign CSV had been rewritten under these columns, or got rows under its
    own header."""
    if path.is_dir():
        parser.error(f"{option}: {path} is a directory; give the CSV file to append the rows to")
    from pretrain.config import ConfigError
    from pretrain.preflight import check_writable

    try:
        check_writable(path, option)  # a read-only folder, a file where a folder would be: before, not after
    except ConfigError as e:
        parser.error(str(e))
    existed = path.exists()
    if path.parent.is_dir():  # try it: a folder that takes no new files (/proc) passes the permission check
        try:
            path.open("a").close()
        except OSError as e:
            parser.error(f"{option}: {path} cannot be written ({e.strerror or type(e).__name__})")
        finally:
            if not existed:
                path.unlink(missing_ok=True)
    header = csv_header(path)
    if header is not None and not (len(header) > 1 and set(header) <= set(fields) and set(fields[:3]) <= set(header)):
        parser.error(f"{option}: {path} is not a CSV of this benchmark's rows (its header is not "
                     f"{','.join(fields[:3])},...); give a new file or one this benchmark wrote")
    return path


def append_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """Append ``rows`` to the CSV at ``path`` (its folder made) under the columns ``fields`` (default ``rows[0]``'s
    keys): the header first where the file is missing or empty (``csv_out`` accepts an empty file, which would otherwise
    get rows under no header); a file written with other (older) columns is first rewritten under ``fields``, its rows
    kept, so that each value lands under its own column."""
    fields = list(fields or rows[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    header = csv_header(path)
    if header is not None and header != fields:
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(old)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if header is None:
            writer.writeheader()
        writer.writerows(rows)


class Stopped(Exception):
    """SIGINT or SIGTERM reached a benchmark (``stop_on_signals``); ``signum`` is which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Stopped`` in the main thread while this is entered: the code under it ends its workers
    on the way out (``subprocess.run`` kills its child on any exception; a ``finally`` closes a pool) and the benchmark
    exits 128 + the signal with one line (SIGTERM had killed it and left its worker process running; SIGINT had ended in
    a KeyboardInterrupt traceback)."""

    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a worker forked under it (a reader process) ends as it would have, silently
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Stopped(signum)

    saved = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def plural(n: int, word: str) -> str:
    """``1 shard``, ``2 shards``."""
    return f"{n} {word}" + ("" if n == 1 else "s")
