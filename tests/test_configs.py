"""Every YAML under ``configs/`` parses through the real CLI, composed as its header says, and the
paper presets hold the official code's hyperparameters.

Parsing uses ``--print_config``, which resolves the whole config and exits before any class is
instantiated: no model is loaded and nothing is downloaded (the fixture below makes sure).
"""

from __future__ import annotations

import contextlib
import io
import re
import socket
from functools import cache
from pathlib import Path

import pytest
import yaml

import sphere_lightning.experiments as experiments
import sphere_lightning.models.loading as loading
import sphere_lightning.module as module
from sphere_lightning.cli import EditingCLI, cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PAPER = CONFIGS / "paper"


def header_compositions(path: Path) -> list[tuple[str, ...]]:
    """The ``--config`` lists of the commands in a YAML file's leading comment block."""
    compositions = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        configs = tuple(re.findall(r"--config\s+(\S+)", line))
        if configs:
            compositions.append(configs)
    return compositions


@cache
def suite_files() -> tuple[Path, ...]:
    """Experiment suites: files whose top level is ``configs:`` (a list of experiment configs
    for ``sphere-lightning experiments --suite``) and optionally the other suite keys."""
    return tuple(
        path
        for path in sorted(CONFIGS.rglob("*.yaml"))
        if "configs" in (keys := set(yaml.safe_load(path.read_text()) or {}))
        and keys <= set(experiments.SUITE_KEYS)
    )


