"""The band of ordinary per-step ΔHE (the HE alarm's maths) on synthetic series, against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from sphere_lightning.functional.band import DeltaBand, robust_centre_scale


def _reference_out(value: float, history: list[float], k: float) -> bool:
    """Out of band, written out with numpy: |x − median| > k · 1.4826 · median|h − median|."""
    h = np.asarray(history, dtype=np.float64)
    centre = np.median(h)
    return bool(abs(value - centre) > k * 1.4826 * np.median(np.abs(h - centre)))


def test_median_and_mad_match_a_hand_computation():
    # Odd count: median 4; |x − 4| = 3, 2, 0, 3, 96 → sorted 0, 2, 3, 3, 96 → MAD 3.
    assert robust_centre_scale([7.0, 1.0, 4.0, 100.0, 2.0]) == pytest.approx((4.0, 1.4826 * 3))
    # Even count: median (2 + 4) / 2 = 3; |x − 3| = 2, 1, 1, 4 → MAD (1 + 2) / 2 = 1.5.
    assert robust_centre_scale([1.0, 2.0, 4.0, 7.0]) == pytest.approx((3.0, 1.4826 * 1.5))
    with pytest.raises(ValueError, match="at least one"):
        robust_centre_scale([])


def _steady_then_jump(seed: int = 0) -> list[float]:
    """30 steps of ΔHE ≈ 10 ± 0.1, a jump to 12 at step 30, then 10 steps back at ≈ 10."""
    rng = np.random.default_rng(seed)
    series = list(10.0 + 0.1 * rng.standard_normal(30))
    series.append(12.0)
    series += list(10.0 + 0.1 * rng.standard_normal(10))
    return [float(x) for x in series]


def _fired(band: DeltaBand, series: list[float]) -> list[int]:
    """Indices where the band fires; out-of-band values are left out of the history (as a
    rollback does)."""
    history: list[float] = []
    fired = []
    for i, value in enumerate(series):
        if band.is_out(value, history):
            fired.append(i)
        else:
            history.append(value)
    return fired


def test_band_fires_exactly_at_the_jump_and_agrees_with_a_plain_reference():
    series = _steady_then_jump()
    band = DeltaBand(k=6.0, warmup_steps=3)
    assert _fired(band, series) == [30]
    history = series[:30]
    for value in [series[30], series[31], 10.3, 9.7, 10.5]:
        assert band.is_out(value, history) == _reference_out(value, history, 6.0)


def test_band_is_silent_during_warm_up():
    wild = [10.0, 1000.0, 10.1, 9.9, 10.05, 10.0, 500.0]
    # The 1000 at step 1 is inside the warm-up of 3 steps; the 500 at step 6 is not.
    assert _fired(DeltaBand(k=3.0, warmup_steps=3), wild) == [6]
    assert _fired(DeltaBand(k=3.0, warmup_steps=1, min_scale=0.5), wild) == [1, 6]
    assert DeltaBand(warmup_steps=3).limits([1.0, 2.0]) == (-np.inf, np.inf)


def test_band_respects_k():
    history = [7.0, 1.0, 4.0, 100.0, 2.0]  # median 4, scale 1.4826 · 3 = 4.4478
    value = 4.0 + 5.0 * 1.4826 * 3  # five robust standard deviations above the median
    assert DeltaBand(k=4.0).is_out(value, history)
    assert not DeltaBand(k=6.0).is_out(value, history)
    assert DeltaBand(k=6.0).limits(history) == pytest.approx((4 - 6 * 4.4478, 4 + 6 * 4.4478))
    assert not DeltaBand(k=5.0).is_out(value, history)  # on the limit: in band


def test_absolute_limit_window_floor_and_non_finite():
    assert DeltaBand(max_abs_delta=1.0).is_out(-1.5, [])  # from the first step
    assert not DeltaBand(max_abs_delta=1.0).is_out(0.5, [])
    # The relative band (1 ± 6 · 1.4826) is wider than the absolute limit, which wins.
    assert DeltaBand(max_abs_delta=1.0).limits([0.0, 1.0, 2.0]) == pytest.approx((-1.0, 1.0))
    assert DeltaBand(max_abs_delta=9.0).limits([0.0, 0.1, 0.2]) == pytest.approx(
        (0.1 - 6 * 0.14826, 0.1 + 6 * 0.14826)
    )
    assert DeltaBand().is_out(float("nan"), [1.0, 2.0, 3.0])
    # Only the last 3 values count: their median is 100, so 100 is in band, 1 is not.
    assert DeltaBand(window=3).limits([1.0, 1.0, 1.0, 99.0, 100.0, 101.0]) == pytest.approx(
        (100 - 6 * 1.4826, 100 + 6 * 1.4826)
    )
    # Identical history: scale 0, any change fires unless floored.
    assert DeltaBand().is_out(1.001, [1.0, 1.0, 1.0])
    assert not DeltaBand(min_scale=0.01).is_out(1.001, [1.0, 1.0, 1.0])
