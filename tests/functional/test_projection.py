"""Tests of the SPHERE sparse-space projection against a plain d x d eigh reference."""

import pytest
import torch

from sphere_lightning.functional import (
    normalize_rows,
    principal_directions,
    project_delta,
    sparse_space_projector,
)
from sphere_lightning.functional.projection import _symmetric_gram

SHAPES = [(20, 64), (96, 32), (40, 40)]
SEEDS = [0, 1, 2]
RATIO_SUPPRESSION = [(0.3, 0.5), (0.5, 1.0), (0.8, 0.25), (0.95, 0.9)]


def decaying_matrix(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Full-rank random ``n x d`` matrix with geometrically decaying singular values.

    Distinct, well-separated singular values keep the eigenvalues of C distinct after row
    normalisation, so the principal subspace at any cutoff is well defined.
    """
    g = torch.Generator().manual_seed(seed)
    k = min(n, d)
    left, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    singular = 0.8 ** torch.arange(k, dtype=torch.float64)
    return ((left * singular) @ right.T).to(dtype)


def reference_basis(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """The formula, literally: eigh of the d x d C, descending order, cumulative-sum rule."""
    w = weight.to(torch.float64)
    w_hat = w / w.norm(dim=1, keepdim=True)
    n, d = w_hat.shape
    cov = w_hat.T @ w_hat / n
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order], evecs[:, order]
    ratios = torch.cumsum(evals, 0) / evals.sum()
    r = min(1 + int((ratios <= ratio).sum()), d)
    return evecs[:, :r]


def reference_project(
    delta: torch.Tensor, weight: torch.Tensor, ratio: float, suppression: float
) -> tuple[torch.Tensor, int]:
    basis = reference_basis(weight, ratio)
    d = weight.shape[1]
    proj = torch.eye(d, dtype=torch.float64) - suppression * basis @ basis.T
    return delta.to(torch.float64) @ proj, basis.shape[1]


def random_delta(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("ratio", "suppression"), RATIO_SUPPRESSION)
def test_project_delta_matches_reference(shape, seed, ratio, suppression):
    n, d = shape
    weight = decaying_matrix(n, d, seed)
    delta = random_delta(n, d, seed)
    expected, expected_rank = reference_project(delta, weight, ratio, suppression)
    assert 0 < expected_rank < min(n, d)  # the cutoff falls inside the spectrum

    projected, rank = project_delta(delta, weight, ratio, suppression)
    assert rank == expected_rank
    assert projected.dtype == delta.dtype and projected.shape == delta.shape
    torch.testing.assert_close(projected, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("ratio", "suppression"), RATIO_SUPPRESSION)
def test_sparse_space_projector_matches_reference(shape, ratio, suppression):
    n, d = shape
    weight = decaying_matrix(n, d, seed=7)
    basis = reference_basis(weight, ratio)
    expected = torch.eye(d, dtype=torch.float64) - suppression * basis @ basis.T

    proj = sparse_space_projector(weight, ratio, suppression)
    assert proj.shape == (d, d)
    torch.testing.assert_close(proj, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(proj, proj.T, rtol=0, atol=1e-12)

    delta = random_delta(n, d, seed=7)
    projected, _ = project_delta(delta, weight, ratio, suppression)
    torch.testing.assert_close(projected, delta @ proj, rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", [0.3, 0.8])
def test_principal_directions_are_orthonormal_eigenvectors(shape, ratio):
    n, d = shape
    weight = decaying_matrix(n, d, seed=3)
    basis = principal_directions(weight, ratio)
    r = basis.shape[1]
    assert basis.shape == (d, r) and r == reference_basis(weight, ratio).shape[1]
    torch.testing.assert_close(basis.T @ basis, torch.eye(r, dtype=torch.float64))

    w_hat = normalize_rows(weight)
    cov = w_hat.T @ w_hat / n
    evals = torch.linalg.eigvalsh(cov).flip(0)[:r]
    torch.testing.assert_close(cov @ basis, basis * evals, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("ratio", "suppression"), RATIO_SUPPRESSION)
def test_component_along_principal_space_scaled_rest_unchanged(shape, ratio, suppression):
    n, d = shape
    weight = decaying_matrix(n, d, seed=4)
    delta = random_delta(n, d, seed=4)
    basis = principal_directions(weight, ratio)
    projected, _ = project_delta(delta, weight, ratio, suppression)

    torch.testing.assert_close(
        projected @ basis, (1 - suppression) * (delta @ basis), rtol=0, atol=1e-10
    )
    complement = torch.eye(d, dtype=torch.float64) - basis @ basis.T
    torch.testing.assert_close(projected @ complement, delta @ complement, rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("ratio", "suppression"), [(0.0, 0.5), (0.7, 0.0), (0.0, 0.0)])
def test_zero_ratio_or_suppression_leaves_delta_unchanged(shape, ratio, suppression):
    n, d = shape
    weight = decaying_matrix(n, d, seed=5)
    delta = random_delta(n, d, seed=5, dtype=torch.float32)
    projected, rank = project_delta(delta, weight, ratio, suppression)
    assert rank == 0
    assert torch.equal(projected, delta)
    assert projected.dtype == delta.dtype
    assert projected.data_ptr() != delta.data_ptr()  # a copy, not an alias

    proj = sparse_space_projector(weight, ratio, suppression)
    assert torch.equal(proj, torch.eye(d, dtype=weight.dtype))


def test_zero_ratio_gives_empty_basis():
    weight = decaying_matrix(20, 64, seed=0)
    assert principal_directions(weight, 0.0).shape == (64, 0)


def test_full_ratio_full_rank_suppresses_everything():
    weight = decaying_matrix(96, 32, seed=0)
    delta = random_delta(96, 32, seed=0)
    projected, rank = project_delta(delta, weight, 1.0, 0.75)
    assert rank == 32
    torch.testing.assert_close(projected, 0.25 * delta, rtol=0, atol=1e-10)


def test_rank_is_capped_at_numerical_rank():
    # n < d: C has rank n, so no more than n directions exist; zero-eigenvalue directions of C
    # carry none of the weight and are not counted even at cumulative_ratio = 1.
    weight = decaying_matrix(20, 64, seed=0)
    assert principal_directions(weight, 1.0).shape == (64, 20)

    # n >= d but rank-deficient: 3 distinct directions repeated with positive scales.
    base = decaying_matrix(3, 16, seed=1)
    weight = torch.cat([base, 2.0 * base, 0.5 * base, base, base, base], dim=0)
    basis = principal_directions(weight, 1.0)
    assert basis.shape == (16, 3)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3, dtype=torch.float64))


def test_zero_rows_are_ignored():
    n, d = 30, 24
    weight = decaying_matrix(n, d, seed=6)
    padded = torch.cat([weight, torch.zeros(5, d, dtype=weight.dtype)], dim=0)
    for ratio in (0.4, 0.9):
        expected = reference_basis(weight, ratio)
        basis = principal_directions(padded, ratio)
        assert basis.shape == expected.shape
        torch.testing.assert_close(basis @ basis.T, expected @ expected.T, rtol=0, atol=1e-10)

    all_zero = torch.zeros(8, 5)
    assert principal_directions(all_zero, 0.9).shape == (5, 0)
    delta = torch.randn(8, 5)
    projected, rank = project_delta(delta, all_zero, 0.9, 1.0)
    assert rank == 0 and torch.equal(projected, delta)


@pytest.mark.parametrize("shape", SHAPES)
def test_positive_row_scaling_does_not_change_directions(shape):
    n, d = shape
    weight = decaying_matrix(n, d, seed=8)
    g = torch.Generator().manual_seed(8)
    scales = torch.rand(n, 1, generator=g, dtype=torch.float64) * 100 + 0.01
    basis = principal_directions(weight, 0.6)
    scaled = principal_directions(weight * scales, 0.6)
    assert scaled.shape == basis.shape
    torch.testing.assert_close(scaled @ scaled.T, basis @ basis.T, rtol=0, atol=1e-10)

    delta = random_delta(n, d, seed=8)
    torch.testing.assert_close(
        project_delta(delta, weight * scales, 0.6, 0.5)[0],
        project_delta(delta, weight, 0.6, 0.5)[0],
        rtol=0,
        atol=1e-10,
    )


def test_dtypes_follow_inputs():
    weight = decaying_matrix(20, 64, seed=9, dtype=torch.float32)
    delta = random_delta(20, 64, seed=9, dtype=torch.bfloat16)
    basis = principal_directions(weight, 0.5)
    assert basis.dtype == torch.float32
    assert sparse_space_projector(weight, 0.5, 0.5).dtype == torch.float32
    projected, rank = project_delta(delta, weight, 0.5, 0.5)
    assert projected.dtype == torch.bfloat16

    expected, expected_rank = reference_project(delta, weight, 0.5, 0.5)
    assert rank == expected_rank
    torch.testing.assert_close(projected, expected.to(torch.bfloat16))

    # The float32 decomposition (the default for a float32 weight) agrees with float64 to float32
    # accuracy.
    basis64 = principal_directions(weight, 0.5, dtype=torch.float64)
    torch.testing.assert_close(basis @ basis.T, basis64 @ basis64.T, rtol=0, atol=1e-4)


def test_gradient_flows_through_delta_only():
    weight = decaying_matrix(20, 64, seed=10).requires_grad_()
    delta = random_delta(20, 64, seed=10).requires_grad_()
    projected, _ = project_delta(delta, weight, 0.5, 0.5)
    projected.sum().backward()
    assert weight.grad is None
    assert delta.grad is not None


def test_normalize_rows():
    weight = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]])
    expected = torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]])
    torch.testing.assert_close(normalize_rows(weight), expected)


def test_invalid_arguments():
    weight = decaying_matrix(6, 4, seed=0)
    delta = torch.zeros_like(weight)
    with pytest.raises(ValueError, match="cumulative_ratio"):
        project_delta(delta, weight, 1.5, 0.5)
    with pytest.raises(ValueError, match="cumulative_ratio"):
        project_delta(delta, weight, -0.1, 0.5)
    with pytest.raises(ValueError, match="cumulative_ratio"):
        principal_directions(weight, float("nan"))
    with pytest.raises(ValueError, match="suppression"):
        project_delta(delta, weight, 0.5, 1.01)
    with pytest.raises(ValueError, match="suppression"):
        sparse_space_projector(weight, 0.5, -1.0)
    with pytest.raises(ValueError, match="delta"):
        project_delta(torch.zeros(4, 6, dtype=weight.dtype), weight, 0.5, 0.5)
    with pytest.raises(ValueError, match="weight"):
        principal_directions(torch.zeros(2, 3, 4), 0.5)
    with pytest.raises(ValueError, match="weight"):
        principal_directions(torch.zeros(3, 4, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="dtype"):
        principal_directions(weight, 0.5, dtype=torch.int64)


# --- The fast (float32, Gram) path against the float64 path -----------------------------------


def power_law_matrix(n: int, d: int, seed: int, noise: float = 0.1) -> torch.Tensor:
    """float32 ``n x d`` weight like a trained layer: singular values ``∝ k^-1/2`` plus noise.

    Unlike :func:`decaying_matrix` the spectrum decays slowly and the eigenvalues of C around the
    cutoff are close together, which is where a float32 decomposition loses accuracy.
    """
    g = torch.Generator().manual_seed(seed)
    k = min(n, d)
    singular = torch.arange(1, k + 1, dtype=torch.float64) ** -0.5
    left = torch.randn(n, k, generator=g, dtype=torch.float64)
    right = torch.randn(k, d, generator=g, dtype=torch.float64)
    signal = (left * singular) @ right / singular.square().sum().sqrt()
    return (signal + noise * torch.randn(n, d, generator=g, dtype=torch.float64)).float()


def max_relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """``max|ours - reference| / max|reference|``, in float64."""
    ours, reference = ours.double(), reference.double()
    return float((ours - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("shape", [(96, 320), (320, 96), (160, 160)])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_float32_default_matches_float64_path(shape, seed, ratio):
    n, d = shape
    weight = power_law_matrix(n, d, seed)
    delta = random_delta(n, d, seed, dtype=torch.float32)
    projected, rank = project_delta(delta, weight, ratio, 0.5)
    expected, expected_rank = project_delta(delta, weight, ratio, 0.5, dtype=torch.float64)
    assert rank == expected_rank
    assert 0 < rank < min(n, d)
    assert projected.dtype == torch.float32
    # Measured: below 2e-6 on these and on the benchmark shapes; the target is 1e-4.
    assert max_relative_difference(projected, expected) < 1e-5

    basis = principal_directions(weight, ratio)
    basis64 = principal_directions(weight, ratio, dtype=torch.float64)
    torch.testing.assert_close(basis @ basis.T, (basis64 @ basis64.T).float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_default_dtype_follows_weight(shape):
    n, d = shape
    weight = decaying_matrix(n, d, seed=11)
    delta = random_delta(n, d, seed=11)
    # float64 weight: exactly the float64 computation.
    assert torch.equal(
        project_delta(delta, weight, 0.5, 0.5)[0],
        project_delta(delta, weight, 0.5, 0.5, dtype=torch.float64)[0],
    )
    # float32 weight (or lower): float32.
    for low in (torch.float32, torch.bfloat16):
        w = weight.to(low)
        assert torch.equal(
            principal_directions(w, 0.5), principal_directions(w, 0.5, dtype=torch.float32)
        )


def test_float32_falls_back_to_float64_when_cutoff_is_below_its_resolution():
    # Eigenvalues of C fall as 0.25^k: beyond k ~ 9 they are below float32 rounding of the
    # largest, so at a ratio this close to 1 only float64 resolves the cutoff.
    g = torch.Generator().manual_seed(0)
    n, d = 48, 64
    left, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))
    weight = ((left * 0.5 ** torch.arange(n, dtype=torch.float64)) @ right.T).float()
    ratio = 1 - 1e-9

    rank32 = principal_directions(weight, ratio, dtype=torch.float32).shape[1]
    basis64 = principal_directions(weight, ratio, dtype=torch.float64)
    assert rank32 < basis64.shape[1]  # explicit float32 stops at its numerical rank

    basis = principal_directions(weight, ratio)  # the default falls back
    assert basis.shape == basis64.shape
    torch.testing.assert_close(basis @ basis.T, basis64 @ basis64.T, rtol=0, atol=1e-6)
    delta = random_delta(n, d, seed=0, dtype=torch.float32)
    assert project_delta(delta, weight, ratio, 0.5)[1] == basis64.shape[1]


@pytest.mark.parametrize("block_size", [1, 7, 30, 64])
def test_symmetric_gram_matches_plain_product(block_size):
    x = torch.randn(30, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(_symmetric_gram(x, block_size), x @ x.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(_symmetric_gram(x.T, block_size), x.T @ x, rtol=0, atol=1e-12)


def test_float32_matmul_precision_setting_is_restored():
    weight = power_law_matrix(64, 96, seed=0)
    delta = random_delta(64, 96, seed=0, dtype=torch.float32)
    expected = project_delta(delta, weight, 0.5, 0.5)[0]
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        projected = project_delta(delta, weight, 0.5, 0.5)[0]
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.equal(projected, expected)
