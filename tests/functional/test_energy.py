"""Tests of the chunked hyperspherical energy against a naive double loop."""

import math

import pytest
import torch

from sphere_lightning.functional import hyperspherical_energy


def naive_energy(weight: torch.Tensor, s: float, eps: float = 1e-6) -> float:
    """E_s by the definition: explicit distances between normalised nonzero rows, all i != j."""
    rows = [w / w.norm() for w in weight.to(torch.float64) if w.norm() > 0]
    total = 0.0
    for i, wi in enumerate(rows):
        for j, wj in enumerate(rows):
            if i == j:
                continue
            z = max(float((wi - wj).norm()), eps)
            total += math.log(1.0 / z) if s == 0 else z**-s
    return total


def random_weight(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)


# float64 products are exact to rounding; float32 ones (the default for a float32 weight) leave
# about 1e-9 here (measured) and are held to 1e-7.
GRAM_TOLERANCE = [(torch.float64, 1e-10), (None, 1e-7)]


@pytest.mark.parametrize("s", [0.0, 1.0, 2.0, 0.5])
@pytest.mark.parametrize("chunk_size", [8, 1, 37, 1024])
@pytest.mark.parametrize(("gram_dtype", "rel"), GRAM_TOLERANCE)
def test_matches_naive_loop(s, chunk_size, gram_dtype, rel):
    weight = random_weight(37, 16, seed=0)
    energy = hyperspherical_energy(weight, s, chunk_size=chunk_size, gram_dtype=gram_dtype)
    assert energy.dtype == torch.float64 and energy.shape == ()
    assert energy.item() == pytest.approx(naive_energy(weight, s), rel=rel)


@pytest.mark.parametrize("s", [0.0, 1.0, 2.0])
def test_orthonormal_neurons_closed_form(s):
    # All pairwise distances are sqrt(2): E_s = n (n - 1) f_s(sqrt(2)).
    n = 10
    weight = torch.eye(n) * torch.arange(1, n + 1).unsqueeze(1)
    f = math.log(1 / math.sqrt(2)) if s == 0 else 2 ** (-s / 2)
    energy = hyperspherical_energy(weight, s, chunk_size=3)
    assert energy.item() == pytest.approx(n * (n - 1) * f, rel=1e-12)


def test_antipodal_pair_counts_both_orders():
    weight = torch.tensor([[1.0, 0.0, 0.0], [-2.0, 0.0, 0.0]])
    assert hyperspherical_energy(weight, 1.0).item() == pytest.approx(1.0)  # 2 * (1 / 2)


@pytest.mark.parametrize("s", [0.0, 1.0, 2.0])
def test_duplicate_neurons_are_finite(s):
    weight = random_weight(12, 8, seed=1)
    weight = torch.cat([weight, 3.0 * weight[:4]], dim=0)
    energy = hyperspherical_energy(weight, s, chunk_size=5, eps=1e-6)
    assert torch.isfinite(energy)
    assert energy.item() == pytest.approx(naive_energy(weight, s, eps=1e-6), rel=1e-6)


@pytest.mark.parametrize("s", [0.0, 1.0, 2.0])
def test_positive_row_scaling_invariance(s):
    weight = random_weight(25, 12, seed=2).double()
    g = torch.Generator().manual_seed(2)
    scales = torch.rand(25, 1, generator=g, dtype=torch.float64) * 100 + 0.01
    expected = hyperspherical_energy(weight, s, chunk_size=7)
    torch.testing.assert_close(hyperspherical_energy(weight * scales, s, chunk_size=7), expected)


def test_zero_rows_are_ignored():
    weight = random_weight(15, 6, seed=3)
    padded = torch.cat([weight[:5], torch.zeros(3, 6), weight[5:], torch.zeros(1, 6)], dim=0)
    torch.testing.assert_close(
        hyperspherical_energy(padded, 1.0, chunk_size=4), hyperspherical_energy(weight, 1.0)
    )


def test_fewer_than_two_neurons_is_zero():
    assert hyperspherical_energy(torch.randn(1, 5)).item() == 0.0
    assert hyperspherical_energy(torch.zeros(0, 5)).item() == 0.0
    assert hyperspherical_energy(torch.zeros(4, 5)).item() == 0.0


