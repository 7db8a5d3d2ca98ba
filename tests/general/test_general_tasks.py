"""Task readers: the real layouts, the shared files, malformed lines, hub ids (with a stub)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from sphere_lightning.general import TASKS, GeneralExample, MalformedExampleError, get_task

#: ``../shared/data/general`` beside the checkout (the repo root is two levels above this file).
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "general"

#: Two records per task in the layout of the shared files, with the expected (prompt, label).
SAMPLES = {
    "sst2": [
        ({"sentence": "the film 's performances are thrilling . ", "label": 1, "idx": 179},
         GeneralExample(
             "Review: the film 's performances are thrilling .\nSentiment (positive or negative):",
             1,
         )),
        ({"sentence": "a dull movie", "label": 0, "idx": 3},
         GeneralExample("Review: a dull movie\nSentiment (positive or negative):", 0)),
    ],
    "mrpc": [
        ({"sentence1": "He left .", "sentence2": "He went away .", "label": 1, "idx": 1},
         GeneralExample(
             "Are the following sentences paraphrases of each other?\nSentence 1: He left .\n"
             "Sentence 2: He went away .\nAnswer (Yes or No):",
             1,
         )),
        ({"sentence1": "A", "sentence2": "B", "label": 0, "idx": 2}, None),
    ],
    "cola": [
        ({"sentence": "Sam gave the ball out of the basket.", "label": 0, "idx": 128},
         GeneralExample(
             "Is this sentence linguistically acceptable?\n"
             "Sentence: Sam gave the ball out of the basket.\nAnswer (Yes or No):",
             0,
         )),
        ({"sentence": "a tall building.", "label": 1, "idx": 403}, None),
    ],
    "rte": [
        ({"sentence1": "P. Prayong belongs to the Theravada sect.",
          "sentence2": "P. Prayong is a member of Theravada.", "label": 0, "idx": 171},
         GeneralExample(
             "P. Prayong belongs to the Theravada sect.\n"
             "Question: P. Prayong is a member of Theravada. True or False?\nAnswer:",
             0,  # GLUE: 0 = entailment → option " True"
         )),
        ({"sentence1": "x", "sentence2": "y", "label": 1, "idx": 91}, None),
    ],
    "nli": [
        ({"index": "2489", "sentence1": "Turkey is unlikely to become involved.",
          "sentence2": "U.S. to use Turkish military bases.", "label": "not_entailment"},
         GeneralExample(
             "Turkey is unlikely to become involved.\n"
             "Question: U.S. to use Turkish military bases. True or False?\nAnswer:",
             1,
         )),
        ({"index": "1", "sentence1": "x", "sentence2": "y", "label": "entailment"}, None),
    ],
    "mmlu": [
        ({"question": "Which expression is equivalent to 4 x 9?",
          "subject": "elementary_mathematics",
          "choices": ["(4x 4) + (4x5)", "(4+4) x (4+5)", "(4+4)+(4+5)", "(4x 4) x (4x5)"],
          "answer": 0},
         GeneralExample(
             "The following is a multiple choice question about elementary mathematics.\n\n"
             "Which expression is equivalent to 4 x 9?\nA. (4x 4) + (4x5)\nB. (4+4) x (4+5)\n"
             "C. (4+4)+(4+5)\nD. (4x 4) x (4x5)\nAnswer:",
             0,
         )),
        ({"question": "q?", "subject": "marketing", "choices": ["a", "b", "c", "d"],
          "answer": 3}, None),
    ],
}  # fmt: skip

#: Expected size and label values of every shared file (../shared/data/README.md).
SHARED_FILES = {
    "sst2": (856, {0, 1}),
    "mrpc": (258, {0, 1}),
    "cola": (644, {0, 1}),
    "rte": (262, {0, 1}),
    "nli": (2489, {0, 1}),
    "mmlu": (1516, {0, 1, 2, 3}),
}


def _write(path: Path, records: list) -> Path:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_reader_parses_the_real_layout(tmp_path, name):
    records = [record for record, _ in SAMPLES[name]]
    examples = get_task(name).read(_write(tmp_path / f"{name}.jsonl", records))
    assert len(examples) == 2
    first, second = (expected for _, expected in SAMPLES[name])
    assert examples[0] == first
    label = records[1].get("label", records[1].get("answer"))
    expected_second = {"entailment": 0, "not_entailment": 1}.get(label, label)
    assert examples[1].label == expected_second


def test_every_task_has_a_sample():
    # BoolQ, NQ-open, GSM8K and the reference's NLI have theirs in test_downstream.py.
    assert set(SAMPLES) == set(TASKS) - {"boolq", "nq_open", "gsm8k", "nli_reference"}


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is not there")
@pytest.mark.parametrize("name", sorted(SHARED_FILES))
def test_shared_files_load(name):
    count, labels = SHARED_FILES[name]
    task = get_task(name)
    examples = task.read(SHARED / f"{name}.jsonl")
    assert len(examples) == count
    assert {e.label for e in examples} == labels
    assert task.read(str(SHARED / f"{name}.jsonl"), limit=7) == examples[:7]


@pytest.mark.parametrize(
    ("name", "bad_line", "match"),
    [
        ("sst2", '{"sentence": "good", "label": 1\n', r"sst2\.jsonl, line 3: not valid JSON"),
        ("sst2", '{"label": 1}\n', r"sst2\.jsonl, line 3, field 'sentence': missing"),
        ("sst2", '{"sentence": "ok", "label": 2}\n', r"line 3, field 'label': 2 is not one of"),
        ("sst2", '{"sentence": "ok", "label": true}\n', r"line 3, field 'label': True is not"),
        ("sst2", '{"sentence": "  ", "label": 1}\n', r"line 3, field 'sentence': empty"),
        ("sst2", '["good", 1]\n', r"line 3: expected a JSON object"),
        ("nli", '{"sentence1": "a", "sentence2": "b", "label": 0}\n', r"line 3, field 'label'"),
        ("rte", '{"sentence1": "a", "sentence2": "b", "label": "entailment"}\n', r"'label'"),
        (
            "mmlu",
            '{"question": "q", "subject": "s", "choices": ["a", "b", "c"], "answer": 0}\n',
            r"mmlu\.jsonl, line 3, field 'choices': expected a list of 4",
        ),
        (
            "mmlu",
            '{"question": "q", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": 4}\n',
            r"line 3, field 'answer': 4 is not one of \[0, 1, 2, 3\]",
        ),
    ],
)
def test_malformed_line_names_file_line_and_field(tmp_path, name, bad_line, match):
    good = SAMPLES[name][0][0]
    # Line 2 is blank: blank lines are skipped but still counted.
    path = _write(tmp_path / f"{name}.jsonl", [good, "\n", bad_line, good])
    with pytest.raises(MalformedExampleError, match=match) as info:
        get_task(name).read(path)
    assert isinstance(info.value, ValueError)
    assert (info.value.source, info.value.line) == (str(path), 3)
    # `limit` reads the first N examples only: the bad line is never reached.
    assert len(get_task(name).read(path, limit=1)) == 1


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*hub id such as 'nyu-mll/glue'"):
        get_task("sst2").read(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"Unknown general-ability task 'glue'.*'mmlu'"):
        get_task("glue")


@pytest.fixture
def stub_hub(monkeypatch):
    """A stand-in ``datasets`` module recording load_dataset calls (the hub is unreachable)."""
    calls = []
    rows = {
        "sst2": [{"sentence": "nice", "label": 1, "idx": 0}, {"sentence": "bad", "label": 0}],
        "rte": [{"sentence1": "a", "sentence2": "b", "label": 1, "idx": 0}],
        "all": [
            {"question": "q?", "subject": "anatomy", "choices": list("abcd"), "answer": 2},
        ],
        "cola": [{"sentence": "ok", "label": -1, "idx": 0}],  # GLUE's unlabelled test split
    }

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return rows[name]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_ids_map_to_load_dataset(stub_hub):
    assert [e.label for e in get_task("sst2").read("nyu-mll/glue")] == [1, 0]
    assert get_task("sst2").read(None, limit=1) == get_task("sst2").read("nyu-mll/glue")[:1]
    # nli reads GLUE RTE's train split and names its integer labels (1 = not_entailment).
    assert get_task("nli").read(None)[0].label == 1
    assert (
        get_task("mmlu")
        .read("cais/mmlu")[0]
        .prompt.startswith("The following is a multiple choice question about anatomy.")
    )
    get_task("mmlu").read("cais/mmlu:all@validation")
    assert stub_hub == [
        ("nyu-mll/glue", "sst2", "validation"),
        ("nyu-mll/glue", "sst2", "validation"),
        ("nyu-mll/glue", "sst2", "validation"),
        ("nyu-mll/glue", "rte", "train"),
        ("cais/mmlu", "all", "test"),
        ("cais/mmlu", "all", "validation"),
    ]
    with pytest.raises(MalformedExampleError, match=r"nyu-mll/glue \(cola, test\), row 1"):
        get_task("cola").read("nyu-mll/glue@test")


def test_task_predicts_the_argmax_option(tiny_llama, tokenizer, monkeypatch):
    task = get_task("sst2")
    examples = [GeneralExample("The city of Paris is", 0), GeneralExample("He plays", 1)]
    scores = torch.tensor([[-3.0, -1.0], [-0.5, -2.0]])
    monkeypatch.setattr(
        "sphere_lightning.general.base.score_options", lambda *args, **kwargs: scores
    )
    assert task.predict(tiny_llama, tokenizer, examples).tolist() == [1, 0]
    # Both wrong: accuracy 0, no true positive → F1 0.
    assert task.evaluate(tiny_llama, tokenizer, examples) == {"accuracy": 0.0, "f1": 0.0}
