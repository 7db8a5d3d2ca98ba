"""Edit-record layouts as a registry: how each is recognised and how its records are read.

Each layout is one :class:`RecordFormat` entry (``name``, ``sniff(records)``, ``parse(records,
source)``) in :data:`FORMAT_REGISTRY`; ``format: auto`` takes the first entry, in registry order,
whose ``sniff`` accepts the records. A new layout is one :func:`register_format` call. This module
reads no files (that is :mod:`sphere_lightning.data.readers`) and imports no other reader, so the
built-in fact set and the file readers both build on it.

Layouts (``format`` names in parentheses):

* ROME's CounterFact (``counterfact_rome``): ``{"case_id", "requested_rewrite": {"prompt":
  "The mother tongue of {} is", "subject", "target_new": {"str"}, "target_true": {"str"}},
  "paraphrase_prompts": [...], "neighborhood_prompts": [...], "generation_prompts": [...]}``.
* CounterFact in the EasyEdit / KnowledgeSpread layout (``counterfact_easyedit``): ``case_id,
  prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt,
  locality_ground_truth``, where ``prompt`` has the subject written in.
* zsRE in the MEND layout: ``subject, src, pred, rephrase, alt, answers, loc, loc_ans``
  (``pred``, ``cond`` and ``portability`` are ignored), read two ways: as the SPHERE/ROME/MEMIT
  reference reads it (``zsre_mend``, the one ``auto`` picks: ROME's ``dsets/zsre.py``), or as
  EasyEdit reads it (``zsre_easyedit``, never detected, chosen explicitly).
* KnowEdit (``knowedit``; WikiData_recent, WikiData_counterfact, ZsRE as EasyEdit's
  ``KnowEditDataset`` reads them): ``subject, prompt, target_new``, optional ``ground_truth`` and
  ``rephrase``, and ``portability``/``locality`` objects mapping a probe family
  (:data:`KNOWEDIT_FAMILIES`) to a list of ``{"prompt", "ground_truth"}`` probes, whose ground
  truth may be a string, a list of aliases or a list of lists of aliases. As EasyEdit's
  ``run_knowedit_llama2.py``, a probe is scored on its first alias and a probe whose first alias
  is blank is dropped; an empty list of aliases is skipped (EasyEdit's ``an = an[0]`` raises
  ``IndexError`` there: 9 probes of WikiData_recent's train split start with ``[]``) and a probe
  with no alias at all is dropped; a probe with a list of prompts is one probe per prompt.
* The layout of the built-in fact set (``builtin``): the fields of :class:`EditRequest` plus
  ``relation``.

Records are validated when they are parsed: a malformed one raises :class:`MalformedRecordError`
naming the source, the record's 0-based index and the field. Leading/trailing whitespace is
stripped from every string (the zsRE files have ``alt`` values such as ``" Captain Universe"``),
and a prompt written out in full (EasyEdit CounterFact, zsRE) becomes a template by replacing the
*first* occurrence of the subject with ``{}`` (ROME's ``dsets/zsre.py`` replaces every
occurrence, which its ``format`` call cannot fill when there are two; in the shipped data the
subject always occurs exactly once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from sphere_lightning.data.requests import EditRequest, Probe
from sphere_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: Values accepted by ``load_requests(format=...)`` and ``--data.format``: ``auto`` or the name of
#: a layout of :data:`FORMAT_REGISTRY`.
DataFormat = Literal[
    "auto",
    "builtin",
    "counterfact_rome",
    "counterfact_easyedit",
    "zsre_mend",
    "zsre_easyedit",
    "knowedit",
]

#: The values of :data:`DataFormat`, in that order.
FORMATS: tuple[str, ...] = get_args(DataFormat)

_MISSING = object()


class MalformedRecordError(DataError):
    """A record of an edit data set is missing a field, has a wrong type or is inconsistent.

    The message reads ``"<source>, record <index>, field '<field>': <problem>"``, e.g.
    ``counterfact-edit.json, record 17, field 'subject': missing``.

    Attributes:
        source: File name (without directory) or hub dataset id.
        index: 0-based position of the record in the file or split.
        field: The offending field (dotted for nested fields, e.g.
            ``requested_rewrite.subject``), or ``None`` when the whole record is at fault.
        problem: What is wrong.
        unit: What ``index`` counts (``record``; subclasses count lines or rows).
    """

    def __init__(
        self, source: str, index: int, field: str | None, problem: str, unit: str = "record"
    ) -> None:
        self.source = source
        self.index = index
        self.field = field
        self.problem = problem
        self.unit = unit
        where = f"{source}, {unit} {index}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.source, self.index, self.field, self.problem, self.unit))


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Record:
    """Typed, validating access to one raw record (what a :class:`RecordFormat` or a
    general-ability task reads); its errors name the source, the record and the field.

    Args:
        raw: The decoded record (must be a JSON object).
        source: File name or hub dataset, for messages.
        index: Position of the record (0-based for edit data; the 1-based line or row of
            general-ability data), for messages.
        unit: What ``index`` counts (``"record"``, ``"line"``, ``"row"``), for messages.
        error_type: The error raised for a bad field (a :class:`MalformedRecordError`).
    """

    def __init__(
        self,
        raw: Any,
        source: str,
        index: int,
        unit: str = "record",
        error_type: type[MalformedRecordError] = MalformedRecordError,
    ) -> None:
        self.source = source
        self.index = index
        self.unit = unit
        self.error_type = error_type
        if not isinstance(raw, Mapping):
            raise self.error(None, f"expected a JSON object, got {type(raw).__name__}")
        self.raw = raw

    def error(self, field: str | None, problem: str) -> MalformedRecordError:
        """The error for ``field`` of this record (``None``: the whole record)."""
        return self.error_type(self.source, self.index, field, problem, self.unit)

    def has(self, field: str) -> bool:
        """Whether the (dotted) ``field`` is present and not null."""
        return self._lookup(field) is not _MISSING

    def _lookup(self, field: str) -> Any:
        value: Any = self.raw
        for part in field.split("."):
            if not isinstance(value, Mapping) or part not in value or value[part] is None:
                return _MISSING
            value = value[part]
        return value

    def get(self, field: str) -> Any:
        """The value of the (dotted) ``field``; missing or null is an error."""
        value = self._lookup(field)
        if value is _MISSING:
            raise self.error(field, "missing")
        return value

    def string(self, field: str) -> str:
        """A non-empty string, stripped."""
        return self._as_string(self.get(field), field)

    def _as_string(self, value: Any, field: str) -> str:
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {type(value).__name__}")
        value = value.strip()
        if not value:
            raise self.error(field, "empty string")
        return value

    def strings(self, field: str, *, allow_single: bool = True) -> tuple[str, ...]:
        """A list of non-empty strings (a bare string counts as a list of one if allowed)."""
        value = self.get(field)
        if isinstance(value, str) and allow_single:
            return (self._as_string(value, field),)
        if not isinstance(value, (list, tuple)):
            raise self.error(field, f"expected a list of strings, got {type(value).__name__}")
        return tuple(self._as_string(item, f"{field}[{i}]") for i, item in enumerate(value))

    def case_id(self, field: str = "case_id") -> int | str:
        """An int or a non-empty string identifying the record."""
        value = self.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.error(field, f"expected an int or a string, got {type(value).__name__}")
        if isinstance(value, str):
            value = self._as_string(value, field)
        return value

    def template(self, field: str) -> str:
        """A prompt template that must contain exactly one ``{}`` and no other brace."""
        prompt = self.string(field)
        if (
            prompt.count("{}") != 1
            or "{" in prompt.replace("{}", "", 1)
            or "}" in prompt.replace("{}", "", 1)
        ):
            raise self.error(
                field,
                f"must contain exactly one '{{}}' for the subject and no other braces, "
                f"got {_short(prompt)!r}",
            )
        return prompt

    def template_from_full(self, field: str, subject: str) -> str:
        """Turn a prompt with the subject written in into a template (first occurrence)."""
        prompt = self.string(field)
        if "{" in prompt or "}" in prompt:
            raise self.error(field, f"contains a brace, got {_short(prompt)!r}")
        start = prompt.find(subject)
        if start < 0:
            raise self.error(
                field, f"subject {subject!r} does not occur in field {field!r} ({_short(prompt)!r})"
            )
        return prompt[:start] + "{}" + prompt[start + len(subject) :]

    def check_targets_differ(
        self, target_new: str, target_true: str | None, new_field: str, true_field: str
    ) -> None:
        """A CounterFact edit whose new target is its true one changes nothing, and efficacy
        (is the new target preferred to the true one?) has no answer for it: reject it."""
        if target_new == target_true:
            raise self.error(
                new_field,
                f"equals {true_field!r} ({target_new!r}): the edit would change nothing; "
                "give it another target or drop the record",
            )


# ------------------------------------------------------------------------------------------ parsing


def _parse_counterfact_rome(rec: Record) -> EditRequest:
    rw = "requested_rewrite"
    if not isinstance(rec.get(rw), Mapping):
        raise rec.error(rw, f"expected an object, got {type(rec.get(rw)).__name__}")
    neighborhood, answers = _prompts_with_optional_targets(rec, "neighborhood_prompts")
    target_new, target_true = (
        rec.string(f"{rw}.target_new.str"),
        rec.string(f"{rw}.target_true.str"),
    )
    rec.check_targets_differ(
        target_new, target_true, f"{rw}.target_new.str", f"{rw}.target_true.str"
    )
    return EditRequest(
        case_id=rec.case_id(),
        subject=rec.string(f"{rw}.subject"),
        prompt=rec.template(f"{rw}.prompt"),
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=rec.strings("paraphrase_prompts", allow_single=False),
        neighborhood_prompts=neighborhood,
        neighborhood_answers=answers,
        generation_prompts=_optional_strings(rec, "generation_prompts", allow_single=False),
    )


def _optional_strings(rec: Record, field: str, *, allow_single: bool = True) -> tuple[str, ...]:
    """A list of strings that may be absent (``()``), empty, or (if allowed) a bare string."""
    return rec.strings(field, allow_single=allow_single) if rec.has(field) else ()


def _prompts_with_optional_targets(
    rec: Record, field: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """ROME neighbourhoods are strings; ROME's zsRE conversion uses ``{"prompt", "target"}``."""
    value = rec.get(field)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        prompts, targets = [], []
        for i, item in enumerate(value):
            sub = Record(item, rec.source, rec.index)
            try:
                prompts.append(sub.string("prompt"))
                targets.append(sub.string("target"))
            except MalformedRecordError as err:
                raise rec.error(f"{field}[{i}].{err.field}", err.problem) from None
        return tuple(prompts), tuple(targets)
    return rec.strings(field, allow_single=False), ()


