"""Session-wide test setup.

Triton reads TRITON_INTERPRET when ``@triton.jit`` runs, i.e. at import of ``kernels.*``; any test module may import
them
(directly or through ``pretrain``), so the switch is set here, before collection, on machines without CUDA.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from tests.mlflow_fixture import mlflow_server  # noqa: E402, F401 - a real `mlflow server` on 127.0.0.1, session-wide


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> list[str]:
    """The digits as shards (the built-in source's), built once for the session."""
    from data_pipeline.shards import ensure_digits_shards

    return ensure_digits_shards(tmp_path_factory.mktemp("digits-cache"))
