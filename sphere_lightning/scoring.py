"""Teacher-forced scoring of token continuations: how likely is each continuation after its context.

One function serves the edit metrics (:mod:`sphere_lightning.evaluation`: mean log-probability for
CounterFact, token accuracy for zsRE) and the general-ability tasks
(:mod:`sphere_lightning.general.scoring`: summed log-probability of each answer option). Callers
tokenise; this module only sees token ids, so each caller keeps its own tokenisation rules.

The work is organised so that nothing is computed twice:

- every distinct context runs once, however many continuations follow it (identical contexts of
  different requests included); contexts are sorted by length and run ``batch_size`` at a time, so
  little padding is computed;
- a continuation's first token is predicted from the context's last position, so single-token
  continuations cost nothing beyond the context;
- the rest of a continuation runs from the context's key/value cache as a short *branch*
  (``continuation[:-1]``); continuations whose ``[:-1]`` is a prefix of another's share its branch;
- the LM head is applied only at positions that predict continuation tokens, so no
  ``(batch, length, vocabulary)`` tensor is built.

Log-probabilities are taken in float32 whatever the model's dtype.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.editors.hooks import model_device, pad_batch


@dataclass(frozen=True)
class ContinuationScores:
    """Per-continuation teacher-forced scores, float32 CPU tensors of one length.

    Attributes:
        sum_logprob: Σ log p(token | everything before it) over the continuation's tokens (≤ 0).
        num_correct: How many of its tokens are the argmax of the prediction at their position.
        num_tokens: How many tokens it has (≥ 1).
    """

    sum_logprob: torch.Tensor
    num_correct: torch.Tensor
    num_tokens: torch.Tensor

    @property
    def mean_logprob(self) -> torch.Tensor:
        """Mean per-token log-probability (the CounterFact comparison)."""
        return self.sum_logprob / self.num_tokens

    @property
    def token_accuracy(self) -> torch.Tensor:
        """Fraction of tokens predicted exactly under teacher forcing (the zsRE metric)."""
        return self.num_correct / self.num_tokens


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """A token id for padded positions: the pad token, else EOS, else 0 (they are masked)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


@dataclass
class _Context:
    """One distinct context, the branches run after it and the continuations it scores."""

    ids: list[int]
    branches: list[list[int]]
    #: (continuation index, branch index or -1 for a single-token continuation, its tokens)
    members: list[tuple[int, int, list[int]]]


def _group(
    contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
) -> list[_Context]:
    """Distinct contexts, each with the fewest branches that cover its continuations."""
    by_ids: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for index, (context, continuation) in enumerate(zip(contexts, continuations, strict=True)):
        if not context:
            raise ValueError(
                f"Context {index} is empty, so the first continuation token has no context"
            )
        if not continuation:
            raise ValueError(f"Continuation {index} is empty; every continuation needs a token")
        by_ids.setdefault(tuple(context), []).append((index, list(continuation)))
    grouped = []
    for ids, pairs in by_ids.items():
        branches: list[list[int]] = []
        members = []
        # Longest prefix first, so a shorter one finds the branch that already covers it.
        for index, continuation in sorted(pairs, key=lambda pair: -len(pair[1])):
            prefix = continuation[:-1]
            if not prefix:
                members.append((index, -1, continuation))
                continue
            branch = next(
                (b for b, ids_ in enumerate(branches) if ids_[: len(prefix)] == prefix), None
            )
            if branch is None:
                branches.append(prefix)
                branch = len(branches) - 1
            members.append((index, branch, continuation))
        grouped.append(_Context(list(ids), branches, members))
    return grouped


