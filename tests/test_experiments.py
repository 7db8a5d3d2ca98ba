"""The with/without-SPHERE runner: config derivation, the report from event files, the combined
table of several editors, skipping and resuming runs, end to end."""

from __future__ import annotations

import copy
import json
import re
import sys
import time
import types
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

from sphere_lightning import experiments
from sphere_lightning.callbacks import SphereProjectionCallback
from sphere_lightning.experiments import (
    SPHERE_CALLBACK,
    WITH_SPHERE,
    WITHOUT_SPHERE,
    main,
    run_config,
    without_sphere,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "configs" / "experiments" / "suite.yaml"
EXPERIMENT_CONFIGS = sorted(p for p in SUITE.parent.glob("*.yaml") if p != SUITE)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUNS_ORDER = (WITHOUT_SPHERE, WITH_SPHERE)


# ------------------------------------------------------------------------------- configs


def test_there_are_experiment_configs():
    names = ["alphaedit.yaml", "ft.yaml", "memit.yaml", "prune.yaml", "rect.yaml"]
    assert [p.name for p in EXPERIMENT_CONFIGS] == names
    suite = experiments.read_suite(SUITE)
    assert sorted(f"{entry.name}.yaml" for entry in suite.entries) == names
    assert all(e.files == (SUITE.parent / f"{e.name}.yaml",) for e in suite.entries)
    assert all(e.settings == () and e.runs is None for e in suite.entries)
    assert suite.num_edits == 1000  # every row of the combined table edits the same facts
    assert suite.runs is None


@pytest.mark.parametrize("value", [0, -3, 2.5, "many"])
def test_a_suite_with_a_bad_num_edits_is_refused(tmp_path, value, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"configs": ["memit.yaml"], "num_edits": value}))
    with pytest.raises(SystemExit):
        main(["--suite", str(suite), "--dataset", "x.json"])
    assert "`num_edits` should be an integer ≥ 1" in capsys.readouterr().err


def test_the_suite_num_edits_reaches_every_run_and_the_flag_wins(tmp_path):
    memit = ROOT / "configs" / "experiments" / "memit.yaml"
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"configs": [str(memit)], "num_edits": 300}))
    parser = experiments.build_parser()
    for flags, expected in (([], 300), (["--num-edits", "200"], 200)):
        args = parser.parse_args(["--suite", str(suite), "--out", str(tmp_path / "o"), *flags])
        experiments._pairs(parser, args)
        assert args.num_edits == expected


def _callback(config, name):
    (entry,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(name)]
    return entry.get("init_args", {})


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=lambda p: p.stem)
def test_experiment_configs_follow_the_paper(path):
    config = yaml.safe_load(path.read_text())
    sphere = _callback(config, "SphereProjectionCallback")
    assert sphere["cumulative_ratio"] == 0.5
    assert sphere["suppression"] == (0.5 if path.stem == "alphaedit" else 0.8)
    general = _callback(config, "GeneralAbilityCallback")
    assert set(general["tasks"]) == {"sst2", "nli", "boolq"}
    assert general["tasks"]["boolq"]["limit"] == 100
    assert general["every_n_steps"] == 5
    assert config["data"]["edits_per_step"] == 100
    assert config["data"]["num_edits"] == (2000 if path.stem == "alphaedit" else 1000)
    assert _callback(config, "ModelCheckpoint")["every_n_train_steps"] == 5
    editor = config["model"]["editor"]["class_path"].rsplit(".", 1)[-1]
    assert editor == {"ft": "FT", "alphaedit": "AlphaEdit"}.get(path.stem, "MEMIT")
    # PRUNE and RECT transform MEMIT's batch update before SPHERE projects it, as the official
    # code composes them; the run without SPHERE keeps the transform.
    classes = [c["class_path"].rsplit(".", 1)[-1] for c in config["trainer"]["callbacks"]]
    transform = {"prune": "PruneCallback", "rect": "RectCallback"}.get(path.stem)
    if transform:
        assert classes.index(transform) == classes.index("SphereProjectionCallback") - 1
        assert sphere["reference"] == ("original" if path.stem == "prune" else "current")
        kept = [c["class_path"] for c in without_sphere(config)["trainer"]["callbacks"]]
        assert any(c.endswith(transform) for c in kept)
    else:
        assert not {"PruneCallback", "RectCallback"} & set(classes)


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=lambda p: p.stem)
def test_without_sphere_removes_only_the_sphere_callback(path):
    original = yaml.safe_load(path.read_text())
    untouched = copy.deepcopy(original)

    derived = without_sphere(original)

    callbacks = original["trainer"]["callbacks"]
    assert [c["class_path"] for c in callbacks].count(SPHERE_CALLBACK) == 1
    expected = copy.deepcopy(original)
    expected["trainer"]["callbacks"] = [c for c in callbacks if c["class_path"] != SPHERE_CALLBACK]
    assert derived == expected
    assert len(derived["trainer"]["callbacks"]) == len(callbacks) - 1
    assert original == untouched, "the given config is not modified"


