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
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from sphere_lightning.callbacks.energy import HyperSphericalEnergyCallback
from sphere_lightning.callbacks.observer import EditObserver
from sphere_lightning.callbacks.sphere import SphereProjectionCallback
from sphere_lightning.callbacks.timing import add_seconds
from sphere_lightning.interrupts import sigint_deferred

AlarmAction = Literal["warn", "stop", "rollback"]
RetryPolicy = Literal["retry", "skip"]
ExhaustedPolicy = Literal["keep", "skip"]

#: Scale of the median absolute deviation that makes it estimate σ for normal data.
MAD_TO_SIGMA = 1.4826


def robust_centre_scale(values: Sequence[float]) -> tuple[float, float]:
    """``(median, 1.4826 · MAD)`` of ``values``: a centre and a scale that a few outliers do
    not move (MAD = median of ``|x − median|``; the median of an even count is the mean of the
    middle two)."""
    if not values:
        raise ValueError("robust_centre_scale needs at least one value")
    centre = statistics.median(values)
    mad = statistics.median(abs(v - centre) for v in values)
    return float(centre), MAD_TO_SIGMA * float(mad)


@dataclass(frozen=True)
class DeltaBand:
    """The band of ordinary per-step ΔHE of one layer, learned from its accepted steps so far.

    With ``history`` the ΔHE of the steps kept so far (the last ``window`` of them), a value
    ``x`` is out of band when

    - ``|x − median| > k · scale``, ``scale = max(1.4826 · MAD, min_scale)``, once the history
      holds at least ``warmup_steps`` values (before that this test is off); or
    - ``|x| > max_abs_delta`` (when set; applies from the first step); or
    - ``x`` is not finite.

    The bounds are strict: a value exactly on a limit is in band.

    Args:
        k: Width of the band in robust standard deviations.
        warmup_steps: Steps in the history before the relative test starts.
        max_abs_delta: Absolute limit on |ΔHE| (``None``: none).
        min_scale: Floor of the scale, so that a history of (nearly) identical ΔHE does not turn
            every small difference into an alarm.
        window: Only the last this-many values of the history count (``None``: all).
    """

    k: float = 6.0
    warmup_steps: int = 3
    max_abs_delta: float | None = None
    min_scale: float = 0.0
    window: int | None = None

    def __post_init__(self) -> None:
        if not self.k > 0:
            raise ValueError(f"`k` should be > 0, got {self.k}")
        if self.warmup_steps < 1:
            raise ValueError(f"`warmup_steps` should be ≥ 1, got {self.warmup_steps}")
        if self.max_abs_delta is not None and not self.max_abs_delta > 0:
            raise ValueError(f"`max_abs_delta` should be > 0 or None, got {self.max_abs_delta}")
        if not self.min_scale >= 0:
            raise ValueError(f"`min_scale` should be ≥ 0, got {self.min_scale}")
        if self.window is not None and self.window < self.warmup_steps:
            raise ValueError(
                f"`window` should be None or ≥ `warmup_steps` ({self.warmup_steps}), "
                f"got {self.window}"
            )

    def limits(self, history: Sequence[float]) -> tuple[float, float]:
        """``(low, high)``: the ΔHE values allowed after ``history`` (±inf where unbounded)."""
        if self.window is not None:
            history = history[-self.window :]
        low, high = -math.inf, math.inf
        if len(history) >= self.warmup_steps:
            centre, scale = robust_centre_scale(history)
            scale = max(scale, self.min_scale)
            low, high = centre - self.k * scale, centre + self.k * scale
        if self.max_abs_delta is not None:
            low, high = max(low, -self.max_abs_delta), min(high, self.max_abs_delta)
        return low, high

    def is_out(self, value: float, history: Sequence[float]) -> bool:
        """Whether ``value`` is outside the band that ``history`` gives."""
        return not _within(value, self.limits(history))


def _finite_or_none(value: float) -> float | None:
    """JSON-friendly bound: ``None`` for ±inf."""
    return value if math.isfinite(value) else None


@dataclass
class _Snapshot:
    """What a step started from: HE per layer, the batch, and for a rollback the edited weights
    and the editor's state."""

    energy: dict[str, float]
    positions: list[int]
    batch: Any
    batch_idx: int
    weights: dict[str, torch.Tensor] | None = None
    editor_state: dict[str, Any] | None = None


