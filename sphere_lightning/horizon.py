"""The usable horizon of a sequential-editing run: how many edits it takes before it breaks.

The horizon is the number of edits at the first evaluation (after the first edit) where the
lifelong efficacy falls below a threshold (default 0.8) or the drift KL rises above one (default
1.0); a run that never crosses either reports "beyond N", N the edits it made. Only the
evaluations the run made count: the horizon is known to the resolution of their spacing (a run
evaluated every 1,000 edits that crosses at 3,000 broke somewhere after 2,000). Sampled
evaluations (``model.eval_sample_size``) count with their point estimate. Plain Python, so the
experiment runner can use it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: Defaults of the two thresholds.
EFFICACY_THRESHOLD = 0.8
DRIFT_KL_THRESHOLD = 1.0


def edits_after(step: int, edits_per_step: int, num_edits: int | None = None) -> int:
    """How many facts a run has written after ``step`` editing steps (batches):
    ``step × edits_per_step``, at most ``num_edits`` (the last batch may be short).

    Args:
        step: Editing steps applied (``global_step``).
        edits_per_step: Requests per step (``--data.edits_per_step``).
        num_edits: Requests of the whole run; ``None``: no cap.
    """
    edits = step * edits_per_step
    return edits if num_edits is None else min(edits, num_edits)


@dataclass(frozen=True)
class Evaluation:
    """What one evaluation of a run measured: after ``edits`` edits, the lifelong efficacy and
    the drift KL (``None`` where that evaluation did not measure it)."""

    edits: int
    efficacy: float | None = None
    drift_kl: float | None = None


@dataclass(frozen=True)
class UsableHorizon:
    """The usable horizon of a run.

    Attributes:
        edits: Edits at the first evaluation past a threshold; ``None`` if none crossed.
        num_edited: Edits the run made (the N of "beyond N").
        crossed_by: Which thresholds that evaluation crossed: ``efficacy``, ``drift_kl`` or
            both; empty if none crossed.
        efficacy_threshold: Efficacy below this crosses.
        drift_kl_threshold: Drift KL above this crosses.
        evaluated: How many evaluations (distinct numbers of edits > 0) there were to look at.
    """

    edits: int | None
    num_edited: int
    crossed_by: tuple[str, ...]
    efficacy_threshold: float
    drift_kl_threshold: float
    evaluated: int

    @property
    def label(self) -> str:
        """``"3000"`` (the edits at the crossing), ``"beyond 10000"``, or ``"not evaluated"``
        for a run without an evaluation after its first edit."""
        if self.edits is not None:
            return str(self.edits)
        return f"beyond {self.num_edited}" if self.evaluated else "not evaluated"

    def as_dict(self) -> dict[str, Any]:
        """The horizon as ``summary.json`` and ``table.json`` hold it."""
        return {
            "edits": self.edits,
            "label": self.label,
            "num_edited": self.num_edited,
            "crossed_by": list(self.crossed_by),
            "efficacy_threshold": self.efficacy_threshold,
            "drift_kl_threshold": self.drift_kl_threshold,
            "evaluated": self.evaluated,
        }


def check_thresholds(efficacy_threshold: float, drift_kl_threshold: float) -> None:
    """Raise ``ValueError`` unless efficacy's threshold is in [0, 1] and drift's is ≥ 0."""
    if not 0.0 <= efficacy_threshold <= 1.0:  # also rejects NaN
        raise ValueError(f"`efficacy_threshold` should be in [0, 1], got {efficacy_threshold}")
    if not drift_kl_threshold >= 0.0:
        raise ValueError(f"`drift_kl_threshold` should be ≥ 0, got {drift_kl_threshold}")


def _finite(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def usable_horizon(
    evaluations: Iterable[Evaluation],
    num_edited: int,
    efficacy_threshold: float = EFFICACY_THRESHOLD,
    drift_kl_threshold: float = DRIFT_KL_THRESHOLD,
) -> UsableHorizon:
    """The first evaluation, in order of edits, with efficacy < ``efficacy_threshold`` or drift
    KL > ``drift_kl_threshold``.

    Evaluations at 0 edits (the pre-edit model, whose efficacy is low by nature) are left out,
    and so are missing or NaN values. Several evaluations at the same number of edits count as
    one that measured everything they did.
    """
    check_thresholds(efficacy_threshold, drift_kl_threshold)
    crossed: dict[int, set[str]] = {}
    for evaluation in evaluations:
        measured = _finite(evaluation.efficacy) or _finite(evaluation.drift_kl)
        if evaluation.edits <= 0 or not measured:
            continue
        reasons = crossed.setdefault(evaluation.edits, set())
        if _finite(evaluation.efficacy) and evaluation.efficacy < efficacy_threshold:
            reasons.add("efficacy")
        if _finite(evaluation.drift_kl) and evaluation.drift_kl > drift_kl_threshold:
            reasons.add("drift_kl")
    first = min((edits for edits, reasons in crossed.items() if reasons), default=None)
    reasons = tuple(sorted(crossed[first])) if first is not None else ()
    return UsableHorizon(
        first, num_edited, reasons, efficacy_threshold, drift_kl_threshold, len(crossed)
    )
