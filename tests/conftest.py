"""Session-wide test setup.

Triton reads TRITON_INTERPRET when ``@triton.jit`` runs, i.e. at import of ``kernels.*``; any test module may import
them (directly or through ``pretrain``), so the switch is set here, before collection, on machines without CUDA.

The processes a test starts (the 2 ranks of mp.spawn, torchrun's, the CLI's and their Ray workers) run side by side
on the machine's cores: each gets one intra-op thread (OMP_NUM_THREADS=1, which they inherit; torchrun and Ray set
the same for theirs), where torch's default of a thread per core would oversubscribe the cores with spinning threads
(measured on a 2-core AMD EPYC: tests/pretrain/test_elastic.py 111 s -> 60 s of wall time, half the CPU time). This
process, alone when it computes, keeps a thread per core.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# under pytest-xdist (make test runs 2 workers), the workers share the cores
torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from tests.mlflow_fixture import mlflow_server  # noqa: E402, F401 - a real `mlflow server` on 127.0.0.1, session-wide


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> list[str]:
    """The digits as shards (the built-in source's), built once for the session."""
    from data_pipeline.shards import ensure_digits_shards

    return ensure_digits_shards(tmp_path_factory.mktemp("digits-cache"))


TESTS = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist with ``--dist loadgroup``, each module's tests go to one worker (its module fixtures are built
    once), and the cluster tests to one worker in turn: the private Slurm cluster and the Kubernetes pods both take
    the loopback addresses 127.0.0.2 and 127.0.0.3."""
    for item in items:
        parts = os.path.relpath(str(item.path), TESTS).split(os.sep)
        item.add_marker(pytest.mark.xdist_group("cluster" if parts[0] == "cluster" else "/".join(parts)))
