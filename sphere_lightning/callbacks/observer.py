"""Edit observers: callbacks that measure the model as edits pile up (HE, general ability, …)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, ClassVar

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import final, override

from sphere_lightning.context import EditingContext
from sphere_lightning.errors import ConfigError, callback_flag
from sphere_lightning.tags import TIME
from sphere_lightning.timing import add_seconds


def changes_since(
    values: Mapping[str, float], baseline: Mapping[str, float], prefix: str, change_prefix: str
) -> dict[str, float]:
    """``{change_prefix + rest: value − baseline value}`` for every tag ``prefix + rest`` of
    ``values`` that the baseline also holds (``energy/l1`` → ``energy_change/l1``)."""
    return {
        change_prefix + tag.removeprefix(prefix): value - baseline[tag]
        for tag, value in values.items()
        if tag.startswith(prefix) and tag in baseline
    }


class EditObserver(Callback, ABC):
    """Base class of callbacks that measure the model after edit steps.

    A subclass writes :meth:`measure` (the current values, ``{tag: value}``), reading the module
    through :class:`~sphere_lightning.context.EditingContext` (``pl_module``); the base does the
    plumbing once, the same way for every observer:

    - **When.** A baseline before the first edit: in ``on_train_start`` at ``global_step`` 0,
      unless one is held (a resumed run keeps the one in its checkpoint). Then after every step
      for which :meth:`should_update` says so (default: every ``every_n_steps``-th), and once
      more at the end of training if the last step was not measured, so :attr:`latest`
      describes the final model.
    - **Logging.** The values, :meth:`changes` against the baseline (e.g. ``energy_change/*``)
      and ``time/<phase>`` go out in one ``pl_module.log_now`` call at ``global_step``: the x
      axis is the number of applied batches, and the baseline sits at step 0.
    - **Weights.** :meth:`measure` runs inside ``pl_module.evaluated_weights()``: with delta
      transforms of stage ``evaluation`` (PRUNE as the official code applies it) it sees the
      weights evaluations see, W₀ + T(W − W₀), and the live weights are put back afterwards.
      An observer that changes the live model (the HE alarm's rollback) sets
      :attr:`evaluates_model` to False and sees the live weights.
    - **Timing.** The measurement's wall time is added to ``pl_module.phase_seconds[phase]``
      (the run summary's time by phase); :meth:`timed` splits it into several phases.
    - **Summary.** ``summary.json`` holds :meth:`summary` under :attr:`summary_key`.
    - **Checkpoints.** :attr:`baseline`, :attr:`latest` and :attr:`latest_step` are saved; the
      state key is built from :attr:`state_key_arguments`, so two instances that differ in
      those arguments can be listed together.

    Attributes:
        summary_key: Name of the entry in ``summary.json`` (``None``: no entry). Observers that
            share a key merge their entries when these are dicts with distinct keys (one per
            layer, say); otherwise the later one is stored under its :attr:`state_key`.
        phase: Name of the measurement's wall-time phase (``None``: :attr:`summary_key`, else
            the class name).
        state_key_arguments: Attribute names whose values tell two instances apart.
        measures_baseline: Whether to measure at step 0 (the baseline).
        evaluates_model: Whether :meth:`measure` sees the evaluated weights (default) rather
            than the live ones.
        baseline: ``{tag: value}`` measured before the first edit (``None`` until then).
        latest: ``{tag: value}`` of the last measurement.
        latest_step: The ``global_step`` of :attr:`latest` (``None`` before any).

    Args:
        every_n_steps: Measure after every n-th applied edit batch.

    Example — the norm of every edited weight and its change since the baseline::

        class WeightNorm(EditObserver):
            summary_key = "weight_norm"

            def measure(self, trainer, pl_module):
                return {
                    f"weight_norm/{name}": float(pl_module.edited_weight(name).norm())
                    for name in pl_module.edited_parameter_names
                }

            def changes(self, values, baseline):
                return changes_since(values, baseline, "weight_norm/", "weight_norm_change/")
    """

    summary_key: ClassVar[str | None] = None
    phase: ClassVar[str | None] = None
    state_key_arguments: ClassVar[tuple[str, ...]] = ()
    measures_baseline: ClassVar[bool] = True
    evaluates_model: ClassVar[bool] = True

    def __init__(self, every_n_steps: int = 1) -> None:
        if every_n_steps < 1:
            raise ConfigError(
                f"{callback_flag(type(self).__name__, 'every_n_steps')} should be ≥ 1, "
                f"got {every_n_steps}"
            )
        self.every_n_steps = every_n_steps
        self.baseline: dict[str, float] | None = None
        self.latest: dict[str, float] = {}
        self.latest_step: int | None = None
        self._part_seconds: dict[str, float] | None = None

    # -- what a subclass writes ---------------------------------------------------------------

    @abstractmethod
    def measure(self, trainer: Trainer, pl_module: EditingContext) -> dict[str, float]:
        """The current values, ``{tag: value}``; the tags are logged as they are."""

    def changes(self, values: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
        """Tags to log relative to the baseline (default none); see :func:`changes_since`."""
        return {}

    def should_update(self, step: int) -> bool:
        """Whether to measure after ``step`` applied batches."""
        return step % self.every_n_steps == 0

    def baseline_after_resume(
        self, trainer: Trainer, pl_module: EditingContext
    ) -> dict[str, float] | None:
        """The baseline of a run that starts past step 0 holding none (its checkpoint has no
        state for this observer). Default ``None``: the unedited model is gone, so changes
        are not logged. Override where the baseline can be rebuilt (e.g. from
        ``pl_module.original_weights``)."""
        return None

    def summary(self, trainer: Trainer, pl_module: EditingContext) -> Any:
        """The entry of ``summary.json`` (default: baseline, final values and final step)."""
        return {"baseline": self.baseline, "final": self.latest, "final_step": self.latest_step}

    # -- plumbing ------------------------------------------------------------------------------

    @property
    @override
    def state_key(self) -> str:
        if not self.state_key_arguments:
            return super().state_key
        return self._generate_state_key(
            **{name: getattr(self, name) for name in self.state_key_arguments}
        )

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Time part of a measurement as its own phase (logged as ``time/<phase>``). Once a
        measurement uses it, only its parts are timed, not the measurement as a whole."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._part_seconds is not None:
                seconds = time.perf_counter() - start
                self._part_seconds[phase] = self._part_seconds.get(phase, 0.0) + seconds

    def _weights_for_measurement(self, pl_module: EditingContext) -> AbstractContextManager:
        """``pl_module.evaluated_weights()`` where the module offers it and
        :attr:`evaluates_model`, else nothing."""
        evaluated = getattr(pl_module, "evaluated_weights", None)
        return evaluated() if self.evaluates_model and evaluated is not None else nullcontext()

    @final
    def observe(self, trainer: Trainer, pl_module: EditingContext) -> dict[str, float]:
        """Measure now, log at ``global_step`` and keep the values as :attr:`latest` (and as
        :attr:`baseline` at step 0 when none is held); returns the values."""
        step = trainer.global_step
        self._part_seconds = {}
        start = time.perf_counter()
        try:
            with self._weights_for_measurement(pl_module):
                values = dict(self.measure(trainer, pl_module))
        finally:
            seconds, self._part_seconds = self._part_seconds, None
        if not seconds:
            phase = self.phase or self.summary_key or type(self).__name__
            seconds = {phase: time.perf_counter() - start}
        if step == 0 and self.baseline is None and self.measures_baseline:
            self.baseline = dict(values)
        metrics = dict(values)
        if self.baseline is not None:
            metrics.update(self.changes(values, self.baseline))
        for phase, elapsed in seconds.items():
            add_seconds(pl_module, phase, elapsed)
            metrics[f"{TIME}{phase}"] = elapsed
        self.latest, self.latest_step = values, step
        pl_module.log_now(metrics)
        return values

    @final
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.measures_baseline or self.baseline is not None:
            return
        if trainer.global_step == 0:
            self.observe(trainer, pl_module)
            return
        self.baseline = self.baseline_after_resume(trainer, pl_module)
        if self.baseline is None:
            rank_zero_warn(
                f"{type(self).__name__}: resumed at step {trainer.global_step} without a stored "
                "baseline; values relative to it will not be logged (the pre-edit model is gone)."
            )

    @final
    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.should_update(trainer.global_step):
            self.observe(trainer, pl_module)

    @final
    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step > 0 and self.latest_step != trainer.global_step:
            self.observe(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "latest": self.latest, "latest_step": self.latest_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        baseline = state_dict.get("baseline")
        self.baseline = None if baseline is None else dict(baseline)
        self.latest = dict(state_dict.get("latest") or {})
        self.latest_step = state_dict.get("latest_step")
