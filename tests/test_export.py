"""Export of an edited model as a plain Hugging Face folder (checkpoint and in-run paths)."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sphere_lightning
from sphere_lightning.callbacks import ExportCallback
from sphere_lightning.cli import cli_main
from sphere_lightning.data.datamodule import EditDataModule
from sphere_lightning.editors import AlphaEdit
from sphere_lightning.errors import ConfigError
from sphere_lightning.export import export_checkpoint, load_edited_model, main
from sphere_lightning.models import load_model
from sphere_lightning.module import CheckpointMismatchError, EditingModule
from tests.helpers import _fit_args  # the tiny-model `fit` arguments of the end-to-end CLI tests

PROMPTS = [
    "The mother tongue of Danielle Darrieux is",
    "The Eiffel Tower is located in the city of",
    "Lionel Messi plays the sport of",
]

#: What a plain transformers folder may hold, besides the export's own two files.
HF_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
}

# Run in a fresh interpreter: plain transformers, and proof that sphere_lightning is not needed.
LOAD_WITH_TRANSFORMERS = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(1)
folder, prompts, result = sys.argv[1:]
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
ids = [tokenizer(p, return_tensors="pt").input_ids for p in json.loads(prompts)]
with torch.no_grad():
    logits = [model(input_ids=i).logits[0] for i in ids]
assert not [m for m in sys.modules if m.startswith("sphere_lightning")], "sphere_lightning loaded"
torch.save({"ids": ids, "logits": logits}, result)
"""


def _load_in_plain_transformers(folder: Path, tmp_path: Path) -> dict[str, list[torch.Tensor]]:
    result = tmp_path / "plain.pt"
    subprocess.run(
        [sys.executable, "-c", LOAD_WITH_TRANSFORMERS, str(folder), json.dumps(PROMPTS), result],
        check=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
    )
    return torch.load(result, weights_only=True)


def _logits(model, tokenizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ids = [tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS]
    with torch.no_grad():
        return ids, [model(input_ids=i).logits[0] for i in ids]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer, make_tiny_model):
    """``base_dir(family, seed=0)``: a folder holding a tiny model and the tokenizer."""
    made: dict[tuple[str, int], str] = {}

    def make(family: str, seed: int = 0) -> str:
        if (family, seed) not in made:
            path = tmp_path_factory.mktemp(f"{family}-{seed}")
            make_tiny_model(family, seed).save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[family, seed] = str(path)
        return made[family, seed]

    return make


def _edited_module(model_dir: str) -> tuple[EditingModule, dict[str, torch.Tensor]]:
    """A module whose layers 1 and 2 got a known ΔW (nn.Linear out × in convention) through the
    module's own apply path."""
    module = EditingModule(editor=AlphaEdit(layers=[1, 2]), model=model_dir)
    module.configure_model()
    generator = torch.Generator().manual_seed(0)
    deltas = {
        name: 0.5 * torch.randn(module.edited_weight(name).shape, generator=generator)
        for name in module.edited_parameter_names
    }
    module.pending_deltas = dict(deltas)
    module.apply_pending_deltas()
    module.pending_deltas = {}
    return module, deltas


def _save_checkpoint(
    module: EditingModule,
    data: dict,
    path: Path,
    num_edited: int = 4,
    log_dir: Path | None = None,
) -> Path:
    """A checkpoint as a run writes it: the module's own ``on_save_checkpoint`` entries, with
    Lightning's hyper-parameter entries and the numbers a trainer would have supplied."""
    checkpoint = {
        "hyper_parameters": dict(module.hparams),
        "datamodule_hyper_parameters": dict(EditDataModule(**data).hparams),
    }
    module.on_save_checkpoint(checkpoint)
    checkpoint["sphere_lightning"].update(
        num_edited=num_edited,
        pre_edit_metrics={"efficacy": 0.125, "generalization": 0.25, "specificity": 0.875},
        final_edit_metrics={
            "num_evaluated": float(num_edited),
            "efficacy": 0.75,
            "generalization": 0.625,
            "specificity": 0.8125,
        },
        log_dir=None if log_dir is None else str(log_dir),
    )
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def facts(tmp_path, requests, write_rome_json) -> dict:
    """Data-module arguments over the five fixture facts, in file order."""
    path = write_rome_json(requests, tmp_path / "facts.json")
    return {"dataset": str(path), "num_edits": 5, "edits_per_step": 2, "shuffle": False}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_loads_in_plain_transformers_with_the_edited_logits(
    family, tmp_path, base_dir, facts
):
    module, deltas = _edited_module(base_dir(family))
    ckpt = _save_checkpoint(module, facts, tmp_path / "run.ckpt")

    out = export_checkpoint(ckpt, tmp_path / "export")

    assert out == tmp_path / "export"
    assert {p.name for p in out.iterdir()} - HF_FILES == {"README.md", "edits.jsonl"}
    assert "sphere_lightning" not in (out / "config.json").read_text()
    plain = _load_in_plain_transformers(out, tmp_path)
    ids, edited_logits = _logits(module.model, module.tokenizer)
    for got, want in zip(plain["ids"], ids, strict=True):
        assert torch.equal(got, want)
    # Same weights, same kernels, one thread each: equal up to float32 rounding noise.
    torch.testing.assert_close(plain["logits"], edited_logits, rtol=0, atol=1e-6)
    base_model, _ = load_model(base_dir(family))
    _, base_logits = _logits(base_model, module.tokenizer)
    assert not torch.allclose(base_logits[0], edited_logits[0], atol=1e-3), "the edit shows"

    # The stored tensors: edited = base + ΔW in the file's own layout (Conv1D: in × out),
    # everything else bit-identical to the base model's file.
    exported = load_file(out / "model.safetensors")
    base = load_file(Path(base_dir(family)) / "model.safetensors")
    assert exported.keys() == base.keys()
    for name, tensor in exported.items():
        if name in deltas:
            delta = deltas[name].T if family == "gpt2" else deltas[name]
            assert tensor.shape == base[name].shape
            assert torch.equal(tensor, base[name] + delta)
            assert not torch.equal(tensor, base[name])
        else:
            assert torch.equal(tensor, base[name]), name
    if family == "gpt2":
        assert exported["transformer.h.1.mlp.c_proj.weight"].shape == (128, 32)  # in × out


