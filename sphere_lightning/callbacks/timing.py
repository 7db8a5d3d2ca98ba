"""Wall time of observers, gathered into the run's phase times."""

from __future__ import annotations

from lightning.pytorch import LightningModule


def add_seconds(pl_module: LightningModule, phase: str, seconds: float) -> None:
    """Add ``seconds`` to ``pl_module.phase_seconds[phase]`` (the run summary's wall time by
    phase), if the module keeps such a table."""
    table = getattr(pl_module, "phase_seconds", None)
    if isinstance(table, dict):
        table[phase] = table.get(phase, 0.0) + seconds
