"""Reading a run's results: the combined table's values from `summary.json`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sphere_lightning import experiments
from sphere_lightning.experiments.results import KNOWEDIT_COLUMNS
from tests.helpers import (
    PNG_SIGNATURE,
    RUNS_ORDER,
    markdown_rows,
    write_run_summary,
)


def test_suite_table_takes_every_value_from_summary_json(tmp_path):
    summary = {
        "num_edited": 300,
        "global_step": 3,
        "edit": {
            "final": {
                "efficacy": 0.75,
                "generalization": 0.5,
                "specificity": 0.625,
                "fluency": 480.25,
            }
        },  # fmt: skip
        "general": {
            "sst2": {"baseline": {"accuracy": 0.5}, "final": {"accuracy": 0.375}},
            "nli": {"baseline": {"accuracy": 0.25}, "final": {"accuracy": 0.5}},
            "boolq": {"baseline": {"accuracy": 0.625}, "final": {"accuracy": 0.625}},
        },
        "drift": {"kl": 0.0625, "perplexity": 9.0},
        "energy": {"a": {"baseline": 10.0, "final": 12.0}, "b": {"baseline": 5.0, "final": 9.0}},
        "phase_seconds": {
            "setup": 9.0,
            "compute_deltas": 600.25,
            "transform_and_apply": 2.5,
            "after_apply": 7.0,
            "evaluation": 100.0,
        },  # fmt: skip
        "wall_seconds": 1234.4,
        "diagnostics": {
            "history": {
                "step": [0, 1, 2],
                "edits": [0, 100, 200],
                "diag/weight_norm/a": [10.0, 11.0, 12.0],
                "diag/weight_norm/b": [4.0, 5.0, 6.0],
                "diag/update_norm/a": [0.0, 2.0, 3.0],
                "diag/update_norm/b": [0.0, 1.0, 2.0],
                "diag/principal_share/a": [None, 0.25, 0.5],
                "diag/principal_share/b": [None, 0.125, 0.125],
                "diag/principal_share_random/a": [None, 0.1, 0.1],
                "diag/principal_share_random/b": [None, 0.2, 0.2],
                "diag/key_leak/a": [None, 0.5, 0.25],
                "diag/key_leak/b": [None, 0.5, None],  # not measured at the last step
                "diag/update_principal_share/a": [None, 0.3, 0.6],
                "diag/update_principal_share/b": [None, 0.2, None],
                "diag/original_principal_share/a": [None, 0.05, 0.1],
                "diag/original_principal_share/b": [None, 0.0, 0.3],
                "diag/principal_overlap/a": [None, 0.9, 0.5],
                "diag/principal_overlap/b": [None, 0.8, 0.7],
                "diag/v_norm_mean": [None, 3.0, 4.5],
            }
        },
    }
    pairs = [
        experiments.Pair(name, Path(f"{name}.yaml"), tmp_path / name, runs=RUNS_ORDER)
        for name in "xy"
    ]
    (tmp_path / "x" / "with_sphere").mkdir(parents=True)
    (tmp_path / "x" / "with_sphere" / "summary.json").write_text(json.dumps(summary))

    markdown, data, figure = experiments.write_suite_report(tmp_path, pairs)
    assert figure.read_bytes()[:8] == PNG_SIGNATURE

    table = json.loads(data.read_text())
    assert [(r["editor"], r["run"], r["finished"]) for r in table["rows"]] == [
        ("x", "without_sphere", False), ("x", "with_sphere", True),
        ("y", "without_sphere", False), ("y", "with_sphere", False),
    ]  # fmt: skip
    assert table["rows"][1]["values"] == {
        "num_edited": 300,
        "efficacy": 0.75,
        "generalization": 0.5,
        "specificity": 0.625,
        "fluency": 480.25,
        "sst2_accuracy_change": -0.125,
        "nli_accuracy_change": 0.25,
        "boolq_accuracy_change": 0.0,
        "drift_kl": 0.0625,
        "usable_horizon": None,  # no scalars in the summary: no evaluation to read it from
        "he_change": 3.0,  # mean of 2 and 4
        "weight_growth": (12 / 10 + 6 / 4) / 2,  # last over the unedited norm, mean of layers
        "update_ratio": (3 / 10 + 2 / 4) / 2,  # last accumulated update over the unedited norm
        "principal_share": (0.25 + 0.5 + 0.125 + 0.125) / 4,  # every batch and layer
        "principal_share_random": (0.1 + 0.1 + 0.2 + 0.2) / 4,
        "key_leak": (0.25 + 0.5) / 2,  # each layer's last measured value
        "update_principal_share": (0.6 + 0.2) / 2,  # so is the accumulated update's share
        "original_principal_share": (0.1 + 0.3) / 2,  # and its share in W₀'s principal space
        "principal_overlap": (0.5 + 0.7) / 2,
        "v_norm": 4.5,
        "edit_seconds": 609.75,  # compute_deltas + transform_and_apply + after_apply
        "measured_seconds": 718.75,  # every phase, setup and evaluation too
        "wall_seconds": 1234.4,
        **dict.fromkeys(KNOWEDIT_COLUMNS),  # not KnowEdit data: no such metric, no column
    }
    assert set(table["rows"][0]["values"].values()) == {None}
    rows = markdown_rows(markdown.read_text())
    assert rows[1] == ["x", "with", "300", "0.750", "0.500", "0.625", "480.2", "-0.125",
                       "+0.250", "+0.000", "0.0625", "—", "3", "1.35", "0.40", "0.250", "0.150",
                       "0.375", "0.400", "0.200", "0.600", "4.50", "610", "719",
                       "1234"]  # fmt: skip
    assert rows[0] == ["x", "without"] + ["—"] * 23
    assert "y with SPHERE: `" in markdown.read_text()
    # x with SPHERE finished with a summary.json that holds no scalars: said, not silently "—".
    assert [r["without_scalars"] for r in table["rows"]] == [False, True, False, False]
    said = markdown.read_text().split("No logged scalars in `summary.json`")[1]
    assert f"- x with SPHERE: `{tmp_path / 'x' / 'with_sphere'}`" in said
    assert "x without SPHERE" not in said and "y with SPHERE" not in said.split("##")[0]


def test_knowedit_metrics_get_columns_and_tables_only_where_a_run_has_them(tmp_path):
    final = {
        "edit_success": 0.75,
        "portability": 0.5,
        "portability_reasoning": 0.25,
        "locality": 0.875,
        "locality_relation_specificity": 0.875,
        "fluency": 500.0,
    }
    scalars = {
        0: {"edit/edit_success": 0.125, "edit/locality": 1.0},
        2: {"edit/num_edited": 20.0, "edit/edit_success": 0.75, "edit/locality": 0.875},
    }
    directory = tmp_path / "x" / "with_sphere"
    write_run_summary(directory, scalars, num_edited=20, edit={"final": final})
    pairs = [experiments.Pair("x", Path("x.yaml"), tmp_path / "x", runs=RUNS_ORDER)]

    markdown, data, _ = experiments.write_suite_report(tmp_path, pairs)

    table = json.loads(data.read_text())
    labels = [c["label"] for c in table["columns"]]
    # Every KnowEdit column some run has a value of, none other (no run has Subject_Aliasing).
    assert "edit success" in labels and "portability Reasoning" in labels
    assert "locality Relation_Specificity" in labels
    assert "portability Subject_Aliasing" not in labels and "locality Forgetfulness" not in labels
    rows = markdown_rows(markdown.read_text())
    values = dict(zip(["editor", "SPHERE", *labels], rows[1], strict=True))
    assert values["edit success"] == "0.750" and values["locality"] == "0.875"
    assert values["portability Reasoning"] == "0.250" and values["efficacy"] == "—"
    text = markdown.read_text()
    assert "## Edit success at every evaluation" in text
    assert "## Portability at every evaluation" not in text  # never logged per evaluation
    assert table["rows"][1]["trajectories"]["edit/edit_success"] == [[0, 0.125], [20, 0.75]]


def test_an_unfinished_run_has_its_logged_scalars_but_no_final_values(tmp_path):
    scalars = {
        0: {"edit/efficacy": 0.25, "energy_change/a": 0.0},
        1: {"edit/num_edited": 100.0, "energy_change/a": 1.5},
        2: {"edit/num_edited": 200.0, "edit/efficacy": 0.875, "energy_change/a": 2.5},
    }
    directory = tmp_path / "x" / "with_sphere"
    write_run_summary(
        directory, scalars, times={0: 5.0, 1: 20.0, 2: 45.0}, start=100.0, finished=False,
        num_edited=200, edit={"final": {"efficacy": 0.875}},
    )  # fmt: skip

    log = experiments.RunLog.read(directory)
    assert not log.finished
    assert log.scalars["energy_change/a"] == {0: 0.0, 1: 1.5, 2: 2.5}
    assert log.wall_seconds(2) == 45.0 and log.edits(2) == 200
    pairs = [experiments.Pair("x", Path("x.yaml"), tmp_path / "x", runs=RUNS_ORDER)]
    _, data, _ = experiments.write_suite_report(tmp_path, pairs)
    _, row = json.loads(data.read_text())["rows"]
    assert row["finished"] is False
    assert row["values"]["efficacy"] is None  # the final values wait for the run's end
    assert row["values"]["usable_horizon"] == "beyond 200"
    assert row["trajectories"]["edit/efficacy"] == [[0, 0.25], [200, 0.875]]


def test_suite_seeds_give_mean_and_standard_deviation_over_the_edit_orders(tmp_path):
    """Three edit orders of one entry: two finished, one still running. The final values'
    statistics are over the finished two; each evaluation's over every run that logged it."""
    from statistics import mean, stdev

    finals = {0: (0.75, 0.5, 1.5), 1: (0.625, 0.25, 2.5)}  # efficacy, SST-2 change, drift KL
    efficacy_at = {0: {1000: 0.875, 2000: 0.75}, 1: {1000: 0.75, 2000: 0.625}, 2: {1000: 0.5}}
    pairs = []
    for seed in (0, 1, 2):
        name = f"ue_seed{seed}"
        pairs.append(
            experiments.Pair(
                name, Path("ue.yaml"), tmp_path / name, runs=(RUNS_ORDER[1],), group="ue", seed=seed
            )  # fmt: skip
        )
        scalars = {0: {"edit/efficacy": 0.25, "drift/kl": 0.0}}
        for edits, value in efficacy_at[seed].items():
            scalars[edits // 100] = {"edit/num_edited": float(edits), "edit/efficacy": value}
        entries = {}
        if seed in finals:
            efficacy, sst2, drift = finals[seed]
            entries = {
                "edit": {"final": {"efficacy": efficacy}},
                "general": {
                    "sst2": {"baseline": {"accuracy": 0.5}, "final": {"accuracy": 0.5 + sst2}}
                },  # fmt: skip
                "drift": {"kl": drift},
            }
        write_run_summary(
            tmp_path / name / "with_sphere",
            scalars,
            finished=seed in finals,
            num_edited=2000 if seed in finals else 1000,
            **entries,
        )

    markdown, data, _ = experiments.write_suite_report(tmp_path, pairs)

    (item,) = json.loads(data.read_text())["seeds"]
    assert (item["group"], item["run"], item["seeds"], item["finished_seeds"]) == (
        "ue", "with_sphere", [0, 1, 2], [0, 1]
    )  # fmt: skip
    for key, index in (("efficacy", 0), ("sst2_accuracy_change", 1), ("drift_kl", 2)):
        values = [finals[seed][index] for seed in (0, 1)]
        stat = item["final"][key]
        assert stat["n"] == 2
        assert stat["mean"] == pytest.approx(mean(values))
        assert stat["sd"] == pytest.approx(stdev(values))
    assert item["final"]["generalization"] == {"n": 0, "mean": None, "sd": None}
    at = item["evaluations"]["edit/efficacy"]
    assert at["1000"]["n"] == 3
    assert at["1000"]["mean"] == pytest.approx(mean([0.875, 0.75, 0.5]))
    assert at["1000"]["sd"] == pytest.approx(stdev([0.875, 0.75, 0.5]))
    assert at["2000"]["n"] == 2
    assert at["2000"]["sd"] == pytest.approx(stdev([0.75, 0.625]))
    assert item["usable_horizon"] == ["2000", "1000", "1000"]

    text = markdown.read_text()
    (row,) = markdown_rows(text.split("## Over the edit orders")[1], table=0)
    header = markdown_rows(text.split("## Over the edit orders")[1], table=0, header=True)[0]
    # Only what the finished runs recorded: no generalization, HE or diagnostics here.
    assert header == [
        "entry", "SPHERE", "seeds finished", "edits", "efficacy", "SST-2 Δacc", "drift KL",
        "usable horizon per seed",
    ]  # fmt: skip
    assert row[:4] == ["ue", "with", "2 of 3", "2000 ± 0"]
    assert row[4] == f"{mean([0.75, 0.625]):.3f} ± {stdev([0.75, 0.625]):.3f}"
    assert row[-1] == "0: 2000, 1: 1000, 2: 1000"
    (efficacy_row,) = markdown_rows(text.split("### Efficacy at every evaluation")[1], table=0)
    assert efficacy_row[2:] == [
        "0.250 ± 0.000",  # before the first edit
        f"{mean([0.875, 0.75, 0.5]):.3f} ± {stdev([0.875, 0.75, 0.5]):.3f}",
        f"{mean([0.75, 0.625]):.3f} ± {stdev([0.75, 0.625]):.3f} (n=2)",
    ]


def test_a_suite_without_seeds_has_no_seed_tables(tmp_path):
    pairs = [experiments.Pair("x", Path("x.yaml"), tmp_path / "x", runs=RUNS_ORDER)]
    write_run_summary(tmp_path / "x" / "with_sphere", {0: {"edit/efficacy": 0.5}}, num_edited=1)
    markdown, data, _ = experiments.write_suite_report(tmp_path, pairs)
    assert json.loads(data.read_text())["seeds"] == []
    assert "Over the edit orders" not in markdown.read_text()
