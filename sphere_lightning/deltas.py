"""The edit step's deltas: the transform role, the checks every ΔW passes, and the pipeline.

A :class:`DeltaTransform` rewrites each ΔW before it lands in the model (SPHERE, PRUNE, RECT or
a transform of your own) and returns what it measured; :func:`check_delta` stops a step whose
ΔW has the wrong shape or a NaN/inf before any weight changes; :class:`DeltaPipeline` runs the
transforms of a run in ``trainer.callbacks`` order, checking each one's output, and hands their
scalars back to the module, which logs them at the step its update lands on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import Callback
from typing_extensions import final

from sphere_lightning.context import EditingContext
from sphere_lightning.errors import ConfigError, callback_flag, editor_flag

#: When a delta transform runs: per layer inside the editor's loop, on the whole batch after it,
#: or only on the total update W − W₀ in the weights an evaluation sees.
TransformStage = Literal["in_loop", "after_loop", "evaluation"]

#: What :meth:`DeltaTransform.transform_delta` returns: the new ΔW, or the new ΔW and the
#: scalars to log (``{tag: value}``).
DeltaResult = torch.Tensor | tuple[torch.Tensor, Mapping[str, float]]

#: What :meth:`DeltaTransform.transform_deltas` returns: ``{name: ΔW}``, or that and scalars.
DeltasResult = dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], Mapping[str, float]]


class NonFiniteDeltaError(RuntimeError):
    """A ΔW contained NaN or inf; the step was stopped before any weight changed."""


def check_delta(delta: Any, name: str, shape: torch.Size, source: str) -> None:
    """Raise if ``delta`` is not a finite tensor of ``shape``; the message names ``source`` (the
    editor or the transform that produced it) and the parameter ``name``."""
    if not isinstance(delta, torch.Tensor):
        raise TypeError(f"{source} returned {type(delta).__name__} for {name}, expected a tensor")
    if delta.shape != shape:
        raise ValueError(
            f"{source} returned ΔW of shape {tuple(delta.shape)} for {name}, expected "
            f"{tuple(shape)}; no weight was changed"
        )
    bad = int((~torch.isfinite(delta)).sum())
    if bad:
        raise NonFiniteDeltaError(
            f"{source} returned ΔW for {name} with {bad} non-finite value(s) (NaN/inf); no weight "
            f"was changed. If this is the editor, lower {editor_flag('target.lr')} or raise its "
            f"regularisation (e.g. {editor_flag('l2')}, {editor_flag('mom2_update_weight')})."
        )


def _split(result: Any) -> tuple[Any, dict[str, float]]:
    """``(value, scalars)`` of a transform's result, which may or may not carry scalars."""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Mapping):
        return result[0], {tag: float(value) for tag, value in result[1].items()}
    return result, {}