def _parse_counterfact_easyedit(rec: Record) -> EditRequest:
    subject = rec.string("subject")
    target_true = rec.string("ground_truth")
    neighborhood = rec.strings("locality_prompt")
    answers = rec.strings("locality_ground_truth")
    if len(answers) == 1 and len(neighborhood) > 1:
        answers = answers * len(neighborhood)
    if len(answers) != len(neighborhood):
        raise rec.error(
            "locality_ground_truth",
            f"has {len(answers)} entries but 'locality_prompt' has {len(neighborhood)}",
        )
    # CounterFact's neighbourhood prompts are answered by the true object of the edited fact;
    # keep the answers only where some differ (EditRequest: empty means "target_true").
    if all(answer == target_true for answer in answers):
        answers = ()
    target_new = rec.string("target_new")
    rec.check_targets_differ(target_new, target_true, "target_new", "ground_truth")
    return EditRequest(
        case_id=rec.case_id(),
        subject=subject,
        prompt=rec.template_from_full("prompt", subject),
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=rec.strings("rephrase_prompt"),
        neighborhood_prompts=neighborhood,
        neighborhood_answers=answers,
    )


def _zsre_request(
    rec: Record, target_new: str, target_true: str | None, locality_prompt: str
) -> EditRequest:
    """The fields both zsRE readings share: template from ``src``, ``rephrase``, ``loc_ans``."""
    subject = rec.string("subject")
    return EditRequest(
        case_id=rec.case_id() if rec.has("case_id") else rec.index,
        subject=subject,
        prompt=rec.template_from_full("src", subject),
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=rec.strings("rephrase"),
        neighborhood_prompts=(locality_prompt,),
        neighborhood_answers=(rec.string("loc_ans"),),
    )


