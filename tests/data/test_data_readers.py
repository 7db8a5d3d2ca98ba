"""Tests for the data set readers (CounterFact ROME/EasyEdit, zsRE MEND, built-in layout)."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sphere_lightning.data import readers
from sphere_lightning.data.readers import (
    MalformedRecordError,
    load_requests,
    load_requests_with_format,
    read_builtin_format,
    read_counterfact_easyedit,
    read_counterfact_rome,
    read_zsre_easyedit,
    read_zsre_mend,
    sniff_format,
)
from sphere_lightning.data.requests import EditRequest
from tests.helpers import copy_with, copy_without, write_json

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture
def shared() -> Path:
    """The shared data folder beside the checkout (skip when absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def shared_file(shared: Path, relative: str) -> Path:
    path = shared / relative
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


# ---------------------------------------------------------------------------- sample records

ROME_RECORD: dict[str, Any] = {
    "case_id": 0,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": [
        "Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
        "An album was recorded for Capitol Nashville but never released. Danielle Darrieux "
        "spoke the language",
    ],
    "neighborhood_prompts": [
        "The mother tongue of Léon Blum is",
        "The native language of Montesquieu is",
    ],
    "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}

EASYEDIT_RECORD: dict[str, Any] = {
    "case_id": 7,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}

ZSRE_RECORD: dict[str, Any] = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": " unmanned aircraft",
    "answers": ["uniform"],
    "loc": "nq question: john goodman's character in the big lebowski",
    "loc_ans": "Walter Sobchak",
    "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
}

BUILTIN_RECORD: dict[str, Any] = {
    "case_id": 3,
    "relation": "city_country",
    "subject": "Lyon",
    "prompt": "{} is located in the country of",
    "target_true": "France",
    "target_new": "Italy",
    "paraphrase_prompts": ["Lyon is a city in"],
    "neighborhood_prompts": ["Marseille is located in the country of"],
    "neighborhood_answers": [],
}


# ---------------------------------------------------------------------------- shared data


def test_counterfact_easyedit_shared_1k(shared: Path) -> None:
    path = shared_file(shared, "counterfact/counterfact-edit-1k.json")
    requests = read_counterfact_easyedit(path)
    assert len(requests) == 1000
    first = requests[0]
    assert first == EditRequest(
        case_id=3087,
        subject="David Robinson",
        prompt="{} professionally plays the sport",
        target_new="baseball",
        target_true="basketball",
        paraphrase_prompts=("David Robinson's greatest weakness is",),
        neighborhood_prompts=("Shaquille O'Neal plays",),
        neighborhood_answers=(),
    )
    # The template reproduces the file's prompt exactly, for every record.
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert [r.filled_prompt for r in requests] == [r["prompt"] for r in raw]
    assert all(not r.neighborhood_answers for r in requests)
    # Subject at the very start of the prompt.
    toko = read_counterfact_easyedit(shared_file(shared, "counterfact/counterfact-train.json"))[0]
    assert (toko.subject, toko.prompt) == ("Toko Yasuda", "{}, the")


def test_counterfact_easyedit_shared_full_splits(shared: Path) -> None:
    edit, layout = load_requests_with_format(
        str(shared_file(shared, "counterfact/counterfact-edit.json"))
    )
    assert layout == "counterfact_easyedit"
    assert len(edit) == 10_000
    assert edit[0].subject == "Danielle Darrieux"
    assert edit[0].prompt == "The mother tongue of {} is"
    assert (edit[0].target_new, edit[0].target_true) == ("English", "French")
    assert len({r.case_id for r in edit}) == 10_000


