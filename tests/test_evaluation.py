"""Edit metrics against a naive one-sequence-at-a-time computation."""

from __future__ import annotations

import dataclasses
from typing import get_args

import pytest
import torch

from sphere_lightning.data.datamodule import MetricFamily
from sphere_lightning.evaluation import (
    METRIC_FAMILIES,
    counterfact_scores,
    score_continuations,
    zsre_scores,
)


def _naive(model, tokenizer, prompt: str, target: str) -> tuple[float, float, float]:
    """Mean log-prob, token accuracy and summed log-prob from one unpadded full forward pass."""
    p = tokenizer(prompt)["input_ids"]
    text = target if target.startswith(" ") else " " + target
    t = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p + t])).logits[0]
    logprobs = logits.float().log_softmax(-1)
    lp = [logprobs[len(p) - 1 + k, tok].item() for k, tok in enumerate(t)]
    hits = [float(logits[len(p) - 1 + k].argmax() == tok) for k, tok in enumerate(t)]
    return sum(lp) / len(lp), sum(hits) / len(hits), sum(lp)


#: Prompts of different lengths, each with several targets: one- and multi-token, sharing a
#: first token (" the city of Rome" / " the king") or not; one prompt twice.
PROMPTS = [
    "The capital of France is",
    "Lionel Messi plays the sport of",
    "Toyota is in",
    "A small dog ran across the park while children were playing with a",
    "The capital of France is",
]
TARGETS = ["Paris", "soccer basketball", "the city of Rome", " the king", "Japan"]


@pytest.mark.parametrize("tiny_model", ["gpt2", "llama"], indirect=True)
@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_score_continuations_matches_naive(tiny_model, tokenizer, batch_size):
    prompts = [p for p in PROMPTS for _ in TARGETS]
    targets = TARGETS * len(PROMPTS)
    scores = score_continuations(tiny_model, tokenizer, prompts, targets, batch_size=batch_size)
    expected = torch.tensor(
        [_naive(tiny_model, tokenizer, p, t) for p, t in zip(prompts, targets, strict=True)]
    )
    assert (expected[:, 0] < 0).all()
    torch.testing.assert_close(scores.mean_logprob, expected[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.token_accuracy, expected[:, 1], atol=0, rtol=0)
    torch.testing.assert_close(scores.sum_logprob, expected[:, 2], atol=1e-5, rtol=0)


def test_counterfact_scores_follow_the_definitions(tiny_gpt2, tokenizer, requests):
    scores = counterfact_scores(tiny_gpt2, tokenizer, requests, batch_size=3)
    for i, r in enumerate(requests):
        new, *_ = _naive(tiny_gpt2, tokenizer, r.filled_prompt, r.target_new)
        true, *_ = _naive(tiny_gpt2, tokenizer, r.filled_prompt, r.target_true)
        assert scores["efficacy"][i].item() == float(new > true)
        wins = [
            _naive(tiny_gpt2, tokenizer, p, r.target_true)[0]
            > _naive(tiny_gpt2, tokenizer, p, r.target_new)[0]
            for p in r.neighborhood_prompts
        ]
        assert abs(scores["specificity"][i].item() - sum(wins) / len(wins)) < 1e-6


def test_zsre_scores_use_neighborhood_answers(tiny_llama, tokenizer, requests):
    # The Toyota request of the shared fixture, with an explicit neighborhood answer.
    request = dataclasses.replace(requests[2], neighborhood_answers=("Japan",))
    scores = zsre_scores(tiny_llama, tokenizer, [request])
    _, expected, _ = _naive(tiny_llama, tokenizer, "Honda was founded in the country of", "Japan")
    assert scores["specificity"][0].item() == expected
    _, expected, _ = _naive(tiny_llama, tokenizer, request.filled_prompt, "Germany")
    assert scores["efficacy"][0].item() == expected


def test_every_metric_family_of_the_data_module_has_a_scorer():
    assert set(get_args(MetricFamily)) == {"auto", *METRIC_FAMILIES}