def _edits(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "edits.jsonl").read_text().splitlines()]


def test_edits_jsonl_lists_the_edited_facts_in_edit_order(tmp_path, base_dir, facts, requests):
    module, _ = _edited_module(base_dir("llama"))
    ckpt = _save_checkpoint(module, facts, tmp_path / "run.ckpt", num_edited=4)

    out = export_checkpoint(ckpt, tmp_path / "export")

    assert _edits(out) == [
        {
            "case_id": r.case_id,
            "prompt": r.prompt,
            "subject": r.subject,
            "target_new": r.target_new,
            "target_true": r.target_true,
            "position": i,
        }
        for i, r in enumerate(requests[:4])
    ]


def test_edits_jsonl_follows_the_seeded_edit_order(tmp_path, base_dir, facts, requests):
    data = {**facts, "shuffle": True, "seed": 3}
    module, _ = _edited_module(base_dir("llama"))
    ckpt = _save_checkpoint(module, data, tmp_path / "run.ckpt", num_edited=3)

    lines = _edits(export_checkpoint(ckpt, tmp_path / "export"))

    order = EditDataModule(**data).requests[:3]
    assert [line["case_id"] for line in lines] == [r.case_id for r in order]
    assert [line["position"] for line in lines] == [0, 1, 2]
    assert [line["subject"] for line in lines] == [r.subject for r in order]
    assert [r.case_id for r in order] != [0, 1, 2], "the seed changes the order"


def test_model_card_reports_the_run(tmp_path, base_dir, facts):
    module, _ = _edited_module(base_dir("llama"))
    log_dir = tmp_path / "logs" / "edit" / "version_0"
    log_dir.mkdir(parents=True)
    (log_dir / "config.yaml").write_text(
        """
trainer:
  callbacks:
    - class_path: sphere_lightning.callbacks.HyperSphericalEnergyCallback
    - class_path: sphere_lightning.callbacks.SphereProjectionCallback
      init_args: {cumulative_ratio: 0.4, suppression: 0.8, stage: after_loop}
"""
    )
    ckpt = _save_checkpoint(module, facts, tmp_path / "run.ckpt", log_dir=log_dir)

    card = (export_checkpoint(ckpt, tmp_path / "export") / "README.md").read_text()

    assert f"`{base_dir('llama')}` (edited in float32)" in card
    assert "`sphere_lightning.editors.alphaedit.AlphaEdit`" in card
    assert "β (cumulative_ratio) = 0.4, α (suppression) = 0.8, stage `after_loop`" in card
    assert "reference `current`" in card  # the class default, left out of the config
    assert "| edits | 4 (" in card
    assert "| efficacy | 0.125 | 0.75 |" in card
    assert "| specificity | 0.875 | 0.8125 |" in card
    assert "after 4 edits" in card
    assert f"| sphere_lightning | {sphere_lightning.__version__} |" in card
    assert f'from_pretrained("{tmp_path / "export"}")' in card
    for name in module.edited_parameter_names:
        assert f"- `{name}`" in card


