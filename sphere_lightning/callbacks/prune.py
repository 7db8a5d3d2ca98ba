"""PRUNE: restrain the singular values of the accumulated update (Ma et al.,
"Perturbation-Restrained Sequential Model Editing", ICLR 2025), as the official SPHERE code applies
it (``experiments/evaluate.py``, ``MEMIT_prune``)."""

from __future__ import annotations

import math

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from sphere_lightning.callbacks.sphere import short_name
from sphere_lightning.context import EditingContext
from sphere_lightning.deltas import DeltaResult, DeltaTransform, TransformStage


def restrain_singular_values(singular_values: torch.Tensor, bound: float) -> torch.Tensor:
    """PRUNE's rescaling of singular values: σ' = log σ − log σ_max + σ_max where σ > σ_max,
    σ' = σ elsewhere (``bound`` is σ_max). Equal at σ = σ_max, and growing only logarithmically
    above it."""
    if not bound > 0.0:
        raise ValueError(f"`bound` (σ_max of the original weight) must be > 0, got {bound}")
    above = singular_values > bound
    restrained = torch.log(singular_values) - math.log(bound) + bound
    return torch.where(above, restrained, singular_values)


def prune_delta(
    accumulated: torch.Tensor, bound: float, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The change PRUNE makes to an accumulated update ΔW = U diag(σ) Vᵀ, and ΔW's singular
    values σ (descending).

    PRUNE replaces ΔW by U diag(σ') Vᵀ (:func:`restrain_singular_values`); this returns the
    difference ``U_k diag(σ'_k − σ_k) V_kᵀ`` over the k rescaled values only (zero when k = 0), so
    adding it to ΔW gives the restrained update while the untouched directions keep ΔW's own
    bits, not a float round trip through the SVD.

    Precision: the SVD runs in ``dtype`` (default: float32, or float64 for a float64 input), as
    the reference runs it in float32.
    """
    if accumulated.ndim != 2:
        raise ValueError(f"`accumulated` must be 2-D, got shape {tuple(accumulated.shape)}")
    if dtype is None:
        dtype = torch.float64 if accumulated.dtype == torch.float64 else torch.float32
    matrix = accumulated.to(dtype)
    u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    above = sigma > bound
    count = int(above.sum())
    if count == 0:
        return torch.zeros_like(accumulated), sigma
    # Singular values come in descending order: the rescaled ones are the first ``count``.
    change = restrain_singular_values(sigma[:count], bound) - sigma[:count]
    correction = (u[:, :count] * change) @ vh[:count]
    return correction.to(accumulated.dtype), sigma


class PruneCallback(DeltaTransform):
    """PRUNE: bound the singular values of the accumulated update by those of the original weight.

    With W₀ the unedited weight, the accumulated update A = U diag(σ) Vᵀ has every σ above
    σ_max (W₀'s largest singular value) replaced by log σ − log σ_max + σ_max (the official
    code's formula), giving PRUNE(A) = U diag(σ') Vᵀ. Nothing changes while every σ ≤ σ_max. The
    singular values do not depend on orientation, so GPT-2's Conv1D and nn.Linear behave alike.

    Two ways to apply it, chosen with ``stage``:

    - ``evaluation`` — the official code's (``evaluate.py``, ``MEMIT_prune``): the live model
      keeps the plain updates, and every batch is edited on the unrestrained model; only the
      weights evaluated (edit metrics, observers, export) are W₀ + PRUNE(W − W₀), with W the
      live weight. The paper presets use it.
    - ``after_loop`` (default) or ``in_loop`` — live: A = W + ΔW − W₀ with W the weight as
      applied so far and ΔW this step's update, and the step's ΔW is returned as
      W₀ + PRUNE(A) − W, so the live model holds W₀ + PRUNE(A) and later batches are edited on
      the restrained model; ``after_loop`` rescales once the batch's updates are in place,
      ``in_loop`` restrains each layer's accumulated update before the layers above are solved.

    Logs ``prune/num_rescaled/<layer>`` (how many σ were rescaled) and
    ``prune/max_singular_value_ratio/<layer>`` (σ₁ of A over σ_max, before rescaling): at each
    step when live, whenever the evaluated weights are computed at ``evaluation``.

    Args:
        stage: ``after_loop`` (default), ``in_loop`` or ``evaluation``; see above and
            :class:`~sphere_lightning.deltas.DeltaTransform`.
    """

    def __init__(self, stage: TransformStage = "after_loop") -> None:
        super().__init__(stage)
        # σ_max of each original weight; W₀ never changes during a fit, so computed once per layer.
        self._bounds: dict[str, float] = {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._bounds = {}  # a new fit may edit another model

    def bound(self, pl_module: EditingContext, name: str) -> float:
        """σ_max of the original weight of parameter ``name``."""
        if name not in self._bounds:
            original = pl_module.original_weights[name].detach()
            dtype = torch.float64 if original.dtype == torch.float64 else torch.float32
            self._bounds[name] = float(torch.linalg.matrix_norm(original.to(dtype), ord=2))
        return self._bounds[name]

    @override
    def transform_delta(
        self, name: str, delta: torch.Tensor, pl_module: EditingContext
    ) -> DeltaResult:
        if self.stage == "evaluation":
            accumulated = delta  # the total update W − W₀ itself
        else:
            original = pl_module.original_weights[name].detach().to(delta.device)
            applied = pl_module.edited_weight(name).detach().to(delta.device)
            accumulated = (applied.to(delta.dtype) - original.to(delta.dtype)) + delta
        bound = self.bound(pl_module, name)
        correction, sigma = prune_delta(accumulated, bound)
        count = int((sigma > bound).sum())
        layer = short_name(name)
        metrics = {
            f"prune/num_rescaled/{layer}": float(count),
            f"prune/max_singular_value_ratio/{layer}": float(sigma[0]) / bound,
        }
        return (delta + correction if count else delta), metrics
