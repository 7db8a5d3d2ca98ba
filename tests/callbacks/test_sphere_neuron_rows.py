"""SPHERE's ``neuron_rows: stored`` against the official projection on the weight as stored."""

from __future__ import annotations

import pytest
import torch

from sphere_lightning.callbacks import SphereProjectionCallback
from tests.helpers import ContextStub


def project_b_into_soft_dirs(a, b, energy_ratio, alpha):
    """The official ``project_B_into_soft_dirs(A, B, energy_ratio, alpha)`` (SPHERE's
    ``AlphaEdit_main.py`` / ``memit_main.py``), written out in float64: the neurons are the rows
    of ``A`` as given. Returns ``(B P_softᵀ, r)``."""
    a, b = a.double(), b.double()
    a_hat = a / (a.norm(dim=1, keepdim=True) + 1e-8)
    c = (a_hat.T @ a_hat) / a_hat.size(0)
    eigvals, eigvecs = torch.linalg.eigh(c)
    cumsum = torch.cumsum(eigvals.flip(0), 0)
    r = int((cumsum / eigvals.sum() <= energy_ratio).sum().item()) + 1
    u = eigvecs[:, -r:]
    p_soft = torch.eye(a.size(1), dtype=a.dtype) - alpha * (u @ u.T)
    return b @ p_soft.T, r


def _edit_live_weights(module: ContextStub, generator: torch.Generator) -> None:
    """Move the live weights away from the originals, so ``current`` and ``original`` differ."""
    with torch.no_grad():
        for name in module.edited_parameter_names:
            weight = module.model.get_parameter(name)
            weight += 0.3 * torch.randn(weight.shape, generator=generator)


@pytest.mark.parametrize("reference", ["current", "original"])
def test_stored_rows_on_conv1d_match_the_reference(make_tiny_model, reference):
    module = ContextStub(make_tiny_model("gpt2"))  # c_proj is a Conv1D, stored (in × out)
    generator = torch.Generator().manual_seed(0)
    _edit_live_weights(module, generator)
    stored = SphereProjectionCallback(0.5, 0.8, reference=reference, neuron_rows="stored")
    linear = SphereProjectionCallback(0.5, 0.8, reference=reference)
    for name in module.edited_parameter_names:
        delta = torch.randn(module.edited_weight(name).shape, generator=generator)  # out × in
        if reference == "current":
            as_stored = module.model.get_parameter(name)  # `nethook.get_parameter`, as stored
        else:
            as_stored = module.original_weights[name].T
        assert as_stored.shape == delta.T.shape  # (in × out)
        # The reference's update has the stored shape (upd_matrix_match_shape): ΔWᵀ here.
        expected, rank = project_b_into_soft_dirs(as_stored, delta.T, 0.5, 0.8)

        projected, metrics = stored.transform_delta(name, delta, module)
        assert projected.shape == delta.shape
        torch.testing.assert_close(projected.T.double(), expected, rtol=1e-4, atol=1e-5)
        layer = name.removesuffix(".weight")
        assert metrics[f"sphere/rank/{layer}"] == rank
        # The default acts on the other side: a different update on GPT-2.
        other, _ = linear.transform_delta(name, delta, module)
        assert (other - projected).abs().max() > 1e-2


def test_stored_rows_on_linear_are_the_default(make_tiny_model):
    module = ContextStub(make_tiny_model("llama"))  # down_proj is an nn.Linear, stored (out × in)
    generator = torch.Generator().manual_seed(1)
    stored = SphereProjectionCallback(0.5, 0.5, neuron_rows="stored")
    linear = SphereProjectionCallback(0.5, 0.5)
    for name in module.edited_parameter_names:
        delta = torch.randn(module.edited_weight(name).shape, generator=generator)
        projected, _ = stored.transform_delta(name, delta, module)
        torch.testing.assert_close(projected, linear.transform_delta(name, delta, module)[0])
        expected, _ = project_b_into_soft_dirs(module.model.get_parameter(name), delta, 0.5, 0.5)
        torch.testing.assert_close(projected.double(), expected, rtol=1e-4, atol=1e-5)


def test_neuron_rows_rejects_unknown_values():
    with pytest.raises(ValueError, match="neuron_rows` should be `linear` or `stored`"):
        SphereProjectionCallback(neuron_rows="output")