@pytest.mark.parametrize(
    ("summary_step", "expected"),
    [(2, "| efficacy | 0.125 | 0.5 |"), (1, "| efficacy | 0.125 | — |")],
)
def test_model_card_takes_final_metrics_from_the_runs_summary_of_the_same_step(
    summary_step, expected, tmp_path, base_dir, facts
):
    """``last.ckpt`` is written after the last batch, before the run's final evaluation: the
    card then reads the final metrics from the run's summary.json, if it is of the same step."""
    module, _ = _edited_module(base_dir("llama"))
    log_dir = tmp_path / "logs" / "edit" / "version_0"
    log_dir.mkdir(parents=True)
    ckpt = _save_checkpoint(module, facts, tmp_path / "run.ckpt", log_dir=log_dir)
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["global_step"] = 2
    checkpoint["sphere_lightning"]["final_edit_metrics"] = {}  # not evaluated at step 2 yet
    torch.save(checkpoint, ckpt)
    summary = {
        "global_step": summary_step,
        "num_edited": 4,
        "edit": {"final": {"num_evaluated": 4.0, "efficacy": 0.5, "specificity": 0.75}},
    }
    (log_dir / "summary.json").write_text(json.dumps(summary))

    card = (export_checkpoint(ckpt, tmp_path / "export") / "README.md").read_text()

    efficacy = next(line for line in card.splitlines() if line.startswith("| efficacy |"))
    assert expected in efficacy


@pytest.mark.parametrize(
    ("config", "expected"),
    [(None, "| SPHERE | unknown"), ("trainer: {callbacks: []}\n", "| SPHERE | none")],
)
def test_model_card_without_sphere_settings(tmp_path, base_dir, facts, config, expected):
    module, _ = _edited_module(base_dir("llama"))
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    if config is not None:
        (log_dir / "config.yaml").write_text(config)
    ckpt = _save_checkpoint(module, facts, tmp_path / "run.ckpt", log_dir=log_dir)

    card = (export_checkpoint(ckpt, tmp_path / "export") / "README.md").read_text()

    assert expected in card


def test_a_run_with_evaluation_stage_transforms_is_refused(tmp_path, base_dir, facts):
    # Its checkpoint holds the live weights, not the W₀ + PRUNE(W − W₀) it evaluated.
    module, _ = _edited_module(base_dir("llama"))
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    (log_dir / "config.yaml").write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: sphere_lightning.callbacks.PruneCallback\n"
        "      init_args: {stage: evaluation}\n"
    )
    ckpt = _save_checkpoint(module, facts, tmp_path / "run.ckpt", log_dir=log_dir)

    with pytest.raises(
        ConfigError, match=r"PruneCallback with `stage: evaluation`.*ExportCallback"
    ):
        export_checkpoint(ckpt, tmp_path / "export")

    assert not (tmp_path / "export").exists()


def _leftovers(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} - {"run.ckpt", "facts.json"}


def test_a_wrong_base_model_is_refused_and_nothing_is_written(tmp_path, base_dir, facts):
    module, _ = _edited_module(base_dir("llama"))
    ckpt = _save_checkpoint(module, facts, tmp_path / "run.ckpt")
    other = base_dir("llama", seed=1)  # same architecture, other weights

    with pytest.raises(CheckpointMismatchError, match="other weights") as error:
        export_checkpoint(ckpt, tmp_path / "export", base_model=other)

    assert repr(base_dir("llama")) in str(error.value) and repr(other) in str(error.value)
    assert _leftovers(tmp_path) == set()


def test_a_parameter_the_base_model_lacks_is_refused(tmp_path, base_dir, facts):
    module, _ = _edited_module(base_dir("llama"))
    ckpt = _save_checkpoint(module, facts, tmp_path / "run.ckpt")
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["state_dict"]["model.model.layers.9.mlp.down_proj.weight"] = torch.zeros(32, 64)
    torch.save(checkpoint, ckpt)

    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.9\.mlp\.down_proj"):
        export_checkpoint(ckpt, tmp_path / "export")
    assert _leftovers(tmp_path) == set()