def test_without_sphere_finds_short_names_appended_lists_and_subclasses(monkeypatch):
    class ClippedSphere(SphereProjectionCallback):
        pass

    module = types.ModuleType("user_transforms")
    module.ClippedSphere = ClippedSphere
    monkeypatch.setitem(sys.modules, "user_transforms", module)
    energy = {"class_path": "sphere_lightning.callbacks.HyperSphericalEnergyCallback"}
    config = {
        "trainer": {
            "max_epochs": 1,
            "callbacks": [{"class_path": "SphereProjectionCallback"}, energy],
            "callbacks+": [
                {"class_path": "user_transforms.ClippedSphere", "init_args": {"stage": "in_loop"}},
                "sphere_lightning.callbacks.sphere.SphereProjectionCallback",
            ],
        },
        "model": {"model": "x"},
    }
    assert experiments.count_sphere_callbacks(config) == 3
    assert without_sphere(config) == {
        "trainer": {"max_epochs": 1, "callbacks": [energy], "callbacks+": []},
        "model": {"model": "x"},
    }


def test_run_config_sets_data_and_logger_and_keeps_the_rest(tmp_path):
    config = yaml.safe_load(EXPERIMENT_CONFIGS[0].read_text())
    derived = run_config(config, "facts.json", tmp_path / "out", WITH_SPHERE, num_edits=300)

    assert derived["data"] == {**config["data"], "dataset": "facts.json", "num_edits": 300}
    assert derived["trainer"]["logger"] == {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {
            "save_dir": str(tmp_path / "out"),
            "name": "",
            "version": "with_sphere",
            "default_hp_metric": False,
        },
    }
    for key in config:
        if key not in ("data", "trainer"):
            assert derived[key] == config[key]
    rest = {k: v for k, v in derived["trainer"].items() if k != "logger"}
    assert rest == {k: v for k, v in config["trainer"].items() if k != "logger"}
    # Without --num-edits the config's count stays.
    kept = run_config(config, "facts.json", tmp_path, WITHOUT_SPHERE)
    assert kept["data"]["num_edits"] == config["data"]["num_edits"]


# ------------------------------------------------------------------------------- report

START = 1_700_000_000.0
LAYERS = ("model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj")


def _scalars(**by_step):
    return {int(step.removeprefix("s")): values for step, values in by_step.items()}


def _he(a, b):
    return {f"energy_change/{LAYERS[0]}": a, f"energy_change/{LAYERS[1]}": b}


# Values exactly representable in float32 (TensorBoard stores scalars as float32).
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
# Seconds after the first event at which each step's scalars are written.
WITHOUT_TIMES = {0: 10.0, 1: 40.0, 2: 100.0}
WITH_TIMES = {0: 12.0, 1: 50.0, 2: 130.0}


def _write_run(out: Path, run: str, log, times, monkeypatch) -> Path:
    """Log ``{step: {tag: value}}`` with Lightning's TensorBoardLogger under a fake clock."""
    clock = [START]
    with monkeypatch.context() as patch:
        patch.setattr(time, "time", lambda: clock[0])
        logger = TensorBoardLogger(save_dir=str(out), name="", version=run, default_hp_metric=False)
        logger.experiment  # noqa: B018 - creates the event file: its first event is at START
        for step in sorted(log):
            clock[0] = START + times[step]
            logger.log_metrics(log[step], step=step)
        logger.finalize("success")
    return Path(logger.log_dir)


