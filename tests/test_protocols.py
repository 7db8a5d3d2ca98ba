"""The words ``summary.json`` uses for each edit metric's protocol, per layout and family."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from sphere_lightning.data.requests import EditRequest
from sphere_lightning.fluency import FLUENCY_PROTOCOLS
from sphere_lightning.protocols import edit_protocols


def _data(requests: list[EditRequest], data_format: str, family: str) -> SimpleNamespace:
    """What the summary passes: the data module's family, layout and requests."""
    return SimpleNamespace(metric_family=family, data_format=data_format, requests=requests)


def _rome_layout(request: EditRequest) -> EditRequest:
    return dataclasses.replace(
        request,
        paraphrase_prompts=request.paraphrase_prompts * 2,
        neighborhood_prompts=request.neighborhood_prompts * 10,
    )


def test_counterfact_layouts_name_their_prompt_counts(requests) -> None:
    # The fixture's facts have one paraphrase and one neighbourhood prompt, as EasyEdit's.
    easyedit = edit_protocols(_data(requests, "counterfact_easyedit", "counterfact"), "greedy")
    assert set(easyedit) == {"efficacy", "generalization", "specificity", "fluency"}
    assert "ROME's CounterFact protocol" in easyedit["efficacy"]
    assert "(1 per fact; ROME's CounterFact has 2)" in easyedit["generalization"]
    assert "(1 per fact; ROME's CounterFact has 10)" in easyedit["specificity"]
    assert easyedit["fluency"] == FLUENCY_PROTOCOLS["greedy"]
    assert easyedit["fluency"].startswith(
        "greedy generations from the edit prompts (ROME samples from generation_prompts)"
    )
    rome_facts = [_rome_layout(r) for r in requests]
    rome = edit_protocols(_data(rome_facts, "counterfact_rome", "counterfact"), "rome")
    assert "(2 per fact)" in rome["generalization"]
    assert "(10 per fact)" in rome["specificity"]
    assert rome["fluency"] == FLUENCY_PROTOCOLS["rome"]
    mixed = edit_protocols(_data([*requests, *rome_facts], "builtin", "counterfact"), None)
    assert "(1.5 per fact on average; ROME's CounterFact has 2)" in mixed["generalization"]
    assert mixed["fluency"] == "not measured"


def test_zsre_readings_name_their_targets(requests) -> None:
    reference = edit_protocols(_data(requests, "zsre_mend", "zsre"), "greedy")
    assert "eval_utils_zsre" in reference["efficacy"]
    assert "answers[0], as the reference" in reference["efficacy"]
    assert "'nq question: <loc>?', as the reference" in reference["specificity"]
    easyedit = edit_protocols(_data(requests, "zsre_easyedit", "zsre"), "greedy")
    assert "alt, EasyEdit's target" in easyedit["efficacy"]
    assert "the reference appends '?'" in easyedit["specificity"]
    # zsRE metrics forced onto CounterFact data: no claim about zsRE's fields.
    forced = edit_protocols(_data(requests, "counterfact_easyedit", "zsre"), "greedy")
    assert "(target_new)" in forced["efficacy"]
    assert "answers[0]" not in forced["efficacy"]
