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

torch.set_num_threads(os.cpu_count() or 1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from tests.mlflow_fixture import mlflow_server  # noqa: E402, F401 - a real `mlflow server` on 127.0.0.1, session-wide


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> list[str]:
    """The digits as shards (the built-in source's), built once for the session."""
    from data_pipeline.shards import ensure_digits_shards

    return ensure_digits_shards(tmp_path_factory.mktemp("digits-cache"))
