"""Wall time by phase: the run summary's ``phase_seconds`` table, which the module and the
observers add to."""

from __future__ import annotations

from typing import Any


def add_seconds(owner: Any, phase: str, seconds: float) -> None:
    """Add ``seconds`` to ``owner.phase_seconds[phase]`` (the run summary's wall time by phase),
    if ``owner`` (the editing module) keeps such a table.

    Args:
        owner: The object holding ``phase_seconds`` (a ``dict`` of phase → seconds).
        phase: The phase's name, e.g. ``compute_deltas`` or an observer's ``phase``.
        seconds: Wall time to add.
    """
    table = getattr(owner, "phase_seconds", None)
    if isinstance(table, dict):
        table[phase] = table.get(phase, 0.0) + seconds