def _first_answer(rec: Record) -> str:
    answers = rec.strings("answers")
    if not answers:
        raise rec.error("answers", "empty list")
    return answers[0]


def _parse_zsre_mend(rec: Record) -> EditRequest:
    # ROME's dsets/zsre.py (used unchanged by MEMIT, AlphaEdit and SPHERE): the edit writes the
    # true answer, and the neighbourhood prompt is ``loc + "?"``, ``nq question:`` prefix kept.
    return _zsre_request(rec, _first_answer(rec), None, rec.string("loc") + "?")


def _parse_zsre_easyedit(rec: Record) -> EditRequest:
    # EasyEdit's zsRE examples: the edit writes ``alt``; ``loc`` is the locality prompt as it is.
    return _zsre_request(rec, rec.string("alt"), _first_answer(rec), rec.string("loc"))


#: KnowEdit's probe families, by kind (the families EasyEdit's ``KnowEditDataset`` reads).
KNOWEDIT_FAMILIES: dict[str, tuple[str, ...]] = {
    "portability": ("Subject_Aliasing", "Reasoning", "Logical_Generalization"),
    "locality": ("Relation_Specificity", "Forgetfulness"),
}


def knowedit_metric_name(kind: str, family: str | None = None) -> str:
    """``portability``, ``locality`` or one family's ``portability_subject_aliasing``, ..."""
    return kind if family is None else f"{kind}_{family.lower()}"