def _markdown_rows(text: str, table: int = 0) -> list[list[str]]:
    """The body rows of the ``table``-th markdown table of ``text``."""
    tables: list[list[str]] = []
    previous = ""
    for line in text.splitlines():
        if line.startswith("| "):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append(line)
        previous = line
    rows = tables[table] if table < len(tables) else []
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def test_report_tabulates_the_logged_values_at_every_evaluation_step(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _write_run(out, "without_sphere", WITHOUT_LOG, WITHOUT_TIMES, monkeypatch)
    with_dir = _write_run(out, "with_sphere", WITH_LOG, WITH_TIMES, monkeypatch)
    (with_dir / "summary.json").write_text(
        json.dumps({"wall_seconds": 131.5, "num_edited": 200, "global_step": 2})
    )

    markdown, data, figure = write_report(out)

    # Step 1 logged only HE and the edit count: not an evaluation step, not a row.
    assert _markdown_rows(markdown.read_text()) == [
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


def test_report_of_one_run_has_only_its_columns(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _write_run(out, "with_sphere", WITH_LOG, WITH_TIMES, monkeypatch)

    assert main(["--report-only", "--out", str(out)]) == 0

    text = (out / "table.md").read_text()
    assert "(without)" not in text and "efficacy (with)" in text
    rows = _markdown_rows(text)
    assert [row[0] for row in rows] == ["0", "200"]
    assert rows[1][1:] == [
        "0.875", "0.625", "0.750", "550.0", "-0.375", "+0.250", "0.0156", "1.25", "130"
    ]  # fmt: skip
    assert list(json.loads((out / "table.json").read_text())["runs"]) == ["with_sphere"]
    assert (out / "figure.png").read_bytes()[:8] == PNG_SIGNATURE


def test_runs_flag_plans_only_the_chosen_run(tmp_path):
    config = yaml.safe_load(EXPERIMENT_CONFIGS[0].read_text())
    pair = experiments.Pair("alphaedit", EXPERIMENT_CONFIGS[0], tmp_path / "alphaedit")
    processes = experiments.plan_pair(
        pair, config, "x.json", None, report=lambda _: None, runs=(WITH_SPHERE,)
    )
    assert [p.run for p in processes] == [WITH_SPHERE]
    assert (pair.directory / "with_sphere.yaml").is_file()
    assert not (pair.directory / "without_sphere.yaml").exists()


def test_edit_counts_come_from_the_config_where_not_logged(tmp_path, monkeypatch):
    out = tmp_path / "out"
    log = {step: {k: v for k, v in values.items() if k != "edit/num_edited"}
           for step, values in WITH_LOG.items()}  # fmt: skip
    run = _write_run(out, "with_sphere", log, WITH_TIMES, monkeypatch)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"edits_per_step": 30}}))

    table = experiments.build_table(out)

    assert [r["edits"] for r in table["rows"]] == [0, 60]


def test_report_only_without_runs_fails_naming_the_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--report-only", "--out", str(tmp_path / "nothing")])
    assert exit_info.value.code == 2
    assert "no runs under --out" in capsys.readouterr().err


# ------------------------------------------------------------------------------- command


def test_dataset_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(EXPERIMENT_CONFIGS[0])])
    assert exit_info.value.code == 2
    assert "--dataset is required" in capsys.readouterr().err


def test_a_config_without_sphere_is_refused(tmp_path, capsys):
    config = tmp_path / "plain.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": []}}))
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--dataset", "x.json", "--out", str(tmp_path / "o")])
    assert "nothing to compare" in capsys.readouterr().err


def test_plan_skips_finished_resumes_checkpointed_and_restarts_bare_runs(tmp_path):
    config = yaml.safe_load(EXPERIMENT_CONFIGS[0].read_text())
    pair = experiments.Pair("alphaedit", EXPERIMENT_CONFIGS[0], tmp_path / "alphaedit")
    messages: list[str] = []

    def plan():
        messages.clear()
        return experiments.plan_pair(pair, config, "x.json", None, report=messages.append)

    # Nothing there yet: both runs start from scratch.
    assert [(p.run, p.ckpt_path) for p in plan()] == [(WITHOUT_SPHERE, None), (WITH_SPHERE, None)]

    # Without SPHERE finished; with SPHERE was killed after a checkpoint.
    without_dir, with_dir = (pair.directory / run.name for run in RUNS_ORDER)
    without_dir.mkdir()
    (without_dir / "summary.json").write_text("{}")
    (without_dir / "without_sphere_marker").write_text("")
    checkpoint = with_dir / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"ckpt")
    (processes,) = [plan()]
    assert [(p.run, p.ckpt_path) for p in processes] == [(WITH_SPHERE, checkpoint)]
    assert processes[0].command()[-2:] == ["--ckpt_path", str(checkpoint)]
    assert processes[0].name == "alphaedit with SPHERE"
    assert any("skipping 'alphaedit without SPHERE'" in m for m in messages)

    # Killed before its first checkpoint: the folder is set aside and the run starts again.
    checkpoint.unlink()
    (with_dir / "fit.log").write_text("old")
    (processes,) = [plan()]
    assert [(p.run, p.ckpt_path) for p in processes] == [(WITH_SPHERE, None)]
    assert not with_dir.exists()
    assert (pair.directory / "with_sphere.incomplete-1" / "fit.log").read_text() == "old"
    with_dir.mkdir()
    plan()
    assert (pair.directory / "with_sphere.incomplete-2").is_dir()
    assert (without_dir / "without_sphere_marker").exists(), "a finished run is left alone"


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
        "usable_horizon": None,  # no TensorBoard events: no evaluation to read it from
        "he_change": 3.0,  # mean of 2 and 4
        "weight_growth": (12 / 10 + 6 / 4) / 2,  # last over the unedited norm, mean of layers
        "update_ratio": (3 / 10 + 2 / 4) / 2,  # last accumulated update over the unedited norm
        "principal_share": (0.25 + 0.5 + 0.125 + 0.125) / 4,  # every batch and layer
        "principal_share_random": (0.1 + 0.1 + 0.2 + 0.2) / 4,
        "key_leak": (0.25 + 0.5) / 2,  # each layer's last measured value
        "v_norm": 4.5,
        "edit_seconds": 609.75,  # compute_deltas + transform_and_apply + after_apply
        "wall_seconds": 1234.4,
    }
    assert set(table["rows"][0]["values"].values()) == {None}
    rows = _markdown_rows(markdown.read_text())
    assert rows[1] == ["x", "with", "300", "0.750", "0.500", "0.625", "480.2", "-0.125",
                       "+0.250", "+0.000", "0.0625", "—", "3", "1.35", "0.40", "0.250", "0.150",
                       "0.375", "4.50", "610", "1234"]  # fmt: skip
    assert rows[0] == ["x", "without"] + ["—"] * 19
    assert "y with SPHERE: `" in markdown.read_text()


