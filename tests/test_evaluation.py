"""Edit metrics against a naive one-sequence-at-a-time computation."""

from __future__ import annotations

import dataclasses

import torch

from sphere_lightning.evaluation import counterfact_scores, score_continuations, zsre_scores


def _naive(model, tokenizer, prompt: str, target: str) -> tuple[float, float]:
    p = tokenizer(prompt)["input_ids"]
    t = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p + t])).logits[0]
    logprobs = logits.log_softmax(-1)
    lp = [logprobs[len(p) - 1 + k, tok].item() for k, tok in enumerate(t)]
    hits = [float(logits[len(p) - 1 + k].argmax() == tok) for k, tok in enumerate(t)]
    return sum(lp) / len(lp), sum(hits) / len(hits)


def test_score_continuations_matches_naive(tiny_llama, tokenizer):
    prompts = ["The capital of France is", "Lionel Messi plays the sport of", "Toyota is in"]
    targets = ["Paris", "soccer basketball", "Japan"]
    logprob, accuracy = score_continuations(tiny_llama, tokenizer, prompts, targets, batch_size=2)
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        lp, acc = _naive(tiny_llama, tokenizer, p, t)
        assert abs(logprob[i].item() - lp) < 1e-4
        assert accuracy[i].item() == acc


def test_counterfact_scores_follow_the_definitions(tiny_gpt2, tokenizer, requests):
    scores = counterfact_scores(tiny_gpt2, tokenizer, requests, batch_size=3)
    for i, r in enumerate(requests):
        new, _ = _naive(tiny_gpt2, tokenizer, r.filled_prompt, r.target_new)
        true, _ = _naive(tiny_gpt2, tokenizer, r.filled_prompt, r.target_true)
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
    _, expected = _naive(tiny_llama, tokenizer, "Honda was founded in the country of", "Japan")
    assert scores["specificity"][0].item() == expected
    _, expected = _naive(tiny_llama, tokenizer, request.filled_prompt, "Germany")
    assert scores["efficacy"][0].item() == expected
