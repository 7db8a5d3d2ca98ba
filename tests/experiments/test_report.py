"""The experiment reports: a pair's table and figure at every evaluation step, the suite's
trajectories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sphere_lightning import experiments
from sphere_lightning.experiments import (
    main,
    write_report,
)
from tests.helpers import (
    PNG_SIGNATURE,
    RUNS_ORDER,
    markdown_rows,
    write_run_summary,
)

START = 1_700_000_000.0


LAYERS = ("model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj")


def _scalars(**by_step):
    return {int(step.removeprefix("s")): values for step, values in by_step.items()}


def _he(a, b):
    return {f"energy_change/{LAYERS[0]}": a, f"energy_change/{LAYERS[1]}": b}


PRE_EDIT = {
    "edit/efficacy": 0.25,
    "edit/generalization": 0.125,
    "edit/specificity": 0.75,
    "edit/fluency": 550.0,
    "general_change/sst2/accuracy": 0.0,
    "drift/kl": 0.0,
    **_he(0.0, 0.0),
}


WITHOUT_LOG = _scalars(
    s0=PRE_EDIT,
    s1={"edit/num_edited": 100.0, **_he(1.0, 2.0)},
    s2={
        "edit/num_edited": 200.0,
        "edit/efficacy": 0.5,
        "edit/generalization": 0.375,
        "edit/specificity": 0.625,
        "edit/fluency": 525.5,
        "general_change/sst2/accuracy": -0.125,
        "drift/kl": 0.0625,
        **_he(2.0, 4.0),
    },
)


WITH_LOG = _scalars(
    s0={**PRE_EDIT, "general_change/nli/accuracy": 0.0},
    s1={"edit/num_edited": 100.0, **_he(0.5, 0.5)},
    s2={
        "edit/num_edited": 200.0,
        "edit/efficacy": 0.875,
        "edit/generalization": 0.625,
        "edit/specificity": 0.75,
        "edit/fluency": 550.0,
        "general_change/sst2/accuracy": -0.375,
        "general_change/nli/accuracy": 0.25,
        "drift/kl": 0.015625,
        **_he(1.0, 1.5),
    },
)


# Seconds after the run's start at which each step's scalars are logged.
WITHOUT_TIMES = {0: 10.0, 1: 40.0, 2: 100.0}


WITH_TIMES = {0: 12.0, 1: 50.0, 2: 130.0}


def _write_run(out: Path, run: str, log, times, finished: bool = False, **entries) -> Path:
    """The ``summary.json`` of a run that logged ``{step: {tag: value}}`` at ``times``."""
    return write_run_summary(out / run, log, times, START, finished, **entries).parent


def test_report_tabulates_the_logged_values_at_every_evaluation_step(tmp_path):
    out = tmp_path / "out"
    _write_run(out, "without_sphere", WITHOUT_LOG, WITHOUT_TIMES)
    _write_run(
        out, "with_sphere", WITH_LOG, WITH_TIMES, True,
        wall_seconds=131.5, num_edited=200, global_step=2,
    )  # fmt: skip

    markdown, data, figure = write_report(out)

    # Step 1 logged only HE and the edit count: not an evaluation step, not a row.
    assert markdown_rows(markdown.read_text()) == [
        # edits, then (without, with) for: efficacy, generalization, specificity, fluency,
        # SST-2 change, NLI change, drift KL, HE change, wall time
        ["0", "0.250", "0.250", "0.125", "0.125", "0.750", "0.750", "550.0", "550.0",
         "+0.000", "+0.000", "—", "+0.000", "0.0000", "0.0000", "0", "0", "10", "12"],
        ["200", "0.500", "0.875", "0.375", "0.625", "0.625", "0.750", "525.5", "550.0",
         "-0.125", "-0.375", "—", "+0.250", "0.0625", "0.0156", "3", "1.25", "100", "130"],
    ]  # fmt: skip
    table = json.loads(data.read_text())
    assert [(r["step"], r["edits"]) for r in table["rows"]] == [(0, 0), (2, 200)]
    last = table["rows"][1]
    assert last["without_sphere"]["general_change/nli/accuracy"] is None
    assert last["with_sphere"]["edit/efficacy"] == 0.875
    assert last["with_sphere"]["drift/kl"] == 0.015625
    assert last["without_sphere"]["energy_change/per_layer"] == {LAYERS[0]: 2.0, LAYERS[1]: 4.0}
    assert last["without_sphere"]["energy_change/mean"] == 3.0
    assert last["with_sphere"]["wall_seconds"] == 130.0
    # HE at every logged step, for the figure.
    assert table["energy_change"]["with_sphere"] == [
        {"step": 0, "edits": 0, "energy_change/mean": 0.0},
        {"step": 1, "edits": 100, "energy_change/mean": 0.5},
        {"step": 2, "edits": 200, "energy_change/mean": 1.25},
    ]
    assert table["runs"]["with_sphere"]["finished"] is True
    assert table["runs"]["with_sphere"]["wall_seconds"] == 131.5
    assert table["runs"]["without_sphere"]["finished"] is False
    assert "200 edits in 132 s" in markdown.read_text()
    assert figure.read_bytes()[:8] == PNG_SIGNATURE


def test_report_of_one_run_has_only_its_columns(tmp_path):
    out = tmp_path / "out"
    _write_run(out, "with_sphere", WITH_LOG, WITH_TIMES)

    assert main(["--report-only", "--out", str(out)]) == 0

    text = (out / "table.md").read_text()
    assert "(without)" not in text and "efficacy (with)" in text
    rows = markdown_rows(text)
    assert [row[0] for row in rows] == ["0", "200"]
    assert rows[1][1:] == [
        "0.875", "0.625", "0.750", "550.0", "-0.375", "+0.250", "0.0156", "1.25", "130"
    ]  # fmt: skip
    assert list(json.loads((out / "table.json").read_text())["runs"]) == ["with_sphere"]
    assert (out / "figure.png").read_bytes()[:8] == PNG_SIGNATURE


def test_edit_counts_come_from_the_config_where_not_logged(tmp_path):
    out = tmp_path / "out"
    log = {step: {k: v for k, v in values.items() if k != "edit/num_edited"}
           for step, values in WITH_LOG.items()}  # fmt: skip
    _write_run(out, "with_sphere", log, WITH_TIMES, config={"data": {"edits_per_step": 30}})

    table = experiments.build_table(out)

    assert [r["edits"] for r in table["rows"]] == [0, 60]


def test_suite_trajectories_and_figure_follow_the_logged_diagnostics(tmp_path):
    layers = ("l3", "l4")
    weight = {0: (10.0, 20.0), 1: (11.0, 22.0), 2: (13.0, 30.0)}
    update = {0: (0.0, 0.0), 1: (2.0, 4.0), 2: (5.0, 12.0)}
    share = {1: (0.2, 0.4), 2: (0.3, 0.1)}
    random = {1: (0.1, 0.1), 2: (0.1, 0.1)}
    leak = {1: (0.5, 0.25), 2: (0.75, 0.5)}
    summed = {1: (0.4, 0.2), 2: (0.6, 0.5)}  # the accumulated update's share
    log: dict[int, dict[str, float]] = {0: {"edit/efficacy": 0.25, "drift/kl": 0.0}}
    for step in (0, 1, 2):
        row = log.setdefault(step, {})
        for i, layer in enumerate(layers):
            row[f"diag/weight_norm/{layer}"] = weight[step][i]
            row[f"diag/update_norm/{layer}"] = update[step][i]
            row[f"energy_change/{layer}"] = float(step * (i + 1))
            if step:
                row[f"diag/delta_ratio/{layer}"] = 0.1
                row[f"diag/principal_share/{layer}"] = share[step][i]
                row[f"diag/principal_share_random/{layer}"] = random[step][i]
                row[f"diag/key_leak/{layer}"] = leak[step][i]
                row[f"diag/update_principal_share/{layer}"] = summed[step][i]
        if step:
            row["edit/num_edited"] = 100.0 * step
            row["diag/v_norm_mean"] = 2.0 * step
    log[2].update({"edit/efficacy": 0.75, "drift/kl": 1.5})
    out = tmp_path / "suite"
    write_run_summary(out / "alphaedit" / "with_sphere", log)
    pairs = [experiments.Pair("alphaedit", Path("a.yaml"), out / "alphaedit", runs=RUNS_ORDER)]

    markdown, data, figure = experiments.write_suite_report(out, pairs)

    rows = json.loads(data.read_text())["rows"]
    assert [row["run"] for row in rows] == ["without_sphere", "with_sphere"]
    assert rows[0]["trajectories"] == {}  # never started
    trajectory = rows[1]["trajectories"]

    def plain(step, quantity):  # each quantity averaged over the layers by hand
        if quantity == "weight_growth":
            return sum(weight[step][i] / weight[0][i] for i in range(2)) / 2
        if quantity == "update_ratio":
            return sum(update[step][i] / weight[0][i] for i in range(2)) / 2
        if quantity == "principal_excess":
            return (sum(share[step]) / 2) / (sum(random[step]) / 2)
        if quantity == "update_principal_excess":
            return (sum(summed[step]) / 2) / (sum(random[step]) / 2)
        return sum(leak[step]) / 2

    quantities = ("weight_growth", "update_ratio", "principal_excess", "key_leak")
    for quantity in (*quantities, "update_principal_excess"):
        assert [x for x, _ in trajectory[quantity]] == [100, 200], quantity
        expected = [plain(s, quantity) for s in (1, 2)]
        assert [y for _, y in trajectory[quantity]] == pytest.approx(expected, rel=1e-6)
    assert trajectory["v_norm"] == [[100, 2.0], [200, 4.0]]
    assert trajectory["edit/efficacy"] == [[0, 0.25], [200, 0.75]]
    assert trajectory["energy_change/mean"] == [[0, 0.0], [100, 1.5], [200, 3.0]]
    text = markdown.read_text()
    assert text.startswith("# Every run of the suite `suite`\n")  # named after its folder
    efficacy = markdown_rows(text, table=1)
    assert efficacy == [
        ["alphaedit", "without", "—", "—"],
        ["alphaedit", "with", "0.250", "0.750"],
    ]
    assert "## Efficacy at every evaluation" in text
    assert "## Generalization at every evaluation\n\n(not logged yet)" in text
    drift = markdown_rows(text, table=2)  # generalization and specificity have no table
    assert drift[1] == ["alphaedit", "with", "0.000", "1.500"]
    assert figure.read_bytes()[:8] == PNG_SIGNATURE