def test_two_configs_of_one_name_are_refused(tmp_path, capsys):
    other = tmp_path / "memit.yaml"
    other.write_text("{}")
    memit = ROOT / "configs" / "experiments" / "memit.yaml"
    with pytest.raises(SystemExit):
        main(["--config", str(memit), str(other), "--dataset", "x.json"])
    assert "name memit twice" in capsys.readouterr().err


def test_parallel_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["--suite", str(SUITE), "--dataset", "x.json", "--parallel", "0"])
    assert "--parallel should be ≥ 1, got 0" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for action in experiments.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
    for flag in ("--config", "--suite", "--dataset", "--num-edits", "--out", "--parallel",
                 "--threads", "--sequential", "--report-only"):  # fmt: skip
        assert flag in text


def test_status_shows_the_batch_count_and_what_the_run_does_now(tmp_path):
    log = tmp_path / "fit.log"
    bar = "Epoch 0:  35%|███▌      | 7/20 [12:01<22:03,  0.01it/s]"
    log.write_text(f"Loading weights\n{bar}\rValidation DataLoader 0:  50%|█████| 2/4\r")
    assert experiments.log_progress(log) == "batch 7/20 · Validation DataLoader 0:  50%|█████| 2/4"
    assert experiments.log_progress(log, width=12) == "batch 7/20 · Validation …"
    log.write_text(f"Loading weights\n{bar}")
    assert experiments.log_progress(log) == "batch 7/20"
    log.write_text("Generating text\n")
    assert experiments.log_progress(log) == "Generating text"
    assert experiments.log_progress(tmp_path / "not-yet.log") == ""


# ------------------------------------------------------------------------------- end to end


#: Editor settings that scale each experiment config down to the tiny model.
TINY_EDITORS = {
    "alphaedit": dict(layers=[1, 2], v_num_steps=4, num_context_templates=1,
                      context_template_length=4, stats_num_samples=8, stats_max_length=12,
                      nullspace_threshold=1e9),
    "ft": dict(layers=[1], num_steps=3, batch_size=4),
}  # fmt: skip