class DeltaTransform(Callback):
    """Base class of callbacks that rewrite the update ΔW of each edited weight.

    Override :meth:`transform_delta` (one layer's ΔW) — or, for a transform that needs every
    layer at once, :meth:`transform_deltas` with ``stage="after_loop"``. ΔW is in the nn.Linear
    (out × in) convention for every architecture. ``pl_module`` is the run's
    :class:`~sphere_lightning.context.EditingContext`: ``edited_weight(name)`` (the weight as
    applied so far), ``original_weights``, ``model``, ``editor``… Return the new ΔW, or
    ``(ΔW, {tag: value})`` to have scalars logged at the step the update lands on.

    Transforms run in ``trainer.callbacks`` order (:class:`DeltaPipeline`). Their output is
    checked (shape, NaN/inf) after each one; a bad ΔW stops the step with the transform's class
    name and the layer, and no weight changes.

    Args:
        stage: When the transform runs.

            - ``in_loop`` (default): inside the editor's layer loop, on each layer's ΔW before
              it is put in place for the layers above, so their keys and residuals see the
              transformed update and the upper layers make up for what it removed. This is how
              the official AlphaEdit + SPHERE code projects (``AlphaEdit_main.py``).
            - ``after_loop``: on all layers' ΔW once the loop has finished, just before they are
              applied (the official MEMIT + SPHERE code, ``memit_main.py``, and EasyEdit's
              port). Editors without a layer loop see every transform after it.
            - ``evaluation``: never on a step's ΔW; the live model keeps the plain updates.
              Whenever the model is evaluated (edit metrics, observers, export), each edited
              weight holds W₀ + T(W − W₀) instead, with T this and every other ``evaluation``
              transform in list order applied to the total update W − W₀ (``delta``), and is
              put back afterwards (:meth:`EditingModule.evaluated_weights
              <sphere_lightning.module.EditingModule.evaluated_weights>`). This is how the
              official SPHERE code applies PRUNE and SPHERE to MEMIT (``evaluate.py``,
              ``MEMIT_prune``): only to the weights it saves for evaluation.

    Example — clip the norm of every ΔW, composed in YAML next to SPHERE::

        class ClipDeltaNorm(DeltaTransform):
            def __init__(self, max_norm: float = 1.0, stage: str = "in_loop") -> None:
                super().__init__(stage)
                self.max_norm = max_norm

            def transform_delta(self, name, delta, pl_module):
                norm = float(delta.norm())
                scale = min(1.0, self.max_norm / max(norm, 1e-12))
                return delta * scale, {f"clip/norm/{name}": norm}
    """

    def __init__(self, stage: TransformStage = "in_loop") -> None:
        if stage not in get_args(TransformStage):
            *first, last = (f"`{name}`" for name in get_args(TransformStage))
            raise ConfigError(
                f"{callback_flag(type(self).__name__, 'stage')} should be {', '.join(first)} or "
                f"{last}, got {stage!r}"
            )
        whole_batch_only = (
            type(self).transform_deltas is not DeltaTransform.transform_deltas
            and type(self).transform_delta is DeltaTransform.transform_delta
        )
        if whole_batch_only and stage == "in_loop":
            stage_flag = callback_flag(type(self).__name__, "stage")
            raise ConfigError(
                f"{type(self).__name__} transforms the whole batch (`transform_deltas`), which "
                f"only exists after the layer loop: set {stage_flag} to `after_loop`"
            )
        self.stage = stage

    def transform_delta(
        self, name: str, delta: torch.Tensor, pl_module: EditingContext
    ) -> DeltaResult:
        """The rewritten ΔW of parameter ``name`` (same shape), optionally with its scalars
        (``(ΔW, {tag: value})``). Default: unchanged."""
        return delta

    def transform_deltas(
        self, deltas: dict[str, torch.Tensor], pl_module: EditingContext
    ) -> DeltasResult:
        """Rewrite every layer's ΔW at once (``after_loop`` only), optionally with scalars.
        Default: each through :meth:`transform_delta`."""
        out, metrics = {}, {}
        for name, delta in deltas.items():
            out[name], produced = _split(self.transform_delta(name, delta, pl_module))
            metrics.update(produced)
        return out, metrics

    @final
    def apply_in_loop(
        self, name: str, delta: torch.Tensor, pl_module: EditingContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Run :meth:`transform_delta` on one layer's ΔW and check the result; returns the new
        ΔW and the transform's scalars."""
        out, metrics = _split(self.transform_delta(name, delta, pl_module))
        check_delta(out, name, delta.shape, type(self).__name__)
        return out, metrics

    @final
    def apply_to_batch(
        self, deltas: dict[str, torch.Tensor], pl_module: EditingContext
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Run :meth:`transform_deltas` on every layer's ΔW (or, at stage ``evaluation``, every
        layer's total update W − W₀) and check the result; returns the new deltas and the
        transform's scalars."""
        out, metrics = _split(self.transform_deltas(dict(deltas), pl_module))
        if not isinstance(out, dict) or set(out) != set(deltas):
            raise ValueError(
                f"{type(self).__name__}.transform_deltas should return a ΔW for each of "
                f"{sorted(deltas)}, got {sorted(out) if isinstance(out, dict) else type(out)}"
            )
        for name, delta in out.items():
            try:
                check_delta(delta, name, deltas[name].shape, type(self).__name__)
            except NonFiniteDeltaError as error:
                raise NonFiniteDeltaError(f"Step {pl_module.global_step}: {error}") from None
        return out, metrics


class DeltaPipeline:
    """The delta transforms of a run, in ``trainer.callbacks`` order; the module builds it once
    per ``fit``/``validate``/``test`` (:meth:`of`) and runs each stage through it.

    Every run returns the transformed deltas and the scalars the transforms produced (a later
    transform's value for a tag replaces an earlier one's).
    """

    def __init__(self, transforms: Iterable[DeltaTransform] = ()) -> None:
        self.transforms = list(transforms)

    @classmethod
    def of(cls, callbacks: Iterable[object]) -> DeltaPipeline:
        """The pipeline of the delta transforms among ``callbacks``, in their order."""
        return cls(c for c in callbacks if isinstance(c, DeltaTransform))

    def stage(self, stage: TransformStage) -> list[DeltaTransform]:
        """The transforms of ``stage``, in order."""
        return [t for t in self.transforms if t.stage == stage]

    def in_loop(
        self, name: str, delta: torch.Tensor, context: EditingContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One layer's ΔW through every ``in_loop`` transform; a non-finite ΔW is reported with
        the step."""
        metrics: dict[str, float] = {}
        try:
            for transform in self.stage("in_loop"):
                delta, produced = transform.apply_in_loop(name, delta, context)
                metrics.update(produced)
        except NonFiniteDeltaError as error:
            raise NonFiniteDeltaError(f"Step {context.global_step}: {error}") from None
        return delta, metrics

    def whole_batch(
        self, stage: TransformStage, deltas: dict[str, torch.Tensor], context: EditingContext
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Every layer's ΔW through the transforms of ``stage`` (``after_loop`` on a step's
        deltas, ``evaluation`` on the total updates W − W₀)."""
        metrics: dict[str, float] = {}
        for transform in self.stage(stage):
            deltas, produced = transform.apply_to_batch(deltas, context)
            metrics.update(produced)
        return deltas, metrics