@torch.no_grad()
def score_token_continuations(
    model: PreTrainedModel,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    batch_size: int = 64,
    *,
    pad_id: int = 0,
    progress: bool = False,
    desc: str = "Scoring",
) -> ContinuationScores:
    """Teacher-forced log-probabilities and token hits of each continuation after its context.

    The model runs in eval mode (its mode is restored after). Equal contexts are run once; see the
    module docstring for how the work is shared. Results equal one unpadded forward pass of
    ``context + continuation`` per pair up to floating-point summation order.

    Args:
        model: A causal LM whose ``base_model`` returns the final hidden states and accepts a
            key/value cache, and whose output embedding turns them into logits.
        contexts: Token ids of each context (non-empty; a BOS, if any, included).
        continuations: Token ids of each continuation (non-empty), one per context.
        batch_size: Distinct contexts per forward pass. The branch pass after them holds one row
            per multi-token continuation branch of those contexts.
        pad_id: Token id written into padded positions (they are masked; any id will do).
        progress: Show a tqdm bar (``leave=False``) over the batches of contexts.
        desc: The bar's label.

    Returns:
        :class:`ContinuationScores` with one entry per pair.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` should be ≥ 1, got {batch_size}")
    if len(contexts) != len(continuations):
        raise ValueError(
            f"Got {len(contexts)} contexts but {len(continuations)} continuations; "
            "give one continuation per context"
        )
    grouped = _group(contexts, continuations)
    # Longest first: similar lengths share a batch (little padding) and memory peaks at once.
    grouped.sort(key=lambda c: -len(c.ids))
    sum_logprob = torch.zeros(len(contexts))
    num_correct = torch.zeros(len(contexts))
    num_tokens = torch.tensor([float(len(c)) for c in continuations])

    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(grouped), batch_size)
        for start in tqdm(starts, desc=desc, leave=False, disable=not progress):
            owners, logprob, correct = _score_batch(
                model, grouped[start : start + batch_size], pad_id
            )
            sum_logprob.index_add_(0, owners, logprob)
            num_correct.index_add_(0, owners, correct)
    finally:
        model.train(was_training)
    return ContinuationScores(sum_logprob, num_correct, num_tokens)


def _score_batch(
    model: PreTrainedModel, batch: list[_Context], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score every continuation of a batch of contexts; returns per-token (owner, logprob, hit)."""
    device = model_device(model)
    head = model.get_output_embeddings()
    lengths = torch.tensor([len(c.ids) for c in batch])
    ids, mask = pad_batch([c.ids for c in batch], pad_id, device)
    padded = bool((lengths != lengths[0]).any())
    has_branches = any(c.branches for c in batch)
    # Right padding never reaches a real position through causal attention, so the context pass
    # needs no mask; the branch pass does, because its rows continue at different lengths.
    out = model.base_model(input_ids=ids, use_cache=has_branches)

    # First tokens: predicted at each context's last position.
    owners, tokens, rows = [], [], []
    for row, context in enumerate(batch):
        for index, _, continuation in context.members:
            owners.append(index)
            tokens.append(continuation[0])
            rows.append(row)
    last = out.last_hidden_state[torch.arange(len(batch), device=device), lengths.to(device) - 1]
    logprob, correct = _token_scores(head(last), rows, tokens)
    results = [(owners, logprob, correct)]

    if has_branches:
        cache = getattr(out, "cache", None) or out.past_key_values
        results.append(_score_branches(model, batch, cache, lengths, mask, padded, pad_id))
    return (
        torch.tensor([o for owner, _, _ in results for o in owner], dtype=torch.long),
        torch.cat([lp for _, lp, _ in results]).cpu(),
        torch.cat([c for _, _, c in results]).cpu(),
    )


def _score_branches(
    model: PreTrainedModel,
    batch: list[_Context],
    cache: Cache,
    lengths: torch.Tensor,
    context_mask: torch.Tensor,
    padded: bool,
    pad_id: int,
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Run every branch from its context's cache; score tokens 1.. of the continuations."""
    device = context_mask.device
    branch_rows, branches = [], []
    first_row: list[int] = []  # index of each context's first branch in the branch pass
    for row, context in enumerate(batch):
        first_row.append(len(branches))
        branch_rows += [row] * len(context.branches)
        branches += context.branches
    branch_ids, branch_mask = pad_batch(branches, pad_id, device)
    select = torch.tensor(branch_rows, device=device)
    cache.batch_select_indices(select)  # one cache row per branch (rows repeat)
    kwargs = {}
    if padded:
        # Rows continue at their own context length, past the padding of shorter contexts.
        offsets = torch.arange(branch_ids.shape[1], device=device)
        kwargs["position_ids"] = lengths.to(device)[select, None] + offsets
        kwargs["attention_mask"] = torch.cat([context_mask[select], branch_mask], dim=1)
    # transformers renamed `past_key_values` to `cache` during 5.x.
    base = model.base_model
    kwargs[
        "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    ] = cache
    out = base(input_ids=branch_ids, use_cache=True, **kwargs)

    owners, tokens, positions = [], [], []
    for row, context in enumerate(batch):
        for index, branch, continuation in context.members:
            for k, token in enumerate(continuation[1:]):
                owners.append(index)
                tokens.append(token)
                positions.append((first_row[row] + branch, k))
    # Continuations that share a branch read their tokens from the same positions, so the head
    # runs once per distinct position.
    distinct = sorted(set(positions))
    where = {p: i for i, p in enumerate(distinct)}
    at = torch.tensor(distinct, device=device)
    logits = model.get_output_embeddings()(out.last_hidden_state[at[:, 0], at[:, 1]])
    logprob, correct = _token_scores(logits, [where[p] for p in positions], tokens)
    return owners, logprob, correct


def _token_scores(
    logits: torch.Tensor, rows: list[int], tokens: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability (float32) of ``tokens[j]`` under ``logits[rows[j]]``, and whether it is
    that row's argmax; the softmax runs once per row however many tokens read it."""
    device = logits.device
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    target = torch.tensor(tokens, dtype=torch.long, device=device)
    logits = logits.float()
    logprob = logits.log_softmax(-1)[rows_t, target]
    return logprob, (logits.argmax(-1)[rows_t] == target).float()