def _tiny_experiment(
    tmp_path: Path, model_dir: str, requests, name: str = "alphaedit"
) -> tuple[Path, Path]:
    """The experiment config ``name`` scaled down to the tiny model, and a fact file."""
    facts = tmp_path / "facts.json"  # the EasyEdit CounterFact layout, as the shared data
    records = [
        {
            "case_id": r.case_id,
            "prompt": r.filled_prompt,
            "subject": r.subject,
            "target_new": r.target_new,
            "ground_truth": r.target_true,
            "rephrase_prompt": r.paraphrase_prompts[0],
            "locality_prompt": r.neighborhood_prompts[0],
            "locality_ground_truth": r.target_true,
        }
        for r in requests
    ]
    facts.write_text(json.dumps(records))
    general = tmp_path / "general"
    sst2 = [{"sentence": f"the film is {w}", "label": i % 2, "idx": i} for i, w in enumerate("ab")]
    nli = [
        {"index": i, "sentence1": "The city is big .", "sentence2": s, "label": label}
        for i, (s, label) in enumerate([("It is big .", "entailment"), ("No .", "not_entailment")])
    ]
    boolq = [
        {"question": "is the city big", "passage": "The city is big .", "answer": answer}
        for answer in (True, False)
    ]
    for task, rows in (("sst2", sst2), ("nli", nli), ("boolq", boolq)):
        general.mkdir(exist_ok=True)
        if not (general / f"{task}.jsonl").exists():
            (general / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    config = yaml.safe_load((ROOT / "configs" / "experiments" / f"{name}.yaml").read_text())
    config["trainer"].update(val_check_interval=1, enable_model_summary=False)
    for callback in config["trainer"]["callbacks"]:
        args = callback.get("init_args", {})
        if callback["class_path"].endswith("GeneralAbilityCallback"):
            args.update(data_dir=str(general), limit=2, every_n_steps=1)
        elif callback["class_path"].endswith("DriftCallback"):
            args.update(num_texts=2, max_length=8, every_n_steps=1)
        elif callback["class_path"].endswith("ModelCheckpoint"):  # keep every step's checkpoint
            args.update(every_n_train_steps=1, save_top_k=-1)
    config["model"].update(model=model_dir, fluency_prompts=1, fluency_max_new_tokens=3)
    config["model"]["editor"]["init_args"].update(TINY_EDITORS[name])
    config["data"]["edits_per_step"] = 2
    path = tmp_path / ("tiny.yaml" if name == "alphaedit" else f"{name}.yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, facts


@pytest.mark.slow
def test_runner_runs_both_and_writes_the_report(tmp_path, tiny_model_dir, requests, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, facts = _tiny_experiment(tmp_path, tiny_model_dir, requests)
    out = tmp_path / "out"

    code = main(
        ["--config", str(config), "--dataset", str(facts), "--num-edits", "4", "--out", str(out)]
    )

    assert code == 0, (out / "with_sphere" / "fit.log").read_text()[-3000:]
    derived = yaml.safe_load((out / "without_sphere.yaml").read_text())
    assert experiments.count_sphere_callbacks(derived) == 0
    given = yaml.safe_load((out / "with_sphere.yaml").read_text())
    assert experiments.count_sphere_callbacks(given) == 1
    for run in (WITH_SPHERE, WITHOUT_SPHERE):
        assert (out / run.name / "summary.json").is_file()
        # The status line reads Lightning's progress bar from the log.
        assert experiments.log_progress(out / run.name / "fit.log").startswith("batch 2/2")
    sphere_tags = {
        run.name: [t for t in experiments.RunLog.read(out / run.name).scalars if "sphere/" in t]
        for run in (WITH_SPHERE, WITHOUT_SPHERE)
    }
    assert sphere_tags["with_sphere"] and not sphere_tags["without_sphere"]
    table = json.loads((out / "table.json").read_text())
    assert [r["edits"] for r in table["rows"]] == [0, 2, 4]
    for row in table["rows"]:
        for run in (WITH_SPHERE, WITHOUT_SPHERE):
            values = row[run.name]
            for tag in ("edit/efficacy", "general_change/sst2/accuracy", "drift/kl"):
                assert values[tag] is not None, (run.name, row["edits"], tag)
            assert values["wall_seconds"] >= 0
            assert set(values["energy_change/per_layer"]) == {
                "model.layers.1.mlp.down_proj",
                "model.layers.2.mlp.down_proj",
            }
    assert (out / "figure.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "| 4 |" in (out / "table.md").read_text()


@pytest.mark.slow
def test_suite_runs_every_pair_skips_finished_runs_and_resumes_a_killed_one(
    tmp_path, tiny_model_dir, requests, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    alphaedit, facts = _tiny_experiment(tmp_path, tiny_model_dir, requests, "alphaedit")
    ft, _ = _tiny_experiment(tmp_path, tiny_model_dir, requests, "ft")
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"configs": [ft.name, alphaedit.name]}))
    out = tmp_path / "out"
    args = ["--suite", str(suite), "--dataset", str(facts), "--num-edits", "4", "--out", str(out)]
    pairs = {"ft": out / "ft", "tiny": out / "tiny"}

    def summaries():
        return {
            (name, run.name): json.loads((folder / run.name / "summary.json").read_text())
            for name, folder in pairs.items()
            for run in RUNS_ORDER
        }

    def check_table():
        table = json.loads((out / "table.json").read_text())
        expected = summaries()
        assert [(r["editor"], r["run"]) for r in table["rows"]] == list(expected)
        for row in table["rows"]:
            summary = expected[row["editor"], row["run"]]
            values = row["values"]
            assert values["num_edited"] == summary["num_edited"] == 4
            for key in ("efficacy", "generalization", "specificity", "fluency"):
                assert values[key] == summary["edit"]["final"][key]
            for task in ("sst2", "nli", "boolq"):
                accuracy = {
                    k: summary["general"][task][k]["accuracy"] for k in ("baseline", "final")
                }
                assert values[f"{task}_accuracy_change"] == accuracy["final"] - accuracy["baseline"]
            assert values["drift_kl"] == summary["drift"]["kl"]
            he = [e["final"] - e["baseline"] for e in summary["energy"].values()]
            assert values["he_change"] == pytest.approx(sum(he) / len(he), rel=1e-12)
            assert values["wall_seconds"] == summary["wall_seconds"]
            phases = summary["phase_seconds"]
            assert values["edit_seconds"] == pytest.approx(
                phases["compute_deltas"] + phases["transform_and_apply"] + phases["after_apply"]
            )
        assert len(_markdown_rows((out / "table.md").read_text())) == 4

    code = main([*args, "--parallel", "2"])

    logs = {(n, r.name): pairs[n] / r.name / "fit.log" for n in pairs for r in RUNS_ORDER}
    assert code == 0, {k: v.read_text()[-2000:] for k, v in logs.items()}
    check_table()
    for folder in pairs.values():  # each pair's own report is still written
        assert (folder / "figure.png").read_bytes()[:8] == PNG_SIGNATURE
        assert [r["edits"] for r in json.loads((folder / "table.json").read_text())["rows"]] == [
            0, 2, 4,
        ]  # fmt: skip
    given = yaml.safe_load((pairs["ft"] / "with_sphere.yaml").read_text())
    assert given["model"]["editor"]["class_path"] == "sphere_lightning.editors.FT"
    assert experiments.count_sphere_callbacks(given) == 1

    # Everything finished: nothing is run again.
    before = {k: (v.stat().st_mtime_ns, v.read_text()) for k, v in logs.items()}
    started = []
    monkeypatch.setattr(experiments.RunProcess, "start", lambda self, threads: started.append(self))
    assert main(args) == 0
    assert started == []
    assert {k: (v.stat().st_mtime_ns, v.read_text()) for k, v in logs.items()} == before
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)

    # AlphaEdit with SPHERE "killed" after its first batch: no summary, the step-1 checkpoint as
    # its last one. It alone is resumed from that checkpoint and finishes the remaining batch.
    killed = pairs["tiny"] / "with_sphere"
    first = json.loads((killed / "summary.json").read_text())
    (killed / "summary.json").unlink()
    (step_1,) = (killed / "checkpoints").glob("*step=1*.ckpt")
    (killed / "checkpoints" / "last.ckpt").write_bytes(step_1.read_bytes())
    untouched = {k: v for k, v in before.items() if k != ("tiny", "with_sphere")}

    assert main(args) == 0

    log = logs["tiny", "with_sphere"].read_text()
    assert log.startswith(before["tiny", "with_sphere"][1]), "the log is appended to"
    assert "Restoring states from the checkpoint path" in log
    assert {
        k: (v.stat().st_mtime_ns, v.read_text()) for k, v in logs.items() if k in untouched
    } == (untouched)
    resumed = json.loads((killed / "summary.json").read_text())
    assert resumed["global_step"] == first["global_step"] == 2
    check_table()


def test_merge_configs_merges_as_a_second_config_file():
    base = {
        "seed": 0,
        "trainer": {"callbacks": [{"class_path": "A"}], "max_epochs": 1},
        "model": {
            "dtype": "float32",
            "editor": {"class_path": "U", "init_args": {"layers": [1], "lr": 0.1}},
        },
    }
    same_class = {"model": {"editor": {"class_path": "U", "init_args": {"lr": 0.5}}}}
    other_class = {
        "trainer": {"callbacks": [{"class_path": "B"}]},
        "model": {"editor": {"class_path": "V", "init_args": {"l2": 1.0}}},
    }
    merged = experiments.merge_configs(base, same_class)
    assert merged["model"]["editor"] == {"class_path": "U", "init_args": {"layers": [1], "lr": 0.5}}
    merged = experiments.merge_configs(base, other_class)
    assert merged == {
        "seed": 0,
        "trainer": {"callbacks": [{"class_path": "B"}], "max_epochs": 1},
        "model": {"dtype": "float32", "editor": {"class_path": "V", "init_args": {"l2": 1.0}}},
    }
    assert base["model"]["editor"]["init_args"] == {"layers": [1], "lr": 0.1}  # not modified


def test_the_horizon_suite_composes_its_entries(tmp_path):
    suite = ROOT / "configs" / "horizon" / "suite.yaml"
    read = experiments.read_suite(suite)
    assert read.num_edits == 10000
    names = [entry.name for entry in read.entries]
    assert names == ["alphaedit", "alphaedit_nas", "ultraedit", "memit"]
    files = {entry.name: entry.files for entry in read.entries}
    nas = experiments.load_config(files["alphaedit_nas"])
    editor = nas["model"]["editor"]
    assert editor["class_path"].endswith("AlphaEdit")
    assert editor["init_args"]["layers"] == [3, 4, 5, 6, 7] and editor["init_args"]["nas"] is True
    assert "lr" not in editor["init_args"]  # UltraEdit's init_args went with its class
    assert nas["data"]["edits_per_step"] == 100 and nas["model"]["eval_sample_size"] == 500
    memit = experiments.load_config(files["memit"])
    sphere = [c for c in memit["trainer"]["callbacks"] if experiments.is_sphere_callback(c)]
    assert [s["init_args"]["suppression"] for s in sphere] == [0.8]
    # The runner's pairs: named after the entry, their files merged in order.
    parser = experiments.build_parser()
    args = parser.parse_args(["--suite", str(suite), "--out", str(tmp_path)])
    pairs = experiments._pairs(parser, args)
    assert [p.name for p in pairs] == names
    assert pairs[1].files == tuple(files["alphaedit_nas"])
    assert pairs[1].directory == tmp_path / "alphaedit_nas"


def test_a_malformed_suite_entry_is_refused(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"configs": [{"name": "x"}]}))
    with pytest.raises(SystemExit):
        main(["--suite", str(suite), "--dataset", "x.json"])
    assert "configs[0] should be a file name or a mapping" in capsys.readouterr().err


