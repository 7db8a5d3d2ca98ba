"""HE collapse alarm: act when a step moves the edited weights' energy far outside its usual band.

Collapse in sequential editing follows sharp fluctuations of the hyperspherical energy (HE) of the
edited weights (SPHERE, observation 1). This callback watches ΔHE, the HE change each step
causes in each edited layer, learns the ordinary size of that change from the run so far, and
when a step falls outside that band it warns, stops the run, or undoes the step and either
leaves the batch out or edits it again with a stronger SPHERE projection.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from sphere_lightning.callbacks.energy import HyperSphericalEnergyCallback
from sphere_lightning.callbacks.observer import EditObserver
from sphere_lightning.callbacks.sphere import SphereProjectionCallback
from sphere_lightning.context import EditingContext, StepDecision, StepPolicy
from sphere_lightning.errors import ConfigError, callback_flag
from sphere_lightning.functional.band import DeltaBand, excess, outside
from sphere_lightning.tags import ENERGY, NUM_EDITED
from sphere_lightning.timing import add_seconds

AlarmAction = Literal["warn", "stop", "rollback"]
RetryPolicy = Literal["retry", "skip"]
ExhaustedPolicy = Literal["keep", "skip"]


def _flag(*name: str) -> str:
    """An option of this callback as messages name it (:func:`~sphere_lightning.errors.flag`)."""
    return callback_flag("HEAlarmCallback", *name)


def _finite_or_none(value: float) -> float | None:
    """JSON-friendly bound: ``None`` for ±inf."""
    return value if math.isfinite(value) else None


@dataclass
class _Step:
    """A step under review: HE per layer before it, the batch's request positions, and what
    the reviews of its attempts found."""

    energy: dict[str, float]
    positions: list[int]
    limits: dict[str, tuple[float, float]] = field(default_factory=dict)
    delta: dict[str, float] = field(default_factory=dict)
    fired: bool = False
    retries: int = 0
    skipped: bool = False
    alpha: float | None = None
    stop_reason: str | None = None


class HEAlarmCallback(EditObserver, StepPolicy):
    """Watch the HE change of each step, and warn, stop or roll back when it is out of band.

    Before each step (``on_train_batch_start``) the HE of every edited weight is computed; after
    each attempt of it (:meth:`review_step`) again, and ΔHE = HE after − HE before, per layer,
    is checked against a :class:`~sphere_lightning.functional.band.DeltaBand` learned from that
    layer's ΔHE over the steps kept so far
    (median ± ``k`` · 1.4826 · MAD, once ``warmup_steps`` steps are in; optionally an absolute
    ``max_abs_delta``). A step is out of band if any layer is. Then, per ``action``:

    - ``warn``: a warning naming the step, the layer, ΔHE and the band;
    - ``stop``: also ``trainer.should_stop = True`` (the run ends after this step, whose edit
      stays in); the reason is warned and kept in :attr:`stop_reason` and ``summary.json``;
    - ``rollback``: the edited weights and the editor's sequential state (``editor.state_dict()``,
      e.g. AlphaEdit's accumulated K Kᵀ) are put back bit for bit as they were before the step,
      then per ``on_retry``:

      - ``retry``: the batch is edited again with the α (``suppression``) of every live
        :class:`SphereProjectionCallback` raised by ``alpha_step`` per retry (capped at 1), for
        the retry only; up to ``max_retries`` times. If every retry is out of band too,
        ``on_exhausted`` keeps the last attempt (``keep``) or rolls it
        back and leaves the batch out (``skip``). Needs a SPHERE callback in the trainer; to
        edit without SPHERE until an alarm, list one with ``suppression: 0.0`` (α = 0 applies
        ΔW unchanged).
      - ``skip``: the batch is left out; its request positions are recorded.

    Only steps that are kept add their ΔHE to the history (a skipped batch adds nothing), and
    only steps with ΔHE (not drift or edit metrics) are watched.

    **How it acts.** The callback holds the configuration and the band; it is the run's
    :class:`~sphere_lightning.context.StepPolicy`. The module asks it after each attempt of a
    step (:meth:`review_step`) and does the rollback and the retry itself, inside the step, so
    every observer, wherever it is listed, measures the attempt that was kept. The retry is
    applied without another optimizer step: ``global_step`` is the step's number throughout it.

    **Logging** (TensorBoard, at the step's ``global_step``): ``alarm/fired`` (1 if the step's
    first attempt was out of band), ``alarm/retries``, ``alarm/skipped``, ``alarm/alpha`` (α of
    the step's last attempt, when a SPHERE callback is present), ``alarm/delta_he/<layer>`` (ΔHE
    of the kept attempt; 0 for a skipped batch), ``alarm/band_{low,high}/<layer>`` (finite limits
    only) and ``time/alarm`` (HE after each attempt; HE before the step is the previous step's
    after). Every attempt logs the module's own scalars (``edit_batch/*``, ``editor/*``,
    ``sphere/*``, ``time/*``, ``edit/num_edited``) at the same step: the last value at a step
    belongs to the attempt that was kept (after a skip, the first attempt's
    scalars stay; ``alarm/skipped`` marks them). ``edit/num_edited`` counts the batch's facts
    whether or not they were skipped; once any batch has been skipped, this callback writes it
    again after the module, minus the facts skipped so far. (The lifelong ``edit/*`` metrics
    still score skipped facts: they are facts of the run that were not written.)

    **summary.json** (``alarm``): ``events`` — one per out-of-band attempt, and one for a retry
    that came back in band — each ``{step, attempt, action, layer, delta_he, band, out_of_band,
    alpha}``: ``action`` is what was done with that attempt (``warn``, ``stop``, ``retry``:
    rolled back and retried, ``skip``, ``keep``: retries exhausted and kept, ``accept``: a retry
    in band), ``layer``/``delta_he``/``band`` the layer furthest outside its band (``band`` as
    ``[low, high]``, ``null`` where unbounded), ``out_of_band`` every offending layer's ΔHE;
    ``skipped_positions``; ``stop_reason``. All of it, and the band history, is in the
    checkpoint, so a resumed run keeps its band.

    **Cost.** HE of every edited weight twice per step (the HE callback's maths), and with
    ``rollback`` a copy of the edited weights and of the editor's state (for AlphaEdit the K Kᵀ
    matrices, ``d_in²`` floats per layer) per step; each retry costs a full step.

    Args:
        action: ``warn``, ``stop`` or ``rollback``.
        on_retry: After a rollback: ``retry`` (with a stronger SPHERE α) or ``skip``.
        on_exhausted: When every retry is out of band: ``keep`` the last attempt or ``skip``.
        band: The band of ordinary ΔHE (:class:`~sphere_lightning.functional.band.DeltaBand`):
            ``k``, its half-width in robust standard deviations (1.4826 · MAD) around the
            median; ``warmup_steps``, kept steps per layer before the relative band applies;
            ``max_abs_delta``, an absolute limit on |ΔHE| of any layer (``None``: none) that
            applies from the first step; ``min_scale``, the floor of the band's scale (the
            robust standard deviation); ``window``, the band learns from the last this-many
            kept steps (``None``: all of them).
        max_retries: Retries of an out-of-band batch (``on_retry: retry``).
        alpha_step: Increase of SPHERE's α per retry (capped at 1).
        s: Exponent of the energy, as in :class:`HyperSphericalEnergyCallback`.
        chunk_size: Rows of the Gram matrix computed at once (bounds memory).
    """

    summary_key = "alarm"
    phase = "alarm"
    measures_baseline = False
    # It judges the live model: the weights the module rolls back and editing goes on from.
    evaluates_model = False

    def __init__(
        self,
        action: AlarmAction = "warn",
        on_retry: RetryPolicy = "retry",
        on_exhausted: ExhaustedPolicy = "keep",
        band: DeltaBand = DeltaBand(),
        max_retries: int = 2,
        alpha_step: float = 0.1,
        s: float = 1.0,
        chunk_size: int = 1024,
    ) -> None:
        super().__init__(every_n_steps=1)
        for flag, value, allowed in [
            ("action", action, AlarmAction),
            ("on_retry", on_retry, RetryPolicy),
            ("on_exhausted", on_exhausted, ExhaustedPolicy),
        ]:
            if value not in get_args(allowed):
                names = ", ".join(f"`{a}`" for a in get_args(allowed))
                raise ConfigError(f"{_flag(flag)} should be one of {names}, got {value!r}")
        if max_retries < 1:
            raise ConfigError(f"{_flag('max_retries')} should be ≥ 1, got {max_retries}")
        if not 0.0 < alpha_step <= 1.0:
            raise ConfigError(f"{_flag('alpha_step')} should be in (0, 1], got {alpha_step}")
        if s < 0:  # checked here, so that the message names this callback's option
            raise ConfigError(f"{_flag('s')} should be ≥ 0, got {s}")
        self.band = band
        self.action = action
        self.on_retry = on_retry
        self.on_exhausted = on_exhausted
        self.max_retries = max_retries
        self.alpha_step = alpha_step
        self._energy = HyperSphericalEnergyCallback(s=s, chunk_size=chunk_size)
        #: ΔHE of every kept step, per layer (short name): what the band learns from.
        self.history: dict[str, list[float]] = {}
        #: One record per out-of-band attempt (and per retry back in band); see the class doc.
        self.events: list[dict[str, Any]] = []
        #: Request positions of the batches left out.
        self.skipped_positions: list[int] = []
        #: Why the run was stopped (``action: stop``), else ``None``.
        self.stop_reason: str | None = None
        self._step: _Step | None = None
        self._spheres: list[SphereProjectionCallback] = []
        self._review_seconds = 0.0
        self._energy_cache: tuple[int, dict[str, float]] | None = None

    @property
    def s(self) -> float:
        """Exponent of the energy."""
        return self._energy.s

    @property
    @override
    def undoes_steps(self) -> bool:
        return self.action == "rollback"

    # -- hooks ---------------------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # One of stage `evaluation` never touches the live model a retry re-edits.
        self._spheres = [
            c
            for c in trainer.callbacks
            if isinstance(c, SphereProjectionCallback) and c.stage != "evaluation"
        ]
        if self.action == "rollback" and self.on_retry == "retry" and not self._spheres:
            raise ConfigError(
                f"HEAlarmCallback with {_flag('action')} `rollback` and {_flag('on_retry')} "
                "`retry` raises SPHERE's α on a retry, but `trainer.callbacks` holds no "
                "SphereProjectionCallback: add one (`suppression: 0.0` edits without SPHERE until "
                f"an alarm) or set {_flag('on_retry')} to `skip`"
            )

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = _Step(
            energy=self._energies_before(trainer, pl_module),
            positions=list(getattr(batch, "positions", [])),
        )
        self._review_seconds = 0.0

    # -- the policy ----------------------------------------------------------------------------

    def alpha(self, attempt: int) -> float | None:
        """SPHERE's α (of the first live SPHERE callback) at ``attempt``; ``None`` without one."""
        if not self._spheres:
            return None
        base = self._spheres[0].suppression
        return base if attempt == 0 else min(1.0, base + self.increase(attempt))

    def increase(self, attempt: int) -> float:
        """The raise of α at retry ``attempt``."""
        return attempt * self.alpha_step

    @override
    def review_step(self, context: EditingContext, attempt: int) -> StepDecision:
        step = self._step
        if step is None:  # not started through on_train_batch_start: nothing to compare with
            return StepDecision()
        if attempt == 0:
            step.limits = {
                layer: self.band.limits(self.history.get(layer, [])) for layer in step.energy
            }
        step.delta = self._delta(context, step)
        out = outside(step.delta, step.limits)
        step.retries, step.alpha = attempt, self.alpha(attempt)
        if attempt == 0:
            step.fired = bool(out)
            return self._first_verdict(context.global_step, step, out)
        if not out:
            action = "accept"
        elif attempt < self.max_retries:
            action = "retry"
        else:
            action = self.on_exhausted
        self._record(context.global_step, attempt, action, step.delta, out, step.limits, step.alpha)
        if action == "retry":
            return StepDecision("retry", self.increase(attempt + 1))
        step.skipped = action == "skip"
        return StepDecision("skip" if step.skipped else "accept")

    def _first_verdict(self, index: int, step: _Step, out: dict[str, float]) -> StepDecision:
        """The decision on a step's first attempt."""
        if not out:
            return StepDecision()

        def record(action: str) -> dict[str, Any]:
            return self._record(index, 0, action, step.delta, out, step.limits, step.alpha)

        if self.action == "warn":
            record("warn")
            return StepDecision()
        if self.action == "stop":
            event = record("stop")
            step.stop_reason = (
                f"HE alarm at step {index}: ΔHE of {event['layer']} = {event['delta_he']:.6g} "
                f"outside {_band_text(event['band'])}"
            )
            return StepDecision()
        if self.on_retry == "skip":
            record("skip")
            step.skipped = True
            return StepDecision("skip")
        record("retry")
        return StepDecision("retry", self.increase(1))

    @override
    def measure(self, trainer: Trainer, pl_module: EditingContext) -> dict[str, float]:
        step, self._step = self._step, None
        if step is None or not step.delta:  # no step reviewed since the last check
            return {}
        if self._part_seconds is not None:
            self._part_seconds[self.phase] = self._review_seconds
        if step.stop_reason is not None:
            self.stop_reason = step.stop_reason
            trainer.should_stop = True
        if step.skipped:
            self._energy_cache = (trainer.global_step, dict(step.energy))
            self.skipped_positions.extend(step.positions)
        else:
            for layer, value in step.delta.items():
                self.history.setdefault(layer, []).append(value)
        values = {
            "alarm/fired": float(step.fired),
            "alarm/retries": float(step.retries),
            "alarm/skipped": float(step.skipped),
        }
        if step.alpha is not None:
            values["alarm/alpha"] = step.alpha
        for layer, value in step.delta.items():
            values[f"alarm/delta_he/{layer}"] = 0.0 if step.skipped else value
            low, high = step.limits[layer]
            if math.isfinite(low):
                values[f"alarm/band_low/{layer}"] = low
            if math.isfinite(high):
                values[f"alarm/band_high/{layer}"] = high
        if self.skipped_positions and step.positions:
            # The module logged the batch's last position + 1; correct it for skipped facts.
            values[NUM_EDITED] = float(step.positions[-1] + 1 - len(self.skipped_positions))
        return values

    # -- helpers -------------------------------------------------------------------------------

    def _energies(self, pl_module: EditingContext) -> dict[str, float]:
        """``{layer: HE}`` of every edited weight now."""
        names = pl_module.edited_parameter_names
        energies = self._energy.energies({n: pl_module.edited_weight(n) for n in names})
        return {tag.removeprefix(ENERGY): value for tag, value in energies.items()}

    def _energies_before(self, trainer: Trainer, pl_module: EditingContext) -> dict[str, float]:
        """HE before the coming step: the HE after the previous step if this callback measured
        it (nothing changes the weights between steps), else computed now."""
        if self._energy_cache is not None and self._energy_cache[0] == trainer.global_step:
            return dict(self._energy_cache[1])
        start = time.perf_counter()
        energies = self._energies(pl_module)
        add_seconds(pl_module, self.phase, time.perf_counter() - start)
        return energies

    def _delta(self, pl_module: EditingContext, step: _Step) -> dict[str, float]:
        """``{layer: HE now − HE before the step}``; HE now is kept as the HE before the next
        step (a later rollback replaces it)."""
        start = time.perf_counter()
        after = self._energies(pl_module)
        self._review_seconds += time.perf_counter() - start
        self._energy_cache = (pl_module.global_step, after)
        return {layer: after[layer] - step.energy[layer] for layer in step.energy}

    def _record(
        self,
        step: int,
        attempt: int,
        action: str,
        delta: Mapping[str, float],
        out: Mapping[str, float],
        limits: Mapping[str, tuple[float, float]],
        alpha: float | None,
    ) -> dict[str, Any]:
        """Append an event (and warn, for an out-of-band attempt); returns the event."""
        layer = max(out or delta, key=lambda name: excess(delta[name], limits[name]))
        low, high = limits[layer]
        event = {
            "step": step,
            "attempt": attempt,
            "action": action,
            "layer": layer,
            "delta_he": delta[layer],
            "band": [_finite_or_none(low), _finite_or_none(high)],
            "out_of_band": dict(out),
            "alpha": alpha,
        }
        self.events.append(event)
        if out:
            others = f" ({len(out)} layers out of band)" if len(out) > 1 else ""
            alpha_text = "" if alpha is None else f", SPHERE α {alpha:.3g}"
            rank_zero_warn(
                f"HE alarm at step {step} (attempt {attempt}{alpha_text}): ΔHE of {layer} = "
                f"{delta[layer]:.6g} outside {_band_text(event['band'])}{others}; "
                f"action: {action}"
            )
        return event

    # -- summary and checkpoints -------------------------------------------------------------

    @override
    def summary(self, trainer: Trainer, pl_module: EditingContext) -> dict[str, Any]:
        return {
            "events": [dict(e) for e in self.events],
            "skipped_positions": list(self.skipped_positions),
            "stop_reason": self.stop_reason,
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "history": {layer: list(values) for layer, values in self.history.items()},
            "events": [copy.deepcopy(e) for e in self.events],
            "skipped_positions": list(self.skipped_positions),
            "stop_reason": self.stop_reason,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = {k: list(v) for k, v in (state_dict.get("history") or {}).items()}
        self.events = [copy.deepcopy(e) for e in state_dict.get("events") or []]
        self.skipped_positions = list(state_dict.get("skipped_positions") or [])
        self.stop_reason = state_dict.get("stop_reason")


def _band_text(band: Sequence[float | None]) -> str:
    low, high = band
    return (
        f"[{'-inf' if low is None else f'{low:.6g}'}, {'inf' if high is None else f'{high:.6g}'}]"
    )