def test_zsre_mend_shared_portability(shared: Path) -> None:
    path = shared_file(shared, "zsre/zsre_mend_eval_portability.json")
    requests, layout = load_requests_with_format(str(path))
    assert layout == "zsre_mend"
    assert len(requests) == 1037
    first = requests[0]
    assert first == EditRequest(
        case_id=0,
        subject="IAAF Combined Events Challenge",
        prompt="When was the inception of {}?",
        target_new="1998",  # answers[0]; alt is "2006"
        target_true=None,
        paraphrase_prompts=("When was the IAAF Combined Events Challenge launched?",),
        neighborhood_prompts=("nq question: what is the name of the last episode of spongebob?",),
        neighborhood_answers=("The String",),
    )
    raw = json.loads(path.read_text(encoding="utf-8"))
    for i, (request, record) in enumerate(zip(requests, raw, strict=True)):
        assert request == _as_request(_reference_mend_qa(record, i))
    easyedit = read_zsre_easyedit(path)
    assert (easyedit[0].target_new, easyedit[0].target_true) == ("2006", "1998")
    assert easyedit[0].neighborhood_prompts == (raw[0]["loc"],)


def test_zsre_shared_train_empty_alt(shared: Path) -> None:
    path = shared_file(shared, "zsre/zsre_mend_train-1k.json")
    # The reference never reads alt: every record is valid.
    requests = read_zsre_mend(path)
    assert len(requests) == 1000
    assert (requests[534].subject, requests[534].target_new) == ("Michaela Staniford", "female")
    # EasyEdit's reading edits towards alt, which two records lack.
    with pytest.raises(
        MalformedRecordError,
        match=r"zsre_mend_train-1k\.json, record 534, field 'alt': empty string",
    ):
        read_zsre_easyedit(path)
    easyedit = read_zsre_easyedit(path, skip_malformed=True)
    assert len(easyedit) == 998
    ids = {r.case_id for r in easyedit}
    assert 534 not in ids and 723 not in ids and 999 in ids
    by_id = {r.case_id: r for r in easyedit}
    assert by_id[174].target_new == "Captain Universe"  # " Captain Universe" in the file
    assert by_id[0].target_true == "uniform"
    assert by_id[0].prompt == "What is the product made by {}?"


# ---------------------------------------------------------------------------- ROME layout


def test_counterfact_rome(tmp_path: Path) -> None:
    dict_neigh = copy_with(
        ROME_RECORD,
        [{"prompt": "Who is the mother of X?", "target": "Y"}],
        "neighborhood_prompts",
    )
    path = write_json(tmp_path / "cf.json", [ROME_RECORD, dict_neigh])
    first, second = read_counterfact_rome(path)
    assert first.case_id == 0
    assert first.subject == "Danielle Darrieux"
    assert first.prompt == "The mother tongue of {} is"
    assert (first.target_new, first.target_true) == ("English", "French")
    assert len(first.paraphrase_prompts) == 2
    assert first.neighborhood_prompts[1] == "The native language of Montesquieu is"
    assert first.neighborhood_answers == ()
    assert second.neighborhood_prompts == ("Who is the mother of X?",)
    assert second.neighborhood_answers == ("Y",)
    assert first.generation_prompts == ("Danielle Darrieux's mother tongue is",)
    assert load_requests(str(path)) == [first, second]


def test_counterfact_rome_generation_prompts_optional(tmp_path: Path) -> None:
    # ROME's zsRE conversion writes "generation_prompts": []; other files leave it out.
    records = [copy_with(ROME_RECORD, [], "generation_prompts")]
    records.append(copy_without(ROME_RECORD, "generation_prompts"))
    for request in read_counterfact_rome(write_json(tmp_path / "cf.json", records)):
        assert request.generation_prompts == ()
    (builtin,) = read_builtin_format(
        write_json(tmp_path / "b.json", [dict(BUILTIN_RECORD, generation_prompts=["Lyon is"])])
    )
    assert builtin.generation_prompts == ("Lyon is",)


