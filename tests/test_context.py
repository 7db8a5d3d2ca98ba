"""The declared interface between the module and its callbacks: EditingModule and the tests'
stand-in implement every member of EditingContext, and the callbacks read nothing else."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

import sphere_lightning.callbacks
from sphere_lightning.context import EditingContext, StepDecision, StepPolicy
from sphere_lightning.data.datamodule import EditDataModule
from sphere_lightning.editors import AlphaEdit, StatisticsOptions, TargetOptions, TemplateOptions
from sphere_lightning.errors import ConfigError
from sphere_lightning.module import EditingModule
from tests.helpers import ContextStub, quiet_trainer

CALLBACKS = Path(sphere_lightning.callbacks.__file__).parent


def _members() -> set[str]:
    """Every attribute, property and method EditingContext declares."""
    declared = set(EditingContext.__annotations__)
    declared |= {name for name in vars(EditingContext) if not name.startswith("_")}
    return declared


def _has(obj: object, name: str) -> bool:
    """Whether ``obj`` has ``name`` as an instance attribute or on its class (a property is not
    evaluated: ``trainer`` raises on a module not attached to one)."""
    return any(name in vars(cls) for cls in type(obj).__mro__) or hasattr(obj, name)


def test_the_context_lists_what_callbacks_read():
    assert {
        "edited_weight",
        "original_weights",
        "edited_parameter_names",
        "editor_deltas",
        "applied_deltas",
        "record_step_deltas",
        "num_edited",
        "log_now",
        "evaluated_weights",
    } <= _members()
    assert "step_metrics" not in _members() and "training_step" not in _members()


def test_the_module_and_the_test_stub_implement_the_context(tiny_model_dir, tiny_llama):
    module = EditingModule(editor=AlphaEdit(layers=[1, 2]), model=tiny_model_dir)
    module.configure_model()
    stub = ContextStub(tiny_llama)
    for name in sorted(_members()):
        assert _has(module, name), f"EditingModule lacks {name}"
        assert _has(stub, name), f"ContextStub lacks {name}"


def _reads_of_the_module() -> list[tuple[str, int, str]]:
    """``(file, line, attribute)`` of every ``pl_module.<attribute>`` in the callbacks."""
    reads = []
    for path in sorted(CALLBACKS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "pl_module"
            ):
                reads.append((path.name, node.lineno, node.attr))
    return reads


def test_callbacks_read_the_module_only_through_the_context():
    reads = _reads_of_the_module()
    assert reads  # the scan sees the callbacks
    members = _members()
    undeclared = [
        f"{file}:{line} pl_module.{name}" for file, line, name in reads if name not in members
    ]
    assert not undeclared, undeclared


def test_a_step_decision_names_its_action():
    assert StepDecision().action == "accept"
    assert StepDecision("retry", 0.2).suppression_increase == 0.2
    with pytest.raises(ValueError, match="`accept`, `retry` or `skip`, got 'rewind'"):
        StepDecision("rewind")


class _SkipEverything(Callback, StepPolicy):
    """A step policy that leaves every batch out (or claims to, without ``undoes_steps``)."""

    def __init__(self, undoes: bool = True) -> None:
        self.undoes = undoes
        self.reviewed: list[tuple[int, int]] = []

    @property
    def undoes_steps(self) -> bool:
        return self.undoes

    def review_step(self, context, attempt):
        self.reviewed.append((context.global_step, attempt))
        return StepDecision("skip")


def _fit(callbacks, tiny_model_dir, requests, write_rome_json, tmp_path) -> EditingModule:
    data_path = write_rome_json(requests[:4], tmp_path / "facts.json")
    data = EditDataModule(dataset=str(data_path), num_edits=4, edits_per_step=2)
    editor = AlphaEdit(
        layers=[1, 2],
        target=TargetOptions(num_steps=2),
        templates=TemplateOptions(count=1),
        statistics=StatisticsOptions(num_samples=8),
    )
    module = EditingModule(editor=editor, model=tiny_model_dir, fluency_prompts=0)
    quiet_trainer(callbacks, default_root_dir=tmp_path).fit(module, datamodule=data)
    return module


def test_the_module_undoes_what_a_step_policy_skips(
    tiny_model_dir, requests, write_rome_json, tmp_path
):
    policy = _SkipEverything()
    module = _fit([policy], tiny_model_dir, requests, write_rome_json, tmp_path)
    assert policy.reviewed == [(1, 0), (2, 0)]  # once per step, after it was counted
    for name, original in module.original_weights.items():
        assert torch.equal(module.edited_weight(name), original)


def test_a_policy_that_does_not_undo_cannot_skip(
    tiny_model_dir, requests, write_rome_json, tmp_path
):
    with pytest.raises(RuntimeError, match="_SkipEverything decided `skip`.*undoes_steps"):
        _fit([_SkipEverything(undoes=False)], tiny_model_dir, requests, write_rome_json, tmp_path)


def test_one_step_policy_per_run(tiny_model_dir, requests, write_rome_json, tmp_path):
    with pytest.raises(ConfigError, match="more than one step policy"):
        _fit(
            [_SkipEverything(), _SkipEverything()],
            tiny_model_dir,
            requests,
            write_rome_json,
            tmp_path,
        )