@cache
def compositions_to_check() -> tuple[tuple[str, ...], ...]:
    """Each file's header commands that name the file itself, or else the file alone."""
    found: dict[tuple[str, ...], None] = {}
    for path in sorted(CONFIGS.rglob("*.yaml")):
        if path in suite_files():
            continue  # a list of experiment configs (checked below), not a fit config
        relative = path.relative_to(ROOT).as_posix()
        own = [c for c in header_compositions(path) if relative in c]
        for composition in own or [(relative,)]:
            found[composition] = None
    return tuple(found)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Fail loudly if parsing reaches for the network, a model, or instantiates the classes."""
    monkeypatch.setattr("sys.argv", ["sphere_lightning"])  # the CLI's args come from the test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("parsing a config must not touch the network or load a model")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(module, "load_model", refuse)
    monkeypatch.setattr(EditingCLI, "instantiate_classes", refuse)


@cache
def _print_config(composition: tuple[str, ...]) -> str:
    args = ["fit"]
    for config in composition:
        args += ["--config", str(ROOT / config)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main([*args, "--print_config"])
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise AssertionError(f"{composition} does not parse:\n{err.getvalue()}") from None
        else:
            raise AssertionError("--print_config should exit after printing")
    return out.getvalue()


def resolve(*composition: str) -> dict:
    """The fully resolved config of ``fit --config a --config b ...``."""
    return yaml.safe_load(_print_config(tuple(composition)))


def callback(config: dict, name: str) -> dict:
    """``init_args`` of the one callback whose class is ``name``."""
    (found,) = [
        c["init_args"] for c in config["trainer"]["callbacks"] if c["class_path"].endswith(name)
    ]
    return found


@pytest.mark.parametrize("composition", compositions_to_check(), ids=" + ".join)
def test_config_parses(composition):
    for config in composition:
        assert (ROOT / config).is_file(), f"header names a missing file: {config}"
    resolved = resolve(*composition)
    assert resolved["model"]["editor"]["class_path"].startswith("sphere_lightning.editors.")
    assert resolved["data"]["edits_per_step"] >= 1


@pytest.mark.parametrize("suite", suite_files(), ids=lambda p: p.name)
def test_suite_lists_experiment_configs_that_parse(suite, tmp_path):
    """Each config a suite lists (relative to the suite) exists and is itself a fit config
    checked by ``test_config_parses``; an entry of several files, merged by the runner, is the
    config jsonargparse makes of ``fit --config a --config b ...``."""
    listed = yaml.safe_load(suite.read_text())["configs"]
    assert listed, f"{suite} lists no configs"
    checked = {c for composition in compositions_to_check() for c in composition}
    for entry in listed:
        names = entry["configs"] if isinstance(entry, dict) else [entry]
        settings = entry.get("set", {}) if isinstance(entry, dict) else {}
        files = [(suite.parent / name).resolve() for name in names]
        for name, config in zip(names, files, strict=True):
            assert config.is_file(), f"{suite} lists a missing file: {name}"
        relative = tuple(config.relative_to(ROOT).as_posix() for config in files)
        if len(files) == 1 and not settings:
            assert relative[0] in checked
            continue
        pair = experiments.Pair(entry["name"], files[-1], tmp_path, tuple(files[:-1]),
                                tuple(settings.items()))  # fmt: skip
        merged = tmp_path / f"{entry['name']}.yaml"
        merged.write_text(yaml.safe_dump(pair.load(), sort_keys=False))
        # The runner's merge and settings, against jsonargparse's resolution of the files with
        # each setting written into the resolved config.
        expected = resolve(*relative)
        for key, value in settings.items():
            experiments.set_value(expected, key, value)
        assert resolve(str(merged)) == expected


def test_header_parser_reads_commands(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(
        "# Compose:\n#   fit --config configs/a.yaml --config configs/b.yaml\n"
        "# no command here\ndata:\n  # --config configs/ignored.yaml\n  num_edits: 1\n"
    )
    assert header_compositions(path) == [("configs/a.yaml", "configs/b.yaml")]


# -- paper presets -------------------------------------------------------------------------------

# Transcribed by hand from the official code (github.com/PlusLabNLP/SPHERE, hparams/<editor>/
# <model>.json; the README's --beta_hse/--alpha; experiments/evaluate.py), not from the presets.
REFERENCE = {
    "llama3-8b": {
        "model": "meta-llama/Meta-Llama-3-8B-Instruct",
        "layers": [4, 5, 6, 7, 8],
        "v_num_steps": 25,
        "v_lr": 0.1,
        "clamp_norm_factor": 0.75,
        "v_weight_decay": 0.5,
        "mom2_update_weight": 15000,
    },
    "qwen2.5-7b": {
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "layers": [4, 5, 6, 7, 8],
        "v_num_steps": 25,
        "v_lr": 0.5,
        "clamp_norm_factor": 4,
        "v_weight_decay": 1e-3,
        "mom2_update_weight": 15000,
    },
    "gpt-j-6b": {
        "model": "EleutherAI/gpt-j-6B",
        "layers": [3, 4, 5, 6, 7, 8],
        "v_num_steps": 25,
        "v_lr": 0.5,
        "clamp_norm_factor": 0.75,
        "v_weight_decay": 0.5,
        "mom2_update_weight": 15000,
    },
    "gpt2-xl": {
        "model": "gpt2-xl",
        "layers": [13, 14, 15, 16, 17],
        "v_num_steps": 20,
        "v_lr": 0.5,
        "clamp_norm_factor": 0.75,
        "v_weight_decay": 0.5,
        "mom2_update_weight": 20000,
    },
}
EDITORS = {
    "alphaedit": {"class": "AlphaEdit", "suppression": 0.5, "stage": "in_loop"},
    "memit": {"class": "MEMIT", "suppression": 0.8, "stage": "after_loop"},
    # --alg_name=MEMIT_prune / MEMIT_rect read hparams/MEMIT/<model>.json (evaluate.py); PRUNE
    # prunes the total update, then projects it with the unedited W, only in the weights
    # evaluated (evaluate.py); RECT keeps k_percent = 40 of the entries, then projects with the
    # live W (memit/memit_rect_main.py), after the loop.
    "prune": {
        "class": "MEMIT",
        "suppression": 0.8,
        "stage": "evaluation",
        "reference": "original",
        "transform": ("PruneCallback", {"stage": "evaluation"}),
    },
    "rect": {
        "class": "MEMIT",
        "suppression": 0.8,
        "stage": "after_loop",
        "transform": ("RectCallback", {"ratio": 0.4, "stage": "after_loop"}),
    },
}
# hparams/ROME/<model>.json. Every file: v_lr 0.5, clamp 4, KL 0.0625, fact_token subject_last,
# context_template_length_params [[5, 10], [10, 10]] (20 generated templates).
ROME_REFERENCE = {
    "llama3-8b": {"layers": [5], "v_num_steps": 25, "v_weight_decay": 1e-3, "mom2": False},
    "qwen2.5-7b": {"layers": [5], "v_num_steps": 25, "v_weight_decay": 1e-3, "mom2": False},
    "gpt-j-6b": {"layers": [5], "v_num_steps": 20, "v_weight_decay": 0.5, "mom2": True},
    "gpt2-xl": {"layers": [17], "v_num_steps": 20, "v_weight_decay": 0.5, "mom2": True},
}
# hparams/FT/<model>.json (GPT-J and GPT-2 XL: the `_unconstr` files). Every file: 25 steps,
# lr 5e-4, weight decay 0, norm_constraint false; batch_size is FTHyperParams' default, 64.
FT_REFERENCE = {"llama3-8b": [21], "qwen2.5-7b": [27], "gpt-j-6b": [21], "gpt2-xl": [1]}
# SPHERE on ROME (per request, in the loop) and FT (on the tuned ΔW) with the live W, α 0.8.
OTHER_EDITORS = {
    "rome": {"class": "ROME", "suppression": 0.8, "stage": "in_loop"},
    "ft": {"class": "FT", "suppression": 0.8, "stage": "after_loop"},
}
ALL_EDITORS = [*EDITORS, *OTHER_EDITORS]
# github.com/XiaojieGu/UltraEdit config/model/<model>.yaml: the blocks of its edited modules (GPT-J:
# fc_out; Llama-3 and Qwen2.5: gate_proj/up_proj, edited here as down_proj of the same blocks),
# lr 1e-6, 10 requests per pass, half precision. Not a SPHERE paper editor: α 0.8, after the loop.
ULTRAEDIT_REFERENCE = {
    "llama3-8b": [11, 12, 13, 14, 15, 18, 19, 20, 21, 22, 23, 24],
    "qwen2.5-7b": [18, 19, 20, 21, 22, 23, 24, 25, 26],
    "gpt-j-6b": [18, 19, 20, 21, 22, 23, 24, 25, 26],
}
DATASETS = {
    "counterfact": {"num_edits": 15000, "format": "counterfact_rome", "family": "counterfact"},
    "zsre": {"num_edits": 3000, "format": "zsre_mend", "family": "zsre"},
}


def test_paper_folder_holds_exactly_the_presets():
    expected = {f"{m}_{e}.yaml" for m in REFERENCE for e in ALL_EDITORS}
    expected |= {f"{m}_ultraedit.yaml" for m in ULTRAEDIT_REFERENCE}
    expected |= {f"{d}.yaml" for d in DATASETS}
    expected |= {"downstream.yaml"}
    assert {p.name for p in PAPER.iterdir()} == expected


@pytest.mark.parametrize("model_name", REFERENCE)
@pytest.mark.parametrize("editor_name", ALL_EDITORS)
def test_paper_preset_header_composes_each_dataset(model_name, editor_name):
    preset = f"configs/paper/{model_name}_{editor_name}.yaml"
    assert sorted(header_compositions(ROOT / preset)) == sorted(
        (preset, f"configs/paper/{d}.yaml") for d in DATASETS
    )


@pytest.mark.parametrize("dataset_name", DATASETS)
@pytest.mark.parametrize("editor_name", EDITORS)
@pytest.mark.parametrize("model_name", REFERENCE)
def test_paper_preset_matches_reference(model_name, editor_name, dataset_name):
    ref, editor, data = REFERENCE[model_name], EDITORS[editor_name], DATASETS[dataset_name]
    config = resolve(
        f"configs/paper/{model_name}_{editor_name}.yaml", f"configs/paper/{dataset_name}.yaml"
    )
    model = config["model"]
    assert model["model"] == ref["model"]
    assert model["dtype"] == "float32"  # from_pretrained's default in the reference

    assert model["editor"]["class_path"] == f"sphere_lightning.editors.{editor['class']}"
    args = model["editor"]["init_args"]
    assert args["layers"] == ref["layers"]
    assert args["target_layer"] == ref["layers"][-1]  # the reference's z_layer
    target = args["target"]
    for knob, field in [
        ("v_num_steps", "num_steps"),
        ("v_lr", "lr"),
        ("clamp_norm_factor", "clamp_norm_factor"),
        ("v_weight_decay", "weight_decay"),
    ]:
        assert target[field] == pytest.approx(ref[knob]), knob
    assert target["kl_factor"] == pytest.approx(0.0625)
    assert target["loss_threshold"] == pytest.approx(5e-2)
    assert args["templates"] == {"count": 5, "length": 10}
    assert args["statistics"]["num_samples"] == 100000
    assert "wikitext-103" in args["statistics"]["corpus"]
    if editor["class"] == "AlphaEdit":
        assert args["l2"] == pytest.approx(10)
        assert args["nullspace_threshold"] == pytest.approx(2e-2)
        assert "mom2_update_weight" not in args
    else:
        assert args["mom2_update_weight"] == pytest.approx(ref["mom2_update_weight"])
        assert "l2" not in args

    check_sphere_and_data(config, editor, data)
    classes = [c["class_path"].rsplit(".", 1)[-1] for c in config["trainer"]["callbacks"]]
    if "transform" in editor:
        name, init_args = editor["transform"]
        assert callback(config, name) == init_args
        # the reference transforms the update first, then projects it
        assert classes.index(name) < classes.index("SphereProjectionCallback")
    else:
        assert not {"PruneCallback", "RectCallback"} & set(classes)


def check_sphere_and_data(config: dict, editor: dict, data: dict) -> None:
    """SPHERE as the paper runs it on ``editor``, and the paper's edits of ``data``."""
    sphere = callback(config, "SphereProjectionCallback")
    assert sphere["cumulative_ratio"] == pytest.approx(0.5)
    assert sphere["suppression"] == pytest.approx(editor["suppression"])
    assert sphere["stage"] == editor["stage"]
    assert sphere["reference"] == editor.get("reference", "current")
    # The reference projects on the rows of the weight as stored: GPT-2's Conv1D (in × out);
    # on nn.Linear (the other models) the default `linear` is the same.
    gpt2 = config["model"]["model"] == "gpt2-xl"
    assert sphere["neuron_rows"] == ("stored" if gpt2 else "linear")
    callback(config, "HyperSphericalEnergyCallback")

    assert config["data"]["edits_per_step"] == 100
    assert config["data"]["shuffle"] is False  # the reference edits the first records in order
    assert config["data"]["num_edits"] == data["num_edits"]
    assert config["data"]["format"] == data["format"]
    assert config["data"]["metric_family"] == data["family"]
    assert config["data"]["dataset"].startswith("PATH/TO/")