@pytest.mark.parametrize(
    ("record", "field", "problem"),
    [
        (
            copy_without(ROME_RECORD, "requested_rewrite", "subject"),
            "requested_rewrite.subject",
            "missing",
        ),
        (copy_without(ROME_RECORD, "case_id"), "case_id", "missing"),
        (
            copy_with(ROME_RECORD, "The mother tongue of is", "requested_rewrite", "prompt"),
            "requested_rewrite.prompt",
            "exactly one",
        ),
        (
            copy_with(ROME_RECORD, "{} and {} speak", "requested_rewrite", "prompt"),
            "requested_rewrite.prompt",
            "exactly one",
        ),
        (
            copy_with(ROME_RECORD, "  ", "requested_rewrite", "target_new", "str"),
            "requested_rewrite.target_new.str",
            "empty string",
        ),
        (
            copy_with(ROME_RECORD, "one prompt", "paraphrase_prompts"),
            "paraphrase_prompts",
            "expected a list",
        ),
        (
            copy_with(ROME_RECORD, ["ok", 3], "neighborhood_prompts"),
            "neighborhood_prompts[1]",
            "expected a string",
        ),
        (
            copy_with(ROME_RECORD, "one prompt", "generation_prompts"),
            "generation_prompts",
            "expected a list",
        ),
    ],
)
def test_counterfact_rome_malformed(
    tmp_path: Path, record: dict[str, Any], field: str, problem: str
) -> None:
    path = write_json(tmp_path / "rome-cf.json", [ROME_RECORD, record])
    expected = re.escape(f"rome-cf.json, record 1, field '{field}'")
    with pytest.raises(MalformedRecordError, match=expected):
        read_counterfact_rome(path)
    try:
        read_counterfact_rome(path)
    except MalformedRecordError as err:
        assert (err.source, err.index, err.field) == ("rome-cf.json", 1, field)
        assert problem in err.problem
    assert len(read_counterfact_rome(path, skip_malformed=True)) == 1


# ---------------------------------------------------------------------------- EasyEdit layout


def test_counterfact_easyedit_lists_and_answers(tmp_path: Path) -> None:
    listy = dict(
        EASYEDIT_RECORD,
        rephrase_prompt=["Danielle Darrieux speaks", "Danielle Darrieux's language is"],
        locality_prompt=["Michel Rocard is a native speaker of", "The capital of France is"],
        locality_ground_truth=["French", "Paris"],
    )
    broadcast = dict(EASYEDIT_RECORD, locality_prompt=["A speaks", "B speaks"])
    path = write_json(tmp_path / "ee.json", [EASYEDIT_RECORD, listy, broadcast])
    plain, lists, shared_answer = read_counterfact_easyedit(path)
    assert plain.case_id == 7
    assert plain.prompt == "The mother tongue of {} is"
    assert plain.target_true == "French"
    assert plain.paraphrase_prompts == (EASYEDIT_RECORD["rephrase_prompt"],)
    assert plain.neighborhood_answers == ()
    assert len(lists.paraphrase_prompts) == 2
    assert lists.neighborhood_answers == ("French", "Paris")
    assert shared_answer.neighborhood_prompts == ("A speaks", "B speaks")
    assert shared_answer.neighborhood_answers == ()


def test_counterfact_easyedit_first_occurrence(tmp_path: Path) -> None:
    record = dict(EASYEDIT_RECORD, subject="Paris", prompt="Paris Hilton was born in Paris, in")
    (request,) = read_counterfact_easyedit(write_json(tmp_path / "x.json", [record]))
    assert request.prompt == "{} Hilton was born in Paris, in"


@pytest.mark.parametrize(
    ("record", "field", "problem"),
    [
        (copy_without(EASYEDIT_RECORD, "subject"), "subject", "missing"),
        (dict(EASYEDIT_RECORD, subject="Édith Piaf"), "prompt", "does not occur"),
        (dict(EASYEDIT_RECORD, target_new=""), "target_new", "empty string"),
        (dict(EASYEDIT_RECORD, ground_truth=12), "ground_truth", "expected a string"),
        (dict(EASYEDIT_RECORD, case_id=None), "case_id", "missing"),
        (
            dict(EASYEDIT_RECORD, locality_prompt=["a", "b"], locality_ground_truth=["x"] * 3),
            "locality_ground_truth",
            "has 3 entries",
        ),
        (
            dict(EASYEDIT_RECORD, prompt="The {mother} tongue of Danielle Darrieux is"),
            "prompt",
            "brace",
        ),
    ],
)
def test_counterfact_easyedit_malformed(
    tmp_path: Path, record: dict[str, Any], field: str, problem: str
) -> None:
    path = write_json(tmp_path / "counterfact-edit.json", [EASYEDIT_RECORD, record])
    with pytest.raises(
        MalformedRecordError, match=re.escape(f"counterfact-edit.json, record 1, field '{field}'")
    ) as info:
        read_counterfact_easyedit(path)
    assert problem in info.value.problem