def test_set_value_follows_dotted_keys_through_mappings_and_callback_lists():
    config = {
        "data": {"seed": 0},
        "trainer": {
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar"},
                {"class_path": SPHERE_CALLBACK, "init_args": {"suppression": 0.5}},
            ]
        },
    }
    experiments.set_value(config, "data.seed", 2)
    experiments.set_value(
        config, "trainer.callbacks.SphereProjectionCallback.init_args.suppression", 0.8
    )
    experiments.set_value(config, "trainer.callbacks.1.init_args.cumulative_ratio", 0.3)
    experiments.set_value(config, "model", {"dtype": "float32"})  # a new last key
    assert config["data"] == {"seed": 2}
    assert config["trainer"]["callbacks"][1]["init_args"] == {
        "suppression": 0.8,
        "cumulative_ratio": 0.3,
    }
    assert config["model"] == {"dtype": "float32"}
    errors = {
        "data.order.seed": "data has no 'order'",
        "trainer.callbacks.HEAlarmCallback.init_args.x": "no entry of class 'HEAlarmCallback'",
        "trainer.callbacks.5.init_args": "has 2 entries, no index 5",
        "data.seed.value": "data.seed is a value",
        "data..seed": "should be dotted names",
    }
    for key, message in errors.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            experiments.set_value(config, key, 1)
    config["trainer"]["callbacks"].append({"class_path": SPHERE_CALLBACK})
    with pytest.raises(ValueError, match="2 entries of class 'SphereProjectionCallback'"):
        experiments.set_value(config, "trainer.callbacks.SphereProjectionCallback.x", 1)


