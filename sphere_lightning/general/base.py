"""The shared part of every general-ability task: reading, validation, scoring and metrics.

A task is zero-shot multiple choice: a prompt, a fixed tuple of answer options (label words with
their leading space), and a prediction that is the option with the highest summed log-likelihood
(:func:`~sphere_lightning.general.scoring.score_options`). Data comes from a local JSONL file (one
record a line) or from a Hugging Face hub dataset, loaded with ``datasets.load_dataset``. Records
are validated as they are read; a malformed one raises :class:`MalformedExampleError` naming the
file, the 1-based line and the field.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.data.formats import Record
from sphere_lightning.data.readers import MalformedRecordError
from sphere_lightning.distributed import SINGLE, Collective
from sphere_lightning.general.metrics import classification_metrics
from sphere_lightning.general.scoring import score_options
from sphere_lightning.paths import looks_like_path


class MalformedExampleError(MalformedRecordError):
    """A record of a general-ability data set is not valid JSON, lacks a field or has a bad label.

    The message reads ``"<source>, line <n>, field '<field>': <problem>"``, e.g.
    ``/data/general/sst2.jsonl, line 3, field 'label': 2 is not one of [0, 1]``. Hub records are
    located by row (``"nyu-mll/glue (sst2, validation), row 3"``).

    Attributes:
        source: The file path (or hub dataset, config and split).
        line: 1-based line of the file (row of the hub split).
        field: The offending field, or ``None`` when the whole line is at fault.
        problem: What is wrong.
    """

    def __init__(
        self, source: str, line: int, field: str | None, problem: str, unit: str = "line"
    ) -> None:
        super().__init__(source, line, field, problem, unit)

    @property
    def line(self) -> int:
        """1-based line of the file (row of the hub split)."""
        return self.index


@dataclass(frozen=True)
class GeneralExample:
    """One scored example: the prompt and the index of the correct option."""

    prompt: str
    label: int


@dataclass(frozen=True)
class HubDataset:
    """Where a task's data lives on the Hugging Face hub.

    Attributes:
        path: Dataset id, e.g. ``nyu-mll/glue``.
        name: Configuration, e.g. ``sst2`` (``None`` for none).
        split: Split to read, e.g. ``validation``.
    """

    path: str
    name: str | None
    split: str

    @classmethod
    def parse(cls, text: str, default: HubDataset) -> HubDataset:
        """``"<id>[:<config>][@<split>]"``; the parts left out come from ``default``.

        ``"nyu-mll/glue"`` reads the task's own configuration and split,
        ``"cais/mmlu:abstract_algebra@validation"`` names both.
        """
        rest, _, split = text.partition("@")
        path, _, name = rest.partition(":")
        return cls(path, name or default.name, split or default.split)

    def __str__(self) -> str:
        parts = ", ".join(p for p in (self.name, self.split) if p)
        return f"{self.path} ({parts})"


class GeneralTask:
    """A zero-shot multiple-choice task scored by option log-likelihood.

    Subclasses set the class attributes and write :meth:`prompt`; everything else (reading,
    validation, scoring, metrics) is shared.

    Attributes:
        name: Task name used in configs and metric keys (``general/<name>/<metric>``).
        options: The answer options, each with its leading space; option ``k`` is class ``k``.
        text_fields: String fields every record must have (non-empty; whitespace is stripped).
        label_field: The field holding the label.
        labels: Raw label value → option index. A value outside it is a malformed record.
        positive: Option index of the positive class for binary F1 (``None``: macro F1).
        metrics: Metric names reported (see :data:`~sphere_lightning.general.metrics.METRICS`).
        hub: The default hub dataset.
        data_file: Stem of the task's file in a data folder (``<data_file>.jsonl``; ``None``:
            :attr:`name`), for tasks that read another task's data their own way.
    """

    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]]
    text_fields: ClassVar[tuple[str, ...]]
    label_field: ClassVar[str] = "label"
    labels: ClassVar[Mapping[Any, int]]
    positive: ClassVar[int | None] = None
    metrics: ClassVar[tuple[str, ...]] = ("accuracy", "f1")
    hub: ClassVar[HubDataset]
    data_file: ClassVar[str | None] = None

    def prompt(self, record: Mapping[str, Any]) -> str:
        """The prompt of a validated record (text fields stripped), ending where the answer goes."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------- reading

    def parse(self, record: Record) -> GeneralExample:
        """Validate one record and turn it into an example."""
        fields = {field: record.string(field) for field in self.text_fields}
        fields.update(self.extra_fields(record))
        return GeneralExample(self.prompt(fields), self.label(record))

    def extra_fields(self, record: Record) -> dict[str, Any]:
        """Validated non-string fields the prompt needs (none by default)."""
        return {}

    def label(self, record: Record) -> int:
        """The option index of a record's label."""
        value = record.get(self.label_field)
        # bool is an int subclass and True == 1: a JSON ``true`` must not pass as label 1.
        if isinstance(value, bool) or not isinstance(value, Hashable) or value not in self.labels:
            raise record.error(self.label_field, f"{value!r} is not one of {list(self.labels)}")
        return self.labels[value]

    def from_hub(self, row: dict[str, Any]) -> dict[str, Any]:
        """Turn a hub row into the local layout (the identity where they agree)."""
        return row

    def read(
        self, source: str | Path | None = None, limit: int | None = None
    ) -> list[GeneralExample]:
        """Read the first ``limit`` examples (all if ``None``) of a JSONL file or hub dataset.

        Args:
            source: A local JSONL file; a hub id ``"<id>[:<config>][@<split>]"`` (see
                :meth:`HubDataset.parse`); or ``None`` for :attr:`hub`. A string naming no
                existing file is a hub id unless it looks like a path
                (:func:`~sphere_lightning.paths.looks_like_path`).
            limit: Keep the first ``limit`` examples in file order; lines after them are not
                read (nor validated).

        Raises:
            FileNotFoundError: ``source`` looks like a path but no file is there.
            MalformedExampleError: A record among the first ``limit`` is malformed.
        """
        if limit is not None and limit < 1:
            raise ValueError(f"`limit` should be ≥ 1 or None, got {limit}")
        if source is None:
            return self._read_hub(self.hub, limit)
        path = Path(source).expanduser()
        if path.is_file():
            return self._read_jsonl(path, limit)
        text = str(source)
        if isinstance(source, Path) or looks_like_path(text):
            raise FileNotFoundError(
                f"No {self.name} data file at {path}; give an existing JSONL file, or a hub id "
                f"such as {self.hub.path!r} to load {self.hub} with `datasets`"
            )
        return self._read_hub(HubDataset.parse(text, self.hub), limit)

    def _read_jsonl(self, path: Path, limit: int | None) -> list[GeneralExample]:
        examples: list[GeneralExample] = []
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if limit is not None and len(examples) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as err:
                    raise MalformedExampleError(
                        str(path), number, None, f"not valid JSON ({err.msg})"
                    ) from err
                examples.append(
                    self.parse(Record(raw, str(path), number, "line", MalformedExampleError))
                )
        return examples

    def _read_hub(self, hub: HubDataset, limit: int | None) -> list[GeneralExample]:
        import datasets  # deferred: slow to import, and only hub ids need it

        rows: Iterable[dict[str, Any]] = datasets.load_dataset(hub.path, hub.name, split=hub.split)
        examples: list[GeneralExample] = []
        for number, row in enumerate(rows, start=1):
            if limit is not None and len(examples) >= limit:
                break
            examples.append(
                self.parse(
                    Record(self.from_hub(dict(row)), str(hub), number, "row", MalformedExampleError)
                )
            )
        return examples

    # ----------------------------------------------------------------------------------- scoring

    def predict(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[GeneralExample],
        batch_size: int = 16,
        progress: bool = False,
    ) -> torch.Tensor:
        """The predicted option index of every example (argmax of the option log-likelihoods)."""
        scores = score_options(
            model,
            tokenizer,
            [e.prompt for e in examples],
            self.options,
            batch_size,
            progress=progress,
            desc=self.name,
        )
        return scores.argmax(-1)

    def compute_metrics(self, preds: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """``{"accuracy": .., "f1": .., ("mcc": ..)}`` of option-index predictions."""
        return classification_metrics(
            preds, target, len(self.options), positive=self.positive, metrics=self.metrics
        )

    def evaluate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[GeneralExample],
        batch_size: int = 16,
        progress: bool = False,
        collective: Collective = SINGLE,
    ) -> dict[str, float]:
        """Predict every example and return the task's metrics (each process predicts its
        share of ``examples``; the metrics are computed over all of them)."""
        if not examples:
            raise ValueError(f"{self.name}: no examples to evaluate")
        preds = collective.map(
            lambda share: self.predict(model, tokenizer, share, batch_size, progress), examples
        )
        return self.compute_metrics(preds, torch.tensor([e.label for e in examples]))
