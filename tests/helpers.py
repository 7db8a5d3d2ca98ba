"""Small helpers shared by the test modules (fixtures live in ``conftest.py``)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer


def quiet_trainer(callbacks: list | None = None, **overrides: Any) -> Trainer:
    """A one-epoch CPU ``Trainer`` without logger, checkpoints, progress bar, model summary or
    sanity check; ``overrides`` replace any of these."""
    options: dict[str, Any] = {
        "callbacks": callbacks or [],
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return Trainer(**{**options, **overrides})
