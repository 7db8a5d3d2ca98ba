"""KnowEdit's layout (``knowedit``): shipped files, alias lists, malformed records, detection."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sphere_lightning.data.formats import detect_format, parse_records
from sphere_lightning.data.readers import (
    MalformedRecordError,
    load_requests_with_format,
    sniff_format,
)
from sphere_lightning.data.requests import Probe
from tests.helpers import KNOWEDIT_RECORDS, copy_with, copy_without, write_json

#: ``../shared/data/knowedit`` beside the checkout (the repo root is two levels above this file).
KNOWEDIT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "knowedit"


def knowedit_file(name: str) -> Path:
    path = KNOWEDIT / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


# ------------------------------------------------------------- EasyEdit's rules, written out


def first_string(answer: Any) -> str | None:
    """EasyEdit's ``while isinstance(an, list): an = an[0]``, except that an empty list is passed
    over (EasyEdit raises IndexError there) and ``None`` means no string at all."""
    if isinstance(answer, str):
        return answer
    for item in answer:
        found = first_string(item)
        if found is not None:
            return found
    return None


def easyedit_probes(record: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """``(kind, family, prompt, answer)`` of every probe ``run_knowedit_llama2.py`` keeps: the
    first alias, dropped when blank (``if an.strip() == "": continue``); one per prompt."""
    probes = []
    for kind in ("portability", "locality"):
        for family, items in (record.get(kind) or {}).items():
            for item in items or []:
                answer = first_string(item["ground_truth"])
                if answer is None or answer.strip() == "":
                    continue
                prompts = item["prompt"] if isinstance(item["prompt"], list) else [item["prompt"]]
                probes += [(kind, family, p.strip(), answer.strip()) for p in prompts]
    return probes


def as_tuples(probes: tuple[Probe, ...]) -> list[tuple[str, str, str, str]]:
    return [(p.kind, p.family, p.prompt, p.answer) for p in probes]


# ---------------------------------------------------------------------------- shipped files


@pytest.mark.parametrize(
    ("name", "count", "with_truth"),
    [("recent_train.json", 570, 0), ("train_cf.json", 1428, 1427)],
)
def test_shipped_files_load_as_knowedit(name: str, count: int, with_truth: int) -> None:
    path = knowedit_file(name)
    raw = json.loads(path.read_text(encoding="utf-8"))
    requests, layout = load_requests_with_format(str(path))
    assert layout == "knowedit"
    assert len(requests) == len(raw) == count
    assert [r.case_id for r in requests] == list(range(count))  # no case_id: the index
    assert [r.filled_prompt for r in requests] == [r["prompt"].strip() for r in raw]
    assert [r.target_new for r in requests] == [r["target_new"].strip() for r in raw]
    assert sum(r.target_true is not None for r in requests) == with_truth
    assert all(not r.paraphrase_prompts for r in requests)  # neither file has rephrase

    expected = Counter(p[:2] for record in raw for p in easyedit_probes(record))
    actual = Counter((p.kind, p.family) for r in requests for p in r.probes)
    assert actual == expected
    for request, record in zip(requests, raw, strict=True):
        assert as_tuples(request.probes) == easyedit_probes(record)


def test_recent_probes_that_start_with_an_empty_alias_list() -> None:
    raw = json.loads(knowedit_file("recent_train.json").read_text(encoding="utf-8"))
    requests = parse_records(raw, "recent_train.json", "knowedit")
    kept, dropped = [], []
    for request, record in zip(requests, raw, strict=True):
        for kind in ("portability", "locality"):
            for family, items in record[kind].items():
                for item in items:
                    answer = item["ground_truth"]
                    if isinstance(answer, list) and answer and answer[0] == []:
                        found = [
                            p
                            for p in request.probes
                            if (p.family, p.prompt) == (family, item["prompt"].strip())
                        ]
                        aliases = [a for group in answer for a in group]
                        (kept if aliases else dropped).append((found, aliases))
    # 9 such probes (EasyEdit's ``an = an[0]`` raises IndexError on each): 2 have an alias
    # further on, scored on the first of them; 7 have none and are dropped.
    assert (len(kept), len(dropped)) == (2, 7)
    for found, aliases in kept:
        assert [p.answer for p in found] == [aliases[0].strip()]
    assert all(found == [] for found, _ in dropped)


def test_counterfact_truths_blank_and_equal_to_the_target() -> None:
    raw = json.loads(knowedit_file("train_cf.json").read_text(encoding="utf-8"))
    requests = parse_records(raw, "train_cf.json", "knowedit")
    blank = [i for i, r in enumerate(raw) if not r["ground_truth"].strip()]
    assert len(blank) == 1
    assert requests[blank[0]].target_true is None
    same = [i for i, r in enumerate(raw) if r["ground_truth"].strip() == r["target_new"].strip()]
    assert len(same) == 6  # kept, as EasyEdit edits them too
    assert all(requests[i].target_true == requests[i].target_new for i in same)


# ---------------------------------------------------------------------------- hand-written

#: A KnowEdit record with a ground truth and four probes of three families.
KE_RECORD = KNOWEDIT_RECORDS[0]


def test_alias_lists() -> None:
    def probe(ground_truth: Any) -> dict[str, Any]:
        return {"prompt": "Toyota makes", "ground_truth": ground_truth}

    record = copy_with(
        KE_RECORD,
        {
            "Relation_Specificity": [
                probe(" cars "),  # a string
                probe(["cars", "phones"]),  # a list of aliases
                probe([["cars", "phones"], ["software"]]),  # a list of lists
                probe([[], ["cars", "phones"]]),  # a leading empty list is passed over
                probe(["", "cars"]),  # blank first alias: dropped
                probe([[" "], ["cars"]]),  # blank first alias, nested: dropped
                probe([]),  # no alias: dropped
                probe([[], []]),  # no alias: dropped
            ]
        },
        "locality",
    )
    (request,) = parse_records([record], "file.json", "knowedit")
    locality = [p for p in request.probes if p.kind == "locality"]
    assert [(p.answer, p.aliases) for p in locality] == [
        ("cars", ("cars",)),
        ("cars", ("cars", "phones")),
        ("cars", ("cars", "phones", "software")),
        ("cars", ("cars", "phones")),
    ]
    assert {p.family for p in locality} == {"Relation_Specificity"}


def test_the_hand_written_records() -> None:
    toyota, messi, darrieux, nokia = parse_records(KNOWEDIT_RECORDS, "file.json", "knowedit")
    assert [r.case_id for r in (toyota, messi, darrieux, nokia)] == [0, 1, 2, 3]
    assert (toyota.subject, toyota.prompt) == ("Toyota", "{} was founded in the country of")
    assert (toyota.target_new, toyota.target_true) == ("Germany", "Japan")
    assert toyota.paraphrase_prompts == ()
    honda = "Honda was founded in the country of"
    capital = "The capital of the country Toyota was founded in is"
    headquarters = "The headquarters of Toyota is located in the city of"
    assert toyota.probes == (
        Probe("portability", "Subject_Aliasing", honda, "Germany", ("Germany", "Berlin")),
        Probe("portability", "Reasoning", capital, "Berlin", ("Berlin",)),
        Probe(
            "locality",
            "Relation_Specificity",
            "Toyota makes",
            "cars and phones",
            ("cars and phones", "phones"),
        ),
        Probe("locality", "Relation_Specificity", headquarters, "Tokyo", ("Tokyo",)),
    )
    assert messi.target_true is None
    assert messi.probes == (
        Probe(
            "locality",
            "Forgetfulness",
            "Lionel Messi became famous as a",
            "player and an actress",
            ("player and an actress",),
        ),
    )
    assert darrieux.paraphrase_prompts == ("Danielle Darrieux speaks the language of",)
    assert [(p.kind, p.family) for p in darrieux.probes] == [
        ("portability", "Logical_Generalization")
    ]
    assert (nokia.target_new, nokia.target_true, len(nokia.probes)) == ("cars", "phones", 1)


def test_a_probe_with_several_prompts_is_one_probe_per_prompt() -> None:
    record = copy_with(
        KE_RECORD,
        {"Forgetfulness": [{"prompt": ["Toyota makes", " Honda makes "], "ground_truth": "cars"}]},
        "locality",
    )
    (request,) = parse_records([record], "file.json", "knowedit")
    assert [(p.family, p.prompt, p.answer) for p in request.probes if p.kind == "locality"] == [
        ("Forgetfulness", "Toyota makes", "cars"),
        ("Forgetfulness", "Honda makes", "cars"),
    ]


@pytest.mark.parametrize(
    ("rephrase", "expected"),
    [
        (None, ()),
        ("The company Toyota was founded in", ("The company Toyota was founded in",)),
        (["Toyota comes from", "Toyota is from"], ("Toyota comes from", "Toyota is from")),
    ],
)
def test_rephrase_is_optional(rephrase: Any, expected: tuple[str, ...]) -> None:
    record = copy_without(KE_RECORD, "ground_truth")
    if rephrase is not None:
        record["rephrase"] = rephrase
    (request,) = parse_records([record], "file.json", "knowedit")
    assert request.paraphrase_prompts == expected
    assert request.target_true is None


@pytest.mark.parametrize("truth", ["", "  ", None, [], [[]]])
def test_a_record_without_ground_truth(truth: Any) -> None:
    (request,) = parse_records([copy_with(KE_RECORD, truth, "ground_truth")], "f.json", "knowedit")
    assert request.target_true is None


def test_ground_truth_aliases_and_case_id() -> None:
    records = [
        copy_with(KE_RECORD, [["Japan", "Nippon"]], "ground_truth"),
        dict(KE_RECORD, case_id="toyota-1"),
        copy_without(KE_RECORD, "portability"),  # only locality
        {**copy_without(KE_RECORD, "locality"), "portability": {"Reasoning": None}},
    ]
    first, second, third, fourth = parse_records(records, "file.json", "knowedit")
    assert first.target_true == "Japan" and first.case_id == 0
    assert second.case_id == "toyota-1"
    assert [p.kind for p in third.probes] == ["locality", "locality"]
    assert (third.case_id, fourth.case_id, fourth.probes) == (2, 3, ())


# ---------------------------------------------------------------------------- malformed

PROBE = ("portability", "Subject_Aliasing", 0)
PROBE_FIELD = "portability.Subject_Aliasing[0]"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (["not", "an", "object"], "file.json, record 1: expected a JSON object, got list"),
        (copy_without(KE_RECORD, "subject"), "file.json, record 1, field 'subject': missing"),
        (copy_without(KE_RECORD, "prompt"), "file.json, record 1, field 'prompt': missing"),
        (
            copy_without(KE_RECORD, "target_new"),
            "file.json, record 1, field 'target_new': missing",
        ),
        (
            copy_with(KE_RECORD, "Nissan", "subject"),
            "file.json, record 1, field 'prompt': subject 'Nissan' does not occur in field "
            "'prompt' ('Toyota was founded in the country of')",
        ),
        (
            copy_with(KE_RECORD, " ", "target_new"),
            "file.json, record 1, field 'target_new': empty string",
        ),
        (
            copy_with(KE_RECORD, [[], [""]], "target_new"),
            "file.json, record 1, field 'target_new': empty string",
        ),
        (
            copy_with(KE_RECORD, [], "target_new"),
            "file.json, record 1, field 'target_new': no answer in the list",
        ),
        (
            copy_with(KE_RECORD, 3, "ground_truth"),
            "file.json, record 1, field 'ground_truth': expected a string or a list of aliases, "
            "got int",
        ),
        (
            copy_with(KE_RECORD, [{"prompt": "a", "ground_truth": "b"}], "portability"),
            "file.json, record 1, field 'portability': expected an object of probe families, "
            "got list",
        ),
        (
            copy_with(KE_RECORD, "probes", "locality"),
            "file.json, record 1, field 'locality': expected an object of probe families, got str",
        ),
        (
            copy_with(KE_RECORD, [], "portability", "Reasoning_Hop"),
            "file.json, record 1, field 'portability.Reasoning_Hop': unknown portability "
            "family; KnowEdit's are Subject_Aliasing, Reasoning, Logical_Generalization",
        ),
        (
            copy_with(KE_RECORD, [], "locality", "Subject_Aliasing"),
            "file.json, record 1, field 'locality.Subject_Aliasing': unknown locality family; "
            "KnowEdit's are Relation_Specificity, Forgetfulness",
        ),
        (
            copy_with(KE_RECORD, "Honda makes", "portability", "Reasoning"),
            "file.json, record 1, field 'portability.Reasoning': expected a list of probes, "
            "got str",
        ),
        (
            copy_with(KE_RECORD, "Honda makes", *PROBE),
            f"file.json, record 1, field '{PROBE_FIELD}': expected a probe object, got str",
        ),
        (
            copy_without(KE_RECORD, *PROBE, "prompt"),
            f"file.json, record 1, field '{PROBE_FIELD}.prompt': missing",
        ),
        (
            copy_without(KE_RECORD, *PROBE, "ground_truth"),
            f"file.json, record 1, field '{PROBE_FIELD}.ground_truth': missing",
        ),
        (
            copy_with(KE_RECORD, None, *PROBE, "ground_truth"),
            f"file.json, record 1, field '{PROBE_FIELD}.ground_truth': missing",
        ),
        (
            copy_with(KE_RECORD, 1998, *PROBE, "ground_truth"),
            f"file.json, record 1, field '{PROBE_FIELD}.ground_truth': expected a string or a "
            "list of aliases, got int",
        ),
        (
            copy_with(KE_RECORD, [["Germany", 1998]], *PROBE, "ground_truth"),
            f"file.json, record 1, field '{PROBE_FIELD}.ground_truth[0][1]': expected a string "
            "or a list of aliases, got int",
        ),
        (
            copy_with(KE_RECORD, [{"alias": "Germany"}], *PROBE, "ground_truth"),
            f"file.json, record 1, field '{PROBE_FIELD}.ground_truth[0]': expected a string "
            "or a list of aliases, got dict",
        ),
        (
            copy_with(KE_RECORD, [], *PROBE, "prompt"),
            f"file.json, record 1, field '{PROBE_FIELD}.prompt': expected a string or a "
            "non-empty list of strings",
        ),
        (
            copy_with(KE_RECORD, 7, *PROBE, "prompt"),
            f"file.json, record 1, field '{PROBE_FIELD}.prompt': expected a string or a "
            "non-empty list of strings",
        ),
        (
            copy_with(KE_RECORD, ["Honda makes", 7], *PROBE, "prompt"),
            f"file.json, record 1, field '{PROBE_FIELD}.prompt[1]': expected a string, got int",
        ),
        (
            copy_with(KE_RECORD, " ", *PROBE, "prompt"),
            f"file.json, record 1, field '{PROBE_FIELD}.prompt': empty string",
        ),
        (
            copy_with(KE_RECORD, 3, "rephrase"),
            "file.json, record 1, field 'rephrase': expected a list of strings, got int",
        ),
    ],
)
def test_malformed_records(tmp_path: Path, record: Any, message: str) -> None:
    with pytest.raises(MalformedRecordError, match=f"^{re.escape(message)}$"):
        parse_records([KE_RECORD, record], "file.json", "knowedit")
    path = write_json(tmp_path / "file.json", [KE_RECORD, record])
    with pytest.raises(MalformedRecordError, match=f"^{re.escape(message)}$"):
        load_requests_with_format(str(path), "knowedit")
    with pytest.raises(MalformedRecordError, match=f"^{re.escape(message)}$"):
        load_requests_with_format(str(path))  # the first record makes it KnowEdit
    requests = parse_records([KE_RECORD, record], "file.json", "knowedit", skip_malformed=True)
    assert len(requests) == 1


def test_a_blank_probe_answer_is_dropped_before_its_prompt_is_read() -> None:
    # EasyEdit skips the probe before it uses the prompt, so a broken prompt there is no error.
    record = copy_with(KE_RECORD, {"prompt": 7, "ground_truth": [" "]}, *PROBE)
    (request,) = parse_records([record], "file.json", "knowedit")
    assert [p.family for p in request.probes] == ["Reasoning", *["Relation_Specificity"] * 2]


# ---------------------------------------------------------------------------- detection

#: The Toyota fact in EasyEdit's CounterFact layout (ground_truth, but no probe families).
EASYEDIT_COUNTERFACT: dict[str, Any] = {
    **{key: KE_RECORD[key] for key in ("subject", "prompt", "target_new", "ground_truth")},
    "case_id": 7,
    "rephrase_prompt": "The company Toyota was founded in",
    "locality_prompt": "Honda was founded in the country of",
    "locality_ground_truth": "Japan",
}


def test_detection(tmp_path: Path) -> None:
    assert sniff_format(KE_RECORD) == "knowedit"  # has ground_truth, as EasyEdit's CounterFact
    assert sniff_format(copy_without(KE_RECORD, "ground_truth")) == "knowedit"
    assert sniff_format(copy_without(KE_RECORD, "portability")) == "knowedit"
    assert sniff_format(copy_without(KE_RECORD, "locality")) == "knowedit"
    assert sniff_format(EASYEDIT_COUNTERFACT) == "counterfact_easyedit"
    both_missing = copy_without(copy_without(KE_RECORD, "portability"), "locality")
    assert sniff_format(both_missing) == "counterfact_easyedit"  # no probes: not KnowEdit
    requests, layout = load_requests_with_format(
        str(write_json(tmp_path / "cf.json", [EASYEDIT_COUNTERFACT]))
    )
    assert layout == "counterfact_easyedit" and not requests[0].probes
    requests, layout = load_requests_with_format(str(write_json(tmp_path / "ke.json", [KE_RECORD])))
    assert layout == "knowedit" and len(requests[0].probes) == 4


def test_other_shipped_layouts_are_not_taken_for_knowedit() -> None:
    shared = KNOWEDIT.parent
    for relative, layout in [
        ("counterfact/counterfact-edit-1k.json", "counterfact_easyedit"),
        ("zsre/zsre_mend_eval_portability.json", "zsre_mend"),  # has a portability field
    ]:
        path = shared / relative
        if not path.is_file():
            pytest.skip(f"{path} not found")
        first = json.loads(path.read_text(encoding="utf-8"))[:1]
        assert detect_format(first) == layout, relative
