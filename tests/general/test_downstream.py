"""BoolQ, NQ-open, GSM8K and the reference's NLI: answer checks against the official scripts'
logic, prompts against the reference's builders, scoring and generation against naive loops, and
short runs."""

from __future__ import annotations

import json
import re
import string
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_gpt2, build_tiny_llama, build_tokenizer

from sphere_lightning.callbacks import GeneralAbilityCallback
from sphere_lightning.general import (
    TASKS,
    BoolQTask,
    GenerationExample,
    GSM8KTask,
    MalformedExampleError,
    NLIReferenceTask,
    NQOpenTask,
    get_task,
    nli_reference_answer,
)
from sphere_lightning.general.downstream import (
    answer_exact_match,
    answer_f1,
    extract_number,
    fit_prompts,
    normalize_answer,
    soft_exact_match,
)
from tests.helpers import ContextStub

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "general"
DOWNSTREAM = ("boolq", "nq_open", "gsm8k")

# ----------------------------------------------------------------- the official logic, copied


def squad_normalize(s: str) -> str:
    """``normalize_answer`` of the SQuAD v1.1 evaluation script, verbatim."""

    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def squad_f1(prediction: str, ground_truth: str) -> float:
    """``f1_score`` of the SQuAD v1.1 evaluation script, verbatim."""
    prediction_tokens = squad_normalize(prediction).split()
    ground_truth_tokens = squad_normalize(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def reference_soft_exact_match(normalized_output: str, ground_truths: list[str]) -> bool:
    """``OpenDomainQA_Eval._soft_exact_match`` of the reference (ground truths normalised)."""

    def ems(prediction, truths):
        return max(squad_normalize(prediction) == squad_normalize(gt) for gt in truths)

    if not str(normalized_output).strip():
        return False
    words = normalized_output.split()
    if ems(words[0], ground_truths) or ems(words[-1], ground_truths):
        return True
    for i in range(len(words)):
        output = words[i]
        if ems(output, ground_truths):
            return True
        for j in range(i + 1, len(words)):
            output = output + " " + words[j]
            if ems(output, ground_truths):
                return True
    return False


ANSWER_TEXTS = [
    "The Eiffel Tower",
    "  the  eiffel-tower!! ",
    "An apple a day",
    "Theatre of the absurd",
    "A.B.C.",
    "Wilhelm Conrad Röntgen",
    "wilhelm röntgen in 1901",
    "May 18 , 2018",
    "June 1, 2018.",
    "a",
    "",
    "the the the",
    "Olivia",
    "MFSK (multi-frequency shift keying)",
    "it's Brazil's capital, Brasília",
]

# ----------------------------------------------------------------- NQ normalisation and scores


def test_normalize_answer_on_hand_written_examples():
    assert normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("Theatre of the absurd") == "theatre of absurd"  # whole words only
    assert normalize_answer("A.B.C.") == "abc"
    assert normalize_answer("May 18 , 2018") == "may 18 2018"
    assert normalize_answer("the the the") == ""


@pytest.mark.parametrize("text", ANSWER_TEXTS)
def test_normalize_answer_matches_the_squad_script(text):
    assert normalize_answer(text) == squad_normalize(text)


def test_exact_match_against_any_gold_answer():
    golds = ["Rolling Stones", "The Beatles"]
    assert answer_exact_match("beatles.", golds)
    assert answer_exact_match("the Rolling Stones!", golds)
    assert not answer_exact_match("the Beatles and the Stones", golds)
    assert not answer_exact_match("", golds)
    assert answer_exact_match("May 18, 2018", ["May 18 , 2018"])  # punctuation, not spacing
    assert answer_exact_match("", ["A+"])  # the SQuAD script's verdict: both normalise to ""


def test_token_f1_by_hand_and_against_the_squad_script():
    # 2 shared tokens; 4 predicted, 3 gold: P = 1/2, R = 2/3, F1 = 4/7. The second gold (1 of 1
    # token, 1 of 4 predicted) gives 2/5; the best counts.
    golds = ["Wilhelm Conrad Röntgen", "Röntgen"]
    assert answer_f1("wilhelm röntgen in 1901", golds) == pytest.approx(4 / 7)
    assert answer_f1("the Röntgen", golds) == pytest.approx(1.0)
    assert answer_f1("", golds) == 0.0
    assert answer_f1("Paris Paris", ["Paris"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts
    for prediction in ANSWER_TEXTS:
        for gold in ANSWER_TEXTS:
            assert answer_f1(prediction, [gold]) == pytest.approx(squad_f1(prediction, gold))


def test_soft_exact_match_is_the_references():
    golds = ["Wilhelm Conrad Röntgen", "Röntgen"]
    assert soft_exact_match("It was Wilhelm Röntgen, in 1901.", golds)  # "röntgen" is a span
    assert not soft_exact_match("It was Wilhelm Röntgenium.", golds)  # not as whole words
    assert not soft_exact_match("", golds)
    assert soft_exact_match("The answer: the Beatles", ["Beatles"])
    for prediction in ANSWER_TEXTS:
        for i in range(len(ANSWER_TEXTS) - 1):
            gold = [g for g in ANSWER_TEXTS[i : i + 2] if squad_normalize(g)]
            if gold:
                expected = reference_soft_exact_match(squad_normalize(prediction), gold)
                assert soft_exact_match(prediction, gold) == expected, (prediction, gold)


def test_nq_scores_exact_answers_on_the_first_line():
    task = NQOpenTask()
    golds = ("Wilhelm Conrad Röntgen", "Röntgen")
    assert task.score("Röntgen.\nQuestion: who is he?", golds) == {
        "exact_match": 1.0,
        "f1": 1.0,
        "soft_exact_match": 1.0,
    }
    scores = task.score("He was Wilhelm Röntgen", golds)
    assert scores["exact_match"] == 0.0 and scores["soft_exact_match"] == 1.0
    assert scores["f1"] == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))
    assert task.answer_text(" Paris Answer: Rome\n") == "Rome"  # after the last cue, stripped


# ---------------------------------------------------------------------- GSM8K numbers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Janet makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### 1,234", "1234"),
        ("The total is 1,000,000 dollars", "1000000"),
        ("She pays $1,234.50.", "1234.5"),
        ("It is 18.00", "18"),
        ("It is 0.5 of it", "0.5"),
        ("The temperature fell to -5 degrees", "-5"),
        ("#### -3", "-3"),
        ("She lost -$7 overall", "-7"),
        ("3 apples and 4 pears", "4"),  # no ####: the last number
        ("#### 5\n#### 7", "5"),  # several ####: the first
        ("I had 3 apples #### none", "3"),  # nothing after ####: the last number
        ("#### 12 eggs, 3 boxes", "12"),
        ("There is no number here", None),
        ("", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_gsm8k_scores_exact_number_and_the_references_containment():
    task = GSM8KTask()
    assert task.score("18 dollars.", ("18",)) == {"exact_match": 1.0, "contains_answer": 1.0}
    assert task.score("118", ("18",)) == {"exact_match": 0.0, "contains_answer": 1.0}
    assert task.score("1,000", ("1000",)) == {"exact_match": 1.0, "contains_answer": 0.0}
    assert task.score("$18.00", ("18",))["exact_match"] == 1.0
    assert task.score("18 or 20", ("18",))["exact_match"] == 0.0  # the last number counts
    assert task.score("none", ("18",)) == {"exact_match": 0.0, "contains_answer": 0.0}


# ---------------------------------------------------------------------------- readers, prompts

BOOLQ = {
    "question": "is the city of paris the capital of france",
    "title": "Paris",
    "answer": True,
    "passage": "The city of Paris is the capital of France.",
}
NQ = {
    "question": "who got the first nobel prize in physics?",
    "answer": ["Wilhelm Conrad Röntgen", "Röntgen"],
    "output": ["\n\nThe first Nobel Prize in Physics went to Wilhelm Röntgen."],
}
GSM8K = {
    "question": "Janet has 3 eggs and buys 2. How many eggs does she have?",
    "answer": "She has 3 + 2 = <<3+2=5>>5 eggs.\n#### 5",
}


def _write(path: Path, records: list) -> Path:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))
    return path