class HEAlarmCallback(EditObserver):
    """Watch the HE change of each step, and warn, stop or roll back when it is out of band.

    Before each step (``on_train_batch_start``) the HE of every edited weight is computed; after
    it (``on_train_batch_end``) again, and ΔHE = HE after − HE before, per layer, is checked
    against a :class:`DeltaBand` learned from that layer's ΔHE over the steps kept so far
    (median ± ``k`` · 1.4826 · MAD, once ``warmup_steps`` steps are in; optionally an absolute
    ``max_abs_delta``). A step is out of band if any layer is. Then, per ``action``:

    - ``warn``: a warning naming the step, the layer, ΔHE and the band;
    - ``stop``: also ``trainer.should_stop = True`` (the run ends after this step, whose edit
      stays in); the reason is warned and kept in :attr:`stop_reason` and ``summary.json``;
    - ``rollback``: the edited weights and the editor's sequential state (``editor.state_dict()``,
      e.g. AlphaEdit's accumulated K Kᵀ) are put back bit for bit as they were before the step
      (snapshots taken in ``on_train_batch_start``), then per ``on_retry``:

      - ``retry``: the batch is edited again (``pl_module.training_step``) with the α
        (``suppression``) of every :class:`SphereProjectionCallback` raised by ``alpha_step``
        per retry (capped at 1) and set back afterwards; up to ``max_retries`` times. If every
        retry is out of band too, ``on_exhausted`` keeps the last attempt (``keep``) or rolls it
        back and leaves the batch out (``skip``). Needs a SPHERE callback in the trainer; to
        edit without SPHERE until an alarm, list one with ``suppression: 0.0`` (α = 0 applies
        ΔW unchanged).
      - ``skip``: the batch is left out; its request positions are recorded.

    Only steps that are kept add their ΔHE to the history (a skipped batch adds nothing), and
    only steps with ΔHE (not drift or edit metrics) are watched.

    **Where to list it.** Before every observer (``HyperSphericalEnergyCallback``, drift, general
    ability, figures) in ``trainer.callbacks``: callbacks run in list order, so observers listed
    after it see the weights of the attempt that was kept (a warning is raised otherwise).
    Order relative to delta transforms does not matter; ``ModelCheckpoint`` always runs last.

    **Logging** (TensorBoard, at the step's ``global_step``): ``alarm/fired`` (1 if the step's
    first attempt was out of band), ``alarm/retries``, ``alarm/skipped``, ``alarm/alpha`` (α of
    the step's last attempt, when a SPHERE callback is present), ``alarm/delta_he/<layer>`` (ΔHE
    of the kept attempt; 0 for a skipped batch), ``alarm/band_{low,high}/<layer>`` (finite limits
    only) and ``time/alarm`` (HE after the step; HE before it is the previous step's after). A
    retry re-runs ``training_step``, so the module's own scalars (``edit_batch/*``, ``editor/*``,
    ``sphere/*``, ``time/*``, ``edit/num_edited``) are written again at the same step: the last
    value at a step belongs to the attempt that was kept (after a skip, the first attempt's
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
        k: Band half-width in robust standard deviations (1.4826 · MAD) around the median.
        warmup_steps: Kept steps per layer before the relative band applies.
        max_abs_delta: Absolute limit on |ΔHE| of any layer (``None``: none); applies from the
            first step.
        min_scale: Floor of the band's scale (the robust standard deviation).
        window: The band learns from the last this-many kept steps (``None``: all of them).
        max_retries: Retries of an out-of-band batch (``on_retry: retry``).
        alpha_step: Increase of SPHERE's α per retry (capped at 1).
        s: Exponent of the energy, as in :class:`HyperSphericalEnergyCallback`.
        chunk_size: Rows of the Gram matrix computed at once (bounds memory).
    """

    summary_key = "alarm"
    phase = "alarm"
    measures_baseline = False
    # A policy on the live model: it rolls back and re-edits the weights editing goes on from.
    evaluates_model = False

    def __init__(
        self,
        action: AlarmAction = "warn",
        on_retry: RetryPolicy = "retry",
        on_exhausted: ExhaustedPolicy = "keep",
        k: float = 6.0,
        warmup_steps: int = 3,
        max_abs_delta: float | None = None,
        min_scale: float = 0.0,
        window: int | None = None,
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
                raise ValueError(f"`{flag}` should be one of {names}, got {value!r}")
        if max_retries < 1:
            raise ValueError(f"`max_retries` should be ≥ 1, got {max_retries}")
        if not 0.0 < alpha_step <= 1.0:
            raise ValueError(f"`alpha_step` should be in (0, 1], got {alpha_step}")
        self.band = DeltaBand(k, warmup_steps, max_abs_delta, min_scale, window)
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
        self._before: _Snapshot | None = None
        self._energy_cache: tuple[int, dict[str, float]] | None = None

    @property
    def s(self) -> float:
        """Exponent of the energy."""
        return self._energy.s

    # -- hooks ---------------------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.action == "rollback" and self.on_retry == "retry" and not self._spheres(trainer):
            raise ValueError(
                "HEAlarmCallback with `action: rollback` and `on_retry: retry` raises SPHERE's α "
                "on a retry, but trainer.callbacks holds no SphereProjectionCallback: add one "
                "(`suppression: 0.0` edits without SPHERE until an alarm) or set `on_retry: skip`"
            )
        callbacks = list(trainer.callbacks)
        if self in callbacks:
            before = callbacks[: callbacks.index(self)]
            early = [type(c).__name__ for c in before if isinstance(c, EditObserver)]
            if early:
                rank_zero_warn(
                    f"HEAlarmCallback is listed after {', '.join(early)} in trainer.callbacks: "
                    "those measure a step before the alarm has rolled it back or retried it. "
                    "List the alarm before them."
                )

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        before = _Snapshot(
            energy=self._energies_before(trainer, pl_module),
            positions=list(getattr(batch, "positions", [])),
            batch=batch,
            batch_idx=batch_idx,
        )
        if self.action == "rollback":
            before.weights = {
                name: pl_module.edited_weight(name).detach().clone()
                for name in pl_module.edited_parameter_names
            }
            before.editor_state = copy.deepcopy(pl_module.editor.state_dict())
        self._before = before

    @override
    def measure(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        before, self._before = self._before, None
        if before is None:  # no step since the last check (e.g. at the end of a resumed run)
            return {}
        step = trainer.global_step
        spheres = self._spheres(trainer)
        alpha = _alpha(spheres)
        limits = {layer: self.band.limits(self.history.get(layer, [])) for layer in before.energy}
        delta = self._delta(pl_module, before)
        out = _outside(delta, limits)
        retries, skipped = 0, False
        if out and self.action == "warn":
            self._record(step, 0, "warn", delta, out, limits, alpha)
        elif out and self.action == "stop":
            event = self._record(step, 0, "stop", delta, out, limits, alpha)
            self.stop_reason = (
                f"HE alarm at step {step}: ΔHE of {event['layer']} = {event['delta_he']:.6g} "
                f"outside {_band_text(event['band'])}"
            )
            trainer.should_stop = True
        elif out and self.on_retry == "skip":
            self._record(step, 0, "skip", delta, out, limits, alpha)
            skipped = True
        elif out:
            delta, retries, skipped, alpha = self._retry(
                trainer, pl_module, before, spheres, delta, out, limits
            )
        if skipped:
            self._restore(pl_module, before)
            self._energy_cache = (step, dict(before.energy))
            self.skipped_positions.extend(before.positions)
        else:
            for layer, value in delta.items():
                self.history.setdefault(layer, []).append(value)
        values = {
            "alarm/fired": float(bool(out)),
            "alarm/retries": float(retries),
            "alarm/skipped": float(skipped),
        }
        if alpha is not None:
            values["alarm/alpha"] = alpha
        for layer, value in delta.items():
            values[f"alarm/delta_he/{layer}"] = 0.0 if skipped else value
            low, high = limits[layer]
            if math.isfinite(low):
                values[f"alarm/band_low/{layer}"] = low
            if math.isfinite(high):
                values[f"alarm/band_high/{layer}"] = high
        if self.skipped_positions and before.positions:
            # The module logged the batch's last position + 1; correct it for skipped facts.
            values["edit/num_edited"] = float(
                before.positions[-1] + 1 - len(self.skipped_positions)
            )
        return values

    # -- rollback and retry ----------------------------------------------------------------------

    def _retry(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        before: _Snapshot,
        spheres: list[SphereProjectionCallback],
        delta: dict[str, float],
        out: dict[str, float],
        limits: dict[str, tuple[float, float]],
    ) -> tuple[dict[str, float], int, bool, float | None]:
        """Roll back and re-edit the batch with a stronger α until ΔHE is in band or the retries
        run out. Returns the last attempt's ΔHE, the number of retries, whether the batch is to
        be left out (rolled back by the caller) and the α of the last attempt."""
        step = trainer.global_step
        base = [sphere.suppression for sphere in spheres]
        self._record(step, 0, "retry", delta, out, limits, _alpha(spheres))
        for attempt in range(1, self.max_retries + 1):
            self._restore(pl_module, before)
            raised = [min(1.0, alpha + attempt * self.alpha_step) for alpha in base]
            try:
                for sphere, alpha in zip(spheres, raised, strict=True):
                    sphere.suppression = alpha
                with _step_replayed(trainer):
                    pl_module.training_step(before.batch, before.batch_idx)
            finally:
                for sphere, alpha in zip(spheres, base, strict=True):
                    sphere.suppression = alpha
            delta = self._delta(pl_module, before)
            out = _outside(delta, limits)
            if not out:
                action = "accept"
            elif attempt < self.max_retries:
                action = "retry"
            else:
                action = self.on_exhausted
            self._record(step, attempt, action, delta, out, limits, raised[0])
            if not out:
                break
        return delta, attempt, action == "skip", raised[0]

    def _restore(self, pl_module: LightningModule, before: _Snapshot) -> None:
        """Put the edited weights and the editor's state back as they were before the step
        (all of it, also when Ctrl-C arrives meanwhile)."""
        with torch.no_grad(), sigint_deferred():
            for name, saved in before.weights.items():
                pl_module.edited_weight(name).copy_(saved)
            # A fresh copy each time: load_state_dict may keep references later steps mutate.
            pl_module.editor.load_state_dict(copy.deepcopy(before.editor_state))

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _spheres(trainer: Trainer) -> list[SphereProjectionCallback]:
        # One of stage `evaluation` never touches the live model a retry re-edits.
        return [
            c
            for c in trainer.callbacks
            if isinstance(c, SphereProjectionCallback) and c.stage != "evaluation"
        ]

    def _energies(self, pl_module: LightningModule) -> dict[str, float]:
        """``{layer: HE}`` of every edited weight now."""
        names = pl_module.edited_parameter_names
        energies = self._energy.energies({n: pl_module.edited_weight(n) for n in names})
        return {tag.removeprefix("energy/"): value for tag, value in energies.items()}

    def _energies_before(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """HE before the coming step: the HE after the previous step if this callback measured
        it (nothing changes the weights between steps), else computed now."""
        if self._energy_cache is not None and self._energy_cache[0] == trainer.global_step:
            return dict(self._energy_cache[1])
        start = time.perf_counter()
        energies = self._energies(pl_module)
        add_seconds(pl_module, self.phase, time.perf_counter() - start)
        return energies

    def _delta(self, pl_module: LightningModule, before: _Snapshot) -> dict[str, float]:
        """``{layer: HE now − HE before the step}``; HE now is kept as the HE before the next
        step (a later rollback replaces it)."""
        with self.timed(self.phase):
            after = self._energies(pl_module)
        self._energy_cache = (pl_module.global_step, after)
        return {layer: after[layer] - before.energy[layer] for layer in before.energy}

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
        layer = max(out or delta, key=lambda name: _excess(delta[name], limits[name]))
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
    def summary(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
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


@contextmanager
def _step_replayed(trainer: Trainer) -> Iterator[None]:
    """Run the step that just finished again as the trainer's loop ran it: ``global_step`` is
    one back while the batch is edited (the module checks the batch's positions against it) and
    the optimizer step advances it, so the re-run logs at the same step as the first run. The
    step counters are restored exactly on exit, whatever happened inside."""
    loop = trainer.fit_loop.epoch_loop.manual_optimization
    progress = loop.optim_step_progress
    saved = progress.state_dict()
    progress.increment_by(-1)
    loop.on_run_start()  # lets the optimizer step count, as inside the loop
    try:
        yield
    finally:
        loop.on_run_end()
        progress.load_state_dict(saved)


def _outside(
    delta: Mapping[str, float], limits: Mapping[str, tuple[float, float]]
) -> dict[str, float]:
    """``{layer: ΔHE}`` of the layers outside their ``(low, high)`` limits."""
    return {layer: value for layer, value in delta.items() if not _within(value, limits[layer])}


def _within(value: float, limits: tuple[float, float]) -> bool:
    """``low ≤ value ≤ high`` (false for NaN)."""
    return limits[0] <= value <= limits[1]


def _alpha(spheres: Sequence[SphereProjectionCallback]) -> float | None:
    """α of the first SPHERE callback (``None`` without one)."""
    return spheres[0].suppression if spheres else None


def _excess(value: float, limits: tuple[float, float]) -> float:
    """How far ``value`` lies beyond its band (negative inside; inf if not finite)."""
    if not math.isfinite(value):
        return math.inf
    return max(limits[0] - value, value - limits[1])


def _band_text(band: Sequence[float | None]) -> str:
    low, high = band
    return (
        f"[{'-inf' if low is None else f'{low:.6g}'}, {'inf' if high is None else f'{high:.6g}'}]"
    )
