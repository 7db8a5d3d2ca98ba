"""Teacher-forced scoring of token continuations: how likely is each continuation after its context.

One function serves the edit metrics (:mod:`sphere_lightning.evaluation`: mean log-probability for
CounterFact, token accuracy for zsRE) and the general-ability tasks
(:mod:`sphere_lightning.general.scoring`: summed log-probability of each answer option). Callers
tokenise; this module only sees token ids, so each caller keeps its own tokenisation rules.

The work is organised so that nothing is computed twice:

- every distinct context runs once, however many continuations follow it (identical contexts of
  different requests included); contexts are sorted by length and run at most ``batch_size`` at a
  time, and a batch is closed early where the next context would make more than
  :data:`MAX_PADDING` of its tokens padding (one long outlier does not pad a whole batch);
- the tokens every context of a batch starts with (a task's instruction, a shared passage) run
  once, and the rest of each context continues from their key/value cache;
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

from sphere_lightning.models.batching import model_device, pad_batch


@dataclass(frozen=True)
class ContinuationScores:
    """Per-continuation teacher-forced scores, float32 CPU tensors of one length.

    Attributes:
        sum_logprob: Σ log p(token | everything before it) over the continuation's tokens (≤ 0).
        num_correct: How many of its tokens are the argmax of the prediction at their position.
        num_tokens: How many tokens it has (≥ 1).
        predicted: The argmax token at each of its positions (teacher forced), one tuple per
            continuation; only when asked for (``predictions=True``), else ``None``.
    """

    sum_logprob: torch.Tensor
    num_correct: torch.Tensor
    num_tokens: torch.Tensor
    predicted: tuple[tuple[int, ...], ...] | None = None

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


#: Most a batch's padding may be of its padded tokens; a context that would make it more opens a
#: new batch (only ``batch_size`` caps a batch of equal lengths).
MAX_PADDING = 0.125

#: Shortest common prefix of a batch's contexts that is run once for all of them; shorter ones
#: are not worth the extra forward call.
MIN_SHARED_PREFIX = 4


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
    share_prefix: bool = True,
    predictions: bool = False,
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
        batch_size: Most distinct contexts per forward pass (fewer where padding would exceed
            :data:`MAX_PADDING`). The branch pass after them holds one row per multi-token
            continuation branch of those contexts.
        pad_id: Token id written into padded positions (they are masked; any id will do).
        progress: Show a tqdm bar (``leave=False``) over the batches of contexts.
        desc: The bar's label.
        share_prefix: Run the tokens every context of a batch starts with once (at least
            :data:`MIN_SHARED_PREFIX` of them); ``False`` runs each context whole.
        predictions: Also return the argmax token at every continuation position
            (``ContinuationScores.predicted``; KnowEdit's locality compares them).

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
    batches = _batches(grouped, batch_size)
    sum_logprob = torch.zeros(len(contexts))
    num_correct = torch.zeros(len(contexts))
    num_tokens = torch.tensor([float(len(c)) for c in continuations])
    predicted = [[0] * len(c) for c in continuations] if predictions else None

    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc=desc, leave=False, disable=not progress):
            owners, logprob, correct, argmax, offsets = _score_batch(
                model, batch, pad_id, share_prefix
            )
            sum_logprob.index_add_(0, owners, logprob)
            num_correct.index_add_(0, owners, correct)
            if predicted is not None:
                for owner, offset, token in zip(
                    owners.tolist(), offsets, argmax.tolist(), strict=True
                ):
                    predicted[owner][offset] = token
    finally:
        model.train(was_training)
    return ContinuationScores(
        sum_logprob,
        num_correct,
        num_tokens,
        None if predicted is None else tuple(tuple(p) for p in predicted),
    )


def _batches(grouped: list[_Context], batch_size: int) -> list[list[_Context]]:
    """Consecutive runs of the (longest-first) contexts: at most ``batch_size`` each, and closed
    before a context that would make more than :data:`MAX_PADDING` of the padded tokens padding."""
    batches: list[list[_Context]] = []
    real = 0
    for context in grouped:
        batch = batches[-1] if batches else None
        if batch is not None and len(batch) < batch_size:
            padded = (len(batch) + 1) * len(batch[0].ids)
            if padded - real - len(context.ids) <= MAX_PADDING * padded:
                batch.append(context)
                real += len(context.ids)
                continue
        batches.append([context])
        real = len(context.ids)
    return batches


def _common_prefix_length(sequences: list[list[int]]) -> int:
    """How many leading tokens all ``sequences`` share."""
    first, length = sequences[0], min(len(s) for s in sequences)
    for sequence in sequences[1:]:
        k = 0
        while k < length and sequence[k] == first[k]:
            k += 1
        length = k
    return length


def _cache_kwarg(base: torch.nn.Module) -> str:
    # transformers renamed `past_key_values` to `cache` during 5.x.
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _run_contexts(
    model: PreTrainedModel, contexts: list[list[int]], pad_id: int, use_cache: bool, share: bool
):
    """The base model's output over right-padded ``contexts``; where they share a long enough
    prefix (``share``), the prefix runs once and each row continues from its cache.

    Right padding never reaches a real position through causal attention, and every row's
    suffix starts at the same position, so neither pass needs an attention mask.
    """
    device = model_device(model)
    base = model.base_model
    prefix = _common_prefix_length(contexts) if share and len(contexts) > 1 else 0
    # Every row keeps at least one token of its own, where its next-token prediction is read.
    prefix = min(prefix, min(len(c) for c in contexts) - 1)
    if prefix < MIN_SHARED_PREFIX:
        ids, _ = pad_batch(contexts, pad_id, device)
        return base(input_ids=ids, use_cache=use_cache), 0
    shared = base(input_ids=torch.tensor([contexts[0][:prefix]], device=device), use_cache=True)
    cache = getattr(shared, "cache", None) or shared.past_key_values
    cache.batch_repeat_interleave(len(contexts))
    ids, _ = pad_batch([c[prefix:] for c in contexts], pad_id, device)
    return base(input_ids=ids, use_cache=True, **{_cache_kwarg(base): cache}), prefix


def _score_batch(
    model: PreTrainedModel, batch: list[_Context], pad_id: int, share_prefix: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Score every continuation of a batch of contexts; returns per-token (owner, logprob, hit,
    argmax token, position in its continuation)."""
    device = model_device(model)
    head = model.get_output_embeddings()
    lengths = torch.tensor([len(c.ids) for c in batch])
    _, mask = pad_batch([c.ids for c in batch], pad_id, device)
    padded = bool((lengths != lengths[0]).any())
    has_branches = any(c.branches for c in batch)
    # The branch pass needs a mask, because its rows continue at different lengths.
    out, prefix = _run_contexts(model, [c.ids for c in batch], pad_id, has_branches, share_prefix)

    # First tokens: predicted at each context's last position.
    owners, tokens, rows = [], [], []
    for row, context in enumerate(batch):
        for index, _, continuation in context.members:
            owners.append(index)
            tokens.append(continuation[0])
            rows.append(row)
    last_position = lengths.to(device) - 1 - prefix
    last = out.last_hidden_state[torch.arange(len(batch), device=device), last_position]
    results = [(owners, *_token_scores(head(last), rows, tokens), [0] * len(owners))]

    if has_branches:
        cache = getattr(out, "cache", None) or out.past_key_values
        results.append(_score_branches(model, batch, cache, lengths, mask, padded, pad_id))
    return (
        torch.tensor([o for r in results for o in r[0]], dtype=torch.long),
        torch.cat([r[1] for r in results]).cpu(),
        torch.cat([r[2] for r in results]).cpu(),
        torch.cat([r[3] for r in results]).cpu(),
        [k for r in results for k in r[4]],
    )