def _aliases(rec: Record, value: Any, field: str) -> tuple[str, ...]:
    """Every string of a KnowEdit ground truth (a string, a list, or a list of lists), in
    order, stripped (blank ones included: the first is the one EasyEdit scores, and a probe
    whose first is blank is dropped); an empty list of aliases contributes none."""
    if isinstance(value, str):
        return (value.strip(),)
    if not isinstance(value, (list, tuple)):
        raise rec.error(
            field, f"expected a string or a list of aliases, got {type(value).__name__}"
        )
    return tuple(a for i, item in enumerate(value) for a in _aliases(rec, item, f"{field}[{i}]"))


def _first_alias(rec: Record, field: str) -> str:
    """A KnowEdit answer field that must have a non-blank first alias."""
    aliases = _aliases(rec, rec.get(field), field)
    if not aliases or not aliases[0]:
        raise rec.error(field, "empty string" if aliases else "no answer in the list")
    return aliases[0]


def _knowedit_probes(rec: Record, kind: str) -> list[Probe]:
    if not rec.has(kind):
        return []
    families = rec.get(kind)
    if not isinstance(families, Mapping):
        raise rec.error(
            kind, f"expected an object of probe families, got {type(families).__name__}"
        )
    probes = []
    for family, items in families.items():
        field = f"{kind}.{family}"
        if family not in KNOWEDIT_FAMILIES[kind]:
            raise rec.error(
                field,
                f"unknown {kind} family; KnowEdit's are {', '.join(KNOWEDIT_FAMILIES[kind])}",
            )
        if items is None:
            continue
        if isinstance(items, Mapping):  # a single probe
            items = [items]
        if not isinstance(items, (list, tuple)):
            raise rec.error(field, f"expected a list of probes, got {type(items).__name__}")
        for i, item in enumerate(items):
            where = f"{field}[{i}]"
            if not isinstance(item, Mapping):
                raise rec.error(where, f"expected a probe object, got {type(item).__name__}")
            for key in ("prompt", "ground_truth"):
                if item.get(key) is None:
                    raise rec.error(f"{where}.{key}", "missing")
            aliases = _aliases(rec, item["ground_truth"], f"{where}.ground_truth")
            if not aliases or not aliases[0]:  # EasyEdit drops a probe whose answer is blank
                continue
            prompts = item["prompt"]
            prompt_field = f"{where}.prompt"
            if isinstance(prompts, str):
                prompts = [prompts]
            elif not isinstance(prompts, (list, tuple)) or not prompts:
                raise rec.error(prompt_field, "expected a string or a non-empty list of strings")
            for j, prompt in enumerate(prompts):
                text = rec._as_string(
                    prompt, prompt_field if len(prompts) == 1 else f"{prompt_field}[{j}]"
                )
                probes.append(Probe(kind, family, text, aliases[0], aliases))
    return probes


