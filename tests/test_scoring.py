"""score_token_continuations against one unpadded full forward pass per (context, continuation)."""

from __future__ import annotations

import pytest
import torch

from sphere_lightning.scoring import (
    MAX_PADDING,
    MIN_SHARED_PREFIX,
    ContinuationScores,
    _batches,
    _Context,
    score_token_continuations,
)


def naive_scores(model, contexts, continuations) -> ContinuationScores:
    """The obvious computation: the whole LM on context + continuation, one pair at a time."""
    sums, hits = [], []
    for context, continuation in zip(contexts, continuations, strict=True):
        ids = torch.tensor([list(context) + list(continuation)])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
        positions = range(len(context) - 1, len(context) + len(continuation) - 1)
        sums.append(
            sum(logprobs[p, t].item() for p, t in zip(positions, continuation, strict=True))
        )
        hits.append(
            sum(
                float(logprobs[p].argmax() == t)
                for p, t in zip(positions, continuation, strict=True)
            )
        )
    return ContinuationScores(
        torch.tensor(sums), torch.tensor(hits), torch.tensor([float(len(c)) for c in continuations])
    )


def _cases(tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Contexts of different lengths (two repeated), continuations with and without shared
    prefixes, of one and several tokens."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    contexts = [
        ids("The city of Paris is the capital of"),
        ids("He plays"),
        ids("A small dog ran across the park while children were playing with a"),
        ids("We"),
    ]
    continuations = [
        ids(" France"),
        ids(" the city of Rome"),
        ids(" the city"),  # its [:-1] is a prefix of the branch above
        ids(" the king"),  # shares the first token only
        ids(" soccer and tennis"),
        ids(" music"),
    ]
    pairs = [(c, k) for c in contexts for k in continuations]
    pairs += [(contexts[1], continuations[1]), (contexts[2], continuations[4])]  # repeated pairs
    return [c for c, _ in pairs], [k for _, k in pairs]


def _greedy(model, context: list[int], length: int) -> list[int]:
    """The model's own greedy continuation (every token is its argmax: accuracy 1)."""
    ids = list(context)
    with torch.no_grad():
        for _ in range(length):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(context) :]


@pytest.mark.parametrize("tiny_model", ["gpt2", "llama"], indirect=True)
@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_matches_one_full_forward_per_pair(tiny_model, tokenizer, batch_size):
    contexts, continuations = _cases(tokenizer)
    # Continuations the model predicts fully and in part, so token accuracy is not all zeros.
    greedy = _greedy(tiny_model, contexts[0], 3)
    contexts += [contexts[0], contexts[0]]
    continuations += [greedy, greedy[:2] + [(greedy[2] + 1) % len(tokenizer)]]
    expected = naive_scores(tiny_model, contexts, continuations)
    assert (expected.sum_logprob < 0).all()
    assert expected.num_correct[-2:].tolist() == [3.0, 2.0]
    tiny_model.train()  # dropout on: scoring must switch to eval, then switch back
    scores = score_token_continuations(
        tiny_model, contexts, continuations, batch_size, pad_id=tokenizer.pad_token_id
    )
    assert tiny_model.training
    torch.testing.assert_close(scores.sum_logprob, expected.sum_logprob, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.mean_logprob, expected.mean_logprob, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.token_accuracy, expected.token_accuracy, atol=0, rtol=0)
    assert scores.num_tokens.tolist() == [len(c) for c in continuations]


@pytest.mark.parametrize("tiny_model", ["gpt2", "llama"], indirect=True)
def test_computes_each_context_once_and_the_head_only_where_tokens_are_predicted(
    tiny_model, tokenizer
):
    contexts, continuations = _cases(tokenizer)
    seen = {"tokens": 0, "head_rows": 0}

    def count_tokens(module, args, kwargs):
        seen["tokens"] += kwargs["input_ids"].numel()

    def count_rows(module, args):
        seen["head_rows"] += args[0].shape[0]

    tiny_model.base_model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    tiny_model.get_output_embeddings().register_forward_pre_hook(count_rows)
    score_token_continuations(tiny_model, contexts, continuations, batch_size=1)

    # Per distinct context (one per batch here, so no padding): its tokens once, then one
    # branch pass with a row per branch (the longest [:-1] among continuations that extend one
    # another): " the city of" (covering " the city" and " the king") and " soccer and", padded
    # to 3 tokens. The head: each context's last position and each real branch position.
    distinct = {tuple(c) for c in contexts}
    assert len(distinct) == 4 < len(contexts)
    assert seen["tokens"] == sum(len(c) for c in distinct) + 2 * 3 * len(distinct)
    assert seen["head_rows"] == len(distinct) + (3 + 2) * len(distinct)


