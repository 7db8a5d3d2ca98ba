"""HE alarm: warn / stop / rollback on a tiny editing run, the module acting on its decisions."""

from __future__ import annotations

import ast
import copy
import io
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger

import sphere_lightning.callbacks
from sphere_lightning.callbacks import (
    DeltaTransform,
    HEAlarmCallback,
    SphereProjectionCallback,
)
from sphere_lightning.cli import summarise
from sphere_lightning.data.datamodule import EditDataModule
from sphere_lightning.editors import AlphaEdit
from sphere_lightning.errors import ConfigError
from sphere_lightning.functional import hyperspherical_energy
from sphere_lightning.functional.band import DeltaBand
from sphere_lightning.module import EditingModule
from tests.helpers import TINY_ALPHAEDIT, quiet_trainer

LAYERS = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
ALWAYS = 1e-12  # a max_abs_delta every real step exceeds: the alarm fires at every attempt
#: A band every real step is outside of.
FIRES = DeltaBand(max_abs_delta=ALWAYS)


#: How messages name an option of the alarm (escaped for ``match``).
FLAG = r"`trainer\.callbacks\.HEAlarmCallback\.init_args\."


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"action": "panic"}, "action` should be one of `warn`, `stop`, `rollback`, got 'panic'"),
        ({"on_retry": "again"}, "on_retry` should be one of `retry`, `skip`"),
        ({"on_exhausted": "drop"}, "on_exhausted` should be one of `keep`, `skip`"),
        ({"max_retries": 0}, "max_retries` should be ≥ 1, got 0"),
        ({"alpha_step": 0.0}, r"alpha_step` should be in \(0, 1\], got 0.0"),
        ({"s": -1.0}, "s` should be ≥ 0, got -1.0"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ConfigError, match=FLAG + match):
        HEAlarmCallback(**kwargs)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"k": 0.0}, "band.k` should be > 0, got 0.0"),
        ({"warmup_steps": 0}, "band.warmup_steps` should be ≥ 1, got 0"),
        ({"max_abs_delta": -1.0}, "band.max_abs_delta` should be > 0 or None, got -1.0"),
        ({"min_scale": -0.1}, "band.min_scale` should be ≥ 0"),
        ({"window": 2}, r"band.window` should be None or ≥ `.*band.warmup_steps` \(3\), got 2"),
    ],
)
def test_bad_band_fields_are_named(fields, match):
    with pytest.raises(ConfigError, match=FLAG + match):
        DeltaBand(**fields)


# -- on a tiny editing run ------------------------------------------------------------------------


class _ListLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "list"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def values(self, tag: str) -> list[tuple[int, float]]:
        return [(step, m[tag]) for step, m in self.rows if tag in m]


