"""MEMIT (Meng et al., 2023): mass-editing memory in a transformer."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.editors.base import LocateThenEditEditor
from sphere_lightning.errors import ConfigError


class MEMIT(LocateThenEditEditor):
    """ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹, with C = E[k kᵀ] the key second moment of the layer.

    Args:
        mom2_update_weight: λ, the weight of the preserved-key covariance (MEMIT's
            ``mom2_update_weight``; 15000 for GPT-J, 20000 for GPT-2 XL).
        **kwargs: Shared locate-then-edit options (layers, v* optimisation, statistics); see
            :class:`~sphere_lightning.editors.base.LocateThenEditEditor`.
    """

    def __init__(self, mom2_update_weight: float = 15000.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mom2_update_weight < 0:
            raise ConfigError("`editor.init_args.mom2_update_weight` must be ≥ 0")
        self.mom2_update_weight = mom2_update_weight
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
        adjusted = torch.linalg.solve(self.mom2_update_weight * cov + k @ k.T, k)
        return residual.T @ adjusted.T

    # MEMIT's only sequential state is the templates (the base class's state_dict); the
    # covariances are rebuilt from the (cached) statistics by setup.
