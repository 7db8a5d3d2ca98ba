"""Principal hyperspherical space of a weight and the SPHERE sparse-space projection.

A weight ``W`` of shape ``(n, d)`` is read as ``n`` neurons (rows, ``nn.Linear`` convention
``out x in``). With normalised neurons ``Ŵ`` the principal space is spanned by the top eigenvectors
of ``C = Ŵᵀ Ŵ / n``; SPHERE removes a fraction ``α`` of an update's component in that space:
``ΔW P⊥`` with ``P⊥ = I - α U Uᵀ``.
"""

import torch
from torch import Tensor

__all__ = [
    "normalize_rows",
    "principal_directions",
    "project_delta",
    "sparse_space_projector",
]


def _check_weight(weight: Tensor) -> None:
    if weight.ndim != 2:
        raise ValueError(
            f"`weight` must be 2-D (neurons x inputs), got shape {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise ValueError(f"`weight` must be a floating-point tensor, got {weight.dtype}")


def _check_unit_interval(name: str, value: float) -> None:
    # Written as `not (0 <= v <= 1)` so that NaN is rejected as well.
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value}")


def _check_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise ValueError(f"`dtype` must be a real floating-point dtype, got {dtype}")


def normalize_rows(weight: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale every row of ``weight`` to unit L2 norm.

    Rows are divided by ``max(‖w_i‖, eps)``, so all-zero rows stay zero instead of becoming NaN
    (a row whose norm is below ``eps`` therefore comes out shorter than 1). Same dtype and device
    as the input.
    """
    norms = torch.linalg.vector_norm(weight, dim=-1, keepdim=True)
    return weight / norms.clamp_min(eps)


def _principal_basis(weight: Tensor, cumulative_ratio: float, dtype: torch.dtype) -> Tensor:
    """Top-``r`` eigenvectors of ``C = Ŵᵀ Ŵ / n`` in ``dtype``, shape ``(d, r)``.

    ``weight`` must already be validated. ``r = 0`` for ``cumulative_ratio == 0`` or an all-zero
    weight.
    """
    # The projector is a constant of the weight: no gradient flows through the eigensolver.
    w_hat = normalize_rows(weight.detach().to(dtype))
    n, d = w_hat.shape
    empty = w_hat.new_zeros(d, 0)
    if cumulative_ratio == 0.0 or n == 0 or d == 0:
        return empty
    # trace(C) = mean squared row norm: 1 except for zero rows. Using it (not the sum of the
    # computed eigenvalues) keeps the cutoff exact on the n < d path, where only n of the d
    # eigenvalues are computed.
    total = w_hat.square().sum() / n
    if total <= 0:
        return empty

    small_gram = n < d
    if small_gram:
        # Nonzero eigenvalues of Ŵ Ŵᵀ / n equal those of Ŵᵀ Ŵ / n; n x n is the cheaper problem.
        evals, evecs = torch.linalg.eigh(w_hat @ w_hat.mT / n)
    else:
        evals, evecs = torch.linalg.eigh(w_hat.mT @ w_hat / n)
    evals, evecs = evals.flip(0), evecs.flip(1)  # eigh returns ascending order

    # Eigenvalues below this are rounding noise of a PSD matrix; their eigenvectors (and, on the
    # Gram path, u_k = Ŵᵀ v_k / sqrt(n λ_k)) are meaningless, so r never goes past this rank.
    tol = evals[0].clamp_min(0) * max(n, d) * torch.finfo(dtype).eps
    rank = int((evals > tol).sum())
    ratios = torch.cumsum(evals.clamp_min(0), dim=0) / total
    r = 1 + int((ratios <= cumulative_ratio).sum())
    r = min(r, d, rank)
    if r == 0:
        return empty

    if not small_gram:
        return evecs[:, :r]
    # u_k ∝ Ŵᵀ v_k. A sign-fixed QR gives exactly Ŵᵀ v_k / sqrt(n λ_k) in exact arithmetic, but
    # stays orthonormal in floating point even when λ_k is small, so P⊥ remains a true projector.
    q, rr = torch.linalg.qr(w_hat.mT @ evecs[:, :r])
    signs = torch.sign(torch.diagonal(rr))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs


def principal_directions(
    weight: Tensor, cumulative_ratio: float, *, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Orthonormal basis ``U`` (``d x r``) of the principal hyperspherical space of ``weight``.

    ``U`` holds the top-``r`` eigenvectors of ``C = Ŵᵀ Ŵ / n`` (``Ŵ`` = row-normalised ``weight``,
    ``n x d``), eigenvalues in descending order, with
    ``r = 1 + #{k : cumsum(λ)_k / trace(C) <= cumulative_ratio}`` capped at ``d`` and at the
    numerical rank of ``Ŵ``. ``cumulative_ratio == 0`` (or an all-zero weight) gives ``r = 0``.
    Zero rows carry no direction: they contribute nothing to ``C`` and do not change ``U``.

    The decomposition runs in ``dtype`` (on the ``n x n`` Gram matrix when ``n < d``); the result
    has the dtype and device of ``weight``. Column signs are arbitrary; ``U Uᵀ`` is what matters.
    """
    _check_weight(weight)
    _check_unit_interval("cumulative_ratio", cumulative_ratio)
    _check_dtype(dtype)
    return _principal_basis(weight, cumulative_ratio, dtype).to(weight.dtype)


def sparse_space_projector(
    weight: Tensor,
    cumulative_ratio: float,
    suppression: float,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Explicit ``d x d`` projector ``P⊥ = I - α U Uᵀ`` with ``α = suppression``.

    ``U`` is :func:`principal_directions` ``(weight, cumulative_ratio)``. Meant for small layers and
    inspection; :func:`project_delta` applies the same map without forming ``P⊥``. Returned in the
    dtype and device of ``weight``.
    """
    _check_weight(weight)
    _check_unit_interval("cumulative_ratio", cumulative_ratio)
    _check_unit_interval("suppression", suppression)
    _check_dtype(dtype)
    d = weight.shape[1]
    eye = torch.eye(d, dtype=dtype, device=weight.device)
    if suppression == 0.0:
        return eye.to(weight.dtype)
    basis = _principal_basis(weight, cumulative_ratio, dtype)
    return (eye - suppression * (basis @ basis.mT)).to(weight.dtype)


def project_delta(
    delta: Tensor,
    weight: Tensor,
    cumulative_ratio: float,
    suppression: float,
    *,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, int]:
    """Project an update onto the sparse space of ``weight``: ``(ΔW P⊥, r)``.

    Computes ``ΔW - α (ΔW U) Uᵀ`` with ``U`` from :func:`principal_directions` and
    ``α = suppression``, never forming the ``d x d`` projector. ``delta`` must have the shape of
    ``weight`` (``n x d``). ``r`` is the number of principal directions used; when it is 0 (which
    ``suppression == 0`` or ``cumulative_ratio == 0`` force) the result is an unchanged copy of
    ``delta``. The arithmetic runs in ``dtype``; the result has ``delta``'s dtype and device.
    Gradients flow through ``delta`` but not through ``weight``.
    """
    _check_weight(weight)
    if delta.shape != weight.shape:
        raise ValueError(
            f"`delta` must have the shape of `weight` {tuple(weight.shape)}, "
            f"got {tuple(delta.shape)}"
        )
    _check_unit_interval("cumulative_ratio", cumulative_ratio)
    _check_unit_interval("suppression", suppression)
    _check_dtype(dtype)
    if suppression == 0.0 or cumulative_ratio == 0.0:
        return delta.clone(), 0
    basis = _principal_basis(weight, cumulative_ratio, dtype)
    r = basis.shape[1]
    if r == 0:
        return delta.clone(), 0
    basis = basis.to(delta.device)
    delta_c = delta.to(dtype)
    projected = delta_c - suppression * ((delta_c @ basis) @ basis.mT)
    return projected.to(delta.dtype), r
