"""RECT: keep only the entries of ΔW with the largest relative change (Gu et al., "Model Editing
Harms General Abilities of Large Language Models: Regularization to the Rescue", EMNLP 2024), as
the official SPHERE code applies it (``memit/memit_rect_main.py``)."""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from typing_extensions import override

from sphere_lightning.callbacks.sphere import short_name
from sphere_lightning.context import EditingContext
from sphere_lightning.deltas import DeltaResult, DeltaTransform, TransformStage
from sphere_lightning.errors import ConfigError, callback_flag

#: Added to W before dividing (``w + epsilon`` in the reference, sign included).
RECT_EPSILON = 1e-8


def rect_mask(delta: torch.Tensor, weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """The entries of ``delta`` RECT keeps: those whose relative change |ΔW / (W + 1e-8)| is at
    least its k-th smallest value, k = ⌊numel · (1 − ratio)⌋ (the reference's ``kthvalue``).

    That keeps ``numel − k + 1`` entries (one more than ``ratio · numel`` when that is a whole
    number: the k-th smallest itself is kept), more on ties, as the reference does. With k = 0
    (``ratio`` 1, or a matrix too small for one entry to go) everything is kept; the reference's
    ``kthvalue`` would raise there. ``ratio`` is read as a decimal (0.4 is 40 %, as the
    reference's ``k_percent = 40``), so k is exact.

    Precision: ``W + 1e-8`` in W's dtype, the division in float64 (the reference divides its
    float64 MEMIT update by the float32 weight).
    """
    if delta.shape != weight.shape:
        raise ValueError(
            f"`delta` and `weight` must have one shape, got {tuple(delta.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"`ratio` must be in (0, 1], got {ratio}")
    numel = delta.numel()
    k = math.floor(numel * (1 - Fraction(repr(float(ratio)))))
    if k < 1:
        return torch.ones_like(delta, dtype=torch.bool)
    relative = torch.abs(delta.double() / (weight + RECT_EPSILON).double())
    threshold = torch.kthvalue(relative.reshape(-1), k).values
    return relative >= threshold


class RectCallback(DeltaTransform):
    """RECT: zero every entry of ΔW outside the top ``ratio`` by relative change |ΔW / W|.

    W is the weight as applied so far (before this step's update), as the reference divides by
    the live weight; the comparison is entrywise, so GPT-2's Conv1D and nn.Linear behave alike.
    Logs ``rect/kept_fraction/<layer>`` and ``rect/kept_norm_ratio/<layer>``
    (‖RECT(ΔW)‖ / ‖ΔW‖).

    Args:
        ratio: Share of ΔW's entries kept, in (0, 1] (reference: 0.4, its ``k_percent = 40``).
            The reference's threshold keeps one entry more than ``ratio · numel``; see
            :func:`rect_mask`.
        stage: ``after_loop`` (default; the official code rectifies each layer's update as it
            applies the batch, after the layer loop) or ``in_loop`` (before the layers above are
            solved). See :class:`~sphere_lightning.deltas.DeltaTransform`.
    """

    def __init__(self, ratio: float = 0.4, stage: TransformStage = "after_loop") -> None:
        super().__init__(stage)
        # ``not 0 < v <= 1`` also rejects NaN.
        if isinstance(ratio, bool) or not 0.0 < ratio <= 1.0:
            raise ConfigError(
                f"{callback_flag(type(self).__name__, 'ratio')} should be in (0, 1], got {ratio}"
            )
        self.ratio = ratio

    @override
    def transform_delta(
        self, name: str, delta: torch.Tensor, pl_module: EditingContext
    ) -> DeltaResult:
        weight = pl_module.edited_weight(name).detach().to(delta.device)
        mask = rect_mask(delta, weight, self.ratio)
        kept = torch.where(mask, delta, torch.zeros_like(delta))
        layer = short_name(name)
        return kept, {
            f"rect/kept_fraction/{layer}": float(mask.float().mean()),
            f"rect/kept_norm_ratio/{layer}": float(kept.norm() / delta.norm().clamp_min(1e-12)),
        }