def test_subject_missing_message(tmp_path: Path) -> None:
    record = dict(EASYEDIT_RECORD, subject="X")
    path = write_json(tmp_path / "counterfact-edit.json", [record])
    with pytest.raises(
        MalformedRecordError,
        match=r"counterfact-edit\.json, record 0, field 'prompt': "
        r"subject 'X' does not occur in field 'prompt'",
    ):
        read_counterfact_easyedit(path)


# ---------------------------------------------------------------------------- zsRE layout


def _toy_tokens(text: str) -> list[str]:
    """Words with their leading space: ``"".join`` of them is the text."""
    return re.findall(r" ?\S+", text)


class _ToyTokenizer:
    """A stand-in for the reference's tokenizer whose "ids" are :func:`_toy_tokens`."""

    def __call__(self, text: str) -> dict[str, list[str]]:
        return {"input_ids": _toy_tokens(text)}

    def decode(self, ids: list[str] | str) -> str:
        return ids if isinstance(ids, str) else "".join(ids)


def _reference_mend_qa(record: dict[str, Any], i: int, tok: Any = None) -> dict[str, Any]:
    """ROME's ``dsets/zsre.py`` (``MENDQADataset.__init__``) for record ``i``, line for line
    (its ``nq question:`` assertion aside), with ``tok`` (default :class:`_ToyTokenizer`)."""
    tok = tok or _ToyTokenizer()
    ans_toks = tok(" " + record["loc_ans"])["input_ids"]
    return {
        "case_id": i,
        "requested_rewrite": {
            "prompt": record["src"].replace(record["subject"], "{}"),
            "subject": record["subject"],
            "target_new": {"str": record["answers"][0]},
            "target_true": {"str": "<|endoftext|>"},
        },
        "paraphrase_prompts": [record["rephrase"]],
        "neighborhood_prompts": [
            {
                "prompt": record["loc"] + "?" + tok.decode(ans_toks[:j]),
                "target": tok.decode(ans_toks[j]),
            }
            for j in range(len(ans_toks))
        ],
        "attribute_prompts": [],
        "generation_prompts": [],
    }


def _as_request(reference: dict[str, Any]) -> EditRequest:
    """The reference's record as an EditRequest: its i = 0 neighbourhood prompt is the prompt,
    and its per-token targets joined (without the leading space) are the answer."""
    rewrite = reference["requested_rewrite"]
    neighbours = reference["neighborhood_prompts"]
    return EditRequest(
        case_id=reference["case_id"],
        subject=rewrite["subject"],
        prompt=rewrite["prompt"],
        target_new=rewrite["target_new"]["str"],
        paraphrase_prompts=tuple(reference["paraphrase_prompts"]),
        neighborhood_prompts=(neighbours[0]["prompt"],),
        neighborhood_answers=("".join(n["target"] for n in neighbours).removeprefix(" "),),
    )


ZSRE_VARIANTS = [
    ZSRE_RECORD,
    # several answers: the first is the target; a question that already ends with "?"
    dict(ZSRE_RECORD, answers=["uniform", "workwear"], loc="nq question: who won the cup?"),
    # subject first; alt empty (the reference never reads it); a multi-word locality answer
    dict(
        ZSRE_RECORD,
        subject="Honda",
        src="Honda was founded by whom?",
        rephrase="Who founded Honda?",
        alt="",
        answers=["Soichiro Honda"],
        loc="nq question: where is the eiffel tower",
        loc_ans="Paris, France",
    ),
]


