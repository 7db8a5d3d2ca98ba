"""The TensorBoard tag names are a contract with saved runs, the runner and the docs."""

from __future__ import annotations

from sphere_lightning import tags


def test_tag_names():
    assert (tags.EDIT, tags.ENERGY, tags.ENERGY_CHANGE, tags.DIAG) == (
        "edit/",
        "energy/",
        "energy_change/",
        "diag/",
    )
    assert (tags.GENERAL, tags.GENERAL_CHANGE, tags.TIME, tags.EDITOR, tags.SPHERE) == (
        "general/",
        "general_change/",
        "time/",
        "editor/",
        "sphere/",
    )
    assert tags.NUM_EDITED == "edit/num_edited"
    assert tags.DRIFT_KL == "drift/kl"
    assert tags.ENERGY_CHANGE_MEAN == "energy_change/mean"