def _parse_knowedit(rec: Record) -> EditRequest:
    subject = rec.string("subject")
    target_new = _first_alias(rec, "target_new")
    # KnowEdit's metrics never read ground_truth, and the data keeps facts without one (blank)
    # or whose new target is the old one (EasyEdit edits them too); efficacy, which compares the
    # two, leaves those out (evaluation.knowedit_scores).
    truths = (
        _aliases(rec, rec.get("ground_truth"), "ground_truth") if rec.has("ground_truth") else ()
    )
    target_true = truths[0] if truths and truths[0] else None
    return EditRequest(
        case_id=rec.case_id() if rec.has("case_id") else rec.index,
        subject=subject,
        prompt=rec.template_from_full("prompt", subject),
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=_optional_strings(rec, "rephrase"),
        probes=tuple(_knowedit_probes(rec, "portability") + _knowedit_probes(rec, "locality")),
    )


def _parse_builtin(rec: Record) -> EditRequest:
    neighborhood = _optional_strings(rec, "neighborhood_prompts")
    answers = _optional_strings(rec, "neighborhood_answers")
    if answers and len(answers) != len(neighborhood):
        raise rec.error(
            "neighborhood_answers",
            f"has {len(answers)} entries but 'neighborhood_prompts' has {len(neighborhood)}",
        )
    target_new = rec.string("target_new")
    target_true = rec.string("target_true") if rec.has("target_true") else None
    rec.check_targets_differ(target_new, target_true, "target_new", "target_true")
    return EditRequest(
        case_id=rec.case_id(),
        subject=rec.string("subject"),
        prompt=rec.template("prompt"),
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=_optional_strings(rec, "paraphrase_prompts"),
        neighborhood_prompts=neighborhood,
        neighborhood_answers=answers,
        generation_prompts=_optional_strings(rec, "generation_prompts"),
    )


def _never(keys: set[str]) -> bool:
    return False


def _keys_counterfact_rome(keys: set[str]) -> bool:
    return "requested_rewrite" in keys


def _keys_zsre(keys: set[str]) -> bool:
    return "src" in keys and bool(keys & {"answers", "alt"})


def _keys_knowedit(keys: set[str]) -> bool:
    return {"prompt", "subject", "target_new"} <= keys and bool(keys & {"portability", "locality"})


def _keys_counterfact_easyedit(keys: set[str]) -> bool:
    return bool(keys & {"ground_truth", "rephrase_prompt", "locality_prompt"})


def _keys_builtin(keys: set[str]) -> bool:
    return {"prompt", "subject", "target_new"} <= keys and bool(
        keys & {"target_true", "paraphrase_prompts", "neighborhood_prompts"}
    )


# ----------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class RecordFormat:
    """One layout of edit records: an entry of :data:`FORMAT_REGISTRY`.

    Attributes:
        name: The ``--data.format`` value that selects it.
        read_record: Turns one record into a request, raising :class:`MalformedRecordError`
            (through :meth:`Record.error`) for a malformed one.
        detect: Whether the keys of a data set's first record look like this layout
            (``format: auto``); the default never does, so the layout is chosen explicitly.
    """

    name: str
    read_record: Callable[[Record], EditRequest]
    detect: Callable[[set[str]], bool] = _never

    def sniff(self, records: Sequence[Any]) -> bool:
        """Whether ``records`` look like this layout, judged by the keys of the first one."""
        return bool(records) and isinstance(records[0], Mapping) and self.detect(set(records[0]))

    def parse(
        self, records: Sequence[Any], source: str, *, skip_malformed: bool = False
    ) -> list[EditRequest]:
        """Validate ``records`` and turn them into edit requests, in order.

        Args:
            records: The raw records (JSON objects) in file order.
            source: File name or hub id, used in error messages.
            skip_malformed: Drop malformed records (logging how many and the first problem)
                instead of raising.

        Raises:
            MalformedRecordError: A record is malformed and ``skip_malformed`` is false.
        """
        requests: list[EditRequest] = []
        skipped: list[MalformedRecordError] = []
        for index, raw in enumerate(records):
            try:
                rec = Record(raw, source, index)
                try:
                    requests.append(self.read_record(rec))
                except ValueError as err:  # EditRequest's own checks, as a safety net
                    if isinstance(err, MalformedRecordError):
                        raise
                    raise rec.error(None, str(err)) from err
            except MalformedRecordError as err:
                if not skip_malformed:
                    raise
                skipped.append(err)
        if skipped:
            log.warning(
                "%s: skipped %d malformed record(s) of %d; first: %s",
                source,
                len(skipped),
                len(records),
                skipped[0],
            )
        return requests


