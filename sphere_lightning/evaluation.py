"""Editing metrics: how the model scores an answer after a prompt.

CounterFact (ROME/MEMIT protocol) compares the mean per-token log-probability of ``target_new`` and
``target_true``; zsRE uses teacher-forced token accuracy of the answer; KnowEdit (EasyEdit's
protocol) adds portability (token accuracy on each probe family) and locality (the share of
answer tokens the edited model predicts as the unedited one did).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.data.formats import KNOWEDIT_FAMILIES, knowedit_metric_name
from sphere_lightning.data.requests import EditRequest
from sphere_lightning.models.batching import encode_target
from sphere_lightning.scoring import ContinuationScores, padding_id, score_token_continuations

#: The metrics of CounterFact and zsRE.
EDIT_METRICS: tuple[str, ...] = ("efficacy", "generalization", "specificity")


def score_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 64,
    *,
    progress: bool = False,
    desc: str = "Edit metrics",
    predictions: bool = False,
) -> ContinuationScores:
    """Teacher-forced scores of each target after its prompt, the edit metrics' tokenisation.

    The prompt is tokenised as the tokenizer does by default (a BOS where it adds one) and the
    target with :func:`~sphere_lightning.models.batching.encode_target` (a leading space, no special
    tokens), as the editors see them. Scoring is
    :func:`~sphere_lightning.scoring.score_token_continuations`: a prompt shared by several
    targets runs once.

    Returns:
        :class:`~sphere_lightning.scoring.ContinuationScores` (``mean_logprob``,
        ``token_accuracy``, ``sum_logprob``; ``predicted``, the argmax token at each target
        position, with ``predictions``), one entry per (prompt, target).
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
        predictions=predictions,
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


#: The unedited model's argmax tokens at each answer position of (prompt, answer) pairs:
#: ``unedited(prompts, answers)``, one tuple per pair (KnowEdit's locality compares them).
UneditedPredictions = Callable[[Sequence[str], Sequence[str]], Sequence[Sequence[int]]]


#: KnowEdit's metrics: EasyEdit's (edit success, rephrase accuracy as generalization,
#: portability and locality, overall and per family) and, where a fact has a ground truth, the
#: probability comparisons (efficacy, specificity).
KNOWEDIT_METRICS: tuple[str, ...] = (
    "edit_success",
    "generalization",
    "efficacy",
    "specificity",
    *(
        knowedit_metric_name(kind, family)
        for kind, families in KNOWEDIT_FAMILIES.items()
        for family in (None, *families)
    ),
)


