"""Delta transforms: callbacks that rewrite each ΔW before it lands in the model (SPHERE, …)."""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import final, override

#: When a delta transform runs: per layer inside the editor's loop, on the whole batch after it,
#: or only on the total update W − W₀ in the weights an evaluation sees.
TransformStage = Literal["in_loop", "after_loop", "evaluation"]


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
            "was changed. If this is the editor, lower `editor.init_args.v_lr` or raise its "
            "regularisation (e.g. `l2`, `mom2_update_weight`)."
        )


class DeltaTransform(Callback):
    """Base class of callbacks that rewrite the update ΔW of each edited weight.

    Override :meth:`transform_delta` (one layer's ΔW) — or, for a transform that needs every
    layer at once, :meth:`transform_deltas` with ``stage="after_loop"``. ΔW is in the nn.Linear
    (out × in) convention for every architecture; ``pl_module`` offers ``edited_weight(name)``
    (the weight as applied so far), ``original_weights`` and ``step_metrics`` (scalars logged at
    the step the update lands on).

    Transforms run in ``trainer.callbacks`` order. Their output is checked (shape, NaN/inf) after
    each one; a bad ΔW stops the step with the transform's class name and the layer, and no
    weight changes.

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
                norm = delta.norm()
                pl_module.step_metrics[f"clip/norm/{name}"] = float(norm)
                return delta * min(1.0, self.max_norm / float(norm.clamp_min(1e-12)))
    """

    def __init__(self, stage: TransformStage = "in_loop") -> None:
        if stage not in get_args(TransformStage):
            *first, last = (f"`{name}`" for name in get_args(TransformStage))
            raise ValueError(f"`stage` should be {', '.join(first)} or {last}, got {stage!r}")
        whole_batch_only = (
            type(self).transform_deltas is not DeltaTransform.transform_deltas
            and type(self).transform_delta is DeltaTransform.transform_delta
        )
        if whole_batch_only and stage == "in_loop":
            raise ValueError(
                f"{type(self).__name__} transforms the whole batch (`transform_deltas`), which "
                "only exists after the layer loop: set `stage: after_loop`"
            )
        self.stage = stage

    def transform_delta(
        self, name: str, delta: torch.Tensor, pl_module: LightningModule
    ) -> torch.Tensor:
        """The rewritten ΔW of parameter ``name`` (same shape). Default: unchanged."""
        return delta

    def transform_deltas(
        self, deltas: dict[str, torch.Tensor], pl_module: LightningModule
    ) -> dict[str, torch.Tensor]:
        """Rewrite every layer's ΔW at once (``after_loop`` only). Default: each through
        :meth:`transform_delta`."""
        return {
            name: self.transform_delta(name, delta, pl_module) for name, delta in deltas.items()
        }

    @final
    def apply_in_loop(
        self, name: str, delta: torch.Tensor, pl_module: LightningModule
    ) -> torch.Tensor:
        """Run :meth:`transform_delta` on one layer's ΔW and check the result."""
        out = self.transform_delta(name, delta, pl_module)
        check_delta(out, name, delta.shape, type(self).__name__)
        return out

    @final
    def apply_to_batch(
        self, deltas: dict[str, torch.Tensor], pl_module: LightningModule
    ) -> dict[str, torch.Tensor]:
        """Run :meth:`transform_deltas` on every layer's ΔW (or, at stage ``evaluation``, every
        layer's total update W − W₀) and check the result."""
        out = self.transform_deltas(dict(deltas), pl_module)
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
        return out

    @final
    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> None:
        # Lightning calls this on every callback, in list order, right before the deltas apply.
        if self.stage != "after_loop" or not pl_module.pending_deltas:
            return
        pl_module.pending_deltas = self.apply_to_batch(pl_module.pending_deltas, pl_module)
