"""The experiment runner's configs: the experiment configs, without SPHERE, run configs,
merged configs, suites and dotted ``set`` keys."""

from __future__ import annotations

import copy
import re
import sys
import types

import pytest
import yaml

from sphere_lightning import experiments
from sphere_lightning.callbacks import SphereProjectionCallback
from sphere_lightning.experiments import (
    SPHERE_CALLBACK,
    WITH_SPHERE,
    WITHOUT_SPHERE,
    run_config,
    without_sphere,
)
from sphere_lightning.experiments.cli import _pairs
from tests.helpers import (
    EXPERIMENT_CONFIGS,
    EXPERIMENT_SUITE,
    ROOT,
)


def _callback(config, name):
    (entry,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(name)]
    return entry.get("init_args", {})


def test_there_are_experiment_configs():
    names = ["alphaedit.yaml", "ft.yaml", "memit.yaml", "prune.yaml", "rect.yaml"]
    assert [p.name for p in EXPERIMENT_CONFIGS] == names
    suite = experiments.read_suite(EXPERIMENT_SUITE)
    assert sorted(f"{entry.name}.yaml" for entry in suite.entries) == names
    assert all(e.files == (EXPERIMENT_SUITE.parent / f"{e.name}.yaml",) for e in suite.entries)
    assert all(e.settings == () and e.runs is None for e in suite.entries)
    assert suite.num_edits == 1000  # every row of the combined table edits the same facts
    assert suite.runs is None


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
    assert names == ["memit", "alphaedit_nas", "alphaedit", "ultraedit"]
    files = {entry.name: entry.files for entry in read.entries}
    nas = experiments.load_config(files["alphaedit_nas"])
    editor = nas["model"]["editor"]
    assert editor["class_path"].endswith("AlphaEdit")
    assert editor["init_args"]["layers"] == [3, 4, 5, 6, 7]
    assert editor["init_args"]["nas"]["enabled"] is True
    assert "lr" not in editor["init_args"]  # UltraEdit's init_args went with its class
    assert nas["data"]["edits_per_step"] == 100 and nas["model"]["eval_sample_size"] == 500
    memit = experiments.load_config(files["memit"])
    sphere = [c for c in memit["trainer"]["callbacks"] if experiments.is_sphere_callback(c)]
    assert [s["init_args"]["suppression"] for s in sphere] == [0.8]
    # The runner's pairs: named after the entry, their files merged in order.
    parser = experiments.build_parser()
    args = parser.parse_args(["--suite", str(suite), "--out", str(tmp_path)])
    pairs = _pairs(parser, args)
    assert [p.name for p in pairs] == names
    assert pairs[1].files == tuple(files["alphaedit_nas"])
    assert pairs[1].directory == tmp_path / "alphaedit_nas"


def _sphere_args(config: dict) -> list[dict]:
    return [
        c.get("init_args", {})
        for c in config["trainer"]["callbacks"]
        if experiments.is_sphere_callback(c)
    ]


def test_the_horizon_follow_up_suites_set_what_they_vary(tmp_path):
    parser = experiments.build_parser()

    def loaded(name: str) -> dict[str, dict]:
        suite = ROOT / "configs" / "horizon" / name
        args = parser.parse_args(["--suite", str(suite), "--out", str(tmp_path)])
        return {pair.name: pair.load() for pair in _pairs(parser, args)}

    grid = loaded("sensitivity.yaml")
    assert experiments.read_suite(ROOT / "configs/horizon/sensitivity.yaml").num_edits == 2000
    cells = {name: config for name, config in grid.items() if name != "alphaedit"}
    assert len(cells) == 9
    for name, config in cells.items():
        beta, alpha = (
            float(part[len(key) :])
            for part, key in zip(name.split("_"), ("beta", "alpha"), strict=True)
        )
        (sphere,) = _sphere_args(config)
        assert (sphere["cumulative_ratio"], sphere["suppression"]) == (beta, alpha)
        assert config["model"]["editor"]["class_path"].endswith("AlphaEdit")
    assert {
        (s["cumulative_ratio"], s["suppression"]) for c in cells.values() for s in _sphere_args(c)
    } == {(b, a) for b in (0.3, 0.5, 0.7) for a in (0.5, 0.8, 1.0)}

    for name, editor in (("seeds.yaml", "AlphaEdit"), ("seeds_ultraedit.yaml", "UltraEdit")):
        runs = loaded(name)
        assert sorted(config["data"]["seed"] for config in runs.values()) == [0, 1, 2]
        stem = "alphaedit" if editor == "AlphaEdit" else "ultraedit"
        assert sorted(runs) == [f"{stem}_seed{seed}" for seed in (0, 1, 2)]
        for config in runs.values():
            assert config["model"]["editor"]["class_path"].endswith(editor)
            assert _sphere_args(config)  # the with-SPHERE run; the runner derives the other
    assert experiments.read_suite(ROOT / "configs/horizon/seeds_ultraedit.yaml").num_edits is None
    for config in loaded("seeds_ultraedit.yaml").values():
        assert config["data"]["num_edits"] == 10000  # ultraedit.yaml's own horizon

    # NAS where AlphaEdit collapses, per edit order: the settings of nas_collapse.yaml
    collapse = loaded("nas_collapse.yaml")
    runs = loaded("seeds_nas.yaml")
    assert experiments.read_suite(ROOT / "configs/horizon/seeds_nas.yaml").num_edits == 2000
    assert sorted(runs) == [
        f"{stem}_seed{seed}"
        for stem in ("alphaedit_l2-1", "alphaedit_nas_l2-1")
        for seed in (0, 1, 2)
    ]
    for name, config in runs.items():
        stem, seed = name.rsplit("_seed", 1)
        assert config["data"]["seed"] == int(seed)
        reference = collapse[stem]["model"]["editor"]["init_args"]
        editor = config["model"]["editor"]["init_args"]
        assert editor["l2"] == reference["l2"] == 1.0
        assert editor["statistics"] == reference["statistics"]
        assert editor["templates"] == reference["templates"]
        assert editor["nullspace_threshold"] == reference["nullspace_threshold"] == 0.02
        assert bool((editor.get("nas") or {}).get("enabled")) == ("nas" in stem)
        assert _sphere_args(config)


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
