"""End to end: the real CLI entry point on a tiny model, in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sphere_lightning.cli import cli_main
from sphere_lightning.editors import AlphaEdit
from sphere_lightning.module import EditingModule, NonFiniteDeltaError

ROOT = Path(__file__).resolve().parents[1]


def _write_rome_json(requests, path: Path) -> Path:
    records = [
        {
            "case_id": r.case_id,
            "requested_rewrite": {
                "prompt": r.prompt,
                "subject": r.subject,
                "target_new": {"str": r.target_new},
                "target_true": {"str": r.target_true},
            },
            "paraphrase_prompts": list(r.paraphrase_prompts),
            "neighborhood_prompts": list(r.neighborhood_prompts),
        }
        for r in requests
    ]
    path.write_text(json.dumps(records))
    return path


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    (event_file,) = list(log_dir.rglob("events.out.tfevents*"))
    acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _fit_args(tmp_path: Path, model_dir: str, data: Path) -> list[str]:
    return [
        "fit",
        "--config",
        str(ROOT / "configs" / "edit.yaml"),
        f"--model.model={model_dir}",
        "--model.editor.init_args.layers=[1, 2]",
        "--model.editor.init_args.v_num_steps=10",
        "--model.editor.init_args.num_context_templates=1",
        "--model.editor.init_args.context_template_length=4",
        "--model.editor.init_args.stats_num_samples=8",
        "--model.editor.init_args.stats_max_length=12",
        "--model.editor.init_args.nullspace_threshold=1e9",
        f"--data.dataset={data}",
        "--data.num_edits=4",
        "--data.edits_per_step=2",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


@pytest.mark.slow
def test_two_step_run_writes_tensorboard_scalars(tmp_path, tiny_model_dir, requests):
    data = _write_rome_json(requests, tmp_path / "facts.json")
    cli_main(_fit_args(tmp_path, tiny_model_dir, data))

    scalars = _scalars(tmp_path / "logs")
    for layer in (1, 2):
        name = f"model.layers.{layer}.mlp.down_proj"
        # HE and its change at step 0 (baseline) and after each of the two steps.
        assert [s for s, _ in scalars[f"energy/{name}"]] == [0, 1, 2]
        assert [s for s, _ in scalars[f"energy_change/{name}"]] == [0, 1, 2]
        assert scalars[f"energy_change/{name}"][0][1] == 0.0
        assert scalars[f"energy_change/{name}"][-1][1] != 0.0
        assert [s for s, _ in scalars[f"sphere/rank/{name}"]] == [1, 2]
        assert all(rank >= 1 for _, rank in scalars[f"sphere/rank/{name}"])
    for metric in ("efficacy", "generalization", "specificity"):
        assert [s for s, _ in scalars[f"edit_pre/{metric}"]] == [0]
        steps = [s for s, _ in scalars[f"edit/{metric}"]]
        assert steps[0] == 0 and steps[-1] == 2
        assert all(0.0 <= v <= 1.0 for _, v in scalars[f"edit/{metric}"])
    assert scalars["edit/num_edited"] == [(1, 2.0), (2, 4.0)]
    assert list((tmp_path / "logs").rglob("*.ckpt")), "a checkpoint is written"


def test_print_config_does_not_load_a_model(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("--print_config must not load a model")

    monkeypatch.setattr("sphere_lightning.module.load_model", refuse)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(ROOT / "configs" / "edit.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "sphere_lightning.editors.AlphaEdit" in printed
    assert "SphereProjectionCallback" in printed


def test_non_finite_delta_leaves_weights_untouched(tiny_model_dir):
    module = EditingModule(editor=AlphaEdit(layers=[1, 2]), model=tiny_model_dir)
    module.configure_model()
    before = {n: module.edited_weight(n).clone() for n in module.edited_parameter_names}
    good, bad = module.edited_parameter_names
    module.pending_deltas = {
        good: torch.ones_like(before[good]),
        bad: torch.full_like(before[bad], float("nan")),
    }
    with pytest.raises(NonFiniteDeltaError, match=r"model\.layers\.2\.mlp\.down_proj"):
        module.apply_pending_deltas()
    for name, weight in before.items():
        assert torch.equal(module.edited_weight(name), weight)


def test_layer_out_of_range_names_the_flag(tiny_model_dir):
    module = EditingModule(editor=AlphaEdit(layers=[1, 40]), model=tiny_model_dir)
    with pytest.raises(ValueError, match=r"model\.editor\.init_args\.layers.*valid: 0\.\.3"):
        module.configure_model()
