"""Kernel-test setup: the `gpu` marker and the device the tests run on.

On a CUDA machine the same tests run compiled on the GPU (no interpreter); elsewhere on CPU under
TRITON_INTERPRET=1, which tests/conftest.py sets before any kernel module is imported.
"""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (compiled Triton kernels, bf16); skipped without it")
    config.addinivalue_line("markers", "slow: slow test (still run in CI)")


@pytest.fixture
def device() -> str:
    """Where kernel tests put their tensors: cuda when present, else cpu (interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
