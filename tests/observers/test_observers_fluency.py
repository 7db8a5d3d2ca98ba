"""ROME's n-gram entropy against hand arithmetic and a literal re-implementation; ROME's
top-k sampled generations against a literal ``generate_fast``; the greedy variant, labelled."""

from __future__ import annotations

import dataclasses
import math
import unicodedata
from collections import Counter

import numpy as np
import pytest
import torch

from sphere_lightning.fluency import (
    FLUENCY_PROTOCOLS,
    REPORTED_SCALE,
    greedy_generations,
    measure_fluency,
    ngram_entropy,
    resolve_fluency_protocol,
    text_ngram_entropy,
    top_k_generations,
    word_tokens,
)

PROSE = """\
The city of Paris is the capital of France and it is known for the Eiffel Tower.
In the morning we walked along the river and talked about music, art and history.
He plays soccer on Sunday and she plays basketball or tennis after school.
The headquarters of the company is located in the city of Tokyo, not Seoul.
It's a cold day; the train hasn't arrived, and the station's old bridge is closed...
"""


def test_ngram_entropy_of_a_known_string_by_hand():
    # "the cat the cat the dog": 6 tokens.
    # 2-grams: (the cat)×2, (cat the)×2, (the dog)×1 → p = 2/5, 2/5, 1/5
    #   H₂ = −2·0.4·log2(0.4) − 0.2·log2(0.2) = 0.8·(log2 5 − 1) + 0.2·log2 5 = log2 5 − 0.8
    #      = 2.321928 − 0.8 = 1.521928 bits
    # 3-grams: (the cat the)×2, (cat the cat)×1, (cat the dog)×1 → p = 1/2, 1/4, 1/4
    #   H₃ = 0.5·1 + 0.25·2 + 0.25·2 = 1.5 bits
    # ROME: mean(H₂·2/3, H₃·4/3) = (1.014619 + 2.0) / 2 = 1.507309
    expected = ((math.log2(5) - 0.8) * 2 / 3 + 1.5 * 4 / 3) / 2
    assert expected == pytest.approx(1.5073094, abs=1e-7)
    assert text_ngram_entropy("the cat the cat the dog") == pytest.approx(expected, abs=1e-12)
    # "Paris." is two tokens: one 2-gram (H₂ = 0) and no 3-gram (0, as ROME's empty FreqDist).
    assert text_ngram_entropy("Paris.") == 0.0
    # The score over texts is the plain mean.
    assert ngram_entropy(["the cat the cat the dog", "Paris."]) == pytest.approx(expected / 2)


def _rome_formula(text: str) -> float:
    """ROME's compute_n_gram_entropy, line for line, over ``word_tokens`` instead of nltk."""
    entropy_list = []
    tokens = word_tokens(text)
    for n in [2, 3]:
        fdist = Counter(zip(*[tokens[i:] for i in range(n)], strict=False))
        freqs = np.array([freq for _, freq in fdist.items()], dtype=float)
        freqs = freqs / freqs.sum()
        entropy_list.append(np.sum(-freqs * np.log(freqs) / np.log(2)))
    return float(np.mean(np.array(entropy_list) * np.array([2 / 3, 4 / 3])))


def test_ngram_entropy_matches_romes_formula_on_prose():
    texts = [line for line in PROSE.splitlines() if line] + [PROSE]
    for text in texts:
        assert text_ngram_entropy(text) == pytest.approx(_rome_formula(text), abs=1e-12)
    assert ngram_entropy(texts) == pytest.approx(np.mean([_rome_formula(t) for t in texts]))


def test_repetition_lowers_ngram_entropy():
    assert ngram_entropy(["Paris " * 30]) < ngram_entropy([PROSE.splitlines()[0]])


def test_word_tokens_follow_treebank_on_prose():
    text = "I don't think Messi's well-known goal cost $1,000... really? Yes: it did."
    assert word_tokens(text) == [
        "I", "do", "n't", "think", "Messi", "'s", "well-known", "goal", "cost", "$", "1,000",
        "...", "really", "?", "Yes", ":", "it", "did", ".",
    ]  # fmt: skip