@pytest.mark.parametrize("dataset_name", DATASETS)
@pytest.mark.parametrize("editor_name", OTHER_EDITORS)
@pytest.mark.parametrize("model_name", REFERENCE)
def test_paper_rome_ft_preset_matches_reference(model_name, editor_name, dataset_name):
    editor, data = OTHER_EDITORS[editor_name], DATASETS[dataset_name]
    config = resolve(
        f"configs/paper/{model_name}_{editor_name}.yaml", f"configs/paper/{dataset_name}.yaml"
    )
    model = config["model"]
    assert model["model"] == REFERENCE[model_name]["model"]
    assert model["dtype"] == "float32"
    assert model["editor"]["class_path"] == f"sphere_lightning.editors.{editor['class']}"
    args = model["editor"]["init_args"]
    if editor["class"] == "ROME":
        ref = ROME_REFERENCE[model_name]
        assert args["layers"] == ref["layers"]
        assert args.get("target_layer") is None  # ROME optimises v* at the edited layer
        target = args["target"]
        assert target["num_steps"] == ref["v_num_steps"]
        assert target["lr"] == pytest.approx(0.5)
        assert target["clamp_norm_factor"] == pytest.approx(4)
        assert target["kl_factor"] == pytest.approx(0.0625)
        assert target["weight_decay"] == pytest.approx(ref["v_weight_decay"])
        assert target["loss_threshold"] == pytest.approx(5e-2)  # hard-coded in compute_v
        assert args["mom2_adjustment"] is ref["mom2"]
        assert args["templates"]["count"] == 20
        assert args["statistics"]["num_samples"] == 100000
        assert "wikitext-103" in args["statistics"]["corpus"]
    else:
        assert args["layers"] == FT_REFERENCE[model_name]
        assert args["num_steps"] == 25
        assert args["lr"] == pytest.approx(5e-4)
        assert args["weight_decay"] == 0
        assert args["norm_constraint"] is None
        assert args["batch_size"] == 64
        assert args["loss_threshold"] == pytest.approx(1e-2)  # hard-coded in ft_main.py
    check_sphere_and_data(config, editor, data)
    classes = [c["class_path"].rsplit(".", 1)[-1] for c in config["trainer"]["callbacks"]]
    assert not {"PruneCallback", "RectCallback"} & set(classes)


