"""Principal hyperspherical space of a weight and the SPHERE sparse-space projection.

A weight ``W`` of shape ``(n, d)`` is read as ``n`` neurons (rows, ``nn.Linear`` convention
``out x in``). With normalised neurons ``Ŵ`` the principal space is spanned by the top eigenvectors
of ``C = Ŵᵀ Ŵ / n``; SPHERE removes a fraction ``α`` of an update's component in that space:
``ΔW P⊥`` with ``P⊥ = I - α U Uᵀ``.

Speed and precision. The eigenproblem is solved on the smaller of ``C`` (``d x d``) and the Gram
matrix ``Ŵ Ŵᵀ / n`` (``n x n``, same nonzero eigenvalues; ``u_k ∝ Ŵᵀ v_k``), formed from the
blocks on and above its diagonal. ``trace(C)`` is the mean squared row norm, so the
cumulative-ratio cutoff needs no eigenvalue beyond the ones computed; ratios are accumulated in
float64. With ``dtype=None`` (the default) this runs in float32, or in float64 when the weight is
float64. float32 is enough: on power-law spectra (the benchmark shapes up to 4096 x 14336 and the
tests) the projected ΔW differs from the float64 result by a few 1e-6 of its largest entry at
most, against a 1e-4 target. Where the cutoff lands below what float32 resolves (the rank cap,
not the ratio, would set ``r``), the default recomputes in float64. The one remaining float32
effect is the cutoff itself: if ``β`` falls within ~1e-7 of a cumulative ratio, ``r`` may differ
by one from the float64 result. Pass ``dtype=torch.float64`` for the float64 computation.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = [
    "normalize_rows",
    "principal_directions",
    "project_delta",
    "sparse_space_projector",
]


# Rows per block of the symmetric Gram product (see `_symmetric_gram`).
_GRAM_BLOCK = 1024


@contextmanager
def _full_precision_float32_matmul() -> Iterator[None]:
    """Run float32 matmuls in true float32 inside the block (no TF32 / bf16 shortcuts).

    ``torch.set_float32_matmul_precision("high")`` (common with Lightning on GPUs) lets float32
    products run at ~1e-3 relative accuracy, which the float32 paths here cannot tolerate. The
    previous setting is restored on exit; nothing is touched when it is already ``"highest"``.
    """
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


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


def _resolve_dtype(dtype: torch.dtype | None, *inputs: torch.dtype) -> torch.dtype:
    """``dtype`` if given, else the automatic choice: float32, or wider if an input is wider."""
    if dtype is not None:
        _check_dtype(dtype)
        return dtype
    resolved = torch.float32
    for other in inputs:
        resolved = torch.promote_types(resolved, other)
    return resolved


def _symmetric_gram(x: Tensor, block_size: int = _GRAM_BLOCK) -> Tensor:
    """``x @ xᵀ`` (``m x m``) from the blocks on and above the diagonal, mirrored below.

    Same result as the plain product up to rounding, at about ``(1 + 1/blocks) / 2`` of its
    flops. ``x`` may be a transposed (non-contiguous) view.
    """
    m = x.shape[0]
    if m <= block_size:
        return x @ x.mT
    gram = x.new_empty(m, m)
    for start in range(0, m, block_size):
        stop = min(start + block_size, m)
        rows = x[start:stop] @ x[start:].mT  # (stop - start) x (m - start)
        gram[start:stop, start:] = rows
        gram[stop:, start:stop] = rows[:, stop - start :].mT
    return gram


def _principal_basis(
    weight: Tensor,
    cumulative_ratio: float,
    dtype: torch.dtype,
    fallback: torch.dtype | None = None,
) -> Tensor:
    """Top-``r`` eigenvectors of ``C = Ŵᵀ Ŵ / n`` in ``dtype``, shape ``(d, r)``.

    ``weight`` must already be validated. ``r = 0`` for ``cumulative_ratio == 0`` or an all-zero
    weight. With ``fallback`` set, a cutoff that lands below the numerical rank resolvable in
    ``dtype`` (so that the rank cap, not the ratio, would decide ``r``) is recomputed in
    ``fallback``.
    """
    # The projector is a constant of the weight: no gradient flows through the eigensolver.
    w_hat = normalize_rows(weight.detach().to(dtype))
    n, d = w_hat.shape
    empty = w_hat.new_zeros(d, 0)
    if cumulative_ratio == 0.0 or n == 0 or d == 0:
        return empty
    # trace(C) = mean squared row norm: 1 except for zero rows. Using it (not the sum of the
    # computed eigenvalues) keeps the cutoff exact on the n < d path, where only n of the d
    # eigenvalues are computed. Accumulated in float64 whatever ``dtype`` is, like the ratios.
    row_norms = torch.linalg.vector_norm(w_hat, dim=1).to(torch.float64)
    total = row_norms.square().sum() / n
    if total <= 0:
        return empty

    # Nonzero eigenvalues of Ŵ Ŵᵀ / n equal those of Ŵᵀ Ŵ / n: decompose the smaller one.
    small_gram = n < d
    gram = _symmetric_gram(w_hat if small_gram else w_hat.mT).div_(n)
    evals, evecs = torch.linalg.eigh(gram)  # ascending order
    del gram
    desc = evals.flip(0)

    # Eigenvalues below this are rounding noise of a PSD matrix; their eigenvectors (and, on the
    # Gram path, u_k = Ŵᵀ v_k / sqrt(n λ_k)) are meaningless, so r never goes past this rank.
    tol = desc[0].clamp_min(0) * max(n, d) * torch.finfo(dtype).eps
    rank = int((desc > tol).sum())
    ratios = torch.cumsum(desc.to(torch.float64).clamp_min(0), dim=0) / total
    wanted = min(1 + int((ratios <= cumulative_ratio).sum()), d)
    if rank < wanted and fallback is not None and fallback != dtype:
        del w_hat, evecs  # free before the second decomposition
        return _principal_basis(weight, cumulative_ratio, fallback)
    r = min(wanted, rank)
    if r == 0:
        return empty

    top = evecs[:, evecs.shape[1] - r :].flip(1)  # descending order, a copy of r columns
    del evecs
    if not small_gram:
        return top
    # u_k ∝ Ŵᵀ v_k. A sign-fixed QR gives exactly Ŵᵀ v_k / sqrt(n λ_k) in exact arithmetic, but
    # stays orthonormal in floating point even when λ_k is small, so P⊥ remains a true projector.
    q, rr = torch.linalg.qr(w_hat.mT @ top)
    signs = torch.sign(torch.diagonal(rr))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs


def _basis_for(weight: Tensor, cumulative_ratio: float, dtype: torch.dtype | None) -> Tensor:
    """:func:`_principal_basis` with the dtype rule of the public functions."""
    resolved = _resolve_dtype(dtype, weight.dtype)
    fallback = torch.float64 if dtype is None else None
    with _full_precision_float32_matmul():
        return _principal_basis(weight, cumulative_ratio, resolved, fallback)


def principal_directions(
    weight: Tensor, cumulative_ratio: float, *, dtype: torch.dtype | None = None
) -> Tensor:
    """Orthonormal basis ``U`` (``d x r``) of the principal hyperspherical space of ``weight``.

    ``U`` holds the top-``r`` eigenvectors of ``C = Ŵᵀ Ŵ / n`` (``Ŵ`` = row-normalised ``weight``,
    ``n x d``), eigenvalues in descending order, with
    ``r = 1 + #{k : cumsum(λ)_k / trace(C) <= cumulative_ratio}`` capped at ``d`` and at the
    numerical rank of ``Ŵ``. ``cumulative_ratio == 0`` (or an all-zero weight) gives ``r = 0``.
    Zero rows carry no direction: they contribute nothing to ``C`` and do not change ``U``.

    The decomposition runs in ``dtype`` (on the ``n x n`` Gram matrix when ``n < d``); the result
    has the dtype and device of ``weight``. Column signs are arbitrary; ``U Uᵀ`` is what matters.
    ``dtype=None`` (the default) picks float32, or float64 for a float64 ``weight``, and redoes
    the decomposition in float64 when the float32 spectrum cannot resolve the cutoff (see the
    module docstring).
    """
    _check_weight(weight)
    _check_unit_interval("cumulative_ratio", cumulative_ratio)
    return _basis_for(weight, cumulative_ratio, dtype).to(weight.dtype)


def sparse_space_projector(
    weight: Tensor,
    cumulative_ratio: float,
    suppression: float,
    *,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Explicit ``d x d`` projector ``P⊥ = I - α U Uᵀ`` with ``α = suppression``.

    ``U`` is :func:`principal_directions` ``(weight, cumulative_ratio, dtype=dtype)``. Meant for
    small layers and inspection; :func:`project_delta` applies the same map without forming
    ``P⊥``. Returned in the dtype and device of ``weight``.
    """
    _check_weight(weight)
    _check_unit_interval("cumulative_ratio", cumulative_ratio)
    _check_unit_interval("suppression", suppression)
    resolved = _resolve_dtype(dtype, weight.dtype)
    d = weight.shape[1]
    eye = torch.eye(d, dtype=resolved, device=weight.device)
    if suppression == 0.0:
        return eye.to(weight.dtype)
    basis = _basis_for(weight, cumulative_ratio, dtype).to(resolved)
    return (eye - suppression * (basis @ basis.mT)).to(weight.dtype)


