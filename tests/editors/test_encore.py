"""ENCORE's norm constraint (``update_norm_lambda``, arXiv 2502.01636) in MEMIT's and AlphaEdit's
solves: against the formulas written out directly, off = the solves without it, bit for bit, and
composed with SPHERE's in-loop projection on a tiny model."""

from __future__ import annotations

import pytest
import torch

from sphere_lightning.editors import MEMIT, AlphaEdit
from sphere_lightning.errors import ConfigError
from tests.helpers import (
    _project_against_live_weight,
    make_editor,
    plain_project_and_apply_loop,
)

D_IN, D_OUT, N = 12, 7, 5


def random_problem(seed: int) -> dict[str, torch.Tensor]:
    """Keys (n × d_in), residuals (n × d_out), a key second moment C, an accumulated K_p K_pᵀ and
    a projector P onto a random half of the key space, all float64."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    residual = torch.randn(N, D_OUT, generator=g, dtype=torch.float64)
    a = torch.randn(D_IN, 3 * D_IN, generator=g, dtype=torch.float64)
    prev = torch.randn(D_IN, 2 * N, generator=g, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(D_IN, D_IN // 2, generator=g, dtype=torch.float64))[0]
    return {
        "keys": keys,
        "residual": residual,
        "cov": a @ a.T / a.shape[1],
        "cache": prev @ prev.T,
        "projector": basis @ basis.T,
    }


def memit(problem: dict, weight: float, **kwargs) -> MEMIT:
    editor = MEMIT(layers=[0], mom2_update_weight=weight, **kwargs)
    editor.covariances = {0: problem["cov"]}
    return editor


def alphaedit(problem: dict, l2: float, **kwargs) -> AlphaEdit:
    editor = AlphaEdit(layers=[0], l2=l2, **kwargs)
    editor.projectors = {0: problem["projector"]}
    editor.key_cache = {0: problem["cache"]}
    return editor


# -- MEMIT ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lam_n", [0.5, 10.0, 200.0])
def test_memit_solve_is_the_minimiser_of_the_norm_constrained_objective(lam_n):
    """ΔW = R Kᵀ (λ C + λ_n I + K Kᵀ)⁻¹ (explicit inverse), and the gradient of
    λ tr(ΔW C ΔWᵀ) + ‖ΔW K − R‖² + λ_n ‖ΔW‖²_F vanishes there."""
    p = random_problem(0)
    lam = 3.0
    ours = memit(p, lam, update_norm_lambda=lam_n).solve(0, 0, p["keys"], p["residual"])

    k, r = p["keys"].T, p["residual"].T  # d_in × n, d_out × n
    normal = lam * p["cov"] + lam_n * torch.eye(D_IN, dtype=torch.float64) + k @ k.T
    expected = r @ k.T @ torch.linalg.inv(normal)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)

    delta = ours.detach().clone().requires_grad_(True)
    objective = (
        lam * torch.trace(delta @ p["cov"] @ delta.T)
        + ((delta @ k - r) ** 2).sum()
        + lam_n * (delta**2).sum()
    )
    (grad,) = torch.autograd.grad(objective, delta)
    assert grad.abs().max() < 1e-9


def test_memit_norm_constraint_shrinks_the_update():
    """‖ΔW‖_F falls strictly as λ_n grows, towards R Kᵀ / λ_n."""
    p = random_problem(1)
    norms = [
        memit(p, 1.0, update_norm_lambda=lam_n).solve(0, 0, p["keys"], p["residual"]).norm()
        for lam_n in (0.0, 1.0, 10.0, 100.0)
    ]
    assert all(a > b for a, b in zip(norms, norms[1:], strict=False)), norms
    huge = memit(p, 1.0, update_norm_lambda=1e9).solve(0, 0, p["keys"], p["residual"])
    limit = p["residual"].T @ p["keys"] / 1e9
    torch.testing.assert_close(huge, limit, rtol=1e-6, atol=0)


def test_memit_without_norm_constraint_is_the_plain_solve_bit_for_bit():
    p = random_problem(2)
    k = p["keys"].T
    plain = p["residual"].T @ torch.linalg.solve(2.5 * p["cov"] + k @ k.T, k).T
    for editor in (memit(p, 2.5), memit(p, 2.5, update_norm_lambda=0.0)):
        assert editor.update_norm_lambda == 0.0
        assert torch.equal(editor.solve(0, 0, p["keys"], p["residual"]), plain)


# -- AlphaEdit -----------------------------------------------------------------------------


@pytest.mark.parametrize("lam_n", [0.5, 20.0])
def test_alphaedit_solve_adds_the_norm_term_to_its_ridge(lam_n):
    """The paper's form ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + (l2 + λ_n) I)⁻¹, explicit inverse."""
    p = random_problem(3)
    l2 = 0.7
    ours = alphaedit(p, l2, update_norm_lambda=lam_n).solve(0, 0, p["keys"], p["residual"])

    k, r, proj = p["keys"].T, p["residual"].T, p["projector"]
    eye = torch.eye(D_IN, dtype=torch.float64)
    expected = (
        r @ k.T @ proj @ torch.linalg.inv(p["cache"] @ proj + k @ k.T @ proj + (l2 + lam_n) * eye)
    )
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    plain = alphaedit(p, l2).solve(0, 0, p["keys"], p["residual"])
    assert ours.norm() < plain.norm()


