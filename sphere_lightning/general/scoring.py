"""Zero-shot multiple choice by log-likelihood: how likely is each answer option after a prompt."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.scoring import padding_id, score_token_continuations


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
    after prompt ``i`` (see :func:`option_token_ids` for how the tokens are found). Scoring is
    :func:`~sphere_lightning.scoring.score_token_continuations`: each prompt runs once for all its
    options (single-token options cost nothing more; longer ones continue from the prompt's
    key/value cache), prompts sorted by length, the head applied only where an option token is
    predicted, the model in eval mode (its mode is restored after). A prompt + option longer than
    the model's ``max_position_embeddings`` loses prompt tokens from the left (a leading BOS is
    kept).

    Args:
        model: A causal LM (``base_model`` gives the final hidden states, the output embedding
            turns them into logits).
        tokenizer: Its tokenizer; a BOS is used exactly where the tokenizer adds one.
        prompts: The prompts, each ending where the answer starts (options carry their leading
            space, e.g. ``" positive"``).
        options: The answer options, shared by all prompts.
        batch_size: Prompts per forward pass.
        progress: Show a tqdm bar (``leave=False``) over the batches.
        desc: The bar's label.

    Returns:
        A float32 CPU tensor of summed log-probabilities (≤ 0).
    """
    if not options:
        raise ValueError("`options` should hold at least one answer option")
    if batch_size < 1:
        raise ValueError(f"`batch_size` should be ≥ 1, got {batch_size}")
    if not prompts:
        return torch.zeros(0, len(options))
    prompt_ids, continuations = option_token_ids(tokenizer, prompts, options)
    max_length = getattr(model.config, "max_position_embeddings", None)
    contexts, flat = [], []
    for p, row in zip(prompt_ids, continuations, strict=True):
        for cont in row:
            # Truncate the sequence the model sees (prompt + all but the last option token); the
            # context is what remains before the option.
            ids = _truncate_left(p + cont[:-1], max_length, tokenizer.bos_token_id)
            contexts.append(ids[: len(ids) - len(cont) + 1])
            flat.append(cont)
    scores = score_token_continuations(
        model,
        contexts,
        flat,
        batch_size,
        pad_id=padding_id(tokenizer),
        progress=progress,
        desc=desc,
    )
    return scores.sum_logprob.view(len(prompts), len(options))