def test_registered_by_name():
    assert set(DOWNSTREAM) <= set(TASKS)
    for name, cls in zip(DOWNSTREAM, (BoolQTask, NQOpenTask, GSM8KTask), strict=True):
        assert isinstance(get_task(name), cls)


def test_prompts_are_the_references(tmp_path):
    # The reference's _create_prompt of each evaluator, zero-shot.
    boolq = (
        "Please answer the given question based on the passage. The answer should be exact "
        f"'yes' or 'no'. passage: {BOOLQ['passage']} question: {BOOLQ['question']}. answer: "
    )
    nq = (
        "Refer to the passage below and answer the following question.\n"
        f"Passage: {NQ['output'][0]}\nQuestion: {NQ['question']}\nAnswer:"
    )
    hint, gold = GSM8K["answer"].split("#### ")[0], GSM8K["answer"].split("#### ")[1]
    gsm8k = (
        f"Q: {GSM8K['question']} A:Let's think step by step. {hint} "
        "Therefore, the answer (arabic numerals) is:"
    )
    (example,) = get_task("boolq").read(_write(tmp_path / "b.jsonl", [BOOLQ]))
    assert example.prompt + " " == boolq and example.label == 1  # the space is the option's
    assert get_task("nq_open").read(_write(tmp_path / "n.jsonl", [NQ])) == [
        GenerationExample(nq, ("Wilhelm Conrad Röntgen", "Röntgen"))
    ]
    assert get_task("gsm8k").read(_write(tmp_path / "g.jsonl", [GSM8K])) == [
        GenerationExample(gsm8k, (gold,))
    ]
    no_passage = {k: v for k, v in NQ.items() if k != "output"}
    (example,) = get_task("nq_open").read(_write(tmp_path / "q.jsonl", [no_passage]))
    assert example.prompt == f"Answer the following question.\nQuestion: {NQ['question']}\nAnswer:"