def test_alphaedit_without_norm_constraint_is_the_plain_solve_bit_for_bit():
    p = random_problem(4)
    k, proj = p["keys"].T, p["projector"]
    eye = torch.eye(D_IN, dtype=torch.float64)
    plain = torch.linalg.solve(
        proj @ (k @ k.T + p["cache"]) + 0.3 * eye, proj @ k @ p["residual"]
    ).T
    for editor in (alphaedit(p, 0.3), alphaedit(p, 0.3, update_norm_lambda=0.0)):
        assert editor.update_norm_lambda == 0.0
        assert torch.equal(editor.solve(0, 0, p["keys"], p["residual"]), plain)


@pytest.mark.parametrize("cls", [MEMIT, AlphaEdit])
def test_a_negative_norm_constraint_is_rejected(cls):
    with pytest.raises(ConfigError, match="update_norm_lambda"):
        cls(layers=[0], update_norm_lambda=-1.0)


# -- a tiny model, with SPHERE's in-loop projection ----------------------------------------


def explicit_update(editor, layer: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The norm-constrained ΔW of ``editor`` at ``layer``, the formula written out (float64)."""
    k, r = keys.double().T, residual.double().T
    eye = torch.eye(k.shape[0], dtype=torch.float64)
    if isinstance(editor, MEMIT):
        cov = editor.covariances[layer].double()
        normal = editor.mom2_update_weight * cov + editor.update_norm_lambda * eye + k @ k.T
        return r @ k.T @ torch.linalg.inv(normal)
    proj, cache = editor.projectors[layer].double(), editor.key_cache[layer].double()
    ridge = editor.l2 + editor.update_norm_lambda
    return r @ k.T @ proj @ torch.linalg.inv((cache + k @ k.T) @ proj + ridge * eye)


@pytest.mark.parametrize("kind", ["memit", "alphaedit"])
def test_tiny_model_norm_constrained_loop_with_sphere_matches_a_plain_loop(
    kind, make_tiny_model, tokenizer, requests, tmp_path
):
    """compute_deltas with λ_n and SPHERE's in-loop projection equals: v* once, then per layer
    the explicit norm-constrained ΔW, projected, really applied for the layers above."""
    model = make_tiny_model("llama")
    sphere = _project_against_live_weight(model)
    editor = make_editor(kind, model, tokenizer, str(tmp_path), num_steps=8, update_norm_lambda=5.0)
    editor.setup(model, tokenizer)

    ours = editor.compute_deltas(model, tokenizer, requests, transform=sphere)
    expected = plain_project_and_apply_loop(
        editor,
        model,
        tokenizer,
        requests,
        sphere,
        solve=lambda i, layer, k, r: explicit_update(editor, layer, k, r),
    )
    for name, delta in expected.items():
        torch.testing.assert_close(ours[name], delta, rtol=1e-4, atol=1e-5)

    # Off is today's editor, bit for bit; on changes every layer's update.
    plain = make_editor(kind, model, tokenizer, str(tmp_path), num_steps=8)
    zero = make_editor(kind, model, tokenizer, str(tmp_path), num_steps=8, update_norm_lambda=0.0)
    plain_deltas = plain.compute_deltas(model, tokenizer, requests, transform=sphere)
    zero_deltas = zero.compute_deltas(model, tokenizer, requests, transform=sphere)
    for name, delta in plain_deltas.items():
        assert torch.equal(zero_deltas[name], delta)
        assert not torch.allclose(ours[name], delta, rtol=1e-3, atol=1e-5)