def test_zsre_mend_reads_as_the_reference(tmp_path: Path) -> None:
    requests = read_zsre_mend(write_json(tmp_path / "z.json", ZSRE_VARIANTS))
    for i, (request, record) in enumerate(zip(requests, ZSRE_VARIANTS, strict=True)):
        reference = _reference_mend_qa(record, i)
        assert request == _as_request(reference)
        # Each of the reference's per-token neighbourhood prompts and targets is our prompt
        # followed by the answer's tokens (what the token-accuracy metric teacher-forces).
        answer = _toy_tokens(" " + request.neighborhood_answers[0])
        assert [
            {"prompt": request.neighborhood_prompts[0] + "".join(answer[:j]), "target": tok}
            for j, tok in enumerate(answer)
        ] == reference["neighborhood_prompts"]
    first, second, third = requests
    assert first.target_new == "uniform" and first.target_true is None
    assert first.neighborhood_prompts == (
        "nq question: john goodman's character in the big lebowski?",
    )
    assert second.neighborhood_prompts == ("nq question: who won the cup??",)
    assert (third.prompt, third.target_new) == ("{} was founded by whom?", "Soichiro Honda")


def _reference_prediction_acc(model, tok, prompts: list[str], targets: list[str]) -> list[bool]:
    """``eval_utils_zsre.test_batch_prediction_acc`` (its non-Llama branch), on the CPU."""
    prompt_tok = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**prompt_tok).logits
    last_non_masked = prompt_tok["attention_mask"].sum(1) - 1
    to_gather = last_non_masked.unsqueeze(1).repeat(1, logits.size(-1)).unsqueeze(1)
    gathered = torch.gather(logits, 1, to_gather).squeeze(1)
    ans = torch.argmax(gathered, dim=1)
    correct_id = tok(targets, padding=True, return_tensors="pt")["input_ids"][:, 0]
    return (ans == correct_id).tolist()


def _reference_zsre_scores(model, tok, record: dict[str, Any]) -> list[float]:
    """``compute_rewrite_quality_zsre`` (non-Llama branch), then ``summarize.py``'s mean of each
    case's list: [rewrite, paraphrase, neighborhood] accuracy of one record."""
    rewrite = record["requested_rewrite"]
    target_tok = tok(" " + rewrite["target_new"]["str"])["input_ids"]
    scores = []
    for prompts in ([rewrite["prompt"].format(rewrite["subject"])], record["paraphrase_prompts"]):
        inp_prompts = [
            el + tok.decode(target_tok[:i]) for el in prompts for i in range(len(target_tok))
        ]
        inp_targets = [tok.decode(target_tok[i]) for _ in prompts for i in range(len(target_tok))]
        scores.append(np.mean(_reference_prediction_acc(model, tok, inp_prompts, inp_targets)))
    neighbours = record["neighborhood_prompts"]
    prompts = [n["prompt"].format(rewrite) for n in neighbours]
    correct = _reference_prediction_acc(model, tok, prompts, [n["target"] for n in neighbours])
    scores.append(np.mean(correct))
    return scores


def _greedy_words(model, tok, prompt: str, n: int) -> str:
    ids = tok(prompt)["input_ids"]
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return tok.decode(ids[-n:])


@pytest.mark.parametrize("tiny_model", ["gpt2", "llama"], indirect=True)
def test_zsre_mend_scored_as_the_reference(tiny_model, tokenizer) -> None:
    from sphere_lightning.evaluation import zsre_scores

    questions = [
        ("Toyota", "Where was Toyota founded?", "Toyota was founded in?"),
        ("Lionel Messi", "What does Lionel Messi play?", "Lionel Messi plays?"),
        ("Nintendo", "Where is Nintendo?", "The headquarters of Nintendo?"),
        ("Eiffel Tower", "Where is the Eiffel Tower?", "The Eiffel Tower is in?"),
    ]
    records = []
    for i, (subject, src, rephrase) in enumerate(questions):
        loc = "nq question: who plays the music"
        # Half the answers are what the model predicts, so the accuracies are not all 0.
        predicted = i % 2 == 0
        records.append(
            {
                "subject": subject,
                "src": src,
                "rephrase": rephrase,
                "alt": "Paris",
                "answers": [_greedy_words(tiny_model, tokenizer, src, 2) if predicted else "Rome"],
                "loc": loc,
                "loc_ans": _greedy_words(tiny_model, tokenizer, loc + "?", 3)
                if predicted
                else "a red ball",
            }
        )
    requests = readers.parse_records(records, "zsre.json", "zsre_mend")
    ours = zsre_scores(tiny_model, tokenizer, requests)
    reference = np.array(
        [
            _reference_zsre_scores(tiny_model, tokenizer, _reference_mend_qa(r, i, tokenizer))
            for i, r in enumerate(records)
        ]
    )
    for column, metric in enumerate(("efficacy", "generalization", "specificity")):
        assert ours[metric].tolist() == pytest.approx(reference[:, column].tolist())
    # The model's own answers after the edit and neighbourhood prompts are scored right.
    assert reference[0::2, 0].min() == reference[0::2, 2].min() == 1.0


