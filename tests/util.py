"""Small helpers shared by tests."""

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_error(recipe, overrides: list[str]) -> str:
    """The one-line ConfigError that loading ``recipe`` with ``overrides`` raises (fails if it raises none)."""
    import pytest

    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(recipe, overrides)
    assert "\n" not in str(e.value)
    return str(e.value)


def train_steps(method, batches, steps: int, lr: float) -> None:
    """``steps`` plain AdamW steps of ``method`` on ``next(batches)`` (short-training checks of a pretext task)."""
    import torch

    opt = torch.optim.AdamW(method.parameters(), lr=lr)
    for _ in range(steps):
        loss = method(next(batches))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