@pytest.mark.parametrize(
    ("name", "bad", "match"),
    [
        ("boolq", {**BOOLQ, "answer": "yes"}, r"line 2, field 'answer': expected true or false"),
        ("boolq", {**BOOLQ, "answer": 1}, r"field 'answer': expected true or false, got 1"),
        ("boolq", {**BOOLQ, "passage": " "}, r"field 'passage': empty"),
        ("nq_open", {**NQ, "answer": []}, r"field 'answer': expected a non-empty list"),
        ("nq_open", {**NQ, "answer": ["x", 3]}, r"field 'answer\[1\]': expected a non-empty"),
        ("nq_open", {**NQ, "answer": [" "]}, r"field 'answer\[0\]'"),
        ("nq_open", {**NQ, "output": "text"}, r"field 'output': expected a list of passage"),
        ("gsm8k", {**GSM8K, "answer": "5"}, r"field 'answer': expected a solution ending"),
        ("gsm8k", {**GSM8K, "answer": "so #### five"}, r"field 'answer': expected a solution"),
        ("gsm8k", {"answer": GSM8K["answer"]}, r"field 'question': missing"),
    ],
)
def test_malformed_records_name_line_and_field(tmp_path, name, bad, match):
    good = {"boolq": BOOLQ, "nq_open": NQ, "gsm8k": GSM8K}[name]
    path = _write(tmp_path / f"{name}.jsonl", [good, bad])
    with pytest.raises(MalformedExampleError, match=match):
        get_task(name).read(path)
    assert len(get_task(name).read(path, limit=1)) == 1


def test_max_new_tokens_is_checked():
    assert (NQOpenTask().max_new_tokens, GSM8KTask().max_new_tokens) == (20, 5)
    assert GSM8KTask(max_new_tokens=12).max_new_tokens == 12
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=r"`max_new_tokens` should be"):
            NQOpenTask(max_new_tokens=bad)


def test_hub_ids_map_to_load_dataset(monkeypatch):
    calls = []
    rows = {
        "google/boolq": [BOOLQ],
        "google-research-datasets/nq_open": [{"question": "who?", "answer": ["Ann"]}],
        "openai/gsm8k": [GSM8K],
    }

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return rows[path]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert [e.label for e in get_task("boolq").read(None)] == [1]
    (example,) = get_task("nq_open").read("google-research-datasets/nq_open")
    assert example.prompt.startswith("Answer the following question.") and example.answers == (
        "Ann",
    )
    assert get_task("gsm8k").read(None)[0].answers == ("5",)
    assert calls == [
        ("google/boolq", None, "validation"),
        ("google-research-datasets/nq_open", None, "validation"),
        ("openai/gsm8k", "main", "test"),
    ]


# ---------------------------------------------------------------------------- scoring, generating


@pytest.fixture(scope="module")
def yes_no_tokenizer():
    """The word-level test tokenizer with "yes" and "no" as words of their own."""
    tok = build_tokenizer()
    tok.add_tokens(["yes", "no"])
    return tok


