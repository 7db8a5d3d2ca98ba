"""The callbacks' view of the module over a tiny conftest model, and a stub trainer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import ContextStub


class StubTrainer:
    """The trainer attributes the observers read."""

    def __init__(self, log_dir: Path, loggers=(), datamodule=None) -> None:
        self.global_step = 0
        self.log_dir = str(log_dir)
        self.default_root_dir = str(log_dir)
        self.loggers = list(loggers)
        self.datamodule = datamodule
        self.is_global_zero = True
        self.sanity_checking = False


@pytest.fixture
def make_stub_module(tokenizer):
    """Factory: ``make_stub_module(model, layers=(1, 2))`` → a :class:`ContextStub`."""
    return lambda model, layers=(1, 2): ContextStub(model, tokenizer, layers)


@pytest.fixture
def stub_trainer(tmp_path) -> StubTrainer:
    """A :class:`StubTrainer` logging into ``tmp_path`` (no logger)."""
    return StubTrainer(tmp_path)