def project_delta(
    delta: Tensor,
    weight: Tensor,
    cumulative_ratio: float,
    suppression: float,
    *,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, int]:
    """Project an update onto the sparse space of ``weight``: ``(ΔW P⊥, r)``.

    Computes ``ΔW - α (ΔW U) Uᵀ`` with ``U`` from :func:`principal_directions` and
    ``α = suppression``, never forming the ``d x d`` projector. ``delta`` must have the shape of
    ``weight`` (``n x d``). ``r`` is the number of principal directions used; when it is 0 (which
    ``suppression == 0`` or ``cumulative_ratio == 0`` force) the result is an unchanged copy of
    ``delta``. The decomposition and the arithmetic run in ``dtype``; with ``dtype=None`` the
    decomposition follows :func:`principal_directions` and the arithmetic runs in float32, or
    float64 if ``delta`` or ``weight`` is float64. The result has ``delta``'s dtype and device.
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
    work = _resolve_dtype(dtype, weight.dtype, delta.dtype)
    if suppression == 0.0 or cumulative_ratio == 0.0:
        return delta.clone(), 0
    basis = _basis_for(weight, cumulative_ratio, dtype)
    r = basis.shape[1]
    if r == 0:
        return delta.clone(), 0
    basis = basis.to(device=delta.device, dtype=work)
    delta_c = delta.to(work)
    # ΔW - α (ΔW U) Uᵀ in one fused call: no n x d temporary besides the result.
    with _full_precision_float32_matmul():
        projected = torch.addmm(delta_c, delta_c @ basis, basis.mT, alpha=-suppression)
    return projected.to(delta.dtype), r
