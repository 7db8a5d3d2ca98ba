"""Ctrl-C (SIGINT) during an editing step: the step lands completely or not at all.

A real SIGINT is sent to this process from inside a step (``os.kill``, as a terminal's Ctrl-C does);
Lightning turns the ``KeyboardInterrupt`` into a shutdown and ``SystemExit(1)``. The edited
weights and the editor's state (AlphaEdit's K Kᵀ) left in memory must then equal those of an
uninterrupted run after the previous step (the signal came before anything was written) or after
this step (it came while the step was being written) — never a mixture.
"""

from __future__ import annotations

import copy
import os
import signal

import pytest
import torch
from lightning.pytorch import Callback

from sphere_lightning.callbacks import DeltaTransform
from sphere_lightning.data.datamodule import EditDataModule
from sphere_lightning.editors import AlphaEdit
from sphere_lightning.interrupts import sigint_deferred
from sphere_lightning.module import EditingModule
from tests.helpers import TINY_ALPHAEDIT, quiet_trainer

STEP = 1  # the step that is interrupted (of 0, 1, 2)


def _state(module: EditingModule) -> tuple[dict, dict]:
    weights = {n: module.edited_weight(n).detach().clone() for n in module.edited_parameter_names}
    return weights, copy.deepcopy(module.editor.state_dict()["key_cache"])


def _same(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    pairs = zip(a, b, strict=True)
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in pairs)


class _EndOfStep(Callback):
    """The edited weights and K Kᵀ at the end of each step, and when Lightning reports the
    ``KeyboardInterrupt`` (before it shuts down)."""

    def __init__(self) -> None:
        self.states: list[tuple[dict, dict]] = []
        self.interrupted: tuple[dict, dict] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append(_state(pl_module))

    def on_exception(self, trainer, pl_module, exception) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.interrupted = _state(pl_module)


class _CtrlC(DeltaTransform):
    """Sends SIGINT to this process when ΔW of ``layer`` passes at :data:`STEP`."""

    def __init__(self, stage: str, layer: str) -> None:
        super().__init__(stage)
        self.layer = layer

    def transform_delta(self, name, delta, pl_module):
        if pl_module.global_step == STEP and name == self.layer:
            os.kill(os.getpid(), signal.SIGINT)
        return delta


class _CtrlCInAfterApply(AlphaEdit):
    """Sends SIGINT when the weights are updated and K Kᵀ is not yet."""

    def after_apply(self, model, tokenizer, requests):
        if len(self.key_cache_steps) == STEP:
            os.kill(os.getpid(), signal.SIGINT)
        self.key_cache_steps.append(len(requests))
        super().after_apply(model, tokenizer, requests)


@pytest.fixture
def sigint_handler():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test — a process started in the
    background by a shell inherits SIGINT ignored — and the previous one put back afterwards
    (Lightning ignores SIGINT once it has shut down)."""
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def fit(tiny_model_dir, requests, write_rome_json, tmp_path):
    def run(callbacks, editor_class=AlphaEdit, folder="run") -> EditingModule:
        root = tmp_path / folder
        root.mkdir()
        data_path = write_rome_json(requests[:3], root / "facts.json")
        editor = editor_class(**TINY_ALPHAEDIT)
        editor.key_cache_steps = []
        module = EditingModule(editor=editor, model=tiny_model_dir, fluency_prompts=0)
        trainer = quiet_trainer(callbacks, default_root_dir=root)
        trainer.fit(
            module, datamodule=EditDataModule(dataset=str(data_path), num_edits=3, edits_per_step=1)
        )
        return module

    return run


LAYER_1, LAYER_2 = "model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"


@pytest.mark.parametrize(
    ("where", "lands"),
    [
        # v* and the solve are done for layer 1, whose ΔW is placed for the layers above; the
        # signal arrives at layer 2, before anything is applied: nothing of the step remains.
        ("in the layer loop", False),
        # The deltas are final and being applied (after-loop transforms run inside the write).
        ("after the loop", True),
        # The weights are updated, K Kᵀ not yet: the step is finished before the signal acts.
        ("between the weights and the key cache", True),
    ],
)
def test_ctrl_c_lands_the_step_completely_or_not_at_all(where, lands, fit, sigint_handler):
    reference = _EndOfStep()
    fit([reference], folder="reference")
    assert len(reference.states) == 3
    assert not _same(reference.states[STEP - 1], reference.states[STEP])  # the step changes both
    assert not any(
        torch.equal(reference.states[STEP - 1][1][k], reference.states[STEP][1][k])
        for k in reference.states[STEP][1]
    )

    callbacks, editor_class = {
        "in the layer loop": ([_CtrlC("in_loop", LAYER_2)], AlphaEdit),
        "after the loop": ([_CtrlC("after_loop", LAYER_1)], AlphaEdit),
        "between the weights and the key cache": ([], _CtrlCInAfterApply),
    }[where]
    seen = _EndOfStep()
    with pytest.raises(SystemExit) as info:
        fit([*callbacks, seen], editor_class=editor_class, folder="interrupted")
    assert info.value.code == 1  # Lightning's graceful shutdown after a KeyboardInterrupt
    assert len(seen.states) == STEP  # the interrupted step never reached its end hooks
    assert seen.interrupted is not None
    expected = reference.states[STEP] if lands else reference.states[STEP - 1]
    assert _same(seen.interrupted, expected)


def test_sigint_deferred_delivers_once_after_the_block(sigint_handler):
    order: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            with sigint_deferred():  # nested: delivered at the end of the outermost block
                os.kill(os.getpid(), signal.SIGINT)
                order.append("inner body finished")
            order.append("outer body finished")
    assert order == ["inner body finished", "outer body finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_deferred_without_a_signal_changes_nothing(sigint_handler):
    before = signal.getsignal(signal.SIGINT)
    with sigint_deferred():
        pass
    assert signal.getsignal(signal.SIGINT) is before