def _naive_option_logprobs(model, tokenizer, prompt: str, options) -> list[float]:
    scores = []
    prompt_len = len(tokenizer(prompt)["input_ids"])
    for option in options:
        ids = torch.tensor([tokenizer(prompt + option)["input_ids"]])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0].log_softmax(-1)
        scores.append(
            sum(float(logprobs[p - 1, ids[0, p]]) for p in range(prompt_len, ids.shape[1]))
        )
    return scores


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_boolq_predictions_equal_a_naive_per_option_loop(tmp_path, yes_no_tokenizer, family):
    tok = yes_no_tokenizer
    model = {"gpt2": build_tiny_gpt2, "llama": build_tiny_llama}[family](tok).eval()
    questions = [
        ("is paris the capital of france", "The city of Paris is the capital of France.", True),
        ("does the river flow to the ocean", "The river flows through the valley.", False),
        ("is the dog small", "A small dog ran across the park.", True),
        ("was it a cold day", "It was a cold day when the train arrived.", True),
        ("is the shop closed", "Because of the rain, the market was closed.", False),
    ]
    records = [{"question": q, "passage": p, "answer": a, "title": "t"} for q, p, a in questions]
    task = get_task("boolq")
    examples = task.read(_write(tmp_path / "boolq.jsonl", records))
    assert all(len(tok(e.prompt)["input_ids"]) < 100 for e in examples)
    # [no, yes] written out: prediction 1 must mean "yes", the label of a true answer.
    naive = [_naive_option_logprobs(model, tok, e.prompt, [" no", " yes"]) for e in examples]
    assert len({round(s[1] - s[0], 4) for s in naive}) == len(examples), "options must differ"
    expected = torch.tensor([max(range(2), key=s.__getitem__) for s in naive])
    for batch_size in (1, 2, 16):
        assert torch.equal(task.predict(model, tok, examples, batch_size=batch_size), expected)
    target = torch.tensor([e.label for e in examples])
    metrics = task.evaluate(model, tok, examples)
    tp = int(((expected == 1) & (target == 1)).sum())
    fp, fn = (
        int(((expected == 1) & (target == 0)).sum()),
        int(((expected == 0) & (target == 1)).sum()),
    )
    assert metrics["accuracy"] == pytest.approx(float((expected == target).float().mean()))
    assert metrics["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp else 0.0)


def test_boolq_weighted_f1_by_hand():
    preds, target = torch.tensor([1, 1, 1, 0, 0]), torch.tensor([1, 0, 1, 1, 0])
    # "yes" (support 3): P 2/3, R 2/3; "no" (support 2): P 1/2, R 1/2.
    metrics = BoolQTask().compute_metrics(preds, target)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["f1_weighted"] == pytest.approx((3 * 2 / 3 + 2 * 1 / 2) / 5)


def _one_at_a_time(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """One unpadded greedy ``generate`` call, the continuation decoded."""
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(
        **enc,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("tiny_model", ["gpt2", "llama"], indirect=True)
@pytest.mark.parametrize("name", ["nq_open", "gsm8k"])
def test_generation_is_batched_like_single_prompts(tiny_model, tokenizer, name):
    task = get_task(name)
    prompts = [
        "The city of Paris is the capital of",
        "He plays",
        "A small dog ran across the park while children were playing with a",
        "We visited the museum , the library and the",
        "Answer:",
    ]
    expected = [_one_at_a_time(tiny_model, tokenizer, p, task.max_new_tokens) for p in prompts]
    assert len(set(expected)) == len(expected)
    for batch_size in (1, 2, 16):
        assert task.generate(tiny_model, tokenizer, prompts, batch_size=batch_size) == expected


def test_long_prompts_lose_tokens_from_the_left(tiny_gpt2, tokenizer):
    # 128 positions: a 300-word prompt would index past GPT-2's position table.
    long = "The river flows to the sea . " * 40 + "Answer:"
    (cut,) = fit_prompts(tokenizer, [long], 100)
    assert len(tokenizer(cut)["input_ids"]) == 100 and long.endswith(cut)
    assert fit_prompts(tokenizer, ["He plays"], 100) == ["He plays"]
    task = NQOpenTask()
    (text,) = task.generate(tiny_gpt2, tokenizer, [long])
    assert text == _one_at_a_time(tiny_gpt2, tokenizer, fit_prompts(tokenizer, [long], 108)[0], 20)
    with pytest.raises(ValueError, match=r"`max_new_tokens` \(200\) leaves no room"):
        NQOpenTask(max_new_tokens=200).generate(tiny_gpt2, tokenizer, ["He plays"])


@pytest.mark.parametrize("name", ["nq_open", "gsm8k"])
def test_evaluate_averages_the_per_example_scores(tmp_path, tiny_llama, tokenizer, name):
    task = get_task(name)
    record = {"nq_open": NQ, "gsm8k": GSM8K}[name]
    examples = task.read(_write(tmp_path / "x.jsonl", [record] * 2))
    generated = task.generate(tiny_llama, tokenizer, [e.prompt for e in examples])
    # Gold answers the tiny model did (and did not) write: the metrics are the means.
    words = task.answer_text(generated[0]).split()
    examples = [
        GenerationExample(examples[0].prompt, (words[0] if name == "nq_open" else "1",)),
        GenerationExample(examples[1].prompt, ("Nobody",) if name == "nq_open" else ("2",)),
    ]
    expected = [
        task.score(task.answer_text(g), e.answers) for g, e in zip(generated, examples, strict=True)
    ]
    metrics = task.evaluate(tiny_llama, tokenizer, examples, batch_size=2)
    assert set(metrics) == set(task.metrics)
    for metric in task.metrics:
        assert metrics[metric] == pytest.approx((expected[0][metric] + expected[1][metric]) / 2)
    if name == "nq_open":
        assert metrics["soft_exact_match"] == 0.5
    with pytest.raises(ValueError, match="no examples"):
        task.evaluate(tiny_llama, tokenizer, [])


# ----------------------------------------------------------------------------------- short runs


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is not there")
@pytest.mark.parametrize("tiny_model", ["gpt2", "llama"], indirect=True)
def test_each_task_runs_on_the_shared_files_with_limit_3(tiny_model, tokenizer):
    module, trainer = ContextStub(tiny_model, tokenizer), types.SimpleNamespace(global_step=0)
    tasks = {"boolq": {}, "nq_open": {"batch_size": 3}, "gsm8k": {}}
    callback = GeneralAbilityCallback(
        tasks, data_dir=str(SHARED), limit=3, batch_size=2, progress=False
    )
    callback.setup(trainer, module, "fit")
    callback.on_train_start(trainer, module)  # the baseline, before any edit
    for name in DOWNSTREAM:
        task = get_task(name)
        examples = task.read(SHARED / f"{name}.jsonl", limit=3)
        assert callback.examples[name] == examples and len(examples) == 3
        expected = task.evaluate(tiny_model, tokenizer, examples, batch_size=2)
        assert set(expected) == set(task.metrics) | ({"f1_weighted"} if name == "boolq" else set())
        assert all(0.0 <= value <= 1.0 for value in expected.values()), (name, expected)
        for metric, value in expected.items():
            assert module.last_logged[f"general/{name}/{metric}"] == pytest.approx(value)
        assert callback.summary(trainer, module)[name]["baseline"] == pytest.approx(expected)


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is not there")
def test_shared_files_load():
    for name, count in (("boolq", 3267), ("nq_open", 3610), ("gsm8k", 1319)):
        examples = get_task(name).read(SHARED / f"{name}.jsonl")
        assert len(examples) == count
    assert examples[0].answers == ("18",)  # GSM8K's first problem


# ------------------------------------------------------------------- NLI, the reference's protocol

NLI_RECORDS = [
    {"sentence1": s1, "sentence2": s2, "label": label}
    for s1, s2, label in (
        ("The city of Paris is the capital of France.", "Paris is in France.", "entailment"),
        ("He plays soccer on Sunday.", "He plays tennis.", "not_entailment"),
        ("A small dog ran across the park.", "A dog ran.", "entailment"),
        ("The river flows through the valley.", "The river is dry.", "not_entailment"),
        ("We visited the museum and the library.", "We visited the library.", "entailment"),
        ("The company was founded in Japan.", "The company is French.", "not_entailment"),
        ("Many people speak English at home.", "Nobody speaks English.", "not_entailment"),
        ("It was a cold day when the train arrived.", "The train arrived.", "entailment"),
    )
]


def reference_nli_prompt(example: dict) -> str:
    """``NLIEval._create_prompt`` of ``RECT_eval/NLI_eval.py``, zero-shot (no few-shot context)."""
    postfix_prompt = "answer:"
    return f"{example['sentence1']} entails {example['sentence2']}. True or False? {postfix_prompt}"


def reference_get_answer(generated_text: str) -> int:
    """``NLIEval._get_answer``, verbatim: 1 true, 0 false, -1 invalid."""
    lower = generated_text.lower()
    if "true" in lower:
        return 1
    elif "false" in lower:
        return 0
    return -1


def test_nli_reference_is_registered_and_reads_the_nli_file(tmp_path):
    task = get_task("nli_reference")
    assert isinstance(task, NLIReferenceTask) and task.max_new_tokens == 1
    assert task.data_file == "nli" and TASKS["nli"] is not NLIReferenceTask
    examples = task.read(_write(tmp_path / "nli.jsonl", NLI_RECORDS))
    assert [e.prompt for e in examples] == [reference_nli_prompt(r) for r in NLI_RECORDS]
    assert examples[0].prompt == (
        "The city of Paris is the capital of France. entails Paris is in France.. "
        "True or False? answer:"
    )
    # The reference's label: 1 ("true") unless "not_entailment".
    assert [e.answers for e in examples] == [
        ("false",) if r["label"] == "not_entailment" else ("true",) for r in NLI_RECORDS
    ]
    bad = {**NLI_RECORDS[0], "label": 0}
    with pytest.raises(MalformedExampleError, match=r"line 2, field 'label': expected one of"):
        task.read(_write(tmp_path / "bad.jsonl", [NLI_RECORDS[0], bad]))
    # From the hub, GLUE RTE's integer labels are named first, as for `nli`.
    assert task.from_hub({"label": 1})["label"] == "not_entailment"


@pytest.mark.parametrize(
    "text", ["True", " true.", "FALSE", "false", "It is true or false", "maybe", "", "no", "Tr ue"]
)
def test_nli_reference_answer_parses_like_the_reference(text):
    expected = {1: "true", 0: "false", -1: None}[reference_get_answer(text)]
    assert nli_reference_answer(text) == expected


@pytest.fixture(scope="module")
def true_false_llama():
    """A tiny Llama over the test tokenizer plus "true", "false" and "maybe", whose LM head
    (not tied to the embeddings) can only rank those three above 0: its greedy next token is one
    of them or, when all three score below 0, the first token of the vocabulary (an invalid
    answer)."""
    tok = build_tokenizer()
    tok.add_tokens(["true", "false", "maybe"])
    model = build_tiny_llama(tok, seed=3).eval()
    words = tok.convert_tokens_to_ids(["true", "false", "maybe"])
    with torch.no_grad():
        head = model.lm_head.weight
        kept = head[words].clone() * 200.0
        head.zero_()
        head[words] = kept
    return model, tok


def _reference_nli_loop(model, tokenizer, records) -> dict[str, float]:
    """``NLIEval.evaluate``'s accuracy as a plain loop: one unpadded greedy token per prompt,
    the answer parsed by the reference's ``_get_answer``, invalid answers left out of the
    accuracy. (The reference splits the decoded prompt + answer at "answer:"; the test tokenizer
    decodes "answer:" as "answer :", so the continuation is decoded on its own here.)"""
    correct = incorrect = invalid = 0
    for record in records:
        answer_text = _one_at_a_time(model, tokenizer, reference_nli_prompt(record), 1).strip()
        answer = reference_get_answer(answer_text)
        label = 1 if record["label"] != "not_entailment" else 0
        if answer == -1:
            invalid += 1
        elif answer == label:
            correct += 1
        else:
            incorrect += 1
    total = correct + incorrect
    return {
        "accuracy": correct / total if total > 0 else 0.0,
        "invalid": invalid / len(records),
        "counts": (correct, incorrect, invalid),
    }


def test_nli_reference_accuracy_equals_the_references_plain_loop(tmp_path, true_false_llama):
    model, tok = true_false_llama
    task = get_task("nli_reference")
    examples = task.read(_write(tmp_path / "nli.jsonl", NLI_RECORDS))
    expected = _reference_nli_loop(model, tok, NLI_RECORDS)
    correct, incorrect, invalid = expected["counts"]
    # The case under test: right, wrong and invalid answers all occur.
    assert correct and incorrect and invalid, expected["counts"]
    for batch_size in (1, 3, 16):
        metrics = task.evaluate(model, tok, examples, batch_size=batch_size)
        assert set(metrics) == set(task.metrics)
        assert metrics["accuracy"] == pytest.approx(expected["accuracy"])
        assert metrics["invalid"] == pytest.approx(expected["invalid"])
    # Invalid answers are excluded, not counted wrong.
    assert metrics["accuracy"] != pytest.approx(correct / len(NLI_RECORDS))