def test_invalid_arguments():
    weight = random_weight(4, 3, seed=0)
    with pytest.raises(ValueError, match="`s`"):
        hyperspherical_energy(weight, -1.0)
    with pytest.raises(ValueError, match="`s`"):
        hyperspherical_energy(weight, float("nan"))
    with pytest.raises(ValueError, match="chunk_size"):
        hyperspherical_energy(weight, chunk_size=0)
    with pytest.raises(ValueError, match="eps"):
        hyperspherical_energy(weight, eps=0.0)
    with pytest.raises(ValueError, match="weight"):
        hyperspherical_energy(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="gram_dtype"):
        hyperspherical_energy(weight, gram_dtype=torch.float16)


# --- Near-duplicates, and the float32 path against the float64 one ----------------------------


def near_duplicate_weight(dtype: torch.dtype) -> torch.Tensor:
    """12 random neurons plus 6 copies of the first ones, perturbed by 1e-3 down to 5e-7.

    The copies sit just above the ``eps = 1e-6`` clamp, where ``2 - 2 ŵ_i·ŵ_j`` has cancelled to a
    few digits even in float64 (the old all-float64 path was off by ~5e-6 here for s = 2).
    """
    g = torch.Generator().manual_seed(3)
    base = torch.randn(12, 32, generator=g, dtype=torch.float64)
    scales = torch.tensor([1e-3, 1e-4, 1e-5, 3e-6, 1e-6, 5e-7], dtype=torch.float64)
    near = base[:6] + scales[:, None] * torch.randn(6, 32, generator=g, dtype=torch.float64)
    return torch.cat([base, near]).to(dtype)


@pytest.mark.parametrize("s", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [5, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("gram_dtype", "rel"), GRAM_TOLERANCE)
def test_near_duplicates_match_naive_loop(s, chunk_size, dtype, gram_dtype, rel):
    weight = near_duplicate_weight(dtype)
    energy = hyperspherical_energy(weight, s, chunk_size=chunk_size, gram_dtype=gram_dtype)
    assert energy.item() == pytest.approx(naive_energy(weight, s), rel=rel)


def structured_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    n, d = 300, 96
    mean = torch.randn(1, d, generator=g)
    scattered = torch.randn(n, d, generator=g)
    scattered[150:160] = scattered[10:20] + 1e-4 * torch.randn(10, d, generator=g)
    scattered[290:] = 7.0 * scattered[:10]  # exact duplicates (after normalisation)
    return {
        "random": torch.randn(n, d, generator=g),
        # All pairs closer than 60°: every block is recomputed and the rest switches to float64.
        "shared_mean": 0.3 * torch.randn(n, d, generator=g) + mean,
        # A few close pairs per block: recomputed one by one.
        "scattered_duplicates": scattered,
        # One tight cluster: recomputed as one float64 product.
        "cluster": torch.cat(
            [torch.randn(n - 40, d, generator=g), mean + 1e-3 * torch.randn(40, d, generator=g)]
        ),
    }


@pytest.mark.parametrize("name", ["random", "shared_mean", "scattered_duplicates", "cluster"])
@pytest.mark.parametrize("s", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [64, 1024])
def test_float32_products_match_float64_path(name, s, chunk_size):
    weight = structured_weights()[name]
    expected = hyperspherical_energy(weight, s, chunk_size=chunk_size, gram_dtype=torch.float64)
    energy = hyperspherical_energy(weight, s, chunk_size=chunk_size)
    assert energy.item() == pytest.approx(expected.item(), rel=1e-8)


def test_both_paths_match_naive_loop_on_structured_weights():
    weight = structured_weights()["scattered_duplicates"][:120]
    for s in (0.0, 1.0, 2.0):
        expected = naive_energy(weight, s)
        for gram_dtype, rel in GRAM_TOLERANCE:
            energy = hyperspherical_energy(weight, s, chunk_size=50, gram_dtype=gram_dtype)
            assert energy.item() == pytest.approx(expected, rel=rel)


def test_float32_matmul_precision_setting_is_restored():
    weight = random_weight(200, 64, seed=5)
    expected = hyperspherical_energy(weight, 1.0, chunk_size=64)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        energy = hyperspherical_energy(weight, 1.0, chunk_size=64)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.equal(energy, expected)


def test_extreme_row_norms_stay_finite():
    # Reciprocals of these norms overflow (or underflow) float32; rows are then scaled in float64.
    weight = random_weight(40, 24, seed=6)
    expected = hyperspherical_energy(weight, 1.0, gram_dtype=torch.float64)
    for scale in (1e-36, 1e36):
        energy = hyperspherical_energy(weight * scale, 1.0)
        assert energy.item() == pytest.approx(expected.item(), rel=1e-6)
