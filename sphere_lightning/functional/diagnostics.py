"""Why a model collapses under sequential editing: what an update ΔW does to a weight W.

Two quantities beyond plain norms, both for an nn.Linear-shaped (out × in) W:

- the **principal share** ‖ΔW U Uᵀ‖² / ‖ΔW‖² = ‖ΔW U‖² / ‖ΔW‖² of an update's energy inside the
  principal space of W's neurons, U from
  :func:`~sphere_lightning.functional.projection.principal_directions` (the subspace SPHERE
  projects away from). A direction drawn uniformly at random has expected
  share r/d (r = dim U, d = columns of W), the reference to read it against;
- the **key energy** tr(A C Aᵀ) = ‖A K₀‖²_F / n of a matrix A on preserved keys K₀ (d × n) with
  second moment C = K₀ K₀ᵀ / n, and the **key leak** of an update, √(tr(ΔW C ΔWᵀ) /
  tr(W C Wᵀ)) = ‖ΔW K₀‖ / ‖W K₀‖: how much of what W does on the preserved keys an update
  changes (AlphaEdit's null-space projection aims at 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sphere_lightning.functional.projection import (
    _full_precision_float32_matmul,
    principal_directions,
)

__all__ = ["key_energy", "key_leak", "principal_share", "share_in", "subspace_overlap"]


def principal_share(
    delta: Tensor, weight: Tensor, cumulative_ratio: float, *, dtype: torch.dtype | None = None
) -> tuple[Tensor, int]:
    """``(‖ΔW U‖² / ‖ΔW‖², r)``: the share of ``delta``'s energy in the principal space of
    ``weight``.

    ``U`` (``d x r``) is :func:`principal_directions` ``(weight, cumulative_ratio, dtype=dtype)``;
    as ``U`` is orthonormal, ``‖ΔW U‖ = ‖ΔW U Uᵀ‖``, the norm of the part of ΔW that SPHERE's
    projector acts on. The share is a float64 scalar on ``delta``'s device; 0 for an all-zero
    ``delta`` or ``r = 0``.
    """
    if delta.shape != weight.shape:
        raise ValueError(
            f"`delta` must have the shape of `weight` {tuple(weight.shape)}, "
            f"got {tuple(delta.shape)}"
        )
    basis = principal_directions(weight.detach(), cumulative_ratio, dtype=dtype)
    return share_in(delta, basis), basis.shape[1]


def share_in(delta: Tensor, basis: Tensor) -> Tensor:
    """``‖ΔW U‖² / ‖ΔW‖²``: the share of ``delta``'s (``m x d``) energy in the span of the
    orthonormal columns of ``basis`` (``d x r``), a float64 scalar on ``delta``'s device; 0 for an
    all-zero ``delta`` or ``r = 0``. One basis serves several updates of the same weight."""
    if basis.shape[0] != delta.shape[1]:
        raise ValueError(
            f"`basis` must have {delta.shape[1]} rows (the columns of `delta`), "
            f"got {tuple(basis.shape)}"
        )
    delta = delta.detach().to(torch.float64)
    total = delta.square().sum()
    if basis.shape[1] == 0 or total == 0:
        return torch.zeros((), dtype=torch.float64, device=delta.device)
    inside = (delta @ basis.to(device=delta.device, dtype=torch.float64)).square().sum()
    return inside / total


def subspace_overlap(first: Tensor, second: Tensor) -> Tensor:
    """``‖Aᵀ B‖²_F / min(r_A, r_B)`` of two orthonormal bases A (``d x r_A``) and B (``d x r_B``):
    the mean squared cosine of their principal angles, as a float64 scalar on ``first``'s device.

    1 when the smaller subspace lies inside the larger one, 0 when they are orthogonal; two
    subspaces drawn at random overlap by about ``max(r_A, r_B) / d``. Read for the principal
    space of an edited weight against the unedited weight's: how far the directions SPHERE
    protects have turned. 0 when either basis is empty.
    """
    if first.shape[0] != second.shape[0]:
        raise ValueError(
            f"the bases must have the same number of rows, got {tuple(first.shape)} and "
            f"{tuple(second.shape)}"
        )
    rank = min(first.shape[1], second.shape[1])
    if rank == 0:
        return torch.zeros((), dtype=torch.float64, device=first.device)
    first = first.detach().to(torch.float64)
    second = second.detach().to(device=first.device, dtype=torch.float64)
    return (first.T @ second).square().sum() / rank


def key_energy(
    matrix: Tensor, second_moment: Tensor, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``tr(A C Aᵀ)`` of ``matrix`` A (``m x d``) and ``second_moment`` C (``d x d``, symmetric):
    ``‖A K₀‖²_F / n`` when ``C = K₀ K₀ᵀ / n``.

    The product runs in ``dtype`` (float32 by default, without TF32 shortcuts: two of them per
    layer and step on a d² moment; the relative error is ~1e-6) and the sum in float64. Returns
    a float64 scalar on ``matrix``'s device.
    """
    if second_moment.shape != (matrix.shape[1], matrix.shape[1]):
        raise ValueError(
            f"`second_moment` must be {matrix.shape[1]} x {matrix.shape[1]} (the columns of "
            f"`matrix`), got {tuple(second_moment.shape)}"
        )
    a = matrix.detach().to(dtype)
    with _full_precision_float32_matmul():
        product = a @ second_moment.detach().to(device=a.device, dtype=dtype)
    return (product.to(torch.float64) * a.to(torch.float64)).sum()


def key_leak(
    delta: Tensor, weight: Tensor, second_moment: Tensor, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``‖ΔW K₀‖ / ‖W K₀‖ = √(tr(ΔW C ΔWᵀ) / tr(W C Wᵀ))`` (:func:`key_energy`); ``inf`` when W
    is 0 on the keys and ΔW is not, 0 when both are."""
    change = key_energy(delta, second_moment, dtype=dtype)
    base = key_energy(weight, second_moment, dtype=dtype).to(change.device)
    if base <= 0:
        return torch.where(change > 0, torch.inf, 0.0).to(torch.float64)
    return (change.clamp_min(0) / base).sqrt()
