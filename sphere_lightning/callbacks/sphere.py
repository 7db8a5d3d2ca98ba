"""SPHERE: project every ΔW away from the principal directions of the weight's neurons."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from typing_extensions import override

from sphere_lightning.context import EditingContext
from sphere_lightning.deltas import DeltaResult, DeltaTransform, TransformStage
from sphere_lightning.errors import ConfigError, callback_flag
from sphere_lightning.functional.projection import project_delta
from sphere_lightning.models.architectures import stores_transposed
from sphere_lightning.tags import SPHERE

#: Which weight the principal directions come from: the current (edited) one or the original.
ReferenceWeight = Literal["current", "original"]
#: Which rows of a weight are its neurons: those of the nn.Linear-shaped (out × in) view, or
#: those of the tensor as the module stores it (the transpose for GPT-2's Conv1D).
NeuronRows = Literal["linear", "stored"]
_GREEK = {"cumulative_ratio": "β", "suppression": "α"}


def short_name(parameter: str) -> str:
    """TensorBoard tag of an edited parameter (its module path)."""
    return parameter.removesuffix(".weight")


class SphereProjectionCallback(DeltaTransform):
    """Replace each ΔW by ΔW P⊥, P⊥ = I − α U Uᵀ (Sparse Projection, SPHERE).

    U holds the top-r principal directions of the weight's normalised neurons, with r the
    smallest number whose eigenvalues' cumulative share exceeds ``cumulative_ratio``. By
    default the neurons are the rows of the nn.Linear-shaped (out × in) weight and the projection
    acts on its input side for every architecture (GPT-2's Conv1D included); ``neuron_rows:
    stored`` follows the official code on Conv1D instead. Logs ``sphere/rank/<layer>`` and
    ``sphere/kept_norm_ratio/<layer>`` (‖ΔW P⊥‖ / ‖ΔW‖).

    Args:
        cumulative_ratio: β, the share of the spectrum treated as principal (paper: 0.5).
        suppression: α, how much of ΔW along the principal directions is removed (paper: 0.5
            on AlphaEdit, 0.8 on MEMIT). 0 disables the projection.
        reference: Where the principal directions come from: ``current`` (the weight as applied
            so far, without this batch's update, as the reference code does) or ``original``
            (the unedited weight).
        stage: ``in_loop`` (default; the official AlphaEdit + SPHERE code: each layer's ΔW is
            projected before the layers above are solved) or ``after_loop`` (the official
            MEMIT + SPHERE code and EasyEdit: every ΔW is projected once the loop is done) or
            ``evaluation`` (the live model keeps the plain updates; the total update W − W₀ is
            projected only in the weights evaluated, as the official ``MEMIT_prune`` code does
            after PRUNE, with ``reference: original``; ``current`` then means the live W).
            See :class:`~sphere_lightning.deltas.DeltaTransform`.
        neuron_rows: Which rows are the neurons U is computed from: ``linear`` (default) the
            rows of the (out × in) weight, one per output unit, so ΔW is projected on its input
            side; ``stored`` the rows of the weight tensor as the module stores it, as the
            official code does (``project_B_into_soft_dirs(w, ...)`` on the stored parameter).
            The two agree on nn.Linear (Llama, Qwen, GPT-J); on GPT-2's Conv1D, stored (in ×
            out), ``stored`` takes one neuron per input unit and projects ΔW on its output side.
    """

    def __init__(
        self,
        cumulative_ratio: float = 0.5,
        suppression: float = 0.5,
        reference: ReferenceWeight = "current",
        stage: TransformStage = "in_loop",
        neuron_rows: NeuronRows = "linear",
    ) -> None:
        super().__init__(stage)
        for flag, value in (("cumulative_ratio", cumulative_ratio), ("suppression", suppression)):
            # ``not 0 <= v <= 1`` also rejects NaN.
            if isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ConfigError(
                    f"{callback_flag(type(self).__name__, flag)} ({_GREEK[flag]}) should be in "
                    f"[0, 1], got {value}"
                )
        if reference not in get_args(ReferenceWeight):
            names = " or ".join(f"`{name}`" for name in get_args(ReferenceWeight))
            raise ConfigError(
                f"{callback_flag(type(self).__name__, 'reference')} should be {names}, "
                f"got {reference!r}"
            )
        if neuron_rows not in get_args(NeuronRows):
            names = " or ".join(f"`{name}`" for name in get_args(NeuronRows))
            raise ConfigError(
                f"{callback_flag(type(self).__name__, 'neuron_rows')} should be {names}, "
                f"got {neuron_rows!r}"
            )
        self.cumulative_ratio = cumulative_ratio
        self.suppression = suppression
        self.reference = reference
        self.neuron_rows = neuron_rows

    def suppression_now(self, pl_module: EditingContext) -> float:
        """α of the ΔW being projected: :attr:`suppression`, raised by the module's
        ``suppression_increase`` (capped at 1) while a step policy has a step edited again
        (never at stage ``evaluation``, which does not touch the live model)."""
        increase = pl_module.suppression_increase
        if not increase or self.stage == "evaluation":
            return self.suppression
        return min(1.0, self.suppression + increase)

    def reference_weight(self, pl_module: EditingContext, name: str) -> torch.Tensor:
        """The weight whose principal directions ΔW is projected away from."""
        if self.reference == "original":
            return pl_module.original_weights[name]
        return pl_module.edited_weight(name)

    def stored_transposed(self, pl_module: EditingContext, name: str) -> bool:
        """Whether ``neuron_rows: stored`` projects ``name`` on the transposed view: True only
        for a weight the module stores (in × out), GPT-2's Conv1D."""
        if self.neuron_rows == "linear":
            return False
        return stores_transposed(pl_module.model.get_submodule(short_name(name)))

    @override
    def transform_delta(
        self, name: str, delta: torch.Tensor, pl_module: EditingContext
    ) -> DeltaResult:
        weight = self.reference_weight(pl_module, name).detach()
        # ΔW P⊥ on the stored (in × out) rows of a Conv1D is (ΔWᵀ P⊥)ᵀ in the (out × in) view.
        transposed = self.stored_transposed(pl_module, name)
        projected, rank = project_delta(
            delta.mT if transposed else delta,
            (weight.mT if transposed else weight).to(delta.device),
            self.cumulative_ratio,
            self.suppression_now(pl_module),
        )
        if transposed:
            projected = projected.mT.contiguous()
        layer = short_name(name)
        return projected, {
            f"{SPHERE}rank/{layer}": float(rank),
            f"{SPHERE}kept_norm_ratio/{layer}": float(
                projected.norm() / delta.norm().clamp_min(1e-12)
            ),
        }
