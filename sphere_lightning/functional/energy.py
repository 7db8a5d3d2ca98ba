"""Hyperspherical energy of a layer's neurons."""

import torch
from torch import Tensor

__all__ = ["hyperspherical_energy"]


def hyperspherical_energy(
    weight: Tensor, s: float = 1.0, *, chunk_size: int = 1024, eps: float = 1e-6
) -> Tensor:
    """Hyperspherical energy ``E_s = Σ_i Σ_{j≠i} f_s(‖ŵ_i - ŵ_j‖)`` of the rows of ``weight``.

    ``ŵ_i`` are the rows of ``weight`` (``n x d``, one neuron per row) scaled to unit norm;
    ``f_s(z) = z^{-s}`` for ``s > 0`` and ``f_0(z) = log(1 / z)``. The sum runs over ordered
    pairs, so every unordered pair is counted twice.

    Distances come from Gram rows (``‖ŵ_i - ŵ_j‖² = 2 - 2 ŵ_i·ŵ_j``), ``chunk_size`` rows at a
    time in float64, so memory is ``O(chunk_size * n)`` on top of the normalised weight.
    Distances are clamped below at ``eps``: duplicate (or near-duplicate) neurons add the finite
    ``f_s(eps)`` instead of ``inf``, which also absorbs the float64 rounding of ``2 - 2 ŵ_i·ŵ_j``
    near zero. All-zero rows have no direction and are left out of the sum.

    Returns a float64 scalar tensor on ``weight``'s device (0 for fewer than two neurons).
    """
    if weight.ndim != 2:
        raise ValueError(
            f"`weight` must be 2-D (neurons x inputs), got shape {tuple(weight.shape)}"
        )
    # Written as `not (s >= 0)` so that NaN is rejected as well.
    if not s >= 0:
        raise ValueError(f"`s` must be >= 0, got {s}")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size}")
    if not eps > 0:
        raise ValueError(f"`eps` must be > 0, got {eps}")

    w = weight.to(torch.float64)
    norms = torch.linalg.vector_norm(w, dim=1)
    keep = norms > 0
    w_hat = w[keep] / norms[keep, None]
    n = w_hat.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=weight.device)
    if n < 2:
        return total

    min_sq = eps * eps
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sq_dist = (2.0 - 2.0 * (w_hat[start:stop] @ w_hat.mT)).clamp_min(min_sq)
        # Work on squared distances: z^-s = (z²)^(-s/2) and log(1/z) = -log(z²)/2.
        if s == 0:
            values = -0.5 * torch.log(sq_dist)
        else:
            values = sq_dist.pow(-0.5 * s)
        rows = torch.arange(stop - start, device=values.device)
        values = values.index_put((rows, rows + start), values.new_zeros(()))  # drop j == i
        total = total + values.sum()
    return total