def test_a_suite_entry_sets_values_and_chooses_its_runs(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(
        yaml.safe_dump(
            {
                "data": {"seed": 0},
                "trainer": {
                    "callbacks": [
                        {"class_path": SPHERE_CALLBACK, "init_args": {"suppression": 0.5}}
                    ]
                },
            }
        )
    )
    suite = tmp_path / "suite.yaml"
    alpha = "trainer.callbacks.SphereProjectionCallback.init_args.suppression"
    suite.write_text(
        yaml.safe_dump(
            {
                "runs": "with_sphere",
                "configs": [
                    {"name": "a08", "configs": ["base.yaml"], "set": {alpha: 0.8}},
                    {
                        "name": "seed1",
                        "configs": ["base.yaml"],
                        "set": {"data.seed": 1},
                        "runs": "both",
                    },  # fmt: skip
                    "base.yaml",
                ],
            }
        )
    )
    read = experiments.read_suite(suite)
    assert read.runs == "with_sphere"
    assert [(e.name, e.settings, e.runs) for e in read.entries] == [
        ("a08", ((alpha, 0.8),), None),
        ("seed1", (("data.seed", 1),), "both"),
        ("base", (), None),
    ]
    parser = experiments.build_parser()
    args = parser.parse_args(["--suite", str(suite), "--out", str(tmp_path / "o")])
    pairs = {p.name: p for p in experiments._pairs(parser, args)}
    assert pairs["a08"].runs == (WITH_SPHERE,)  # the suite's
    assert pairs["seed1"].runs == RUNS_ORDER  # the entry's own
    assert pairs["base"].runs == (WITH_SPHERE,)
    loaded = pairs["a08"].load()
    assert loaded["trainer"]["callbacks"][0]["init_args"]["suppression"] == 0.8
    assert pairs["seed1"].load()["data"]["seed"] == 1
    assert experiments.load_config([base])["data"]["seed"] == 0  # the file is untouched
    assert pairs["a08"].describe() == f"{base} + {alpha}=0.8"
    # --runs on the command line wins over both.
    args = parser.parse_args(["--suite", str(suite), "--out", str(tmp_path / "o"), "--runs",
                              "without_sphere"])  # fmt: skip
    assert {p.runs for p in experiments._pairs(parser, args)} == {(WITHOUT_SPHERE,)}

    bad = {
        "runs": ("configs[0] (a08): `runs` should be one of both, without_sphere, with_sphere",
                 {"name": "a08", "configs": ["base.yaml"], "runs": "sometimes"}),
        "keys": ("configs[0] (a08) has unknown keys ['sets']",
                 {"name": "a08", "configs": ["base.yaml"], "sets": {}}),
        "set": ("configs[0] (a08): `set` should map dotted keys to values",
                {"name": "a08", "configs": ["base.yaml"], "set": ["data.seed"]}),
    }  # fmt: skip
    for message, entry in bad.values():
        suite.write_text(yaml.safe_dump({"configs": [entry]}))
        with pytest.raises(SystemExit):
            main(["--suite", str(suite), "--dataset", "x.json"])
        assert message in capsys.readouterr().err
    # A key that does not resolve is refused before anything runs, naming the entry.
    suite.write_text(yaml.safe_dump({"configs": [
        {"name": "a08", "configs": ["base.yaml"], "set": {"model.editor.init_args.l2": 10}}
    ]}))  # fmt: skip
    with pytest.raises(SystemExit):
        main(["--suite", str(suite), "--dataset", "x.json", "--out", str(tmp_path / "o2")])
    assert "a08: `set` key 'model.editor.init_args.l2': the config has no 'model'" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "o2").exists()


