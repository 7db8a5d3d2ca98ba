"""Tests for the built-in counterfactual fact set."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from importlib import resources

from sphere_lightning.data import (
    builtin_relations,
    load_builtin_facts,
    load_requests,
    read_builtin_format,
    sniff_format,
)
from sphere_lightning.data.requests import EditRequest


def test_size_and_relations() -> None:
    facts = load_builtin_facts()
    relations = builtin_relations()
    assert len(facts) >= 320
    assert set(relations) == {f.case_id for f in facts}
    counts = Counter(relations.values())
    assert len(counts) >= 8
    assert min(counts.values()) >= 15


def test_records_are_well_formed() -> None:
    facts = load_builtin_facts()
    ids = [f.case_id for f in facts]
    assert len(set(ids)) == len(ids)
    assert all(isinstance(i, int) for i in ids)
    for fact in facts:
        assert isinstance(fact, EditRequest)
        assert fact.target_true is not None
        assert fact.target_new != fact.target_true
        for target in (fact.target_new, fact.target_true):
            assert target == target.strip() and target
        assert fact.prompt.count("{}") == 1 and not fact.prompt.endswith(" ")
        assert fact.filled_prompt[0].isupper()
        assert len(fact.paraphrase_prompts) >= 2
        assert len(fact.neighborhood_prompts) >= 3
        assert fact.neighborhood_answers == ()
        for prompt in fact.paraphrase_prompts:
            assert prompt.strip() == prompt and prompt
            assert fact.subject in prompt
            assert prompt != fact.filled_prompt
        for prompt in fact.neighborhood_prompts:
            assert prompt.strip() == prompt and prompt
            assert fact.subject not in prompt


def test_neighbours_are_never_edited_in_the_same_relation() -> None:
    relations = builtin_relations()
    by_relation: dict[str, list[EditRequest]] = defaultdict(list)
    for fact in load_builtin_facts():
        by_relation[relations[fact.case_id]].append(fact)
    for facts in by_relation.values():
        subjects = {f.subject for f in facts}
        assert len(subjects) == len(facts)
        pattern = re.compile("|".join(rf"\b{re.escape(s)}\b" for s in subjects))
        for fact in facts:
            for prompt in fact.neighborhood_prompts:
                assert not pattern.search(prompt), prompt


def test_file_is_small_and_readable_as_a_data_set() -> None:
    resource = resources.files("sphere_lightning.data").joinpath("builtin_facts.json")
    text = resource.read_text("utf-8")
    assert len(text.encode()) < 1_000_000
    records = json.loads(text)
    assert sniff_format(records[0]) == "builtin"
    with resources.as_file(resource) as path:
        assert read_builtin_format(path) == load_builtin_facts()
        assert load_requests(str(path)) == load_builtin_facts()
    assert load_requests("builtin") == load_builtin_facts()
    assert load_builtin_facts() is not load_builtin_facts()


def test_known_facts_spot_check() -> None:
    by_prompt = {f.filled_prompt: f for f in load_builtin_facts()}
    assert by_prompt["The capital of France is"].target_true == "Paris"
    assert by_prompt["Lyon is located in the country of"].target_true == "France"
    assert by_prompt["The currency of the Netherlands is the"].target_true == "euro"
    capital = by_prompt["The capital of France is"]
    assert "The Eiffel Tower is located in the city of" in capital.neighborhood_prompts
