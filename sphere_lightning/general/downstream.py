"""The downstream tasks of RECT / SPHERE: BoolQ, NQ-open and GSM8K.

The SPHERE paper measures general ability after editing on four tasks taken over from RECT
(``RECT_eval/`` in github PlusLabNLP/SPHERE): NLI, closed-domain QA (BoolQ), open-domain QA
(NQ-open) and reasoning (GSM8K). Prompts are the reference's, zero-shot (``RECTEval`` builds every
evaluator with ``number_of_few_shots=0``):

- :class:`NLIReferenceTask` (``nli_reference``) is the reference's NLI protocol: one greedy token,
  parsed for "true"/"false", accuracy over the valid answers
  (:class:`~sphere_lightning.general.tasks.NLI`, ``nli``, is this project's log-likelihood
  variant with its own prompt);

- :class:`BoolQTask` is multiple choice, scored like the GLUE tasks by the log-likelihood of
  ``" yes"`` / ``" no"`` (the reference's ``f1_new``; its ``acc`` parses one greedy token);
- :class:`NQOpenTask` and :class:`GSM8KTask` generate greedily (the reference's 20 and 5 new
  tokens) and compare the text after the prompt's answer cue with the gold answers.

The answer checks are pure functions (:func:`normalize_answer`, :func:`answer_exact_match`,
:func:`answer_f1`, :func:`soft_exact_match`, :func:`extract_number`), tested on their own.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar

import torch
from torchmetrics.functional.classification import multiclass_f1_score
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.distributed import SINGLE, Collective
from sphere_lightning.fluency import greedy_generations
from sphere_lightning.general.base import GeneralTask, HubDataset, Record
from sphere_lightning.general.tasks import NLI_LABEL_NAMES, TASKS, name_rte_label

# ------------------------------------------------------------------------- answer normalisation

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD / NQ-open answer normalisation: lower-case, drop ASCII punctuation, the articles
    a/an/the, and collapse whitespace (``normalize_answer`` of the SQuAD v1.1 script, which the
    reference's ``OpenDomainQA_eval.py`` copies)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """Whether the normalised prediction equals any normalised gold answer.

    As in the SQuAD script, a gold answer that normalises to nothing (``"A+"``, an article and
    punctuation) is matched by an empty prediction.
    """
    normalized = normalize_answer(prediction)
    return any(normalized == normalize_answer(answer) for answer in answers)


def _token_f1(prediction: str, answer: str) -> float:
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def answer_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD v1.1 token F1 of the normalised prediction, the best over the gold answers.

    Tokens are the words of the normalised texts, counted with multiplicity; no shared token
    (an empty prediction included) gives 0.
    """
    return max((_token_f1(prediction, answer) for answer in answers), default=0.0)


def soft_exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """The reference's NQ accuracy (``_soft_exact_match``): some run of consecutive words of the
    normalised prediction equals a normalised gold answer, i.e. the answer appears in the text
    as whole words."""
    words = normalize_answer(prediction).split()
    golds = {normalize_answer(answer) for answer in answers} - {""}
    return any(
        " ".join(words[i:j]) in golds
        for i in range(len(words))
        for j in range(i + 1, len(words) + 1)
    )


# ------------------------------------------------------------------------------ GSM8K numbers

#: A number as GSM8K writes it: an optional minus, an optional ``$``, digits with optional
#: thousands commas and an optional decimal part (``-$1,234.50``).
_NUMBER = re.compile(r"(-?)\$?(\d[\d,]*(?:\.\d+)?)")


def _canonical_number(sign: str, digits: str) -> str:
    """``"-"``, ``"1,234.50"`` → ``"-1234.5"``: commas removed, trailing decimal zeros dropped."""
    digits = digits.replace(",", "")
    try:
        value = Decimal(sign + digits)
    except InvalidOperation:  # pragma: no cover - the pattern only matches valid decimals
        return sign + digits
    text = format(value.normalize(), "f")
    return "0" if text == "-0" else text