#: The record layouts by name. ``format: auto`` takes the first, in this order, whose ``sniff``
#: accepts the data (so a ROME record that also has zsRE keys is read as ROME's CounterFact).
#: A new layout is one entry here and its name in :data:`DataFormat`.
FORMAT_REGISTRY: dict[str, RecordFormat] = {
    entry.name: entry
    for entry in (
        RecordFormat("counterfact_rome", _parse_counterfact_rome, _keys_counterfact_rome),
        RecordFormat("zsre_mend", _parse_zsre_mend, _keys_zsre),
        # Before EasyEdit's CounterFact: KnowEdit's WikiData_counterfact has its ground_truth.
        RecordFormat("knowedit", _parse_knowedit, _keys_knowedit),
        RecordFormat(
            "counterfact_easyedit", _parse_counterfact_easyedit, _keys_counterfact_easyedit
        ),
        RecordFormat("builtin", _parse_builtin, _keys_builtin),
        # The same files as zsre_mend, read as EasyEdit does: chosen explicitly, never detected.
        RecordFormat("zsre_easyedit", _parse_zsre_easyedit),
    )
}


def detect_format(records: Sequence[Any]) -> str | None:
    """The name of the first registered layout whose ``sniff`` accepts ``records``, or ``None``."""
    return next((entry.name for entry in FORMAT_REGISTRY.values() if entry.sniff(records)), None)


def sniff_format(record: Any) -> str | None:
    """Guess the layout of a data set from the keys of its first record.

    Args:
        record: The first raw record.

    Returns:
        ``"counterfact_rome"``, ``"zsre_mend"``, ``"knowedit"``, ``"counterfact_easyedit"``,
        ``"builtin"``, or ``None`` when the keys match no known layout. zsRE is read as the
        reference reads it (``zsre_mend``); EasyEdit's reading (``zsre_easyedit``) is chosen
        explicitly.
    """
    return detect_format([record])


def parse_records(
    records: Sequence[Any], source: str, format: str, *, skip_malformed: bool = False
) -> list[EditRequest]:
    """Validate raw records of a known layout and turn them into edit requests.

    Args:
        records: The raw records (JSON objects) in file order.
        source: File name or hub id, used in error messages.
        format: One of ``"builtin"``, ``"counterfact_rome"``, ``"counterfact_easyedit"``,
            ``"zsre_mend"``, ``"zsre_easyedit"``, ``"knowedit"``.
        skip_malformed: Drop malformed records (logging how many and the first problem) instead
            of raising.

    Returns:
        One request per (valid) record, in file order.

    Raises:
        MalformedRecordError: A record is malformed (in a CounterFact layout, also one whose
            ``target_new`` equals its ``target_true``) and ``skip_malformed`` is false.
        ConfigError: ``format`` is not a concrete layout name.
    """
    if format not in FORMAT_REGISTRY:
        raise ConfigError(
            f"`data.format`: unknown record layout {format!r}; "
            f"expected one of {sorted(FORMAT_REGISTRY)}"
        )
    requests = FORMAT_REGISTRY[format].parse(records, source, skip_malformed=skip_malformed)
    same = sum(r.target_true is not None and r.target_new == r.target_true for r in requests)
    if same:  # zsRE as EasyEdit reads it: an ``alt`` equal to ``answers[0]``
        log.warning(
            "%s: %d record(s) have target_new == target_true (they edit towards the answer "
            "the model should already give)",
            source,
            same,
        )
    return requests
