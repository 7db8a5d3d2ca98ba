"""Zero-shot multiple choice by log-likelihood: how likely is each answer option after a prompt."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.editors.hooks import model_device, pad_batch


def option_token_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], options: Sequence[str]
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Token ids of each prompt, and of each option as it continues that prompt.

    An option's tokens are those that ``prompt + option`` has beyond the prompt's own tokens, so a
    BOS the tokenizer adds stays with the prompt and tokenizers that mark word starts (a
    SentencePiece "▁") see the option where it really is. Where the prompt's tokens are not a
    prefix of the joint text's (a merge across the boundary), the option is tokenised on its own.

    Returns:
        ``(prompt_ids, continuation_ids)`` with ``continuation_ids[i][k]`` the tokens of option
        ``k`` after prompt ``i``.
    """
    prompt_ids = [list(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    alone = [list(ids) for ids in tokenizer(list(options), add_special_tokens=False)["input_ids"]]
    for option, ids in zip(options, alone, strict=True):
        if not ids:
            raise ValueError(f"Option {option!r} tokenises to nothing")
    joint_texts = [prompt + option for prompt in prompts for option in options]
    joint = tokenizer(joint_texts)["input_ids"] if joint_texts else []
    continuations = []
    for i, p in enumerate(prompt_ids):
        if not p:
            raise ValueError(
                f"Prompt {i} ({prompts[i]!r}) tokenises to nothing, so the first token of an "
                "option has no context; give a non-empty prompt or a tokenizer that adds a BOS"
            )
        row = []
        for k in range(len(options)):
            ids = list(joint[i * len(options) + k])
            row.append(ids[len(p) :] if len(ids) > len(p) and ids[: len(p)] == p else alone[k])
        continuations.append(row)
    return prompt_ids, continuations


def _truncate_left(ids: list[int], max_length: int | None, bos_id: int | None) -> list[int]:
    """Keep the last ``max_length`` tokens (and a leading BOS, if there was one)."""
    if max_length is None or len(ids) <= max_length:
        return ids
    if bos_id is not None and ids[0] == bos_id:
        return [bos_id] + ids[len(ids) - max_length + 1 :]
    return ids[len(ids) - max_length :]


@torch.no_grad()
def score_options(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    options: Sequence[str],
    batch_size: int = 16,
    *,
    progress: bool = False,
    desc: str = "Scoring options",
) -> torch.Tensor:
    """Log-likelihood of every answer option after every prompt, ``(len(prompts), len(options))``.

    Entry ``[i, k]`` is the sum of the log-probabilities of option ``k``'s tokens, teacher-forced
    after prompt ``i`` (see :func:`option_token_ids` for how the tokens are found). Sequences are
    right-padded and run ``batch_size`` at a time with the model in eval mode (its mode is
    restored after); options whose tokens before the last one agree (every single-token option)
    share one sequence, so scoring K one-token options costs one forward pass per prompt. The head
    is applied only at the positions that predict option tokens, as in
    :func:`sphere_lightning.evaluation.score_continuations`, so no (batch, length, vocabulary)
    tensor is built. A sequence longer than the model's ``max_position_embeddings`` loses
    prompt tokens from the left (a leading BOS is kept).

    Args:
        model: A causal LM (``base_model`` gives the final hidden states, the output embedding
            turns them into logits).
        tokenizer: Its tokenizer; a BOS is used exactly where the tokenizer adds one.
        prompts: The prompts, each ending where the answer starts (options carry their leading
            space, e.g. ``" positive"``).
        options: The answer options, shared by all prompts.
        batch_size: Sequences per forward pass.
        progress: Show a tqdm bar (``leave=False``) over the batches.
        desc: The bar's label.

    Returns:
        A float32 CPU tensor of summed log-probabilities (≤ 0).
    """
    if not options:
        raise ValueError("`options` should hold at least one answer option")
    if batch_size < 1:
        raise ValueError(f"`batch_size` should be ≥ 1, got {batch_size}")
    scores = torch.zeros(len(prompts), len(options))
    if not prompts:
        return scores
    prompt_ids, continuations = option_token_ids(tokenizer, prompts, options)
    max_length = getattr(model.config, "max_position_embeddings", None)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:  # padded positions are masked, any id will do
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    # One sequence per (prompt, distinct option prefix): prompt + option[:-1] predicts every token
    # of every option that continues that prefix.
    sequences: list[tuple[list[int], list[tuple[int, int, list[int]]]]] = []
    for i, (p, row) in enumerate(zip(prompt_ids, continuations, strict=True)):
        groups: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
        for k, cont in enumerate(row):
            groups.setdefault(tuple(cont[:-1]), []).append((i, k, cont))
        for prefix, members in groups.items():
            ids = _truncate_left(p + list(prefix), max_length, tokenizer.bos_token_id)
            sequences.append((ids, members))
    # Longest first: similar lengths share a batch (less padding) and memory peaks at once.
    sequences.sort(key=lambda item: -len(item[0]))

    device = model_device(model)
    head = model.get_output_embeddings()
    was_training = model.training
    model.eval()
    flat = scores.view(-1)
    try:
        starts = range(0, len(sequences), batch_size)
        for start in tqdm(starts, desc=desc, leave=False, disable=not progress):
            chunk = sequences[start : start + batch_size]
            ids, mask = pad_batch([seq for seq, _ in chunk], pad_id, device)
            hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
            hidden = hidden.last_hidden_state
            rows, cols, tokens, owners = [], [], [], []
            for row, (seq, members) in enumerate(chunk):
                for i, k, cont in members:
                    first = len(seq) - len(cont)  # the position that predicts cont[0]
                    rows += [row] * len(cont)
                    cols += range(first, first + len(cont))
                    tokens += cont
                    owners += [i * len(options) + k] * len(cont)
            logits = head(
                hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
            )
            token_logprob = (
                logits.float()
                .log_softmax(-1)
                .gather(1, torch.tensor(tokens, device=device)[:, None])
                .squeeze(1)
            )
            flat.index_add_(0, torch.tensor(owners), token_logprob.cpu())
    finally:
        model.train(was_training)
    return scores