def extract_number(text: str) -> str | None:
    """The answer number of a GSM8K solution or generation, as a canonical string.

    The number right after the first ``####`` when there is one (GSM8K's answer mark; the
    official ``extract_answer`` also takes the first), else the last number in the text, else
    ``None``. Commas are removed (``1,000`` → ``1000``), a ``$`` is skipped, a leading minus is
    kept and trailing decimal zeros are dropped (``18.00`` → ``18``), so equal values compare
    equal as strings.
    """
    head, mark, tail = text.partition("####")
    if mark:
        match = _NUMBER.search(tail)
        if match:
            return _canonical_number(*match.groups())
    matches = _NUMBER.findall(text)
    return _canonical_number(*matches[-1]) if matches else None


# ------------------------------------------------------------------------------------- BoolQ


class BoolQTask(GeneralTask):
    """BoolQ, the reference's closed-domain QA: a yes/no question about a Wikipedia passage.

    Records: ``question``, ``passage``, ``answer`` (a JSON boolean). Prompt, as
    ``ClosedDomainQA_eval.py`` builds it (zero-shot)::

        Please answer the given question based on the passage. The answer should be exact 'yes'
        or 'no'. passage: {passage} question: {question}. answer:

    (one line). Options ``" no"`` (0) and ``" yes"`` (1, ``answer`` true, the positive class of
    F1), scored by log-likelihood. The reference's prompt ends in ``"answer: "`` and it scores
    ``prompt + " yes"``; here the space belongs to the option, so the answer word is tokenised
    as it would be written. Reports accuracy, the binary F1 of "yes", MCC, and ``f1_weighted``,
    the support-weighted F1 over both classes the reference reports.
    """

    name = "boolq"
    options = (" no", " yes")
    text_fields = ("passage", "question")
    label_field = "answer"
    labels = {False: 0, True: 1}
    positive = 1
    metrics = ("accuracy", "f1", "mcc")
    hub = HubDataset("google/boolq", None, "validation")

    def prompt(self, record: Mapping[str, Any]) -> str:
        return (
            "Please answer the given question based on the passage. The answer should be exact "
            f"'yes' or 'no'. passage: {record['passage']} question: {record['question']}. answer:"
        )

    def label(self, record: Record) -> int:
        """1 for ``true``, 0 for ``false``; anything but a JSON boolean is malformed."""
        value = record.get(self.label_field)
        if not isinstance(value, bool):
            raise record.error(self.label_field, f"expected true or false, got {value!r}")
        return int(value)

    def compute_metrics(self, preds: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Accuracy, F1 of "yes", MCC and the reference's weighted F1."""
        values = super().compute_metrics(preds, target)
        values["f1_weighted"] = float(
            multiclass_f1_score(preds.long(), target.long(), num_classes=2, average="weighted")
        )
        return values


# ---------------------------------------------------------------------------- generated answers


@dataclass(frozen=True)
class GenerationExample:
    """One example answered by generation: the prompt and the gold answers (any may match)."""

    prompt: str
    answers: tuple[str, ...]


def fit_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_tokens: int
) -> list[str]:
    """Cut prompts from the left until each tokenises to at most ``max_tokens`` tokens.

    A cut prompt starts at the first token that still fits (the tokenizer's special tokens, a
    BOS, are added again when it is tokenised). Needs a fast tokenizer for the character
    offsets; with a slow one prompts are returned as they are.
    """
    if max_tokens < 1:
        raise ValueError(f"`max_tokens` should be ≥ 1, got {max_tokens}")
    if not tokenizer.is_fast:
        return list(prompts)
    fitted = []
    for prompt in prompts:
        while True:
            special = len(tokenizer(prompt)["input_ids"])
            plain = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
            special -= len(plain["input_ids"])
            keep = max_tokens - special
            if len(plain["input_ids"]) <= keep:
                break
            if keep < 1:
                raise ValueError(
                    f"Prompts cannot fit in {max_tokens} tokens with {special} special tokens"
                )
            start = plain["offset_mapping"][len(plain["input_ids"]) - keep][0]
            if start <= 0:  # pragma: no cover - only for tokenizers with unusual offsets
                break
            prompt = prompt[start:]
        fitted.append(prompt)
    return fitted