class _Snapshots(Callback):
    """The edited weights and the editor's state at the start and at the end of each step."""

    def __init__(self) -> None:
        self.start: list[tuple[dict, dict]] = []
        self.end: list[tuple[dict, dict]] = []

    def _take(self, pl_module) -> tuple[dict, dict]:
        weights = {
            name: pl_module.edited_weight(name).detach().clone()
            for name in pl_module.edited_parameter_names
        }
        return weights, copy.deepcopy(pl_module.editor.state_dict())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start.append(self._take(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end.append(self._take(pl_module))


class _AlphaSeen(DeltaTransform):
    """Records SPHERE's α each time a layer's ΔW passes."""

    def __init__(self, sphere: SphereProjectionCallback) -> None:
        super().__init__("in_loop")
        self.sphere = sphere
        self.seen: list[tuple[int, float]] = []

    def transform_delta(self, name, delta, pl_module):
        self.seen.append((pl_module.global_step, self.sphere.suppression_now(pl_module)))
        return delta


def _equal_states(a: dict, b: dict) -> bool:
    """Editor states equal bit for bit (tensors by torch.equal)."""
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            if x.keys() != y.keys() or not all(torch.equal(x[i], y[i]) for i in x):
                return False
        elif x != y:
            return False
    return True


@pytest.fixture
def fit(tiny_model_dir, requests, write_rome_json, tmp_path):
    """``fit(callbacks, num_edits=4, folder="run")``: AlphaEdit on the tiny Llama, two edits a
    step; returns the module, the trainer and a :class:`_ListLogger`."""

    def run(callbacks, num_edits: int = 4, folder: str = "run"):
        root = tmp_path / folder
        root.mkdir()
        data_path = write_rome_json(requests[:num_edits], root / "facts.json")
        data = EditDataModule(dataset=str(data_path), num_edits=num_edits, edits_per_step=2)
        module = EditingModule(
            editor=AlphaEdit(**TINY_ALPHAEDIT), model=tiny_model_dir, fluency_prompts=0
        )
        logger = _ListLogger()
        trainer = quiet_trainer(callbacks, logger=logger, default_root_dir=root)
        trainer.fit(module, datamodule=data)
        return module, trainer, logger

    return run


def test_warn_logs_the_step_he_change_and_leaves_the_edit_in(fit):
    alarm = HEAlarmCallback(action="warn", band=FIRES)
    snaps = _Snapshots()
    with pytest.warns(UserWarning, match=r"HE alarm at step 1 .*ΔHE of model\.layers\..*warn"):
        _, trainer, logger = fit([alarm, snaps])
    assert trainer.global_step == 2
    for step, ((w0, e0), (w1, e1)) in enumerate(zip(snaps.start, snaps.end, strict=True), 1):
        assert not all(torch.equal(w0[n], w1[n]) for n in w0)  # the edit stayed
        assert not _equal_states(e0, e1)  # AlphaEdit accumulated K Kᵀ
        for layer in LAYERS:
            name = f"{layer}.weight"
            expected = float(hyperspherical_energy(w1[name]) - hyperspherical_energy(w0[name]))
            logged = dict(logger.values(f"alarm/delta_he/{layer}"))[step]
            assert logged == pytest.approx(expected, rel=1e-9, abs=1e-12)
            assert alarm.history[layer][step - 1] == logged
    assert [(e["step"], e["action"]) for e in alarm.events] == [(1, "warn"), (2, "warn")]
    assert logger.values("alarm/fired") == [(1, 1.0), (2, 1.0)]
    assert logger.values("alarm/skipped") == [(1, 0.0), (2, 0.0)]


def test_rollback_skip_restores_weights_and_editor_state_bit_for_bit(fit):
    alarm = HEAlarmCallback(action="rollback", on_retry="skip", band=FIRES)
    snaps = _Snapshots()  # after the alarm: sees each step as the alarm left it
    with pytest.warns(UserWarning, match="action: skip"):
        module, trainer, logger = fit([SphereProjectionCallback(), alarm, snaps])
    assert trainer.global_step == 2
    for (w0, e0), (w1, e1) in zip(snaps.start, snaps.end, strict=True):
        assert all(torch.equal(w0[n], w1[n]) for n in w0)
        assert _equal_states(e0, e1)
    for name, original in module.original_weights.items():
        assert torch.equal(module.edited_weight(name), original)
    # AlphaEdit's K Kᵀ was accumulated by each attempt and rolled back: still all zeros.
    assert module.editor.key_cache and not any(c.any() for c in module.editor.key_cache.values())
    assert alarm.skipped_positions == [0, 1, 2, 3]
    assert [(e["step"], e["action"]) for e in alarm.events] == [(1, "skip"), (2, "skip")]
    assert logger.values("alarm/skipped") == [(1, 1.0), (2, 1.0)]
    # The last value written at each step counts the facts actually written.
    assert dict(logger.values("edit/num_edited")) == {1: 0.0, 2: 0.0}
    assert all(v == 0.0 for _, v in logger.values(f"alarm/delta_he/{LAYERS[0]}"))


def test_rollback_retry_raises_alpha_for_the_retry_only(fit):
    sphere = SphereProjectionCallback(suppression=0.5)
    seen = _AlphaSeen(sphere)
    alarm = HEAlarmCallback(
        action="rollback",
        on_retry="retry",
        on_exhausted="keep",
        max_retries=2,
        alpha_step=0.1,
        band=FIRES,
    )
    with pytest.warns(UserWarning, match="action: keep"):
        module, trainer, logger = fit([sphere, seen, alarm])
    assert trainer.global_step == 2  # retries replay a step, they do not add one
    assert sphere.suppression == 0.5
    # Two layers per attempt; global_step is the number of steps before the step on its first
    # attempt, and counts the step on a retry (applied after the step was counted).
    attempts = [0.5, 0.5, 0.6, 0.6, 0.7, 0.7]
    assert [s for s, _ in seen.seen] == [0, 0] + [1] * 4 + [1, 1] + [2] * 4
    assert [a for _, a in seen.seen] == pytest.approx(attempts * 2)
    assert [(e["step"], e["attempt"], e["action"]) for e in alarm.events] == [
        (1, 0, "retry"), (1, 1, "retry"), (1, 2, "keep"),
        (2, 0, "retry"), (2, 1, "retry"), (2, 2, "keep"),
    ]  # fmt: skip
    assert [e["alpha"] for e in alarm.events] == pytest.approx([0.5, 0.6, 0.7] * 2)
    assert logger.values("alarm/retries") == [(1, 2.0), (2, 2.0)]
    assert [v for _, v in logger.values("alarm/alpha")] == pytest.approx([0.7, 0.7])
    # Each attempt logs the module's scalars again at the same step, all with the right count.
    counts = logger.values("edit/num_edited")
    assert len(counts) == 6 and all(v == 2.0 * s for s, v in counts)

    # The kept attempt is the batch edited at α 0.7 from the state before it: a plain run at
    # α 0.7 ends with the same weights and editor state, bit for bit.
    reference, _, _ = fit([SphereProjectionCallback(suppression=0.7)], folder="reference")
    for name in module.edited_parameter_names:
        assert torch.equal(module.edited_weight(name), reference.edited_weight(name))
    assert _equal_states(module.editor.state_dict(), reference.editor.state_dict())


def test_rollback_retry_then_skip_when_retries_run_out(fit):
    sphere = SphereProjectionCallback(suppression=0.95)
    seen = _AlphaSeen(sphere)
    alarm = HEAlarmCallback(
        action="rollback", on_exhausted="skip", max_retries=2, alpha_step=0.1, band=FIRES
    )
    snaps = _Snapshots()
    with pytest.warns(UserWarning, match="action: skip"):
        module, _, _ = fit([sphere, seen, alarm, snaps], num_edits=2)
    assert [a for _, a in seen.seen] == pytest.approx([0.95, 0.95, 1.0, 1.0, 1.0, 1.0])  # capped
    assert sphere.suppression == 0.95
    (w0, e0), (w1, e1) = snaps.start[0], snaps.end[0]
    assert all(torch.equal(w0[n], w1[n]) for n in w0)
    assert _equal_states(e0, e1)
    assert [e["action"] for e in alarm.events] == ["retry", "retry", "skip"]
    assert alarm.skipped_positions == [0, 1]


def test_events_reach_the_summary_and_survive_a_checkpoint(fit):
    alarm = HEAlarmCallback(action="stop", band=FIRES)
    with pytest.warns(UserWarning, match="action: stop"):
        module, trainer, _ = fit([alarm])
    assert trainer.global_step == 1  # two batches, stopped after the first
    assert alarm.stop_reason.startswith("HE alarm at step 1: ΔHE of model.layers.")
    summary = json.loads(json.dumps(summarise(trainer, module)["alarm"]))
    assert summary == alarm.summary(trainer, module)
    assert summary["stop_reason"] == alarm.stop_reason
    (event,) = summary["events"]
    assert event["step"] == 1 and event["action"] == "stop" and event["alpha"] is None
    assert event["band"] == [-ALWAYS, ALWAYS]
    assert event["layer"] in LAYERS and event["delta_he"] == event["out_of_band"][event["layer"]]

    buffer = io.BytesIO()
    torch.save(alarm.state_dict(), buffer)
    buffer.seek(0)
    restored = HEAlarmCallback(action="stop", band=FIRES)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.state_dict() == alarm.state_dict()
    assert restored.history == alarm.history and len(restored.history[LAYERS[0]]) == 1
    assert restored.summary(trainer, module) == summary


def test_retry_needs_a_sphere_callback_and_observers_anywhere_see_the_kept_attempt(fit):
    with pytest.raises(ConfigError, match="no SphereProjectionCallback.*suppression: 0.0"):
        fit([HEAlarmCallback(action="rollback")], num_edits=2)
    # The module undoes the step inside it: an observer listed before the alarm already sees
    # the weights the alarm's decision left.
    snaps = _Snapshots()
    alarm = HEAlarmCallback(action="rollback", on_retry="skip", band=FIRES)
    with pytest.warns(UserWarning, match="action: skip"):
        fit([snaps, SphereProjectionCallback(), alarm], num_edits=2, folder="early")
    (w0, e0), (w1, e1) = snaps.start[0], snaps.end[0]
    assert all(torch.equal(w0[n], w1[n]) for n in w0)
    assert _equal_states(e0, e1)


def _callback_sources() -> list[tuple[str, ast.AST]]:
    package = Path(sphere_lightning.callbacks.__file__).parent
    return [(path.name, ast.parse(path.read_text())) for path in sorted(package.glob("*.py"))]


def test_no_callback_runs_a_step_or_touches_the_loop_counters():
    """A callback never drives the loop: no ``training_step(`` call, no use of the fit loop or
    its progress counters, and no write to another callback's SPHERE α."""
    offences = []
    for name, tree in _callback_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in {
                "training_step",
                "fit_loop",
                "epoch_loop",
                "optim_step_progress",
                "manual_optimization",
                "automatic_optimization",
            }:
                offences.append(f"{name}:{node.lineno} .{node.attr}")
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AugAssign | ast.AnnAssign)
                else []
            )
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and target.attr == "suppression"
                    and not (isinstance(target.value, ast.Name) and target.value.id == "self")
                ):
                    offences.append(f"{name}:{node.lineno} writes another object's .suppression")
    assert not offences, offences
