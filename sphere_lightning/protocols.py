"""Which reference protocol each edit metric of a run follows, in words, for ``summary.json``.

A number is comparable with a paper's only when the protocol is the same: CounterFact's
probability comparison on ROME's layout (2 paraphrases, 10 neighbourhood prompts per fact) is not
the same experiment on the EasyEdit layout (1 and 1); zsRE edits towards ``answers[0]`` in the
reference and towards ``alt`` in EasyEdit; fluency samples from ``generation_prompts`` in ROME and
is greedy where the data has none. :func:`edit_protocols` says which one a run used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from sphere_lightning.data.formats import KNOWEDIT_FAMILIES, knowedit_metric_name
from sphere_lightning.data.requests import EditRequest
from sphere_lightning.fluency import FLUENCY_PROTOCOLS

#: Prompts per fact in ROME's own CounterFact layout.
ROME_PARAPHRASES = 2
ROME_NEIGHBOURS = 10


class EditData(Protocol):
    """What :func:`edit_protocols` reads from the data module."""

    metric_family: str
    data_format: str
    requests: list[EditRequest]


def _per_fact(counts: Sequence[int], rome: int) -> str:
    """``"2 per fact"``, ``"1 per fact; ROME's CounterFact has 2"``, or ``"1.5 per fact on
    average; ..."`` when facts differ."""
    if not counts:
        text = "none"
    elif len(set(counts)) == 1:
        text = f"{counts[0]} per fact"
    else:
        text = f"{sum(counts) / len(counts):.3g} per fact on average"
    return text if set(counts) == {rome} else f"{text}; ROME's CounterFact has {rome}"


def _counterfact(data_format: str, requests: Sequence[EditRequest]) -> dict[str, str]:
    paraphrases = _per_fact([len(r.paraphrase_prompts) for r in requests], ROME_PARAPHRASES)
    neighbours = _per_fact([len(r.neighborhood_prompts) for r in requests], ROME_NEIGHBOURS)
    compare = "mean per-token probability of target_new above that of target_true"
    return {
        "efficacy": f"ROME's CounterFact protocol: {compare} on the edit prompt",
        "generalization": f"ROME's CounterFact protocol: {compare} on the paraphrase prompts "
        f"({paraphrases}), averaged per fact",
        "specificity": "ROME's CounterFact protocol: target_true still above target_new on the "
        f"neighbourhood prompts ({neighbours}), averaged per fact",
    }


_ZSRE_TARGETS = {
    "zsre_mend": "answers[0], as the reference",
    "zsre_easyedit": "alt, EasyEdit's target; the reference edits towards answers[0]",
}
_ZSRE_LOCALITY = {
    "zsre_mend": "'nq question: <loc>?', as the reference",
    "zsre_easyedit": "EasyEdit's 'nq question: <loc>' (the reference appends '?')",
}


def _zsre(data_format: str, requests: Sequence[EditRequest]) -> dict[str, str]:
    target = _ZSRE_TARGETS.get(data_format, "target_new")
    locality = _ZSRE_LOCALITY.get(data_format, "the neighbourhood prompts")
    accuracy = "eval_utils_zsre's protocol: teacher-forced argmax accuracy of each answer token"
    return {
        "efficacy": f"{accuracy} of the target ({target}) after the edit prompt, averaged "
        "over tokens, then facts",
        "generalization": f"{accuracy} of the target after the paraphrase, averaged over "
        "tokens, then facts",
        "specificity": f"{accuracy} of loc_ans after {locality}, averaged over tokens, then facts",
    }


def _knowedit(data_format: str, requests: Sequence[EditRequest]) -> dict[str, str]:
    accuracy = (
        "EasyEdit's KnowEdit protocol (test_prediction_acc): teacher-forced argmax accuracy of "
        "each answer token"
    )
    same = (
        "EasyEdit's KnowEdit protocol: the share of answer positions (teacher forced on the "
        "probe's first alias) where the edited model's argmax token equals the unedited model's"
    )
    compare = "mean per-token probability of target_new above that of ground_truth"
    protocols = {
        "edit_success": f"{accuracy} of target_new after the edit prompt (rewrite_acc)",
        "generalization": f"{accuracy} of target_new after the rephrase prompts (rephrase_acc), "
        "averaged per fact",
        "efficacy": f"ROME's CounterFact comparison on facts with a ground_truth: {compare} on "
        "the edit prompt",
        "specificity": "on facts with a ground_truth, each locality probe's first alias still "
        "above target_new in mean per-token probability, averaged per fact (no reference: "
        "KnowEdit has no CounterFact neighbourhood prompts)",
        "portability": "the mean over a fact's portability families of portability_<family>, "
        "then over the facts that have any (run_knowedit_llama2.py's Overall_portability)",
        "locality": "the mean over a fact's locality families of locality_<family>, then over "
        "the facts that have any (run_knowedit_llama2.py's Overall_locality)",
    }
    for kind, families in KNOWEDIT_FAMILIES.items():
        for family in families:
            measure = accuracy + " of the probe's first alias" if kind == "portability" else same
            protocols[knowedit_metric_name(kind, family)] = (
                f"{measure}, {family} probes, averaged per fact, then over the facts that have one"
            )
    return protocols


_EDIT_PROTOCOLS: dict[str, Callable[[str, Sequence[EditRequest]], dict[str, str]]] = {
    "counterfact": _counterfact,
    "zsre": _zsre,
    "knowedit": _knowedit,
}


def edit_protocols(data: EditData, fluency_protocol: str | None) -> dict[str, str]:
    """The protocol of efficacy, generalization, specificity and fluency, in words.

    Args:
        data: The run's data module (its metric family, record layout and requests).
        fluency_protocol: ``rome``, ``greedy``, or ``None`` when fluency was not measured.

    Returns:
        ``{metric: description}`` for the family's edit metrics and fluency.
    """
    protocols = _EDIT_PROTOCOLS[data.metric_family](data.data_format, data.requests)
    protocols["fluency"] = (
        FLUENCY_PROTOCOLS[fluency_protocol] if fluency_protocol is not None else "not measured"
    )
    return protocols
