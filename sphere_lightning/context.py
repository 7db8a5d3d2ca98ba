"""What callbacks may see of the editing module, and how a policy decides whether a step stands.

:class:`EditingContext` is the one declared interface between the module
(:class:`~sphere_lightning.module.EditingModule`) and its callbacks: delta transforms, observers
and step policies read the module through it and through nothing else. :class:`StepPolicy` is
the role of something that judges each applied step (the HE alarm); the module asks it after
every attempt and does what the returned :class:`StepDecision` says itself: keep the step, undo
it and edit the batch again with a stronger SPHERE α, or undo it and leave the batch out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from sphere_lightning.editors.base import Editor


class EditingContext(Protocol):
    """The module as callbacks see it (:class:`~sphere_lightning.module.EditingModule`
    implements it; a test may stand in with any object that has these members).

    Weights are in the nn.Linear (out × in) convention for every architecture.

    Attributes:
        model: The causal LM being edited.
        tokenizer: Its tokenizer.
        editor: The :class:`~sphere_lightning.editors.base.Editor` computing ΔW.
        global_step: Applied batches so far.
        original_weights: ``{name: W₀}``, the unedited weights.
        record_step_deltas: Set to True (in a callback's ``setup``) to have ``editor_deltas``
            and ``applied_deltas`` kept for the step's ``on_train_batch_end`` hooks.
        editor_deltas: The step's ΔW as the editor returned them, before any transform.
        applied_deltas: The step's ΔW as added to the weights.
        suppression_increase: Added to SPHERE's α (capped at 1) while a step policy has the
            step edited again (:class:`StepDecision`); 0 otherwise.
        phase_seconds: Wall time by phase, for ``summary.json``; observers add theirs.
        pre_edit_metrics: The edit metrics before the first edit (``{metric: value}``).
        final_edit_metrics: The last lifelong evaluation over every edited fact
            (``{metric: value}``).
        sampled_edit_metrics: Every sampled intermediate evaluation.
        model_name: The base model as the config names it (``model.model``).
        dtype_name: The weights' dtype as the config names it (``model.dtype``).
    """

    model: Any
    tokenizer: Any
    editor: Editor
    original_weights: dict[str, torch.Tensor]
    record_step_deltas: bool
    editor_deltas: dict[str, torch.Tensor]
    applied_deltas: dict[str, torch.Tensor]
    suppression_increase: float
    phase_seconds: dict[str, float]
    pre_edit_metrics: dict[str, float]
    final_edit_metrics: dict[str, float]
    sampled_edit_metrics: list[dict[str, float]]
    model_name: str
    dtype_name: str

    @property
    def trainer(self) -> Any:
        """The trainer the module is attached to."""

    @property
    def global_step(self) -> int:
        """Applied batches so far."""

    @property
    def edited_parameter_names(self) -> list[str]:
        """Names of the edited parameters."""

    @property
    def editor_class_path(self) -> str:
        """``module.Class`` of the editor, as a config's ``class_path`` names it."""

    @property
    def evaluated_at_current_step(self) -> bool:
        """Whether the lifelong metrics over every edited fact were logged at this step."""

    def edited_weight(self, name: str) -> torch.Tensor:
        """The current weight of an edited parameter, as an (out × in) view (in-place changes
        reach the model)."""

    def evaluated_weights(self) -> AbstractContextManager[None]:
        """A block inside which the edited weights are those evaluations see."""

    def num_edited(self) -> int:
        """Requests written into the model so far."""

    def log_now(self, metrics: dict[str, float]) -> None:
        """Send scalars to the loggers at ``global_step``."""


@contextmanager
def weights_swapped(
    context: EditingContext, replacement: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    """Within the block each edited weight named in ``replacement`` holds its tensor there; on
    exit (also on error) the weights there before are put back bit for bit. Only those weights
    are copied: memory is their size, not the model's."""
    before = {name: context.edited_weight(name).detach().clone() for name in replacement}
    try:
        with torch.no_grad():
            for name, tensor in replacement.items():
                weight = context.edited_weight(name)
                weight.copy_(tensor.to(weight.device, weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, tensor in before.items():
                context.edited_weight(name).copy_(tensor)


#: What a :class:`StepPolicy` may decide about an applied step.
StepAction = Literal["accept", "retry", "skip"]


@dataclass(frozen=True)
class StepDecision:
    """A step policy's verdict on an applied step.

    Attributes:
        action: ``accept`` (keep it), ``retry`` (undo it and edit the batch again, with every
            live SPHERE projection's α raised by ``suppression_increase``, capped at 1) or
            ``skip`` (undo it and leave the batch out).
        suppression_increase: The raise of α of the retry (``retry`` only), from each SPHERE
            callback's own α.
    """

    action: StepAction = "accept"
    suppression_increase: float = 0.0

    def __post_init__(self) -> None:
        if self.action not in ("accept", "retry", "skip"):
            raise ValueError(f"`action` should be `accept`, `retry` or `skip`, got {self.action!r}")


class StepPolicy(ABC):
    """Base class of what decides whether an applied step stands (the HE alarm).

    A callback that is also a :class:`StepPolicy` is found in ``trainer.callbacks`` by the
    module (at most one). After each attempt of a step — the batch's ΔW applied, the editor's
    state updated, the step's scalars logged — the module calls :meth:`review_step` and acts on
    the decision itself: it puts back the edited weights and the editor's state it copied before
    the step (only when :attr:`undoes_steps`), then edits the batch again (``retry``) or leaves
    it out (``skip``). The policy never changes the weights, another callback or the loop.
    """

    @property
    def undoes_steps(self) -> bool:
        """Whether a decision may be ``retry`` or ``skip``: the module then copies the edited
        weights and the editor's state before every step."""
        return False

    @abstractmethod
    def review_step(self, context: EditingContext, attempt: int) -> StepDecision:
        """The verdict on attempt ``attempt`` (0: the first) of the step just applied."""