def test_zsre_easyedit_reads_alt_and_raw_locality(tmp_path: Path) -> None:
    path = write_json(tmp_path / "z.json", ZSRE_VARIANTS[:2])
    first, second = read_zsre_easyedit(path)
    assert first == EditRequest(
        case_id=0,
        subject="UniFirst",
        prompt="What is the product made by {}?",
        target_new="unmanned aircraft",  # " unmanned aircraft" in the record
        target_true="uniform",
        paraphrase_prompts=("What will be the product of UniFirst?",),
        neighborhood_prompts=("nq question: john goodman's character in the big lebowski",),
        neighborhood_answers=("Walter Sobchak",),
    )
    assert second.neighborhood_prompts == ("nq question: who won the cup?",)
    requests, layout = load_requests_with_format(str(path), format="zsre_easyedit")
    assert layout == "zsre_easyedit" and requests == [first, second]


@pytest.mark.parametrize(
    ("record", "field", "problem"),
    [
        (dict(ZSRE_RECORD, subject="Acme"), "src", "does not occur"),
        (dict(ZSRE_RECORD, answers=[]), "answers", "empty list"),
        (dict(ZSRE_RECORD, answers=[""]), "answers[0]", "empty string"),
        (copy_without(ZSRE_RECORD, "answers"), "answers", "missing"),
        (dict(ZSRE_RECORD, loc_ans=["a"]), "loc_ans", "expected a string"),
        (copy_without(ZSRE_RECORD, "loc"), "loc", "missing"),
        (copy_without(ZSRE_RECORD, "rephrase"), "rephrase", "missing"),
    ],
)
def test_zsre_mend_malformed(
    tmp_path: Path, record: dict[str, Any], field: str, problem: str
) -> None:
    path = tmp_path / "zsre_eval.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [ZSRE_RECORD, record]) + "\n", "utf-8")
    for read in (read_zsre_mend, read_zsre_easyedit):
        with pytest.raises(
            MalformedRecordError, match=re.escape(f"zsre_eval.jsonl, record 1, field '{field}'")
        ) as info:
            read(path)
        assert problem in info.value.problem


@pytest.mark.parametrize(
    ("record", "problem"),
    [(copy_without(ZSRE_RECORD, "alt"), "missing"), (dict(ZSRE_RECORD, alt=" "), "empty string")],
)
def test_zsre_alt_only_matters_to_easyedit(
    tmp_path: Path, record: dict[str, Any], problem: str
) -> None:
    path = write_json(tmp_path / "z.json", [record])
    assert read_zsre_mend(path)[0].target_new == "uniform"
    with pytest.raises(MalformedRecordError, match=rf"record 0, field 'alt': {problem}"):
        read_zsre_easyedit(path)


# ---------------------------------------------------------------------------- files, hub, dispatch


def test_jsonl_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(f"{json.dumps(ZSRE_RECORD)}\n\n{json.dumps(ZSRE_RECORD)}\n", encoding="utf-8")
    assert [r.case_id for r in load_requests(str(path))] == [0, 1]


def test_jsonl_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(f"{json.dumps(ZSRE_RECORD)}\n{{oops\n", encoding="utf-8")
    with pytest.raises(MalformedRecordError, match=r"data\.jsonl, record 1: line 2"):
        read_zsre_mend(path)


def test_record_not_an_object(tmp_path: Path) -> None:
    path = write_json(tmp_path / "odd.json", [ZSRE_RECORD, ["not", "an", "object"]])
    with pytest.raises(MalformedRecordError, match=r"odd\.json, record 1: expected a JSON object"):
        read_zsre_mend(path)


