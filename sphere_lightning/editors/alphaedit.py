"""AlphaEdit (Fang et al., ICLR 2025): null-space constrained knowledge editing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.data.requests import EditRequest
from sphere_lightning.editors.base import LocateThenEditEditor
from sphere_lightning.editors.memit import check_update_norm_lambda
from sphere_lightning.errors import ConfigError, editor_flag


def null_space_projector(covariance: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """P = Û Ûᵀ over the eigenvectors of ``covariance`` whose eigenvalue is below ``threshold``.

    Returns the projector and the dimension of the null space it keeps.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
    basis = eigenvectors[:, eigenvalues < threshold]
    return (basis @ basis.T).float(), basis.shape[1]


class AlphaEdit(LocateThenEditEditor):
    """ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + (λ + λ_n) I)⁻¹ (transposed form of the paper's solve).

    P projects onto the (approximate) null space of the preserved keys' second moment, so updates
    leave preserved knowledge untouched; K_p K_pᵀ accumulates the keys of all earlier batches.
    λ_n is ENCORE's norm constraint λ_n ‖ΔW‖²_F (arXiv 2502.01636; see
    :class:`~sphere_lightning.editors.memit.MEMIT`): with ΔW = Δ P it is the same term as
    AlphaEdit's own ‖Δ P‖² regulariser, so the two weights add. λ_n = 0 (default) is
    AlphaEdit's solve, bit for bit.

    Args:
        nullspace_threshold: Eigenvalues of E[k kᵀ] below this span the null space.
        l2: λ, the L2 regulariser of the update.
        update_norm_lambda: λ_n ≥ 0, ENCORE's weight of ‖ΔW‖²_F (the reference's
            ``update_norm_lambda``).
        **kwargs: Shared locate-then-edit options (layers, v* optimisation, statistics); see
            :class:`~sphere_lightning.editors.base.LocateThenEditEditor`.
    """

    def __init__(
        self,
        nullspace_threshold: float = 2e-2,
        l2: float = 1.0,
        update_norm_lambda: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if nullspace_threshold <= 0:
            raise ConfigError(f"{editor_flag('nullspace_threshold')} must be > 0")
        if l2 < 0:
            raise ConfigError(f"{editor_flag('l2')} must be ≥ 0")
        self.nullspace_threshold = nullspace_threshold
        self.l2 = l2
        self.update_norm_lambda = check_update_norm_lambda(update_norm_lambda)
        self.projectors: dict[int, torch.Tensor] | None = None
        self.nullspace_dims: dict[int, int] = {}
        self.key_cache: dict[int, torch.Tensor] = {}

    def setup(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().setup(model, tokenizer)
        if self.projectors is None:
            self.projectors = {}
            for layer, cov in self.second_moments(model, tokenizer).items():
                self.projectors[layer], self.nullspace_dims[layer] = null_space_projector(
                    cov, self.nullspace_threshold
                )
                if layer not in self.key_cache:  # a restored K Kᵀ is kept
                    self.key_cache[layer] = torch.zeros_like(cov)

    def solve(
        self, index: int, layer: int, keys: torch.Tensor, residual: torch.Tensor
    ) -> torch.Tensor:
        k = keys.T  # d_in × n
        p = self.projectors[layer].to(k)
        cache = self.key_cache[layer].to(k)
        eye = torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
        ridge = self.l2 + self.update_norm_lambda  # λ_n = 0: exactly l2
        update = torch.linalg.solve(p @ (k @ k.T + cache) + ridge * eye, p @ k @ residual)
        return update.T

    def after_apply(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
    ) -> None:
        """Accumulate K Kᵀ of this batch, read from the model with the updates applied."""
        keys = self.compute_keys(model, tokenizer, requests, self.layers)
        for layer, k in keys.items():  # K Kᵀ stays on its layer's device
            k = k.double()
            cache = self.key_cache[layer].to(k)
            self.key_cache[layer] = (cache + k.T @ k).float()

    def state_dict(self) -> dict[str, Any]:
        """Templates and the accumulated K Kᵀ; the projectors are rebuilt from the (cached)
        statistics by :meth:`setup`, so checkpoints do not carry them."""
        key_cache = {layer: cache.cpu() for layer, cache in self.key_cache.items()}
        return {**super().state_dict(), "key_cache": key_cache}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.key_cache = dict(state.get("key_cache", {}))
