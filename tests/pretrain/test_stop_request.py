"""The trainer's per-step stop check (``pretrain.dist.LaggedAny``): a request rank 0 finds at a step is every rank's
at the next (the all-reduce started at one step is taken at the next), under gloo (a group of its own) and, on a GPU,
under NCCL (the default group, the answer copied back behind a CUDA event); at once without a process group. Here a
group of one process; 2 ranks stop together in test_torchrun and the Slurm and Kubernetes tests."""

import datetime

import pytest
import torch
import torch.distributed as td

from pretrain.dist import LaggedAny
from tests.util import free_port


@pytest.fixture(params=["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
def backend(request):
    if request.param == "nccl":
        if not torch.cuda.is_available():
            pytest.skip("NCCL needs a GPU")
        torch.cuda.set_device(0)
    td.init_process_group(request.param, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                          timeout=datetime.timedelta(seconds=60))
    yield request.param
    td.destroy_process_group()


def test_a_yes_is_every_ranks_one_call_later(backend):
    agreed = LaggedAny()
    assert agreed.device.type == ("cuda" if backend == "nccl" else "cpu")
    assert (agreed.group is None) == (backend == "nccl")  # gloo: a group of its own
    assert [agreed(False) for _ in range(3)] == [False, False, False]
    assert agreed(True) is False  # said at this call: its all-reduce is taken at the next
    assert agreed(False) is True
    assert agreed(False) is False
    assert [agreed(True), agreed(True), agreed(False), agreed(False)] == [False, True, True, False]
    agreed.close()
    assert agreed.pending is None


def test_without_a_process_group_it_answers_at_once():
    assert not td.is_initialized()
    agreed = LaggedAny()
    assert [agreed(False), agreed(True), agreed(False)] == [False, True, False]
    agreed.close()