@pytest.mark.parametrize("source", ["missing.json", "data/missing.jsonl", "./nothing", "a/b/c"])
def test_missing_file(source: str) -> None:
    with pytest.raises(FileNotFoundError, match=source.replace(".", r"\.")):
        load_requests(source)


def test_missing_path_object(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        read_counterfact_rome(tmp_path / "nope")


def test_hub_id_goes_to_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []

    def fake_hub(name: str, split: str) -> list[Any]:
        calls.append((name, split))
        return [ROME_RECORD, copy_without(ROME_RECORD, "requested_rewrite", "subject")]

    monkeypatch.setattr(readers, "_load_hub", fake_hub)
    with pytest.raises(
        MalformedRecordError,
        match=r"azhx/counterfact, record 1, field 'requested_rewrite\.subject': missing",
    ):
        load_requests("azhx/counterfact", split="test")
    assert calls == [("azhx/counterfact", "test")]
    requests, layout = load_requests_with_format("counterfact", skip_malformed=True)
    assert layout == "counterfact_rome" and len(requests) == 1
    assert calls[-1] == ("counterfact", "train")


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="counterfact_easyedit") as info:
        load_requests("builtin", format="csv")
    for name in readers.FORMATS:
        assert name in str(info.value)


def test_builtin_source_and_format(tmp_path: Path) -> None:
    builtin = load_requests("builtin")
    assert len(builtin) >= 300
    assert load_requests("builtin", format="builtin") == builtin
    with pytest.raises(ValueError, match="built-in"):
        load_requests("builtin", format="zsre_mend")
    path = write_json(tmp_path / "mine.json", [BUILTIN_RECORD])
    (request,) = read_builtin_format(path)
    assert request.neighborhood_prompts == ("Marseille is located in the country of",)
    assert load_requests(str(path)) == [request]


def test_sniff_and_undetectable(tmp_path: Path) -> None:
    assert sniff_format(ROME_RECORD) == "counterfact_rome"
    assert sniff_format(EASYEDIT_RECORD) == "counterfact_easyedit"
    assert sniff_format(ZSRE_RECORD) == "zsre_mend"
    assert sniff_format(copy_without(ZSRE_RECORD, "alt")) == "zsre_mend"
    assert sniff_format(BUILTIN_RECORD) == "builtin"
    assert sniff_format({"question": "q"}) is None
    path = write_json(tmp_path / "other.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"other\.json: cannot detect.*'question'"):
        load_requests(str(path))
    with pytest.raises(ValueError, match="no records"):
        load_requests(str(write_json(tmp_path / "empty.json", [])))
    assert read_zsre_mend(tmp_path / "empty.json") == []


def test_explicit_format_overrides_sniffing(tmp_path: Path) -> None:
    path = write_json(tmp_path / "cf.json", [EASYEDIT_RECORD])
    with pytest.raises(MalformedRecordError, match="field 'requested_rewrite': missing"):
        load_requests(str(path), format="counterfact_rome")


def test_error_pickles() -> None:
    err = MalformedRecordError("f.json", 3, "subject", "missing")
    clone = pickle.loads(pickle.dumps(err))
    assert str(clone) == str(err) == "f.json, record 3, field 'subject': missing"
    assert isinstance(clone, ValueError)


def test_write_counterfact_rome_round_trips(tmp_path):
    from sphere_lightning.data import read_counterfact_rome, write_counterfact_rome
    from tests.helpers import REQUESTS

    path = write_counterfact_rome(REQUESTS, tmp_path / "facts.json")
    back = read_counterfact_rome(path)
    fields = ("case_id", "prompt", "subject", "target_new", "target_true")
    assert [tuple(getattr(r, f) for f in fields) for r in back] == [
        tuple(getattr(r, f) for f in fields) for r in REQUESTS
    ]
    assert [tuple(r.paraphrase_prompts) for r in back] == [
        tuple(r.paraphrase_prompts) for r in REQUESTS
    ]
    assert [tuple(r.neighborhood_prompts) for r in back] == [
        tuple(r.neighborhood_prompts) for r in REQUESTS
    ]