def test_ngram_entropy_rejects_no_texts():
    with pytest.raises(ValueError, match="empty"):
        ngram_entropy([])


@pytest.mark.parametrize("tiny_model", ["gpt2", "llama"], indirect=True)
def test_greedy_generations_batched_equals_one_by_one(tiny_model, tokenizer):
    prompts = ["The city of Paris is", "Toyota was founded in the country of", "I think"]
    batched = greedy_generations(tiny_model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = greedy_generations(tiny_model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    assert batched == single
    assert all(text.startswith(p) for text, p in zip(batched, prompts, strict=True))
    continuations = greedy_generations(
        tiny_model, tokenizer, prompts, max_new_tokens=6, batch_size=2, include_prompt=False
    )
    for text, prompt, continuation in zip(batched, prompts, continuations, strict=True):
        assert text.split() == (prompt + " " + continuation).split()
    assert tokenizer.padding_side == "right"  # restored


def test_greedy_generations_rejects_bad_arguments(tiny_llama, tokenizer):
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generations(tiny_llama, tokenizer, ["The"], max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        greedy_generations(tiny_llama, tokenizer, ["The"], batch_size=0)


# ---------------------------------------------------------------------------- ROME's sampling

GENERATION_PROMPTS = [
    "The city of Paris is",
    "Toyota was founded in the country of",
    "I think",
    "After the war the family moved to London, then to",
]


def _literal_generate_fast(model, tokenizer, prompts, top_k, max_out_len, n_gen, seed):
    """ROME's ``generate_fast`` one text at a time, without a cache or padding: top-k of the
    softmax, renormalised, sampled with the same seeded uniforms by inverse CDF."""
    rows = [p for p in prompts for _ in range(n_gen)]
    uniforms = torch.rand(
        (len(rows), max_out_len), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    texts = []
    for row, prompt in enumerate(rows):
        ids = tokenizer(prompt)["input_ids"]
        step = 0
        while len(ids) < max_out_len:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            softmax_out = torch.nn.functional.softmax(logits.float(), dim=0)
            tk = torch.topk(softmax_out, top_k).indices
            weights = softmax_out[tk] / softmax_out[tk].sum()
            cdf = torch.cumsum(weights.double(), 0)
            index = min(int((cdf < uniforms[row, step]).sum()), top_k - 1)
            ids.append(int(tk[index]))
            step += 1
        text = tokenizer.decode(ids, skip_special_tokens=True)
        texts.append(unicodedata.normalize("NFKD", text).replace("\n\n", " "))
    return texts


@pytest.mark.parametrize("tiny_model", ["gpt2", "llama"], indirect=True)
def test_top_k_generations_match_a_literal_generate_fast(tiny_model, tokenizer):
    expected = _literal_generate_fast(tiny_model, tokenizer, GENERATION_PROMPTS, 5, 14, 2, 3)
    got = top_k_generations(
        tiny_model,
        tokenizer,
        GENERATION_PROMPTS,
        top_k=5,
        max_out_len=14,
        n_gen_per_prompt=2,
        seed=3,
        batch_size=3,  # batches mix prompts of different lengths (left padding, KV cache)
    )
    assert got == expected
    for i, text in enumerate(got):
        assert text.startswith(GENERATION_PROMPTS[i // 2])
    assert tokenizer.padding_side == "right"  # restored


def test_top_k_generations_reproducible_and_seeded(tiny_llama, tokenizer):
    def sample(seed, batch_size):
        return top_k_generations(
            tiny_llama, tokenizer, GENERATION_PROMPTS, max_out_len=20, seed=seed,
            batch_size=batch_size,
        )  # fmt: skip

    first = sample(0, 4)
    assert sample(0, 4) == first
    assert sample(0, 1) == first  # independent of batching
    assert sample(1, 4) != first
    # max_out_len counts the prompt, as ROME's (special tokens sampled are dropped from the text)
    lengths = [len(tokenizer(t)["input_ids"]) for t in first]
    assert max(lengths) == 20 and min(lengths) > 15
    # A prompt already longer than max_out_len is returned as it is.
    long_prompt = GENERATION_PROMPTS[3]
    assert top_k_generations(tiny_llama, tokenizer, [long_prompt], max_out_len=3) == [long_prompt]


def test_top_k_generations_rejects_bad_arguments(tiny_llama, tokenizer):
    for name in ("top_k", "max_out_len", "n_gen_per_prompt", "batch_size"):
        with pytest.raises(ValueError, match=name):
            top_k_generations(tiny_llama, tokenizer, ["The"], **{name: 0})


# ---------------------------------------------------------------------------- protocols


def _with_generation_prompts(requests, prompts_per_fact=2):
    return [
        dataclasses.replace(
            r,
            generation_prompts=tuple(
                GENERATION_PROMPTS[(i + j) % len(GENERATION_PROMPTS)]
                for j in range(prompts_per_fact)
            ),
        )
        for i, r in enumerate(requests)
    ]


def test_rome_protocol_samples_the_generation_prompts(tiny_llama, tokenizer, requests):
    facts = _with_generation_prompts(requests[:3])
    score, protocol = measure_fluency(tiny_llama, tokenizer, facts, seed=7)
    assert protocol == "rome"
    # ROME: the mean entropy of each fact's texts (test_generation), then the mean over facts
    # (summarize.py), times 100.
    expected = []
    offset = 0
    prompts = [p for r in facts for p in r.generation_prompts]
    texts = top_k_generations(tiny_llama, tokenizer, prompts, seed=7)
    for r in facts:
        group = texts[offset : offset + len(r.generation_prompts)]
        offset += len(group)
        expected.append(np.mean([_rome_formula(t) for t in group]))
    assert score == pytest.approx(100 * np.mean(expected))
    assert measure_fluency(tiny_llama, tokenizer, facts, seed=7) == (score, "rome")
    # The edit prompts play no part; the generation prompts do.
    reworded = [dataclasses.replace(r, prompt="{} is") for r in facts]
    assert measure_fluency(tiny_llama, tokenizer, reworded, seed=7)[0] == score
    other = _with_generation_prompts(requests[:3], prompts_per_fact=1)
    assert measure_fluency(tiny_llama, tokenizer, other, seed=7)[0] != score


def test_greedy_protocol_is_labelled_and_uses_edit_prompts(tiny_llama, tokenizer, requests):
    facts = list(requests[:3])
    score, protocol = measure_fluency(tiny_llama, tokenizer, facts, greedy_max_new_tokens=8)
    assert protocol == "greedy"
    texts = greedy_generations(
        tiny_llama, tokenizer, [r.filled_prompt for r in facts], max_new_tokens=8
    )
    assert score == pytest.approx(REPORTED_SCALE * np.mean([_rome_formula(t) for t in texts]))
    assert FLUENCY_PROTOCOLS[protocol].startswith(
        "greedy generations from the edit prompts (ROME samples from generation_prompts)"
    )
    # Forced greedy on facts that do carry generation prompts.
    sampled = _with_generation_prompts(facts)
    forced = measure_fluency(tiny_llama, tokenizer, sampled, "greedy", greedy_max_new_tokens=8)
    assert forced == (score, "greedy")


def test_resolve_fluency_protocol(requests):
    sampled = _with_generation_prompts(requests)
    assert resolve_fluency_protocol("auto", sampled) == "rome"
    assert resolve_fluency_protocol("auto", requests) == "greedy"
    assert resolve_fluency_protocol("auto", [*sampled[:2], requests[2]]) == "greedy"
    assert resolve_fluency_protocol("greedy", sampled) == "greedy"
    with pytest.raises(ValueError, match=r"`model.fluency_protocol` is 'rome' but request 0"):
        resolve_fluency_protocol("rome", requests)
    with pytest.raises(ValueError, match=r"`model.fluency_protocol` should be .*'sampled'"):
        resolve_fluency_protocol("sampled", requests)
