"""Hyperspherical energy of a layer's neurons."""

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from sphere_lightning.functional.projection import _full_precision_float32_matmul

__all__ = ["hyperspherical_energy"]

# Squared distances from a float32 product below this are recomputed in float64. float32 leaves
# an error of order 1e-7 in ŵ_i·ŵ_j, so a term that is not recomputed (squared distance >= 1,
# angle >= 60°) is off by a relative ~s·1e-7 at most, and usually far less.
_REFINE_FLOAT32 = 1.0
# Squared distances from a float64 product below this (angle below ~0.06°) are recomputed as
# ‖ŵ_i - ŵ_j‖² from the rows: there `2 - 2 ŵ_i·ŵ_j` has cancelled to a few significant digits.
_REFINE_FLOAT64 = 1e-6
# Cost of one float64 dot product of gathered rows, in entries of a float64 block product.
_PAIR_COST = 8
# Share of float32 entries recomputed in float64 above which the rest runs in float64 only (a
# float32 product costs about half a float64 one, so past this the mix stops paying).
_SWITCH_SHARE = 0.4
_GRAM_DTYPES = (torch.float32, torch.float64)


def hyperspherical_energy(
    weight: Tensor,
    s: float = 1.0,
    *,
    chunk_size: int = 1024,
    eps: float = 1e-6,
    gram_dtype: torch.dtype | None = None,
) -> Tensor:
    """Hyperspherical energy ``E_s = Σ_i Σ_{j≠i} f_s(‖ŵ_i - ŵ_j‖)`` of the rows of ``weight``.

    ``ŵ_i`` are the rows of ``weight`` (``n x d``, one neuron per row) scaled to unit norm;
    ``f_s(z) = z^{-s}`` for ``s > 0`` and ``f_0(z) = log(1 / z)``. The sum runs over ordered
    pairs, so every unordered pair is counted twice.

    Distances come from the Gram matrix (``‖ŵ_i - ŵ_j‖² = 2 - 2 ŵ_i·ŵ_j``), one
    ``chunk_size x chunk_size`` block at a time and only for blocks on or above the diagonal
    (off-diagonal blocks count twice), so the extra memory is the normalised weight in
    ``gram_dtype`` plus a few ``chunk_size²`` float64 blocks. Norms, distances, ``f_s`` and the
    sum are float64 whatever ``gram_dtype`` is.

    ``gram_dtype`` is the precision of the Gram products: float32 (the default, except for a
    float64 ``weight``) or float64. A float32 block is converted to float64 before anything else,
    and its pairs closer than 60° (``‖ŵ_i - ŵ_j‖² < 1``) are recomputed from float64 rows; the
    other terms carry a relative error of order ``s·1e-7`` at most (1e-11 to 1e-10 on the sums
    measured). If recomputation covers a large share of the pairs (many near-parallel neurons),
    the remaining blocks switch to float64 products. With either dtype, pairs closer than ~0.06°
    (``‖ŵ_i - ŵ_j‖² < 1e-6``), where ``2 - 2 ŵ_i·ŵ_j`` cancels even in float64, take
    ``‖ŵ_i - ŵ_j‖²`` directly from the float64 rows, so near-duplicate neurons are exact to
    rounding. (Many exact duplicates make this slow: each such pair is a separate dot product.)

    Distances are clamped below at ``eps``: duplicate (or near-duplicate) neurons add the finite
    ``f_s(eps)`` instead of ``inf``. All-zero rows have no direction and are left out of the sum.

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
    if gram_dtype is None:
        gram_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    elif gram_dtype not in _GRAM_DTYPES:
        raise ValueError(f"`gram_dtype` must be torch.float32 or torch.float64, got {gram_dtype}")

    weight = weight.detach()
    total = torch.zeros((), dtype=torch.float64, device=weight.device)
    # Row norms in float64, a chunk at a time: no float64 copy of the whole weight.
    norms = torch.cat(
        [
            torch.linalg.vector_norm(weight[start : start + chunk_size].to(torch.float64), dim=1)
            for start in range(0, weight.shape[0], chunk_size)
        ]
        or [total.new_zeros(0)]
    )
    keep = norms > 0
    if not bool(keep.all()):
        weight, norms = weight[keep], norms[keep]
    n, d = weight.shape
    if n < 2:
        return total

    def unit_rows(index: slice | Tensor) -> Tensor:
        """Rows ``index`` of the normalised weight, in float64."""
        return weight[index].to(torch.float64) / norms[index, None]

    w_hat = weight.new_empty(n, d, dtype=gram_dtype)
    # float32 rows are scaled in float32 (a rounding or two; the products add more), unless a
    # norm is so extreme that its reciprocal would not fit float32.
    exact_scaling = gram_dtype == torch.float64 or not (
        bool(norms.amin() > 2.0**-100) and bool(norms.amax() < 2.0**100)
    )
    inv_norms = norms.reciprocal().to(gram_dtype)
    for start in range(0, n, chunk_size):
        block = slice(start, start + chunk_size)
        if exact_scaling:
            w_hat[block] = unit_rows(block)
        else:
            torch.mul(weight[block].to(gram_dtype), inv_norms[block, None], out=w_hat[block])

    def unit_rows64(block: slice) -> Tensor:
        return w_hat[block] if w_hat.dtype == torch.float64 else unit_rows(block)

    # float32 products need the close pairs recomputed. If that covers a large share of the
    # entries (many near-parallel neurons), the remaining blocks go straight to float64.
    mixed = gram_dtype != torch.float64
    recomputed = seen = 0
    min_sq = eps * eps
    with _full_precision_float32_matmul():
        for row_start in range(0, n, chunk_size):
            row_block = slice(row_start, row_start + chunk_size)
            rows64 = None
            for col_start in range(row_start, n, chunk_size):
                col_block = slice(col_start, col_start + chunk_size)
                block = _Block(row_start, col_start, unit_rows, d)
                # ‖ŵ_i - ŵ_j‖² = 2 - 2 ŵ_i·ŵ_j, from here on in float64.
                if mixed:
                    # -2 ŵ_i·ŵ_j in float32 (scaling by -2 is exact), 2 + that in float64.
                    scaled = (w_hat[row_block] @ w_hat[col_block].mT).mul_(-2.0)
                    close = bool(scaled.amin() < _REFINE_FLOAT32 - 2.0)
                    sq_dist = scaled.to(torch.float64).add_(2.0)
                    del scaled
                    seen += sq_dist.numel()
                    if close:
                        recomputed += _refine(sq_dist, block, _REFINE_FLOAT32, products=True)
                        mixed = recomputed <= _SWITCH_SHARE * seen
                else:
                    if rows64 is None:
                        rows64 = unit_rows64(row_block)
                    sq_dist = (rows64 @ unit_rows64(col_block).mT).mul_(-2.0).add_(2.0)
                    close = bool(sq_dist.amin() < _REFINE_FLOAT64)
                    if close:
                        _refine(sq_dist, block, _REFINE_FLOAT64, products=False)
                # Without close pairs every entry is >= _REFINE_FLOAT64 already.
                if close or min_sq > _REFINE_FLOAT64:
                    sq_dist.clamp_min_(min_sq)
                # Work on squared distances: z^-s = (z²)^(-s/2) and log(1/z) = -log(z²)/2.
                if s == 0:
                    values = sq_dist.log_().mul_(-0.5)
                else:
                    values = sq_dist.pow_(-0.5 * s)
                if block.on_diagonal:
                    total += values.fill_diagonal_(0.0).sum()  # drop j == i
                else:
                    total += 2.0 * values.sum()  # the block below the diagonal, mirrored
    return total


class _Block(NamedTuple):
    """Where a Gram block sits, and how to get float64 unit rows of the weight."""

    row_start: int
    col_start: int
    unit_rows: Callable[[Tensor], Tensor]
    dim: int

    @property
    def on_diagonal(self) -> bool:
        return self.row_start == self.col_start


def _refine(sq_dist: Tensor, block: _Block, below: float, *, products: bool) -> int:
    """Recompute, in place, the entries of ``sq_dist`` below ``below``; return the cost.

    Scattered entries get ``‖ŵ_i - ŵ_j‖²`` from float64 rows, exact to rounding however close
    the pair. With ``products``, dense ones instead get one float64 product over the rows and
    columns holding them (then the same treatment below ``_REFINE_FLOAT64``). On a diagonal block
    only pairs ``i < j`` are recomputed and mirrored; the ``i == i`` entries (distance 0, dropped
    from the sum) are left alone. The cost is in block entries recomputed, a lone pair counting
    ``_PAIR_COST``.
    """
    if not bool(sq_dist.amin() < below):
        return 0
    close = sq_dist < below
    if block.on_diagonal:
        close.triu_(1)
    pair_rows, pair_cols = close.nonzero(as_tuple=True)
    del close
    pairs = pair_rows.numel()
    if pairs == 0:
        return 0
    row_ids, row_pos = torch.unique(pair_rows, return_inverse=True)
    col_ids, col_pos = torch.unique(pair_cols, return_inverse=True)
    rows64 = block.unit_rows(row_ids + block.row_start)
    cols64 = block.unit_rows(col_ids + block.col_start)
    area = row_ids.numel() * col_ids.numel()
    if products and area <= _PAIR_COST * pairs:
        exact = (rows64 @ cols64.mT).mul_(-2.0).add_(2.0)
        sq_dist[row_ids[:, None], col_ids] = exact
        if block.on_diagonal:
            sq_dist[col_ids[:, None], row_ids] = exact.mT
        return area + _refine(sq_dist, block, _REFINE_FLOAT64, products=False)
    # Bounded memory: at most ~2^22 float64 values (32 MiB) per gathered operand.
    step = max(1, 2**22 // max(block.dim, 1))
    for start in range(0, pairs, step):
        chunk = slice(start, start + step)
        diff = rows64[row_pos[chunk]] - cols64[col_pos[chunk]]
        values = diff.square_().sum(dim=1)
        sq_dist[pair_rows[chunk], pair_cols[chunk]] = values
        if block.on_diagonal:
            sq_dist[pair_cols[chunk], pair_rows[chunk]] = values
    return _PAIR_COST * pairs
