"""General-ability tasks: GLUE classification (SST-2, MRPC, CoLA, RTE), an RTE-style NLI set, MMLU.

Prompts follow the few-word zero-shot style of AlphaEdit's ``glue_eval`` and, for MMLU, the MMLU
paper; each class docstring shows its prompt, options and label convention. Local files use the
layouts of ``../shared/data/general``; the hub defaults are ``nyu-mll/glue`` and ``cais/mmlu``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sphere_lightning.general.base import GeneralTask, HubDataset, Record

_GLUE = "nyu-mll/glue"


class SST2(GeneralTask):
    """SST-2 sentiment (GLUE). Label 1 = positive, the positive class of F1.

    Prompt::

        Review: {sentence}
        Sentiment (positive or negative):

    Options ``" negative"`` (0), ``" positive"`` (1).
    """

    name = "sst2"
    options = (" negative", " positive")
    text_fields = ("sentence",)
    labels = {0: 0, 1: 1}
    positive = 1
    hub = HubDataset(_GLUE, "sst2", "validation")

    def prompt(self, record: Mapping[str, Any]) -> str:
        return f"Review: {record['sentence']}\nSentiment (positive or negative):"


class MRPC(GeneralTask):
    """MRPC paraphrase detection (GLUE). Label 1 = paraphrase, the positive class of F1 (as GLUE).

    Prompt::

        Are the following sentences paraphrases of each other?
        Sentence 1: {sentence1}
        Sentence 2: {sentence2}
        Answer (Yes or No):

    Options ``" No"`` (0), ``" Yes"`` (1).
    """

    name = "mrpc"
    options = (" No", " Yes")
    text_fields = ("sentence1", "sentence2")
    labels = {0: 0, 1: 1}
    positive = 1
    hub = HubDataset(_GLUE, "mrpc", "validation")

    def prompt(self, record: Mapping[str, Any]) -> str:
        return (
            "Are the following sentences paraphrases of each other?\n"
            f"Sentence 1: {record['sentence1']}\nSentence 2: {record['sentence2']}\n"
            "Answer (Yes or No):"
        )


class CoLA(GeneralTask):
    """CoLA grammatical acceptability (GLUE). Label 1 = acceptable, the positive class of F1.

    Reports MCC, GLUE's metric for CoLA, besides accuracy and F1. Prompt::

        Is this sentence linguistically acceptable?
        Sentence: {sentence}
        Answer (Yes or No):

    Options ``" No"`` (0), ``" Yes"`` (1).
    """

    name = "cola"
    options = (" No", " Yes")
    text_fields = ("sentence",)
    labels = {0: 0, 1: 1}
    positive = 1
    metrics = ("accuracy", "f1", "mcc")
    hub = HubDataset(_GLUE, "cola", "validation")

    def prompt(self, record: Mapping[str, Any]) -> str:
        return (
            "Is this sentence linguistically acceptable?\n"
            f"Sentence: {record['sentence']}\nAnswer (Yes or No):"
        )


_ENTAILMENT_PROMPT = "{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:"


class RTE(GeneralTask):
    """RTE textual entailment (GLUE). Label 0 = entailment (GLUE's convention), the positive class.

    Prompt::

        {sentence1}
        Question: {sentence2} True or False?
        Answer:

    Options ``" True"`` (0, entailment), ``" False"`` (1, not entailment). AlphaEdit's
    ``rte_eval`` writes label 0 as "False", i.e. reads GLUE's labels the other way round; here
    "True" means entailment.
    """

    name = "rte"
    options = (" True", " False")
    text_fields = ("sentence1", "sentence2")
    labels = {0: 0, 1: 1}
    positive = 0
    hub = HubDataset(_GLUE, "rte", "validation")

    def prompt(self, record: Mapping[str, Any]) -> str:
        return _ENTAILMENT_PROMPT.format(**record)


#: GLUE RTE's integer labels by name, as the RECT / SPHERE NLI file writes them.
NLI_LABEL_NAMES = ("entailment", "not_entailment")


def name_rte_label(row: dict[str, Any]) -> dict[str, Any]:
    """A GLUE RTE hub row with its integer label named (``0`` → ``"entailment"``, ``1`` →
    ``"not_entailment"``); other labels are left for validation to reject."""
    label = row.get("label")
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(NLI_LABEL_NAMES):
        row = {**row, "label": NLI_LABEL_NAMES[label]}
    return row


class NLI(GeneralTask):
    """The RTE-style NLI set of RECT / SPHERE (GLUE RTE's training split, string labels), scored
    by option log-likelihood — this project's variant; ``nli_reference``
    (:class:`~sphere_lightning.general.downstream.NLIReferenceTask`) is the reference's protocol.

    Labels ``"entailment"`` (option 0, the positive class) and ``"not_entailment"`` (1); the
    prompt and options are this project's RTE ones, not the reference's::

        {sentence1}
        Question: {sentence2} True or False?
        Answer:

    From the hub it reads ``nyu-mll/glue`` ``rte`` ``train`` and names the integer labels.
    """

    name = "nli"
    options = (" True", " False")
    text_fields = ("sentence1", "sentence2")
    labels = {"entailment": 0, "not_entailment": 1}
    positive = 0
    hub = HubDataset(_GLUE, "rte", "train")

    def prompt(self, record: Mapping[str, Any]) -> str:
        return _ENTAILMENT_PROMPT.format(**record)

    def from_hub(self, row: dict[str, Any]) -> dict[str, Any]:
        return name_rte_label(row)


class MMLU(GeneralTask):
    """MMLU four-way multiple choice (57 subjects); F1 is the macro F1 over the four letters.

    Records: ``question``, ``subject`` (e.g. ``high_school_physics``), ``choices`` (4 strings) and
    ``answer`` (0-3). Prompt, as in the MMLU paper's zero-shot format::

        The following is a multiple choice question about {subject with spaces}.

        {question}
        A. {choices[0]}
        B. {choices[1]}
        C. {choices[2]}
        D. {choices[3]}
        Answer:

    Options ``" A"``, ``" B"``, ``" C"``, ``" D"``.
    """

    name = "mmlu"
    options = (" A", " B", " C", " D")
    text_fields = ("question", "subject")
    label_field = "answer"
    labels = {0: 0, 1: 1, 2: 2, 3: 3}
    hub = HubDataset("cais/mmlu", "all", "test")

    def extra_fields(self, record: Record) -> dict[str, Any]:
        choices = record.get("choices")
        if not isinstance(choices, list) or len(choices) != len(self.options):
            raise record.error(
                "choices", f"expected a list of {len(self.options)} strings, got {choices!r}"
            )
        for i, choice in enumerate(choices):
            if not isinstance(choice, str):
                raise record.error(f"choices[{i}]", f"expected a string, got {choice!r}")
        return {"choices": [choice.strip() for choice in choices]}

    def prompt(self, record: Mapping[str, Any]) -> str:
        subject = record["subject"].replace("_", " ")
        letters = [option.strip() for option in self.options]
        lines = [
            f"{letter}. {choice}" for letter, choice in zip(letters, record["choices"], strict=True)
        ]
        return (
            f"The following is a multiple choice question about {subject}.\n\n"
            f"{record['question']}\n" + "\n".join(lines) + "\nAnswer:"
        )


#: Task name → task class, the names accepted by ``GeneralAbilityCallback(tasks=...)``.
TASKS: dict[str, type[GeneralTask]] = {
    task.name: task for task in (SST2, MRPC, CoLA, RTE, MMLU, NLI)
}


def get_task(name: str, **options: Any) -> GeneralTask:
    """An instance of the task called ``name``, built with ``options`` (e.g. ``max_new_tokens``
    of a generating task); a ValueError lists the known names otherwise."""
    if name not in TASKS:
        raise ValueError(f"Unknown general-ability task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name](**options)