def _score_branches(
    model: PreTrainedModel,
    batch: list[_Context],
    cache: Cache,
    lengths: torch.Tensor,
    context_mask: torch.Tensor,
    padded: bool,
    pad_id: int,
) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Run every branch from its context's cache; score tokens 1.. of the continuations
    (owner, logprob, hit, argmax token, position in the continuation)."""
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
    base = model.base_model
    kwargs[_cache_kwarg(base)] = cache
    out = base(input_ids=branch_ids, use_cache=True, **kwargs)

    owners, tokens, positions, offsets = [], [], [], []
    for row, context in enumerate(batch):
        for index, branch, continuation in context.members:
            for k, token in enumerate(continuation[1:]):
                owners.append(index)
                tokens.append(token)
                positions.append((first_row[row] + branch, k))
                offsets.append(k + 1)
    # Continuations that share a branch read their tokens from the same positions, so the head
    # runs once per distinct position.
    distinct = sorted(set(positions))
    where = {p: i for i, p in enumerate(distinct)}
    at = torch.tensor(distinct, device=device)
    logits = model.get_output_embeddings()(out.last_hidden_state[at[:, 0], at[:, 1]])
    return owners, *_token_scores(logits, [where[p] for p in positions], tokens), offsets


def _token_scores(
    logits: torch.Tensor, rows: list[int], tokens: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probability (float32) of ``tokens[j]`` under ``logits[rows[j]]``, whether it is
    that row's argmax, and the argmax; the softmax runs once per row however many tokens read
    it."""
    device = logits.device
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    target = torch.tensor(tokens, dtype=torch.long, device=device)
    logits = logits.float()
    logprob = logits.log_softmax(-1)[rows_t, target]
    argmax = logits.argmax(-1)[rows_t]
    return logprob, (argmax == target).float(), argmax
