"""MEMIT (Meng et al., 2023): mass-editing memory in a transformer."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.editors.base import LocateThenEditEditor
from sphere_lightning.errors import ConfigError, editor_flag


def check_update_norm_lambda(value: float) -> float:
    """ENCORE's norm-constraint weight λ_n, checked
    (``model.editor.init_args.update_norm_lambda``)."""
    if value < 0:
        raise ConfigError(f"{editor_flag('update_norm_lambda')} must be ≥ 0, got {value}")
    return float(value)


class MEMIT(LocateThenEditEditor):
    """ΔW = R Kᵀ (λ C + λ_n I + K Kᵀ)⁻¹, with C = E[k kᵀ] the key second moment of the layer.

    λ_n is ENCORE's norm constraint (Gupta et al. 2025, arXiv 2502.01636, github
    scalable-model-editing/knowledge-editing-regularization): the term λ_n ‖ΔW‖²_F added to
    MEMIT's objective λ ‖ΔW K_0‖² + ‖(W + ΔW) K − V‖², which keeps each batch's update small and
    so holds back the growth of the edited matrix's norm over sequential batches. λ_n = 0
    (default) is MEMIT's solve, bit for bit.

    Args:
        mom2_update_weight: λ, the weight of the preserved-key covariance (MEMIT's
            ``mom2_update_weight``; 15000 for GPT-J, 20000 for GPT-2 XL).
        update_norm_lambda: λ_n ≥ 0, the weight of ‖ΔW‖²_F (the reference's
            ``update_norm_lambda``: 10 for GPT-2 XL and Llama-2-7B, 20 for Llama-3-8B).
        **kwargs: Shared locate-then-edit options (layers, v* optimisation, statistics); see
            :class:`~sphere_lightning.editors.base.LocateThenEditEditor`.
    """

    def __init__(
        self, mom2_update_weight: float = 15000.0, update_norm_lambda: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if mom2_update_weight < 0:
            raise ConfigError(f"{editor_flag('mom2_update_weight')} must be ≥ 0")
        self.mom2_update_weight = mom2_update_weight
        self.update_norm_lambda = check_update_norm_lambda(update_norm_lambda)
        self.covariances: dict[int, torch.Tensor] | None = None

    def setup(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().setup(model, tokenizer)
        if self.covariances is None:
            self.covariances = self.second_moments(model, tokenizer)

    def solve(
        self, index: int, layer: int, keys: torch.Tensor, residual: torch.Tensor
    ) -> torch.Tensor:
        k = keys.T  # d_in × n
        cov = self.covariances[layer].to(k)
        preserve = self.mom2_update_weight * cov
        if self.update_norm_lambda:  # ENCORE's λ_n I, added as the reference does
            preserve = preserve + self.update_norm_lambda * torch.eye(
                k.shape[0], dtype=k.dtype, device=k.device
            )
        adjusted = torch.linalg.solve(preserve + k @ k.T, k)
        return residual.T @ adjusted.T

    # MEMIT's only sequential state is the templates (the base class's state_dict); the
    # covariances are rebuilt from the (cached) statistics by setup.
