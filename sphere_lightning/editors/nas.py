"""Norm-Anchor Scaling (NAS): the MLP value v* keeps the unedited model's norm.

"Norm Anchors Make Model Edits Last" (arXiv 2602.02543, github SasyaTitech/NAS). Over a
sequential run of a locate-then-edit editor the values v* its solve writes grow in norm batch
after batch, and the edited model collapses. NAS reads the target at the target layer as the
residual entering that layer's MLP plus the MLP's output: h = (h − m) + m, with m the MLP output
of the current model at the subject's last token of the bare prompt, and the optimised target
h + δ as (h − m) + v with v = m + δ, the value the MLP should output. Before the solve it rescales
v to ν, the mean ‖v‖ of the *unedited* model over a sample of requests; a request whose ‖v‖
exceeds ``skip_factor`` · ν keeps v = m (its δ is dropped). The target becomes (h − m) + v.

ν is measured once, with the editor's own v* options on the bare prompt only (no context
templates), as the reference's ``util/vstar_stats.py`` does, and the largest ``1 − upper_quantile``
of the norms are dropped before the mean. It is the editor's sequential state: a resumed run
reuses it instead of measuring the edited model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.data.readers import load_requests
from sphere_lightning.data.requests import EditRequest
from sphere_lightning.editors.hooks import encode_with_subject, gather_at_subject
from sphere_lightning.errors import ConfigError, UserInputError, editor_flag
from sphere_lightning.models.architectures import architecture_of

#: The reference's ``scale_vector_to_norm`` epsilon: v · ν / (‖v‖ + eps).
EPS = 1e-10


@dataclass(frozen=True)
class NASOptions:
    """Whether v* is anchored, where ν comes from and how (the reference's names in brackets):
    the editor's ``nas`` options. In a config: ``model.editor.init_args.nas.<field>``.

    Attributes:
        enabled: Anchor the MLP value m + δ of every v* to ν before the solve (MEMIT, AlphaEdit).
        requests: Edit requests ν is measured on: anything ``--data.dataset`` accepts
            (``builtin``, a JSON/JSONL file, a hub id); the reference samples CounterFact.
        num_requests: How many of them are sampled (seeded); all when there are fewer
            [nas_restart, 1000].
        skip_factor: A request whose ‖v‖ exceeds this times ν keeps v = m (2 in the reference's
            MEMIT, AlphaEdit and NAS code).
        upper_quantile: The norms above this quantile are dropped before the mean (0.95 in the
            reference: the largest 5 % are dropped).
    """

    enabled: bool = False
    requests: str = "builtin"
    num_requests: int = 1000
    skip_factor: float = 2.0
    upper_quantile: float = 0.95

    def __post_init__(self) -> None:
        if not isinstance(self.requests, str) or not self.requests.strip():
            raise ConfigError(
                f"{editor_flag('nas.requests')} must be 'builtin', a file path or a hub "
                f"dataset id, got {self.requests!r}"
            )
        if self.num_requests < 1:
            raise ConfigError(
                f"{editor_flag('nas.num_requests')} must be ≥ 1, got {self.num_requests}"
            )
        if not self.skip_factor > 0:
            raise ConfigError(
                f"{editor_flag('nas.skip_factor')} must be > 0, got {self.skip_factor}"
            )
        if not 0 < self.upper_quantile <= 1:
            raise ConfigError(
                f"{editor_flag('nas.upper_quantile')} must be in (0, 1], got {self.upper_quantile}"
            )


@dataclass
class AnchoredValues:
    """Targets after NAS, with what each request's v was before it."""

    targets: torch.Tensor  # (n, d): (h − m) + anchored v
    norms: torch.Tensor  # (n,): ‖m + δ‖ before anchoring
    skipped: torch.Tensor  # (n,) bool: ‖m + δ‖ > skip_factor · ν, so v = m


def anchor_values(
    values: torch.Tensor,
    initial: torch.Tensor,
    mlp_outputs: torch.Tensor,
    anchor: float,
    skip_factor: float,
) -> AnchoredValues:
    """NAS on a batch of targets, row by row as the reference's ``compute_z``.

    Args:
        values: h + δ, the optimised targets at the target layer ``(n, d)``.
        initial: h, the target layer's output before the edit ``(n, d)``.
        mlp_outputs: m, the target layer's MLP output ``(n, d)``.
        anchor: ν.
        skip_factor: Above ``skip_factor`` · ν, v = m.

    v = m + δ (δ = values − initial) becomes m if ‖v‖ > ``skip_factor`` · ν, else
    v · ν / (‖v‖ + 1e-10); a zero v and ν ≤ 0 leave v as it is (the reference's
    ``scale_vector_to_norm``). The target is (h − m) + v.
    """
    mlp = mlp_outputs.to(values)
    value = (values - initial) + mlp
    norms = value.norm(dim=-1)
    if anchor <= 0:  # no anchor: the reference neither skips nor scales
        skipped = torch.zeros_like(norms, dtype=torch.bool)
        anchored = value
    else:
        skipped = norms > skip_factor * anchor
        denominator = norms + EPS
        scaled = value * (anchor / denominator)[:, None]
        scaled = torch.where((denominator <= EPS)[:, None], value, scaled)
        anchored = torch.where(skipped[:, None], mlp, scaled)
    return AnchoredValues((initial - mlp) + anchored, norms, skipped)


def upper_trimmed_mean(norms: torch.Tensor, upper_quantile: float) -> float:
    """Mean of ``norms`` without the largest ⌊(1 − ``upper_quantile``) · n⌋ (in float64).

    The reference's ``_upper_trimmed_mean``; a non-finite norm is an error.
    """
    values = norms.detach().double().flatten().cpu()
    if values.numel() == 0:
        raise ValueError("NAS: no v* norms to average")
    if not torch.isfinite(values).all():
        raise ValueError("NAS: non-finite v* norm while measuring the anchor")
    values = values.sort().values
    drop = int(math.floor((1.0 - float(upper_quantile)) * values.numel()))
    kept = values[: values.numel() - drop] if drop > 0 else values
    if kept.numel() == 0:
        raise ConfigError(
            f"NAS: every v* norm was trimmed; raise {editor_flag('nas.upper_quantile')}"
        )
    return float(kept.mean())


def sample_requests(requests: Sequence[EditRequest], count: int, seed: int) -> list[EditRequest]:
    """``count`` requests drawn with ``random.Random(seed).sample``, the reference's draw; all of
    them, in order, when there are not more than ``count``."""
    if count >= len(requests):
        return list(requests)
    return random.Random(seed).sample(list(requests), count)


def anchor_requests(options: NASOptions, seed: int) -> list[EditRequest]:
    """The requests ν is measured on: ``options.requests`` loaded, ``num_requests`` sampled."""
    try:
        pool = load_requests(options.requests)
    except UserInputError as error:
        raise ConfigError(
            f"{editor_flag('nas.requests')} ({options.requests!r}): {error}"
        ) from error
    return sample_requests(pool, options.num_requests, seed)


def mlp_outputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    layer: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """m: block ``layer``'s MLP output (its out-projection's output, which the block adds to
    the residual stream) at the subject's last token of each bare prompt, ``(n, d)`` float32."""
    name = architecture_of(model).mlp_out_name(layer)
    bare = [encode_with_subject(tokenizer, r.prompt, r.subject) for r in requests]
    return gather_at_subject(model, tokenizer, bare, [name], read="output", batch_size=batch_size)[
        name
    ]