def knowedit_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    batch_size: int = 64,
    *,
    unedited: UneditedPredictions,
    progress: bool = False,
    desc: str = "Edit metrics",
) -> dict[str, torch.Tensor]:
    """Per-request KnowEdit metrics, as EasyEdit's ``compute_edit_quality`` and the summary of
    its ``run_knowedit_llama2.py`` compute them (each in [0, 1]; NaN where a request has no
    prompt of a kind):

    - ``edit_success``: teacher-forced token accuracy of ``target_new`` after the edit prompt;
    - ``generalization``: the same after each ``rephrase`` prompt, averaged per fact;
    - ``portability_<family>``: token accuracy of each probe's answer after its prompt,
      averaged over the family's probes; ``portability``: the mean over the fact's families;
    - ``locality_<family>``: per probe, the share of answer positions where the model predicts
      the token the unedited model predicts (``unedited``), averaged over the family's probes;
      ``locality``: the mean over the fact's families;
    - where the fact has a ground truth other than ``target_new`` (``target_true``):
      ``efficacy``, the mean per-token probability of ``target_new`` above that of the ground
      truth after the edit prompt, and ``specificity``, each locality probe's answer still above
      ``target_new`` after the probe's prompt, averaged per fact.
    """
    pairs: list[tuple[str, str]] = []
    items: list[tuple[str, int, int]] = []  # (kind, owner, pair index)
    locality: list[tuple[str, int, int]] = []
    compared: list[tuple[str, int, int, int]] = []  # (kind, owner, preferred, other)

    def pair(prompt: str, target: str) -> int:
        pairs.append((prompt, target))
        return len(pairs) - 1

    for i, r in enumerate(requests):
        items.append(("edit_success", i, pair(r.filled_prompt, r.target_new)))
        items += [("generalization", i, pair(p, r.target_new)) for p in r.paraphrase_prompts]
        comparable = r.target_true is not None and r.target_true != r.target_new
        if comparable:
            compared.append(
                (
                    "efficacy",
                    i,
                    pair(r.filled_prompt, r.target_new),
                    pair(r.filled_prompt, r.target_true),
                )
            )
        for probe in r.probes:
            name = knowedit_metric_name(probe.kind, probe.family)
            index = pair(probe.prompt, probe.answer)
            if probe.kind == "portability":
                items.append((name, i, index))
            else:
                locality.append((name, i, index))
                if comparable:
                    compared.append(("specificity", i, index, pair(probe.prompt, r.target_new)))
    prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]
    scores = score_continuations(
        model,
        tokenizer,
        prompts,
        targets,
        batch_size,
        progress=progress,
        desc=desc,
        predictions=bool(locality),
    )
    values, owners, kinds = [], [], []
    accuracy = scores.token_accuracy
    for kind, owner, index in items:
        values.append(float(accuracy[index]))
        owners.append(owner)
        kinds.append(kind)
    if locality:
        before = unedited(
            [prompts[k] for _, _, k in locality], [targets[k] for _, _, k in locality]
        )
        for (kind, owner, index), old in zip(locality, before, strict=True):
            new = scores.predicted[index]
            values.append(sum(a == b for a, b in zip(new, old, strict=True)) / len(new))
            owners.append(owner)
            kinds.append(kind)
    logprob = scores.mean_logprob
    for kind, owner, preferred, other in compared:
        values.append(float(logprob[preferred] > logprob[other]))
        owners.append(owner)
        kinds.append(kind)
    result = _per_request_mean(torch.tensor(values), owners, kinds, len(requests), KNOWEDIT_METRICS)
    for kind, families in KNOWEDIT_FAMILIES.items():
        per_family = torch.stack([result[knowedit_metric_name(kind, f)] for f in families])
        result[kind] = per_family.nanmean(0)  # NaN where the fact has no probe of the kind
    return result


def _per_request_mean(
    values: torch.Tensor,
    owners: list[int],
    kinds: list[str],
    num_requests: int,
    names: Sequence[str] = EDIT_METRICS,
) -> dict[str, torch.Tensor]:
    """Average ``values`` per (kind, request) for each kind of ``names``; NaN where a request has
    no prompt of a kind."""
    owners_t = torch.tensor(owners, dtype=torch.long)
    scores = {}
    for kind in names:
        keep = torch.tensor([k == kind for k in kinds], dtype=torch.bool)
        total = torch.zeros(num_requests).index_add(0, owners_t[keep], values[keep].float())
        count = torch.zeros(num_requests).index_add(0, owners_t[keep], torch.ones(int(keep.sum())))
        scores[kind] = torch.where(count > 0, total / count.clamp_min(1), torch.nan)
    return scores


@dataclass(frozen=True)
class MetricFamily:
    """One way of scoring edits (``--data.metric_family``).

    Attributes:
        scores: ``scores(model, tokenizer, requests, batch_size, *, progress, desc[, unedited])``
            → per-request values of each metric.
        names: The metrics it returns (every one, NaN where a request has none).
        needs_unedited: It compares with the unedited model's predictions, passed as
            ``unedited`` (:data:`UneditedPredictions`).
    """

    scores: Callable[..., dict[str, torch.Tensor]]
    names: tuple[str, ...]
    needs_unedited: bool = False


#: The edit-metric families: name (``--data.metric_family``) → scorer.
METRIC_FAMILIES: dict[str, MetricFamily] = {
    "counterfact": MetricFamily(counterfact_scores, EDIT_METRICS),
    "zsre": MetricFamily(zsre_scores, EDIT_METRICS),
    "knowedit": MetricFamily(knowedit_scores, KNOWEDIT_METRICS, needs_unedited=True),
}

#: Every metric some family returns, in a fixed order (the module keeps one accumulator each).
ALL_EDIT_METRICS: tuple[str, ...] = tuple(
    dict.fromkeys(name for family in METRIC_FAMILIES.values() for name in family.names)
)