class GenerationTask(GeneralTask):
    """A task answered by greedy generation and checked against gold answers.

    Subclasses set :attr:`answer_cue` and :attr:`default_max_new_tokens` and write
    :meth:`prompt`, :meth:`gold_answers` and :meth:`score`. Like the reference, the answer is
    the generated text after the last :attr:`answer_cue` (the prompt ends with it, so normally
    the whole generation), stripped.

    Generation is batched and left-padded (:func:`~sphere_lightning.fluency.greedy_generations`),
    prompts sorted by length so a batch holds similar lengths. A prompt that would not leave
    ``max_new_tokens`` positions within the model's ``max_position_embeddings`` loses tokens
    from the left (:func:`fit_prompts`), as option scoring does.

    Args:
        max_new_tokens: Tokens generated per example (``None``: the reference's number,
            :attr:`default_max_new_tokens`); generation also stops at the EOS token.
    """

    options = ()
    labels: ClassVar[Mapping[Any, int]] = {}
    answer_cue: ClassVar[str]
    default_max_new_tokens: ClassVar[int]

    def __init__(self, max_new_tokens: int | None = None) -> None:
        if max_new_tokens is None:
            max_new_tokens = self.default_max_new_tokens
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ValueError(f"`max_new_tokens` should be an int ≥ 1, got {max_new_tokens!r}")
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` should be ≥ 1, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens

    def gold_answers(self, record: Record) -> tuple[str, ...]:
        """The validated gold answers of a record."""
        raise NotImplementedError

    def score(self, answer: str, gold: Sequence[str]) -> dict[str, float]:
        """``{metric: value}`` of one answer (the text after the cue) against its gold answers."""
        raise NotImplementedError

    def parse(self, record: Record) -> GenerationExample:  # type: ignore[override]
        """Validate one record and turn it into a prompt and its gold answers."""
        fields = {field: record.string(field) for field in self.text_fields}
        fields.update(self.extra_fields(record))
        return GenerationExample(self.prompt(fields), self.gold_answers(record))

    def answer_text(self, generation: str) -> str:
        """The answer part of a generation: what follows the last :attr:`answer_cue`, stripped."""
        return generation.split(self.answer_cue)[-1].strip()

    def generate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        batch_size: int = 16,
        progress: bool = False,
    ) -> list[str]:
        """Greedy continuations (without the prompt) of ``prompts``, in their order."""
        if batch_size < 1:
            raise ValueError(f"`batch_size` should be ≥ 1, got {batch_size}")
        context = getattr(model.config, "max_position_embeddings", None)
        if context is not None:
            if context <= self.max_new_tokens:
                raise ValueError(
                    f"`max_new_tokens` ({self.max_new_tokens}) leaves no room for a prompt in the "
                    f"model's {context} positions ({self.name})"
                )
            prompts = fit_prompts(tokenizer, prompts, context - self.max_new_tokens)
        lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        texts: list[str] = [""] * len(prompts)
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=self.name, leave=False, disable=not progress):
            chunk = order[start : start + batch_size]
            generated = greedy_generations(
                model,
                tokenizer,
                [prompts[i] for i in chunk],
                max_new_tokens=self.max_new_tokens,
                batch_size=len(chunk),
                include_prompt=False,
            )
            for i, text in zip(chunk, generated, strict=True):
                texts[i] = text
        return texts

    def evaluate(  # type: ignore[override]
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[GenerationExample],
        batch_size: int = 16,
        progress: bool = False,
        collective: Collective = SINGLE,
    ) -> dict[str, float]:
        """Generate an answer for every example and return the mean of each metric (each
        process generates for its share of ``examples``; the means are over all of them)."""
        if not examples:
            raise ValueError(f"{self.name}: no examples to evaluate")

        def scores(share: Sequence[GenerationExample]) -> dict[str, torch.Tensor]:
            generations = self.generate(
                model, tokenizer, [e.prompt for e in share], batch_size, progress
            )
            rows = [
                self.score(self.answer_text(generation), example.answers)
                for example, generation in zip(share, generations, strict=True)
            ]
            return {m: torch.tensor([row[m] for row in rows], dtype=torch.float64) for m in rows[0]}

        return self.reduce(
            {
                metric: float(values.mean())
                for metric, values in collective.map(scores, examples).items()
            }
        )

    def reduce(self, means: dict[str, float]) -> dict[str, float]:
        """The task's metrics from the means over the examples of :meth:`score`'s values
        (default: those means)."""
        return means


class NQOpenTask(GenerationTask):
    """NQ-open, the reference's open-domain QA: a question, a passage, a short free answer.

    Records: ``question``, ``answer`` (a list of gold answers, any of which is right) and,
    optionally, ``output`` (a list whose first string is a passage about the question; the
    reference's data has one per record). Prompt, as ``OpenDomainQA_eval.py`` builds it
    (zero-shot; the passage verbatim, leading blank lines included)::

        Refer to the passage below and answer the following question.
        Passage: {output[0]}
        Question: {question}
        Answer:

    Without ``output`` (the hub's ``google-research-datasets/nq_open`` has none) the prompt is
    ``"Answer the following question.\\nQuestion: {question}\\nAnswer:"``. Greedy, 20 new
    tokens. Metrics, on the text after the last ``"Answer:"``, against every gold answer
    (:func:`normalize_answer` on both sides):

    - ``exact_match`` and ``f1`` (SQuAD token F1): of the answer's first line, so that the model
      going on to a new line does not count against an exact answer;
    - ``soft_exact_match``: the reference's accuracy, a gold answer appears as whole words
      anywhere in the answer.
    """

    name = "nq_open"
    text_fields = ("question",)
    label_field = "answer"
    metrics = ("exact_match", "f1", "soft_exact_match")
    hub = HubDataset("google-research-datasets/nq_open", None, "validation")
    answer_cue = "Answer:"
    default_max_new_tokens = 20

    def extra_fields(self, record: Record) -> dict[str, Any]:
        if "output" not in record.raw:
            return {}
        output = record.get("output")
        if not isinstance(output, list) or not output or not isinstance(output[0], str):
            raise record.error("output", f"expected a list of passage strings, got {output!r}")
        if not output[0].strip():
            raise record.error("output", "the first passage is empty")
        return {"passage": output[0]}

    def prompt(self, record: Mapping[str, Any]) -> str:
        if "passage" not in record:
            return f"Answer the following question.\nQuestion: {record['question']}\nAnswer:"
        return (
            "Refer to the passage below and answer the following question.\n"
            f"Passage: {record['passage']}\nQuestion: {record['question']}\nAnswer:"
        )

    def gold_answers(self, record: Record) -> tuple[str, ...]:
        answers = record.get(self.label_field)
        if not isinstance(answers, list) or not answers:
            raise record.error(self.label_field, f"expected a non-empty list, got {answers!r}")
        for i, answer in enumerate(answers):
            if not isinstance(answer, str) or not answer.strip():
                raise record.error(
                    f"{self.label_field}[{i}]", f"expected a non-empty answer, got {answer!r}"
                )
        return tuple(answers)

    def score(self, answer: str, gold: Sequence[str]) -> dict[str, float]:
        first_line = answer.split("\n", 1)[0]
        return {
            "exact_match": float(answer_exact_match(first_line, gold)),
            "f1": answer_f1(first_line, gold),
            "soft_exact_match": float(soft_exact_match(answer, gold)),
        }


_GSM8K_MARK = "#### "


class GSM8KTask(GenerationTask):
    """GSM8K, the reference's reasoning task: a grade-school word problem with a numeric answer.

    Records: ``question`` and ``answer`` (the worked solution, ending ``"#### <number>"``).
    Prompt, as ``reasoning_eval.py`` builds it (one line; ``{rationale}`` is the gold solution
    up to ``"#### "``, calculator annotations and its final newline included)::

        Q: {question} A:Let's think step by step. {rationale} Therefore, the answer (arabic
        numerals) is:

    So, as in the reference, the model is given the worked solution and asked for its final
    number: this measures whether it can still read off and state an answer, not multi-step
    reasoning. Greedy, 5 new tokens. Metrics, on the text after the last answer cue:

    - ``exact_match``: :func:`extract_number` of the answer equals the gold number (the number
      after ``"####"``, commas removed);
    - ``contains_answer``: the reference's accuracy, the gold answer's text is a substring of
      the answer (so ``"18"`` also matches ``"118"``).
    """

    name = "gsm8k"
    text_fields = ("question", "answer")
    label_field = "answer"
    metrics = ("exact_match", "contains_answer")
    hub = HubDataset("openai/gsm8k", "main", "test")
    answer_cue = "Therefore, the answer (arabic numerals) is:"
    default_max_new_tokens = 5

    def _split(self, record: Record) -> tuple[str, str]:
        solution = record.string(self.label_field)
        rationale, mark, final = solution.partition(_GSM8K_MARK)
        if not mark or extract_number(final) is None:
            raise record.error(
                self.label_field, f"expected a solution ending '{_GSM8K_MARK}<number>'"
            )
        return rationale, final

    def extra_fields(self, record: Record) -> dict[str, Any]:
        return {"rationale": self._split(record)[0]}

    def prompt(self, record: Mapping[str, Any]) -> str:
        return (
            f"Q: {record['question']} A:Let's think step by step. {record['rationale']} "
            f"{self.answer_cue}"
        )

    def gold_answers(self, record: Record) -> tuple[str, ...]:
        """The text after ``"#### "`` (what the reference compares)."""
        return (self._split(record)[1],)

    def score(self, answer: str, gold: Sequence[str]) -> dict[str, float]:
        predicted = extract_number(answer)
        return {
            "exact_match": float(predicted is not None and predicted == extract_number(gold[0])),
            "contains_answer": float(gold[0] in answer),
        }


def nli_reference_answer(answer: str) -> str | None:
    """``NLI_eval.py``'s ``_get_answer``: ``"true"`` if the lower-cased answer contains
    "true", else ``"false"`` if it contains "false", else ``None`` (an invalid answer)."""
    lower = answer.lower()
    if "true" in lower:
        return "true"
    if "false" in lower:
        return "false"
    return None


class NLIReferenceTask(GenerationTask):
    """NLI as the reference evaluates it (``RECT_eval/NLI_eval.py``), on the RTE-style set of
    RECT / SPHERE (the records of :class:`~sphere_lightning.general.tasks.NLI`).

    Prompt (zero-shot, one line)::

        {sentence1} entails {sentence2}. True or False? answer:

    Greedy, 1 new token (the reference's ``gen_len=1``). The answer, the text after the last
    ``"answer:"`` stripped, is lower-cased and read as true if it contains "true", else false if
    it contains "false", else invalid (:func:`nli_reference_answer`); the gold answer is "true"
    for every label but ``"not_entailment"``. Metrics:

    - ``accuracy``: correct answers over the valid ones, invalid answers excluded (the
      reference's ``acc``; 0 when every answer is invalid);
    - ``invalid``: the share of examples whose answer is invalid.

    The reference also reports a weighted F1 and MCC of the parsed answers (invalid ones as a
    third class) and ``f1_new`` from the answer words' likelihood; they are not computed here
    (``nli`` scores the likelihood).
    """

    name = "nli_reference"
    text_fields = ("sentence1", "sentence2")
    metrics = ("accuracy", "invalid")
    hub = HubDataset("nyu-mll/glue", "rte", "train")
    data_file = "nli"  # the records of `nli`
    answer_cue = "answer:"
    default_max_new_tokens = 1

    def prompt(self, record: Mapping[str, Any]) -> str:
        return f"{record['sentence1']} entails {record['sentence2']}. True or False? answer:"

    def from_hub(self, row: dict[str, Any]) -> dict[str, Any]:
        return name_rte_label(row)

    def gold_answers(self, record: Record) -> tuple[str, ...]:
        label = record.get(self.label_field)
        if label not in NLI_LABEL_NAMES:
            raise record.error(
                self.label_field, f"expected one of {list(NLI_LABEL_NAMES)}, got {label!r}"
            )
        return ("false",) if label == "not_entailment" else ("true",)

    def score(self, answer: str, gold: Sequence[str]) -> dict[str, float]:
        parsed = nli_reference_answer(answer)
        return {"correct": float(parsed == gold[0]), "valid": float(parsed is not None)}

    def reduce(self, means: dict[str, float]) -> dict[str, float]:
        """Accuracy over the valid answers and the share of invalid ones."""
        valid = means["valid"]
        return {
            "accuracy": means["correct"] / valid if valid > 0 else 0.0,
            "invalid": 1.0 - valid,
        }


for _task in (BoolQTask, NQOpenTask, GSM8KTask, NLIReferenceTask):
    TASKS[_task.name] = _task