def test_a_non_empty_out_dir_is_refused_unless_overwrite(tmp_path, base_dir, facts):
    module, _ = _edited_module(base_dir("llama"))
    ckpt = _save_checkpoint(module, facts, tmp_path / "run.ckpt")
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    with pytest.raises(FileExistsError, match=r"`--out` .*export.* not empty.*overwrite"):
        export_checkpoint(ckpt, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    export_checkpoint(ckpt, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == {"export"}  # no temporary folder left beside it


def test_dtype_sets_the_exported_weights_dtype(tmp_path, base_dir, facts):
    module, _ = _edited_module(base_dir("llama"))
    ckpt = _save_checkpoint(module, facts, tmp_path / "run.ckpt")

    out = export_checkpoint(ckpt, tmp_path / "export", dtype="bfloat16")

    name = "model.layers.1.mlp.down_proj.weight"
    exported = load_file(out / "model.safetensors")
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert torch.equal(exported[name], module.model.get_parameter(name).to(torch.bfloat16))
    with pytest.raises(ValueError, match="`--dtype` should be one of"):
        export_checkpoint(ckpt, tmp_path / "other", dtype="float8")


def test_command_line(tmp_path, base_dir, facts, monkeypatch, capsys):
    module, _ = _edited_module(base_dir("llama"))
    older, newer = tmp_path / "logs" / "old", tmp_path / "logs" / "edit" / "version_1"
    older.mkdir(parents=True)
    newer.mkdir(parents=True)
    older = _save_checkpoint(module, facts, older / "last.ckpt", num_edited=4)
    other = newer / "epoch=0-step=1.ckpt"
    newer = _save_checkpoint(module, facts, newer / "last.ckpt", num_edited=2)
    os.utime(older, ns=(1, 1))  # written long ago
    other.write_bytes(b"")  # newest of all, but `last` means a last.ckpt
    monkeypatch.chdir(tmp_path)

    # `python -m sphere_lightning export ...`, in-process; `last`: the newest last.ckpt.
    argv = ["sphere_lightning", "export", "--ckpt_path", "last", "--out", "export"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_module("sphere_lightning", run_name="__main__")
    assert len(_edits(tmp_path / "export")) == 2

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt_path", str(older), "--out", "export"])
    assert exit_info.value.code == 2  # a mistake in the input: one line, no traceback
    assert capsys.readouterr().err.startswith("error: `--out` 'export' exists and is not empty")
    assert main(["--ckpt_path", str(older), "--out", "export", "--overwrite"]) == Path("export")
    assert len(_edits(tmp_path / "export")) == 4


def test_export_callback_checks_its_arguments_and_folder(tmp_path):
    with pytest.raises(
        ConfigError, match=r"`trainer\.callbacks\.ExportCallback\.init_args\.dirpath` should be a"
    ):
        ExportCallback(dirpath="")
    flag = r"`trainer\.callbacks\.ExportCallback\.init_args\."
    with pytest.raises(ConfigError, match=flag + r"overwrite` .* got 'yes'"):
        ExportCallback(dirpath="out", overwrite="yes")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    trainer = type("Trainer", (), {"is_global_zero": True})()
    with pytest.raises(FileExistsError, match=flag + r"dirpath` .* not empty"):
        ExportCallback(tmp_path / "out").setup(trainer, None, "fit")
    ExportCallback(tmp_path / "out", overwrite=True).setup(trainer, None, "fit")


@pytest.mark.slow
def test_a_run_exports_at_the_end_and_its_checkpoint_exports_the_same(
    tmp_path, tiny_model_dir, requests, write_rome_json
):
    data = write_rome_json(requests, tmp_path / "facts.json")
    extra = tmp_path / "export.yaml"
    extra.write_text(
        f"""
trainer:
  callbacks+:
    - class_path: sphere_lightning.callbacks.ExportCallback
      init_args: {{dirpath: {tmp_path / "in_run"}}}
"""
    )
    args = _fit_args(tmp_path, tiny_model_dir, data)
    args[3:3] = ["--config", str(extra)]
    cli = cli_main([*args, "--model.fluency_prompts=0"])
    (ckpt,) = list((tmp_path / "logs").rglob("*.ckpt"))
    from_ckpt = export_checkpoint(ckpt, tmp_path / "from_ckpt")
    in_run = tmp_path / "in_run"

    module = cli.model
    a, b = load_file(in_run / "model.safetensors"), load_file(from_ckpt / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    changed = {k for k in a if not torch.equal(a[k], base[k])}
    assert changed == set(module.edited_parameter_names)
    assert _edits(in_run) == _edits(from_ckpt)
    assert [e["case_id"] for e in _edits(in_run)] == [
        r.case_id for r in cli.datamodule.requests[:4]
    ]
    plain = _load_in_plain_transformers(from_ckpt, tmp_path)
    _, edited_logits = _logits(module.model, module.tokenizer)
    torch.testing.assert_close(plain["logits"], edited_logits, rtol=0, atol=1e-6)
    for folder in (in_run, from_ckpt):
        card = (folder / "README.md").read_text()
        assert "β (cumulative_ratio) = 0.5, α (suppression) = 0.5, stage `in_loop`" in card
        assert "| edits | 4 (" in card


def test_a_checkpoint_of_another_program_is_refused_by_export_and_by_resume(tmp_path):
    foreign = {"state_dict": {}, "hyper_parameters": {}}  # no `sphere_lightning` entry
    message = r"not written by this version of sphere_lightning.*format"
    with pytest.raises(CheckpointMismatchError, match=message):
        load_edited_model(foreign)
    with pytest.raises(CheckpointMismatchError, match=message):
        EditingModule(editor=AlphaEdit(layers=[1])).check_checkpoint(foreign)
