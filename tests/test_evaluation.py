"""Edit metrics against a naive one-sequence-at-a-time computation; KnowEdit's against EasyEdit."""

from __future__ import annotations

import copy
import dataclasses
from typing import get_args

import numpy as np
import pytest
import torch

from sphere_lightning.data.datamodule import MetricFamily
from sphere_lightning.data.formats import KNOWEDIT_FAMILIES
from sphere_lightning.data.requests import EditRequest, Probe
from sphere_lightning.evaluation import (
    KNOWEDIT_METRICS,
    METRIC_FAMILIES,
    counterfact_scores,
    knowedit_metric_name,
    knowedit_scores,
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


# ---------------------------------------------------------------------------- KnowEdit


def _slice_list(matrix, start_indices, left):
    """EasyEdit's ``slice_list`` (easyeditor/evaluate/evaluate_utils.py)."""
    if isinstance(matrix[0], list):
        if left:
            return [row[start - 1 : -1] for row, start in zip(matrix, start_indices, strict=True)]
        return [row[start:] for row, start in zip(matrix, start_indices, strict=True)]
    if left:
        return matrix[start_indices[0] - 1 : -1]
    return matrix[start_indices[0] :]


def easyedit_prediction_acc(model, tok, prompts, targets, locality=False):
    """EasyEdit's ``test_prediction_acc`` (evaluate_utils.py), its teacher-forced path: prompt +
    ' ' + target tokenised jointly and left padded, the argmax at each target position. Returns
    each prompt's token accuracy, or with ``locality`` the argmax token lists. (The model gets
    ``input_ids`` and ``attention_mask`` only: the test tokenizer also returns token type ids.)
    """
    if isinstance(prompts, str):
        prompts, targets = [prompts], [targets]
    prompt_target = [p + " " + t for p, t in zip(prompts, targets, strict=True)]
    max_prompt_len = max(len(tok.encode(x)) for x in prompt_target) + 1
    before_padding_side = tok.padding_side
    tok.padding_side = "left"
    try:
        options = {"padding": True, "truncation": True, "max_length": max(40, max_prompt_len)}
        prompt_target_tok = tok(prompt_target, return_tensors="pt", **options)
        prompt_tok = tok(prompts, return_tensors="pt", **options)
    finally:
        tok.padding_side = before_padding_side
    num_prompt_toks = [int((i != tok.pad_token_id).sum()) for i in prompt_tok["input_ids"]]
    num_pad_toks = [int((i == tok.pad_token_id).sum()) for i in prompt_target_tok["input_ids"]]
    prompt_len = [x + y for x, y in zip(num_pad_toks, num_prompt_toks, strict=True)]
    with torch.no_grad():
        logits = model(
            input_ids=prompt_target_tok["input_ids"],
            attention_mask=prompt_target_tok["attention_mask"],
        ).logits
    answers = torch.argmax(logits, dim=-1).squeeze().tolist()
    labels = prompt_target_tok["input_ids"].squeeze().tolist()
    answers = _slice_list(answers, prompt_len, left=True)
    labels = _slice_list(labels, prompt_len, left=False)
    if locality:
        return answers if type(answers[0]) is list else [answers]
    if isinstance(answers[0], list):
        res = []
        for ans, label in zip(answers, labels, strict=True):
            temp_acc = np.mean(np.equal(ans, label))
            if np.isnan(temp_acc):
                continue
            res.append(temp_acc)
        return res
    return [np.mean(np.equal(answers, labels))]


def _perturbed(model, scale: float = 0.2, layer: int = 1):
    """A copy of ``model`` with seeded noise added to one MLP down projection (an "edit")."""
    edited = copy.deepcopy(model)
    weight = edited.model.layers[layer].mlp.down_proj.weight
    with torch.no_grad():
        weight.add_(scale * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    return edited


def _argmax_word(model, tok, prompt: str) -> str:
    """The word ``model`` predicts after ``prompt`` (one token of the word-level vocabulary)."""
    with torch.no_grad():
        token = int(model(torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].argmax())
    word = tok.convert_ids_to_tokens(token)
    assert tok(" " + word, add_special_tokens=False)["input_ids"] == [token], word
    return word


def _predictions_of(model, tok):
    """``unedited`` for :func:`knowedit_scores`: ``model``'s argmax tokens on each answer."""
    return lambda p, a: score_continuations(model, tok, p, a, predictions=True).predicted


def _knowedit_requests(edited, tok) -> list[EditRequest]:
    """Four facts: every probe family, facts without portability / locality / paraphrases /
    ground truth, one whose ground truth is its new target, multi-token answers; some answers
    start with the edited model's own prediction so that accuracies are not all 0."""
    honda = "Honda was founded in the country of"
    nokia = "Nokia makes"
    return [
        EditRequest(
            case_id=0,
            subject="Toyota",
            prompt="{} was founded in the country of",
            target_new="Germany",
            target_true="Japan",
            paraphrase_prompts=("The company Toyota was founded in", "Toyota is in"),
            probes=(
                Probe(
                    "portability",
                    "Subject_Aliasing",
                    honda,
                    _argmax_word(edited, tok, honda) + " and Berlin",
                ),
                Probe(
                    "portability",
                    "Reasoning",
                    "The capital of the country Toyota was founded in is",
                    "Berlin",
                ),
                Probe("locality", "Relation_Specificity", "Toyota makes", "cars and phones"),
                Probe(
                    "locality",
                    "Relation_Specificity",
                    "The headquarters of the company is located in the city of",
                    "Tokyo",
                ),
            ),
        ),
        EditRequest(
            case_id=1,
            subject="Lionel Messi",
            prompt="{} plays the sport of",
            target_new="basketball",
            probes=(
                Probe(
                    "locality",
                    "Forgetfulness",
                    "Lionel Messi became famous as a",
                    "player and an actress",
                ),
            ),
        ),
        EditRequest(
            case_id=2,
            subject="Danielle Darrieux",
            prompt="The mother tongue of {} is",
            target_new="English",
            target_true="English",
            probes=(
                Probe(
                    "portability",
                    "Logical_Generalization",
                    "Danielle Darrieux speaks",
                    "English or French",
                ),
            ),
        ),
        EditRequest(
            case_id=3,
            subject="Nokia",
            prompt="{} makes",
            target_new=_argmax_word(edited, tok, nokia) + " phones",
            target_true="phones",
            paraphrase_prompts=("The company Nokia makes", nokia),
            probes=(
                Probe("portability", "Reasoning", "The city of Paris is the capital of", "France"),
                Probe("portability", "Reasoning", "Nokia and Honda make", "cars"),
                Probe(
                    "locality",
                    "Relation_Specificity",
                    "Nokia was founded in the country of",
                    "Japan",
                ),
                Probe("locality", "Forgetfulness", "The capital of France is", "the city of Paris"),
                Probe("locality", "Forgetfulness", "Toyota makes", "cars and phones"),
            ),
        ),
    ]


def _family_means(values: dict[str, list[float]]) -> float:
    """run_knowedit_llama2.py's per-fact value: the mean over the families of their means."""
    means = [float(np.mean(v)) for v in values.values() if v]
    return float(np.mean(means)) if means else float("nan")


def _assert_same(actual: torch.Tensor, expected: list[float], name: str) -> None:
    torch.testing.assert_close(
        actual.double(),
        torch.tensor(expected, dtype=torch.double),
        atol=1e-6,
        rtol=0,
        equal_nan=True,
        msg=name,
    )


def test_knowedit_scores_match_easyedit(tiny_llama, tokenizer):
    unedited, edited = tiny_llama, _perturbed(tiny_llama)
    requests = _knowedit_requests(edited, tokenizer)
    scores = knowedit_scores(
        edited, tokenizer, requests, batch_size=3, unedited=_predictions_of(unedited, tokenizer)
    )
    assert set(scores) == set(KNOWEDIT_METRICS)
    nan = float("nan")
    expected: dict[str, list[float]] = {name: [] for name in KNOWEDIT_METRICS}
    probe_localities = []
    for r in requests:
        (rewrite,) = easyedit_prediction_acc(edited, tokenizer, r.filled_prompt, r.target_new)
        expected["edit_success"].append(float(rewrite))
        paraphrases = list(r.paraphrase_prompts)
        rephrase = (
            easyedit_prediction_acc(
                edited, tokenizer, paraphrases, [r.target_new] * len(paraphrases)
            )
            if paraphrases
            else []
        )
        expected["generalization"].append(float(np.mean(rephrase)) if rephrase else nan)
        per_kind: dict[str, dict[str, list[float]]] = {"portability": {}, "locality": {}}
        for kind, families in KNOWEDIT_FAMILIES.items():
            for family in families:
                probes = [p for p in r.probes if (p.kind, p.family) == (kind, family)]
                prompts, answers = [p.prompt for p in probes], [p.answer for p in probes]
                if not probes:
                    values = []
                elif kind == "portability":  # one call per family, as compute_edit_quality
                    values = easyedit_prediction_acc(edited, tokenizer, prompts, answers)
                else:  # editor.py: pre-edit and post-edit outputs, compared token by token
                    pre = easyedit_prediction_acc(unedited, tokenizer, prompts, answers, True)
                    post = easyedit_prediction_acc(edited, tokenizer, prompts, answers, True)
                    values = [
                        float(np.mean(np.equal(a, b))) for a, b in zip(pre, post, strict=True)
                    ]
                    probe_localities += values
                per_kind[kind][family] = values
                expected[knowedit_metric_name(kind, family)].append(
                    float(np.mean(values)) if values else nan
                )
            expected[kind].append(_family_means(per_kind[kind]))
        if r.target_true is None or r.target_true == r.target_new:
            expected["efficacy"].append(nan)
            expected["specificity"].append(nan)
            continue
        new = _naive(edited, tokenizer, r.filled_prompt, r.target_new)[0]
        true = _naive(edited, tokenizer, r.filled_prompt, r.target_true)[0]
        expected["efficacy"].append(float(new > true))
        wins = [
            _naive(edited, tokenizer, p.prompt, p.answer)[0]
            > _naive(edited, tokenizer, p.prompt, r.target_new)[0]
            for p in r.probes
            if p.kind == "locality"
        ]
        expected["specificity"].append(float(np.mean(wins)) if wins else nan)

    # The check cannot pass trivially: some locality probes change in part, some accuracies
    # are neither 0 nor 1.
    assert any(0 < v < 1 for v in probe_localities), probe_localities
    assert any(
        0 < v < 1 for v in expected["portability_subject_aliasing"] + expected["edit_success"]
    )
    for name in KNOWEDIT_METRICS:
        _assert_same(scores[name], expected[name], name)
    # NaN exactly where a fact has nothing of a kind.
    assert scores["portability"].isnan().tolist() == [False, True, False, False]
    assert scores["locality"].isnan().tolist() == [False, False, True, False]
    assert scores["efficacy"].isnan().tolist() == [False, True, True, False]
    assert scores["generalization"].isnan().tolist() == [False, True, True, False]
    assert scores["portability_logical_generalization"].isnan().tolist() == [
        True,
        True,
        False,
        True,
    ]


def test_knowedit_locality_is_the_same_token_as_before_not_the_right_one(tiny_llama, tokenizer):
    unedited, edited = tiny_llama, _perturbed(tiny_llama)
    candidates = [
        "The headquarters of the company is located in the city of",
        "Toyota makes",
        "The capital of France is",
        "Lionel Messi became famous as a",
        "Nokia was founded in the country of",
        "The mother tongue of the actor was",
        "He plays soccer on",
    ]
    before = {p: _argmax_word(unedited, tokenizer, p) for p in candidates}
    after = {p: _argmax_word(edited, tokenizer, p) for p in candidates}
    changed = next(p for p in candidates if before[p] != after[p])
    kept = next(p for p in candidates if before[p] == after[p])
    other = next(w for w in ("Berlin", "Madrid", "London") if w != before[kept])
    probes = (
        Probe("locality", "Relation_Specificity", changed, after[changed]),  # now right
        Probe("locality", "Forgetfulness", changed, before[changed]),  # was right
        Probe("locality", "Forgetfulness", kept, other),  # wrong, before and after
    )
    request = EditRequest(0, "Toyota", "{} makes", "cars", probes=probes)
    scores = knowedit_scores(
        edited, tokenizer, [request], unedited=_predictions_of(unedited, tokenizer)
    )
    accuracy = score_continuations(
        edited, tokenizer, [p.prompt for p in probes], [p.answer for p in probes]
    ).token_accuracy
    assert accuracy.tolist() == [1.0, 0.0, 0.0]
    assert scores["locality_relation_specificity"].item() == 0.0  # right now, not before
    assert scores["locality_forgetfulness"].item() == 0.5  # (0 + 1) / 2: right before; wrong both
    assert scores["locality"].item() == 0.25
    # Scored against itself, every probe keeps its tokens.
    same = knowedit_scores(
        edited, tokenizer, [request], unedited=_predictions_of(edited, tokenizer)
    )
    assert same["locality"].item() == 1.0


def test_knowedit_scores_without_locality_probes_never_ask_for_the_unedited_model(
    tiny_llama, tokenizer
):
    def refuse(prompts, answers):
        raise AssertionError("no locality probe: the unedited predictions are not needed")

    request = EditRequest(
        0,
        "Toyota",
        "{} makes",
        "cars",
        probes=(Probe("portability", "Reasoning", "Honda makes", "cars"),),
    )
    scores = knowedit_scores(tiny_llama, tokenizer, [request], unedited=refuse)
    assert scores["locality"].isnan().item() and not scores["portability"].isnan().item()
