"""ROME's n-gram entropy against hand arithmetic and a literal re-implementation; greedy text."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from sphere_lightning.fluency import (
    greedy_generations,
    ngram_entropy,
    text_ngram_entropy,
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
