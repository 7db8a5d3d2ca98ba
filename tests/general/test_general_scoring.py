"""score_options against a naive one-prompt, one-option-at-a-time loop on the tiny models.

The scoring itself (sharing prompts, branches, batching) is tested in ``tests/test_scoring.py``;
here the option tokenisation and truncation rules."""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import processors

from sphere_lightning.general import score_options

PROMPTS = [
    "The city of Paris is the capital of",
    "He plays",
    "A small dog ran across the park while children were playing with a",
    "We visited the",
    "The Eiffel Tower is located in the city of",
]
#: Options of one and several tokens, two sharing their first token (" the city ..." / " the king").
OPTIONS = [" France", " the city of Rome", " the king", " soccer and tennis", " music"]


def _with_bos(tokenizer):
    """A copy of the word-level tokenizer that prepends <bos> like Llama-3's does."""
    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)]
    )
    return tok


def _naive(model, tokenizer, prompts, options) -> torch.Tensor:
    """Full forward of prompt + option, summing log p(option token | everything before it)."""
    scores = torch.zeros(len(prompts), len(options))
    for i, prompt in enumerate(prompts):
        prompt_len = len(tokenizer(prompt)["input_ids"])
        for k, option in enumerate(options):
            ids = torch.tensor([tokenizer(prompt + option)["input_ids"]])
            with torch.no_grad():
                logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
            for position in range(prompt_len, ids.shape[1]):
                scores[i, k] += logprobs[position - 1, ids[0, position]]
    return scores


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
@pytest.mark.parametrize("tiny_model", ["gpt2", "llama"], indirect=True)
def test_score_options_matches_naive_loop(tiny_model, tokenizer, bos):
    tok = _with_bos(tokenizer) if bos else tokenizer
    assert (tok("He plays")["input_ids"][0] == tok.bos_token_id) == bos
    expected = _naive(tiny_model, tok, PROMPTS, OPTIONS)
    assert expected.shape == (5, 5) and (expected < 0).all()
    tiny_model.train()  # dropout on: score_options must switch to eval, then switch back
    for batch_size in (1, 3, 64):
        scores = score_options(tiny_model, tok, PROMPTS, OPTIONS, batch_size=batch_size)
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert tiny_model.training


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
def test_score_options_truncates_long_prompts_from_the_left(tiny_gpt2, tokenizer, bos):
    tok = _with_bos(tokenizer) if bos else tokenizer
    limit = tiny_gpt2.config.max_position_embeddings
    words = ("the river flows through the valley to the ocean and " * 20).split()
    assert len(words) > limit
    scores = score_options(tiny_gpt2, tok, [" ".join(words)], [" sea", " sun"])
    # One-token options are predicted from the prompt alone: its last `limit` tokens, the first
    # of them replaced by the BOS where the tokenizer adds one.
    ids = tok(" ".join(words))["input_ids"]
    kept = [tok.bos_token_id] + ids[-limit + 1 :] if bos else ids[-limit:]
    with torch.no_grad():
        last = tiny_gpt2(input_ids=torch.tensor([kept])).logits[0, -1].log_softmax(-1)
    option_ids = [tok(o, add_special_tokens=False)["input_ids"][0] for o in (" sea", " sun")]
    torch.testing.assert_close(scores[0], last[option_ids])


def test_score_options_rejects_what_it_cannot_score(tiny_llama, tokenizer):
    with pytest.raises(ValueError, match="tokenises to nothing"):
        score_options(tiny_llama, tokenizer, [""], [" Paris"])
    with pytest.raises(ValueError, match="at least one"):
        score_options(tiny_llama, tokenizer, ["He plays"], [])
    assert score_options(tiny_llama, tokenizer, [], [" Paris"]).shape == (0, 1)


#: Prompts that start with one instruction, as a task's template makes them (BoolQ's is 24
#: tokens of SmolLM2), with passages of different lengths after it.
TEMPLATE = "I think you should read the letter before the meeting starts tomorrow ."
TEMPLATED = [
    f"{TEMPLATE} {passage} the answer is"
    for passage in (
        "The city of Paris is the capital of France",
        "He plays soccer",
        "A small dog ran across the park while children were playing with a red ball",
        "We visited the museum",
    )
]


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
@pytest.mark.parametrize("tiny_model", ["gpt2", "llama"], indirect=True)
def test_score_options_with_a_shared_template_matches_naive_loop(tiny_model, tokenizer, bos):
    tok = _with_bos(tokenizer) if bos else tokenizer
    expected = _naive(tiny_model, tok, TEMPLATED, OPTIONS)
    seen = []
    hook = tiny_model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    for batch_size in (2, 3, 64):
        scores = score_options(tiny_model, tok, TEMPLATED, OPTIONS, batch_size=batch_size)
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    hook.remove()
    # The template (with the BOS, if any) ran on its own: a one-row pass of exactly its tokens.
    assert (1, len(tok(TEMPLATE)["input_ids"])) in seen
