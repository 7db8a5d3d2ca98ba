"""The band of ordinary per-step change of a watched quantity (the HE alarm's ΔHE): a robust
centre and scale learned from the steps kept so far, and the test of a new value against it.

Pure Python over floats; tested against numpy's median written out.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sphere_lightning.errors import ConfigError, callback_flag

#: Scale of the median absolute deviation that makes it estimate σ for normal data.
MAD_TO_SIGMA = 1.4826


def robust_centre_scale(values: Sequence[float]) -> tuple[float, float]:
    """``(median, 1.4826 · MAD)`` of ``values``: a centre and a scale that a few outliers do
    not move (MAD = median of ``|x − median|``; the median of an even count is the mean of the
    middle two)."""
    if not values:
        raise ValueError("robust_centre_scale needs at least one value")
    centre = statistics.median(values)
    mad = statistics.median(abs(v - centre) for v in values)
    return float(centre), MAD_TO_SIGMA * float(mad)


@dataclass(frozen=True)
class DeltaBand:
    """The band of ordinary per-step ΔHE of one layer, learned from its accepted steps so far.

    With ``history`` the ΔHE of the steps kept so far (the last ``window`` of them), a value
    ``x`` is out of band when

    - ``|x − median| > k · scale``, ``scale = max(1.4826 · MAD, min_scale)``, once the history
      holds at least ``warmup_steps`` values (before that this test is off); or
    - ``|x| > max_abs_delta`` (when set; applies from the first step); or
    - ``x`` is not finite.

    The bounds are strict: a value exactly on a limit is in band.

    It is the HE alarm's ``band`` option group: in a config,
    ``trainer.callbacks.HEAlarmCallback.init_args.band.<field>``, and a bad field raises a
    :class:`~sphere_lightning.errors.ConfigError` naming that path.

    Args:
        k: Width of the band in robust standard deviations.
        warmup_steps: Steps in the history before the relative test starts.
        max_abs_delta: Absolute limit on |ΔHE| (``None``: none).
        min_scale: Floor of the scale, so that a history of (nearly) identical ΔHE does not turn
            every small difference into an alarm.
        window: Only the last this-many values of the history count (``None``: all).
    """

    k: float = 6.0
    warmup_steps: int = 3
    max_abs_delta: float | None = None
    min_scale: float = 0.0
    window: int | None = None

    def __post_init__(self) -> None:
        def flag(name: str) -> str:
            return callback_flag("HEAlarmCallback", "band", name)

        if not self.k > 0:
            raise ConfigError(f"{flag('k')} should be > 0, got {self.k}")
        if self.warmup_steps < 1:
            raise ConfigError(f"{flag('warmup_steps')} should be ≥ 1, got {self.warmup_steps}")
        if self.max_abs_delta is not None and not self.max_abs_delta > 0:
            raise ConfigError(
                f"{flag('max_abs_delta')} should be > 0 or None, got {self.max_abs_delta}"
            )
        if not self.min_scale >= 0:
            raise ConfigError(f"{flag('min_scale')} should be ≥ 0, got {self.min_scale}")
        if self.window is not None and self.window < self.warmup_steps:
            raise ConfigError(
                f"{flag('window')} should be None or ≥ {flag('warmup_steps')} "
                f"({self.warmup_steps}), got {self.window}"
            )

    def limits(self, history: Sequence[float]) -> tuple[float, float]:
        """``(low, high)``: the ΔHE values allowed after ``history`` (±inf where unbounded)."""
        if self.window is not None:
            history = history[-self.window :]
        low, high = -math.inf, math.inf
        if len(history) >= self.warmup_steps:
            centre, scale = robust_centre_scale(history)
            scale = max(scale, self.min_scale)
            low, high = centre - self.k * scale, centre + self.k * scale
        if self.max_abs_delta is not None:
            low, high = max(low, -self.max_abs_delta), min(high, self.max_abs_delta)
        return low, high

    def is_out(self, value: float, history: Sequence[float]) -> bool:
        """Whether ``value`` is outside the band that ``history`` gives."""
        return not within(value, self.limits(history))


def outside(
    delta: Mapping[str, float], limits: Mapping[str, tuple[float, float]]
) -> dict[str, float]:
    """``{layer: ΔHE}`` of the layers outside their ``(low, high)`` limits."""
    return {layer: value for layer, value in delta.items() if not within(value, limits[layer])}


def within(value: float, limits: tuple[float, float]) -> bool:
    """``low ≤ value ≤ high`` (false for NaN)."""
    return limits[0] <= value <= limits[1]


def excess(value: float, limits: tuple[float, float]) -> float:
    """How far ``value`` lies beyond its band (negative inside; inf if not finite)."""
    if not math.isfinite(value):
        return math.inf
    return max(limits[0] - value, value - limits[1])
