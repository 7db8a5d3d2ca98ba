"""Editing metrics: how the model scores an answer after a prompt.

CounterFact (ROME/MEMIT protocol) compares the mean per-token log-probability of ``target_new`` and
``target_true``; zsRE uses teacher-forced token accuracy of the answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.data.requests import EditRequest
from sphere_lightning.editors.hooks import encode_target, model_device, pad_batch


@torch.no_grad()
def score_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token log-probability and teacher-forced token accuracy of each target.

    Returns two float tensors of length ``len(prompts)``.
    """
    device = model_device(model)
    head = model.get_output_embeddings()
    logprob, accuracy = [], []
    for start in range(0, len(prompts), batch_size):
        seqs, spans = [], []
        for prompt, target in zip(
            prompts[start : start + batch_size], targets[start : start + batch_size], strict=True
        ):
            p = tokenizer(prompt)["input_ids"]
            t = encode_target(tokenizer, target)
            seqs.append(p + t[:-1])
            spans.append((len(p) - 1, t))
        ids, mask = pad_batch(seqs, tokenizer.pad_token_id, device)
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        hidden = hidden.last_hidden_state
        rows = torch.cat([torch.full((len(t),), i) for i, (_, t) in enumerate(spans)]).to(device)
        cols = torch.cat([torch.arange(s, s + len(t)) for s, t in spans]).to(device)
        tokens = torch.cat([torch.tensor(t) for _, t in spans]).to(device)
        logits = head(hidden[rows, cols]).float()
        token_lp = logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        token_hit = (logits.argmax(-1) == tokens).float()
        counts = torch.tensor([len(t) for _, t in spans], device=device, dtype=torch.float)
        logprob.append(torch.zeros(len(spans), device=device).index_add(0, rows, token_lp) / counts)
        accuracy.append(
            torch.zeros(len(spans), device=device).index_add(0, rows, token_hit) / counts
        )
    return torch.cat(logprob).cpu(), torch.cat(accuracy).cpu()


def counterfact_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    batch_size: int = 64,
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
    logprob, _ = score_continuations(model, tokenizer, prompts, targets, batch_size)
    new_wins = (logprob[0::2] > logprob[1::2]).float()
    kinds = kinds[0::2]
    success = torch.where(torch.tensor([k == "specificity" for k in kinds]), 1 - new_wins, new_wins)
    return _per_request_mean(success, owners[0::2], kinds, len(requests))


def zsre_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    batch_size: int = 64,
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
    _, accuracy = score_continuations(model, tokenizer, prompts, targets, batch_size)
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


METRIC_FAMILIES = {"counterfact": counterfact_scores, "zsre": zsre_scores}