def _shared_prefix_cases(tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Contexts that start with one instruction (a task's prompt template), of different
    lengths, one a prefix of another; continuations of one and several tokens."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    head = "I think you should read the letter before the meeting"
    assert len(ids(head)) > MIN_SHARED_PREFIX
    contexts = [
        ids(f"{head} starts tomorrow"),
        ids(f"{head} starts"),  # a prefix of the one above
        ids(f"{head} and the music stopped when the door"),
        ids(f"{head} in the morning"),
    ]
    continuations = [ids(" France"), ids(" the city of Rome"), ids(" the king"), ids(" music")]
    pairs = [(c, k) for c in contexts for k in continuations]
    return [c for c, _ in pairs], [k for _, k in pairs]


@pytest.mark.parametrize("tiny_model", ["gpt2", "llama"], indirect=True)
@pytest.mark.parametrize("batch_size", [2, 3, 64])
def test_shared_prefix_matches_one_full_forward_per_pair(tiny_model, tokenizer, batch_size):
    contexts, continuations = _shared_prefix_cases(tokenizer)
    expected = naive_scores(tiny_model, contexts, continuations)
    for share_prefix in (True, False):
        scores = score_token_continuations(
            tiny_model,
            contexts,
            continuations,
            batch_size,
            pad_id=tokenizer.pad_token_id,
            share_prefix=share_prefix,
        )
        torch.testing.assert_close(scores.sum_logprob, expected.sum_logprob, atol=1e-5, rtol=0)
        torch.testing.assert_close(scores.num_correct, expected.num_correct, atol=0, rtol=0)


@pytest.mark.parametrize("tiny_model", ["gpt2", "llama"], indirect=True)
def test_shared_prefix_runs_once_per_batch(tiny_model, tokenizer):
    contexts, continuations = _shared_prefix_cases(tokenizer)
    # Single-token continuations only, so there is no branch pass to count.
    single = [(c, k) for c, k in zip(contexts, continuations, strict=True) if len(k) == 1]
    contexts, continuations = [c for c, _ in single], [k for _, k in single]
    distinct = sorted({tuple(c) for c in contexts}, key=len)
    # Every row keeps one token of its own: the shortest context is the prefix plus one token.
    prefix = len(distinct[0]) - 1
    counts = []

    def count_tokens(module, args, kwargs):
        counts.append(kwargs["input_ids"].shape)

    tiny_model.base_model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    # One batch (padding allowed): the prefix once, then every row's own tokens, right-padded.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sphere_lightning.scoring.MAX_PADDING", 1.0)
        score_token_continuations(tiny_model, contexts, continuations, batch_size=64)
    longest = max(len(c) for c in distinct)
    assert counts == [(1, prefix), (len(distinct), longest - prefix)]
    counts.clear()
    score_token_continuations(tiny_model, contexts, continuations, 64, share_prefix=False)
    assert sum(rows * length for rows, length in counts) >= sum(len(c) for c in distinct)
    assert all(length > prefix for _, length in counts)


def test_batches_close_before_too_much_padding():
    def lengths(batches):
        return [[len(c.ids) for c in batch] for batch in batches]

    grouped = [_Context([0] * n, [], []) for n in (800, 300, 290, 280, 270, 100, 100, 100, 100)]
    batches = _batches(grouped, batch_size=3)
    # 800 alone (300 would make 500 of 1,600 padded tokens padding); then at most 3 a batch;
    # 100 after 270 would be far past the limit.
    assert lengths(batches) == [[800], [300, 290, 280], [270], [100, 100, 100], [100]]
    for batch in batches:
        padded = len(batch) * len(batch[0].ids)
        assert padded - sum(len(c.ids) for c in batch) <= MAX_PADDING * padded
    assert lengths(_batches(grouped, batch_size=1)) == [[n] for n in lengths([grouped])[0]]


def test_progress_bar(tiny_llama, tokenizer, capsys):
    contexts, continuations = _cases(tokenizer)
    score_token_continuations(tiny_llama, contexts, continuations, 2, desc="Scoring facts")
    assert "Scoring facts" not in capsys.readouterr().err
    score_token_continuations(
        tiny_llama, contexts, continuations, 2, progress=True, desc="Scoring facts"
    )
    assert "Scoring facts" in capsys.readouterr().err


def test_rejects_what_it_cannot_score(tiny_llama):
    with pytest.raises(ValueError, match="Context 1 is empty"):
        score_token_continuations(tiny_llama, [[5], []], [[6], [7]])
    with pytest.raises(ValueError, match="Continuation 0 is empty"):
        score_token_continuations(tiny_llama, [[5]], [[]])
    with pytest.raises(ValueError, match="2 contexts but 1 continuations"):
        score_token_continuations(tiny_llama, [[5], [6]], [[7]])
    with pytest.raises(ValueError, match="`batch_size` should be ≥ 1, got 0"):
        score_token_continuations(tiny_llama, [[5]], [[6]], batch_size=0)
    empty = score_token_continuations(tiny_llama, [], [])
    assert empty.sum_logprob.shape == (0,)