@pytest.mark.parametrize("dataset_name", DATASETS)
@pytest.mark.parametrize("model_name", ULTRAEDIT_REFERENCE)
def test_paper_ultraedit_preset_matches_reference(model_name, dataset_name):
    preset = f"configs/paper/{model_name}_ultraedit.yaml"
    assert sorted(header_compositions(ROOT / preset)) == sorted(
        (preset, f"configs/paper/{d}.yaml") for d in DATASETS
    )
    config = resolve(preset, f"configs/paper/{dataset_name}.yaml")
    model = config["model"]
    assert model["model"] == REFERENCE[model_name]["model"]
    assert model["dtype"] == "bfloat16"  # the reference's half: True
    assert model["editor"]["class_path"] == "sphere_lightning.editors.UltraEdit"
    args = model["editor"]["init_args"]
    assert args["layers"] == ULTRAEDIT_REFERENCE[model_name]
    assert args["lr"] == pytest.approx(1e-6)
    assert args["l2"] == pytest.approx(1.0)
    assert args["forward_batch_size"] == 10
    check_sphere_and_data(
        config, {"suppression": 0.8, "stage": "after_loop"}, DATASETS[dataset_name]
    )


@pytest.mark.parametrize("dataset_name", DATASETS)
def test_paper_downstream_evaluates_the_reference_tasks_on_500_examples(dataset_name):
    """scripts/evaluate_each_epoch_rect.py: RECT_eval's four tasks, --num_tests 500."""
    config = resolve(
        "configs/paper/llama3-8b_alphaedit.yaml",
        f"configs/paper/{dataset_name}.yaml",
        "configs/paper/downstream.yaml",
    )
    general = callback(config, "GeneralAbilityCallback")
    assert set(general["tasks"]) == {"gsm8k", "nq_open", "boolq", "nli_reference"}
    assert general["limit"] == 500
    assert all("limit" not in (settings or {}) for settings in general["tasks"].values())
    callback(config, "SphereProjectionCallback")  # added to the preset's callbacks