def _log_scalars(directory: Path, log: dict[int, dict[str, float]]) -> None:
    logger = TensorBoardLogger(
        save_dir=str(directory.parent), name="", version=directory.name, default_hp_metric=False
    )
    for step in sorted(log):
        logger.log_metrics(log[step], step=step)
    logger.finalize("success")


def test_suite_trajectories_and_figure_follow_the_logged_diagnostics(tmp_path):
    layers = ("l3", "l4")
    weight = {0: (10.0, 20.0), 1: (11.0, 22.0), 2: (13.0, 30.0)}
    update = {0: (0.0, 0.0), 1: (2.0, 4.0), 2: (5.0, 12.0)}
    share = {1: (0.2, 0.4), 2: (0.3, 0.1)}
    random = {1: (0.1, 0.1), 2: (0.1, 0.1)}
    leak = {1: (0.5, 0.25), 2: (0.75, 0.5)}
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
        if step:
            row["edit/num_edited"] = 100.0 * step
            row["diag/v_norm_mean"] = 2.0 * step
    log[2].update({"edit/efficacy": 0.75, "drift/kl": 1.5})
    out = tmp_path / "suite"
    _log_scalars(out / "alphaedit" / "with_sphere", log)
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
        return sum(leak[step]) / 2

    for quantity in ("weight_growth", "update_ratio", "principal_excess", "key_leak"):
        assert [x for x, _ in trajectory[quantity]] == [100, 200], quantity
        expected = [plain(s, quantity) for s in (1, 2)]
        assert [y for _, y in trajectory[quantity]] == pytest.approx(expected, rel=1e-6)
    assert trajectory["v_norm"] == [[100, 2.0], [200, 4.0]]
    assert trajectory["edit/efficacy"] == [[0, 0.25], [200, 0.75]]
    assert trajectory["energy_change/mean"] == [[0, 0.0], [100, 1.5], [200, 3.0]]
    text = markdown.read_text()
    efficacy = _markdown_rows(text, table=1)
    assert efficacy == [
        ["alphaedit", "without", "—", "—"],
        ["alphaedit", "with", "0.250", "0.750"],
    ]
    assert "## Efficacy at every evaluation" in text
    assert "## Generalization at every evaluation\n\n(not logged yet)" in text
    drift = _markdown_rows(text, table=2)  # generalization and specificity have no table
    assert drift[1] == ["alphaedit", "with", "0.000", "1.500"]
    assert figure.read_bytes()[:8] == PNG_SIGNATURE
