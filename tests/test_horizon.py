"""The edit count after a number of editing steps."""

from __future__ import annotations

import pytest

from sphere_lightning.horizon import edits_after


@pytest.mark.parametrize(
    ("step", "per_step", "total", "expected"),
    [(0, 10, 25, 0), (2, 10, 25, 20), (3, 10, 25, 25), (9, 10, 25, 25), (3, 10, None, 30)],
)
def test_edits_after(step, per_step, total, expected):
    assert edits_after(step, per_step, total) == expected
