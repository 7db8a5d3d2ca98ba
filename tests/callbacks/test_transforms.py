"""The delta-transform contract: list order, stages, YAML composition, bad output named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sphere_lightning.callbacks import DeltaTransform, SphereProjectionCallback
from sphere_lightning.cli import cli_main
from sphere_lightning.data.datamodule import EditDataModule
from sphere_lightning.editors import AlphaEdit
from sphere_lightning.functional import project_delta
from sphere_lightning.module import EditingModule, NonFiniteDeltaError
from tests.helpers import TINY_ALPHAEDIT, quiet_trainer, tiny_alphaedit_flags

ROOT = Path(__file__).resolve().parents[2]
LAYER_NAMES = ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]

#: The example transform of DeltaTransform's docstring, and a recorder.
CUSTOM_TRANSFORMS = '''
from sphere_lightning.callbacks import DeltaTransform

CALLS = []


class ClipDeltaNorm(DeltaTransform):
    def __init__(self, max_norm: float = 1.0, stage: str = "in_loop") -> None:
        super().__init__(stage)
        self.max_norm = max_norm

    def transform_delta(self, name, delta, pl_module):
        norm = float(delta.norm())
        scale = min(1.0, self.max_norm / max(norm, 1e-12))
        return delta * scale, {f"clip/norm/{name}": norm}


class Recorder(DeltaTransform):
    """Records (label, layer, ‖ΔW‖) and passes ΔW on unchanged."""

    def __init__(self, label: str, stage: str = "in_loop") -> None:
        super().__init__(stage)
        self.label = label

    def transform_delta(self, name, delta, pl_module):
        CALLS.append((self.label, name, float(delta.norm())))
        return delta
'''


def _callback(class_path: str, **init_args) -> dict:
    return {"class_path": class_path, "init_args": init_args}


def test_custom_transforms_composed_in_yaml_run_in_list_order(
    tmp_path, tiny_model_dir, requests, monkeypatch, write_rome_json
):
    (tmp_path / "my_transforms.py").write_text(CUSTOM_TRANSFORMS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_transforms

    max_norm = 0.05
    callbacks = [
        _callback("my_transforms.Recorder", label="first"),
        _callback("sphere_lightning.callbacks.SphereProjectionCallback", suppression=0.8),
        _callback("my_transforms.ClipDeltaNorm", max_norm=max_norm),
        _callback("my_transforms.Recorder", label="after", stage="after_loop"),
        _callback("my_transforms.Recorder", label="last"),
    ]
    overlay = tmp_path / "transforms.yaml"
    overlay.write_text(json.dumps({"trainer": {"callbacks": callbacks}}))
    data = write_rome_json(requests[:2], tmp_path / "facts.json")
    cli = cli_main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "edit.yaml"),
            "--config",
            str(overlay),
            f"--model.model={tiny_model_dir}",
            *tiny_alphaedit_flags(num_steps=TINY_ALPHAEDIT["target"].num_steps),
            f"--model.editor.init_args.nullspace_threshold={TINY_ALPHAEDIT['nullspace_threshold']}",
            f"--data.dataset={data}",
            "--data.num_edits=2",
            "--data.edits_per_step=2",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
        ]
    )
    calls = my_transforms.CALLS
    # In-loop transforms run per layer, bottom to top, in list order; after-loop ones at the end.
    assert [(label, name) for label, name, _ in calls] == [
        ("first", LAYER_NAMES[0]),
        ("last", LAYER_NAMES[0]),
        ("first", LAYER_NAMES[1]),
        ("last", LAYER_NAMES[1]),
        ("after", LAYER_NAMES[0]),
        ("after", LAYER_NAMES[1]),
    ]
    module = cli.model
    for name in LAYER_NAMES:
        seen_last = next(n for label, layer, n in calls if label == "last" and layer == name)
        seen_after = next(n for label, layer, n in calls if label == "after" and layer == name)
        assert seen_last <= max_norm * (1 + 1e-5)  # the clip ran before "last"
        assert seen_after == pytest.approx(seen_last, rel=1e-6)
        applied = module.edited_weight(name) - module.original_weights[name]
        assert float(applied.norm()) == pytest.approx(seen_last, rel=1e-4)


class _NanAt(DeltaTransform):
    """Returns NaN for one layer."""

    def __init__(self, layer: str, stage: str = "in_loop") -> None:
        super().__init__(stage)
        self.layer = layer

    def transform_delta(self, name, delta, pl_module):
        return torch.full_like(delta, float("nan")) if name == self.layer else delta


class _WrongShape(DeltaTransform):
    def transform_delta(self, name, delta, pl_module):
        return delta[:, :-1]


@pytest.mark.parametrize("stage", ["in_loop", "after_loop"])
def test_transform_returning_nan_changes_no_weight_and_names_itself(
    stage, tmp_path, tiny_model_dir, requests, write_rome_json
):
    module = EditingModule(editor=AlphaEdit(**TINY_ALPHAEDIT), model=tiny_model_dir)
    module.configure_model()
    before = {n: t.detach().clone() for n, t in module.model.state_dict().items()}
    bad = _NanAt(LAYER_NAMES[1], stage=stage)  # the upper layer: the lower one was placed already
    with pytest.raises(NonFiniteDeltaError, match=r"_NanAt.*model\.layers\.2\.mlp\.down_proj"):
        data = _two_facts(write_rome_json, requests, tmp_path)
        _fit_module(module, data, [SphereProjectionCallback(), bad])
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed"


def test_transform_returning_a_wrong_shape_is_named(
    tmp_path, tiny_model_dir, requests, write_rome_json
):
    module = EditingModule(editor=AlphaEdit(**TINY_ALPHAEDIT), model=tiny_model_dir)
    module.configure_model()
    before = {n: t.detach().clone() for n, t in module.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"_WrongShape.*shape"):
        _fit_module(module, _two_facts(write_rome_json, requests, tmp_path), [_WrongShape()])
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed"


def _two_facts(write_rome_json, requests, tmp_path) -> EditDataModule:
    """The first two requests, edited in one step."""
    path = write_rome_json(requests[:2], tmp_path / "facts.json")
    return EditDataModule(dataset=str(path), num_edits=2, edits_per_step=2)


def _fit_module(module, data: EditDataModule, callbacks) -> None:
    trainer = quiet_trainer(callbacks)
    trainer.fit(module, datamodule=data)


def test_after_loop_projects_the_deltas_the_editor_computes_without_transforms(
    tmp_path, tiny_model_dir, requests, write_rome_json
):
    """``after_loop`` is the projection of the plain editor's ΔW against the applied weight."""
    probe = EditingModule(editor=AlphaEdit(**TINY_ALPHAEDIT), model=tiny_model_dir)
    probe.configure_model()
    probe.editor.progress = False
    probe.editor.setup(probe.model, probe.tokenizer)
    data = _two_facts(write_rome_json, requests, tmp_path)
    data.setup("fit")
    batch_requests = data.requests
    raw = probe.editor.compute_deltas(probe.model, probe.tokenizer, batch_requests)

    module = EditingModule(
        editor=AlphaEdit(**TINY_ALPHAEDIT), model=tiny_model_dir, fluency_prompts=0
    )
    module.configure_model()
    _fit_module(module, data, [SphereProjectionCallback(stage="after_loop")])
    for name in LAYER_NAMES:
        expected, _ = project_delta(raw[name], module.original_weights[name], 0.5, 0.5)
        applied = module.edited_weight(name) - module.original_weights[name]
        torch.testing.assert_close(applied, expected, rtol=1e-4, atol=1e-6)


def test_whole_batch_transform_must_run_after_the_loop():
    class Rescale(DeltaTransform):
        def transform_deltas(self, deltas, pl_module):
            total = sum(float(d.norm()) for d in deltas.values())
            return {n: d / total for n, d in deltas.items()}

    with pytest.raises(ValueError, match="Rescale.*after_loop"):
        Rescale()
    assert Rescale(stage="after_loop").stage == "after_loop"
