"""Editing metrics: how the model scores an answer after a prompt.

CounterFact (ROME/MEMIT protocol) compares the mean per-token log-probability of ``target_new`` and
``target_true``; zsRE uses teacher-forced token accuracy of the answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.data.requests import EditRequest
from sphere_lightning.models.batching import encode_target
from sphere_lightning.scoring import ContinuationScores, padding_id, score_token_continuations


def score_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 64,
    *,
    progress: bool = False,
    desc: str = "Edit metrics",
) -> ContinuationScores:
    """Teacher-forced scores of each target after its prompt, the edit metrics' tokenisation.

    The prompt is tokenised as the tokenizer does by default (a BOS where it adds one) and the
    target with :func:`~sphere_lightning.models.batching.encode_target` (a leading space, no special
    tokens), as the editors see them. Scoring is
    :func:`~sphere_lightning.scoring.score_token_continuations`: a prompt shared by several
    targets runs once.

    Returns:
        :class:`~sphere_lightning.scoring.ContinuationScores` (``mean_logprob``,
        ``token_accuracy``, ``sum_logprob``), one entry per (prompt, target).
    """
    if len(prompts) != len(targets):
        raise ValueError(f"Got {len(prompts)} prompts but {len(targets)} targets")
    contexts = [list(ids) for ids in tokenizer(list(prompts))["input_ids"]] if prompts else []
    encoded: dict[str, list[int]] = {}
    continuations = [
        encoded[t] if t in encoded else encoded.setdefault(t, encode_target(tokenizer, t))
        for t in targets
    ]
    return score_token_continuations(
        model,
        contexts,
        continuations,
        batch_size,
        pad_id=padding_id(tokenizer),
        progress=progress,
        desc=desc,
    )


def counterfact_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    batch_size: int = 64,
    *,
    progress: bool = False,
    desc: str = "Edit metrics",
) -> dict[str, torch.Tensor]:
    """Per-request efficacy, generalization and specificity (each in [0, 1]).

    - efficacy: P(target_new) > P(target_true) on the edit prompt;
    - generalization: the fraction of paraphrase prompts where P(target_new) > P(target_true);
    - specificity: the fraction of neighborhood prompts where P(target_true) > P(target_new).

    P is the mean per-token probability in log space, as in ROME's CounterFact evaluation.
    """
    prompts, targets, owners, kinds = [], [], [], []
    for i, r in enumerate(requests):
        if r.target_true is None:
            raise ValueError(f"Request {r.case_id!r} has no target_true; CounterFact needs one")
        groups = [
            ("efficacy", [r.filled_prompt]),
            ("generalization", list(r.paraphrase_prompts)),
            ("specificity", list(r.neighborhood_prompts)),
        ]
        for kind, texts in groups:
            for text in texts:
                for target in (r.target_new, r.target_true):
                    prompts.append(text)
                    targets.append(target)
                    owners.append(i)
                    kinds.append(kind)
    logprob = score_continuations(
        model, tokenizer, prompts, targets, batch_size, progress=progress, desc=desc
    ).mean_logprob
    new_wins = (logprob[0::2] > logprob[1::2]).float()
    kinds = kinds[0::2]
    success = torch.where(torch.tensor([k == "specificity" for k in kinds]), 1 - new_wins, new_wins)
    return _per_request_mean(success, owners[0::2], kinds, len(requests))


def zsre_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    batch_size: int = 64,
    *,
    progress: bool = False,
    desc: str = "Edit metrics",
) -> dict[str, torch.Tensor]:
    """Per-request token accuracy on the edit prompt, its paraphrases and neighborhood prompts."""
    prompts, targets, owners, kinds = [], [], [], []
    for i, r in enumerate(requests):
        answers = r.neighborhood_answers or (r.target_true,) * len(r.neighborhood_prompts)
        items = [("efficacy", r.filled_prompt, r.target_new)]
        items += [("generalization", p, r.target_new) for p in r.paraphrase_prompts]
        items += [
            ("specificity", p, a)
            for p, a in zip(r.neighborhood_prompts, answers, strict=True)
            if a is not None
        ]
        for kind, prompt, target in items:
            prompts.append(prompt)
            targets.append(target)
            owners.append(i)
            kinds.append(kind)
    accuracy = score_continuations(
        model, tokenizer, prompts, targets, batch_size, progress=progress, desc=desc
    ).token_accuracy
    return _per_request_mean(accuracy, owners, kinds, len(requests))


def _per_request_mean(
    values: torch.Tensor, owners: list[int], kinds: list[str], num_requests: int
) -> dict[str, torch.Tensor]:
    """Average ``values`` per (kind, request); NaN where a request has no prompt of a kind."""
    owners_t = torch.tensor(owners, dtype=torch.long)
    scores = {}
    for kind in ("efficacy", "generalization", "specificity"):
        keep = torch.tensor([k == kind for k in kinds], dtype=torch.bool)
        total = torch.zeros(num_requests).index_add(0, owners_t[keep], values[keep].float())
        count = torch.zeros(num_requests).index_add(0, owners_t[keep], torch.ones(int(keep.sum())))
        scores[kind] = torch.where(count > 0, total / count.clamp_min(1), torch.nan)
    return scores


#: The edit-metric families: name (``--data.metric_family``) → scorer.
METRIC_FAMILIES = {"counterfact": counterfact_scores, "zsre": zsre_scores}
