"""Seeded samples of the edited facts, and the confidence interval of a mean over a sample.

An intermediate lifelong evaluation may score a simple random sample (without replacement) of
the facts edited so far instead of all of them; these two functions say which facts, and how far
the sample mean may be from the mean over every edited fact.
"""

from __future__ import annotations

import hashlib
import math

import torch

#: Φ⁻¹(0.975), the standard normal quantile of a two-sided 95 % interval.
Z_95 = 1.959963984540054


def sample_indices(population: int, size: int | None, seed: int, step: int) -> torch.Tensor:
    """A fixed, seeded simple random sample of ``range(population)``, sorted (int64).

    The draw depends on ``(seed, step)`` only, never on the global RNG state: the same run
    evaluates the same facts at a step whether or not it was resumed, and every process of a
    data-parallel run draws the same sample. ``size`` ``None`` or ≥ ``population`` gives every
    index.
    """
    if population < 0:
        raise ValueError(f"`population` should be ≥ 0, got {population}")
    if size is not None and size < 1:
        raise ValueError(f"`size` should be ≥ 1 or None, got {size}")
    if size is None or size >= population:
        return torch.arange(population)
    digest = hashlib.sha256(f"edit-sample:{seed}:{step}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(population, generator=generator)[:size].sort().values


def mean_ci95_half_width(total: float, total_sq: float, count: int, population: int) -> float:
    """Half-width of the 95 % confidence interval of a population mean estimated from a sample.

    Normal approximation with the sample standard deviation and the finite-population
    correction of sampling without replacement::

        z₀.₉₇₅ · s / √n · √((N − n) / (N − 1)),   s² = (Σx² − (Σx)²/n) / (n − 1)

    from the sufficient statistics ``total`` = Σx, ``total_sq`` = Σx² and ``count`` = n (so that
    processes can sum their shares first), ``population`` = N. It is 0 when the sample is the
    whole population (n = N) and NaN for n < 2 (no spread to estimate). For a 0/1 metric with
    all-equal sample values it is 0, where a Wilson interval would not be; the normal
    approximation is chosen because most per-fact metrics are means over several prompts.
    """
    if count > population:
        raise ValueError(f"`count` ({count}) should be ≤ `population` ({population})")
    if count >= population:
        return 0.0
    if count < 2:
        return math.nan
    variance = max(total_sq - total * total / count, 0.0) / (count - 1)
    correction = (population - count) / (population - 1)
    return Z_95 * math.sqrt(variance / count * correction)
