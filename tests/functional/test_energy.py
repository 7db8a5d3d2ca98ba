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


@pytest.mark.parametrize("s", [0.0, 1.0, 2.0, 0.5])
@pytest.mark.parametrize("chunk_size", [8, 1, 37, 1024])
def test_matches_naive_loop(s, chunk_size):
    weight = random_weight(37, 16, seed=0)
    energy = hyperspherical_energy(weight, s, chunk_size=chunk_size)
    assert energy.dtype == torch.float64 and energy.shape == ()
    assert energy.item() == pytest.approx(naive_energy(weight, s), rel=1e-10)


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
