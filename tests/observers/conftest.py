"""A stand-in for EditingModule's public surface over a tiny conftest model, and a stub trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.models.architectures import architecture_of, linear_weight


class StubModule:
    """``model``, ``tokenizer``, ``edited_parameter_names``, ``original_weights``,
    ``edited_weight`` and ``log_now`` (which records ``(step, metrics)``), as EditingModule has."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        layers: tuple[int, ...] = (1, 2),
    ) -> None:
        spec = architecture_of(model)
        self.model = model
        self.tokenizer = tokenizer
        self.edited_parameter_names = [spec.weight_name(i) for i in layers]
        self.original_weights = {
            n: self.edited_weight(n).detach().clone() for n in self.edited_parameter_names
        }
        self.global_step = 0
        self.logged: list[tuple[int, dict[str, float]]] = []

    def edited_weight(self, name: str) -> torch.Tensor:
        return linear_weight(self.model.get_submodule(name.removesuffix(".weight")))

    def log_now(self, metrics: dict[str, float]) -> None:
        self.logged.append((self.global_step, dict(metrics)))

    def perturb(self, scale: float = 0.5, seed: int = 1) -> None:
        """An "edit": add noise to the last edited weight."""
        g = torch.Generator().manual_seed(seed)
        weight = self.edited_weight(self.edited_parameter_names[-1])
        with torch.no_grad():
            weight.add_(scale * torch.randn(weight.shape, generator=g))


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
    """Factory: ``make_stub_module(model, layers=(1, 2))`` → :class:`StubModule`."""
    return lambda model, layers=(1, 2): StubModule(model, tokenizer, layers)


@pytest.fixture
def stub_trainer(tmp_path) -> StubTrainer:
    """A :class:`StubTrainer` logging into ``tmp_path`` (no logger)."""
    return StubTrainer(tmp_path)
