"""SPHERE: project every pending ΔW away from the principal directions of the weight's neurons."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from sphere_lightning.functional.projection import project_delta

_REFERENCES = ("current", "original")


def short_name(parameter: str) -> str:
    """TensorBoard tag of an edited parameter (its module path)."""
    return parameter.removesuffix(".weight")


class SphereProjectionCallback(Callback):
    """Replace each pending ΔW by ΔW P⊥, P⊥ = I − α U Uᵀ (Sparse Projection, SPHERE).

    U holds the top-r principal directions of the weight's normalised neurons, with r the
    smallest number whose eigenvalues' cumulative share exceeds ``cumulative_ratio``. The
    projection acts on the input side of the nn.Linear-shaped (out × in) weight for every
    architecture (GPT-2's Conv1D included). Logs ``sphere/rank/<layer>``.

    Args:
        cumulative_ratio: β, the share of the spectrum treated as principal (paper: 0.5).
        suppression: α, how much of ΔW along the principal directions is removed (paper: 0.5
            on AlphaEdit, 0.8 on MEMIT). 0 disables the projection.
        reference: Where the principal directions come from: ``current`` (the weight as edited
            so far, as the reference code does) or ``original`` (the unedited weight).
    """

    def __init__(
        self, cumulative_ratio: float = 0.5, suppression: float = 0.5, reference: str = "current"
    ) -> None:
        if not 0.0 <= cumulative_ratio <= 1.0:
            raise ValueError(f"`cumulative_ratio` should be in [0, 1], got {cumulative_ratio}")
        if not 0.0 <= suppression <= 1.0:
            raise ValueError(f"`suppression` should be in [0, 1], got {suppression}")
        if reference not in _REFERENCES:
            raise ValueError(f"`reference` should be `current` or `original`, got {reference!r}")
        self.cumulative_ratio = cumulative_ratio
        self.suppression = suppression
        self.reference = reference

    def reference_weight(self, pl_module: LightningModule, name: str) -> torch.Tensor:
        """The weight whose principal directions ΔW is projected away from."""
        if self.reference == "original":
            return pl_module.original_weights[name]
        return pl_module.edited_weight(name)

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> None:
        ranks = {}
        for name, delta in pl_module.pending_deltas.items():
            weight = self.reference_weight(pl_module, name).detach()
            projected, rank = project_delta(
                delta, weight.to(delta.device), self.cumulative_ratio, self.suppression
            )
            pl_module.pending_deltas[name] = projected
            ranks[f"sphere/rank/{short_name(name)}"] = float(rank)
            ranks[f"sphere/kept_norm_ratio/{short_name(name)}"] = float(
                projected.norm() / delta.norm().clamp_min(1e-12)
            )
        pl_module.step_metrics.update(ranks)
