"""The experiment runner's command line: its checks and help, and end to end on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sphere_lightning import experiments
from sphere_lightning.experiments import (
    SPHERE_CALLBACK,
    WITH_SPHERE,
    WITHOUT_SPHERE,
    main,
)
from sphere_lightning.experiments.cli import _pairs
from tests.helpers import (
    EXPERIMENT_CONFIGS,
    EXPERIMENT_SUITE,
    PNG_SIGNATURE,
    ROOT,
    RUNS_ORDER,
    markdown_rows,
    write_run_summary,
)


def test_the_runner_starts_without_torch():
    """The runner's own process only plans, starts and reads runs: `--help` and `--report-only`
    answer without importing torch, transformers or Lightning (seconds on a slow machine)."""
    heavy = ("torch", "transformers", "lightning")
    code = (
        "import sys, sphere_lightning.experiments, sphere_lightning.__main__\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


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
        _pairs(parser, args)
        assert args.num_edits == expected


def test_report_only_without_runs_fails_naming_the_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--report-only", "--out", str(tmp_path / "nothing")])
    assert exit_info.value.code == 2
    assert "no runs under --out" in capsys.readouterr().err


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


def test_two_configs_of_one_name_are_refused(tmp_path, capsys):
    other = tmp_path / "memit.yaml"
    other.write_text("{}")
    memit = ROOT / "configs" / "experiments" / "memit.yaml"
    with pytest.raises(SystemExit):
        main(["--config", str(memit), str(other), "--dataset", "x.json"])
    assert "name memit twice" in capsys.readouterr().err


def test_parallel_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["--suite", str(EXPERIMENT_SUITE), "--dataset", "x.json", "--parallel", "0"])
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


def test_a_malformed_suite_entry_is_refused(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"configs": [{"name": "x"}]}))
    with pytest.raises(SystemExit):
        main(["--suite", str(suite), "--dataset", "x.json"])
    assert "configs[0] should be a file name or a mapping" in capsys.readouterr().err


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
    pairs = {p.name: p for p in _pairs(parser, args)}
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
    assert {p.runs for p in _pairs(parser, args)} == {(WITHOUT_SPHERE,)}

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


#: Editor settings that scale each experiment config down to the tiny model.
TINY_EDITORS = {
    "alphaedit": dict(layers=[1, 2], target={"num_steps": 4},
                      templates={"count": 1, "length": 4},
                      statistics={"num_samples": 8, "max_length": 12}, nullspace_threshold=1e9),
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
    init_args = config["model"]["editor"]["init_args"]
    for key, value in TINY_EDITORS[name].items():  # an option group's other fields stay
        init_args[key] = {**init_args.get(key, {}), **value} if isinstance(value, dict) else value
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
        assert experiments.log_progress(out / run.name / "fit.log").startswith("2/2 batches done")
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
            assert values["measured_seconds"] == pytest.approx(sum(phases.values()))
        assert len(markdown_rows((out / "table.md").read_text())) == 4

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


def test_suite_seeds_run_each_entry_once_per_edit_order(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"data": {"seed": 7, "num_edits": 10}}))
    suite = tmp_path / "suite.yaml"
    entries = [{"name": "a", "configs": ["base.yaml"], "runs": "with_sphere"}, "base.yaml"]
    suite.write_text(yaml.safe_dump({"seeds": [2, 0], "configs": entries}))

    read = experiments.read_suite(suite)

    assert read.seeds == (2, 0)
    assert [(e.name, e.group, e.seed, e.settings, e.runs) for e in read.entries] == [
        ("a_seed2", "a", 2, (("data.seed", 2),), "with_sphere"),
        ("a_seed0", "a", 0, (("data.seed", 0),), "with_sphere"),
        ("base_seed2", "base", 2, (("data.seed", 2),), None),
        ("base_seed0", "base", 0, (("data.seed", 0),), None),
    ]
    parser = experiments.build_parser()
    args = parser.parse_args(["--suite", str(suite), "--out", str(tmp_path / "o")])
    pairs = {p.name: p for p in _pairs(parser, args)}
    assert {name: (p.group, p.seed, p.load()["data"]["seed"]) for name, p in pairs.items()} == {
        "a_seed2": ("a", 2, 2),
        "a_seed0": ("a", 0, 0),
        "base_seed2": ("base", 2, 2),
        "base_seed0": ("base", 0, 0),
    }
    assert pairs["a_seed0"].directory == tmp_path / "o" / "a_seed0"


@pytest.mark.parametrize(
    ("content", "settings", "message"),
    [
        ({"seeds": [0, 0]}, {}, "`seeds` should be a list of distinct integers ≥ 0, got [0, 0]"),
        ({"seeds": 3}, {}, "`seeds` should be a list of distinct integers ≥ 0, got 3"),
        ({"seeds": [1, -1]}, {}, "`seeds` should be a list of distinct integers ≥ 0"),
        ({"seeds": [True]}, {}, "`seeds` should be a list of distinct integers ≥ 0"),
        ({"seed": [1, 2]}, {}, "unknown keys ['seed'] (allowed: configs, num_edits, runs, seeds)"),
        (
            {"seeds": [1]},
            {"data.seed": 4},
            "entry x sets `data.seed`, which the suite's `seeds` sets for each of its runs",
        ),
    ],
    ids=["repeated", "not-a-list", "negative", "bool", "misspelt", "set-by-the-entry"],
)
def test_bad_suite_seeds_are_refused(tmp_path, content, settings, message):
    suite = tmp_path / "suite.yaml"
    entry = {"name": "x", "configs": ["x.yaml"], "set": settings}
    suite.write_text(yaml.safe_dump({"configs": [entry], **content}, allow_unicode=True))
    with pytest.raises(ValueError) as error:
        experiments.read_suite(suite)
    assert message in str(error.value)


def test_report_only_of_a_suite_passes_over_entries_not_run_yet(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"configs": [str(c) for c in EXPERIMENT_CONFIGS[:2]]}))
    out = tmp_path / "out"
    first, second = (c.stem for c in EXPERIMENT_CONFIGS[:2])
    write_run_summary(
        out / first / WITH_SPHERE.name,
        {0: {"edit/efficacy": 0.3}, 10: {"edit/efficacy": 0.9}},
        num_edited=1000,
    )
    assert main(["--suite", str(suite), "--out", str(out), "--report-only"]) == 0
    printed = capsys.readouterr().out
    assert f"No runs of '{second}' under {out / second} yet" in printed
    assert not (out / second).exists(), "nothing is written for an entry that has not run"
    assert (out / first / "table.md").is_file() and (out / "table.md").is_file()
    # The suite's table still names the entry that has not run.
    assert second in (out / "table.md").read_text()
