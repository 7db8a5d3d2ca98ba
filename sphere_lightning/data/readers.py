"""Readers that turn knowledge-editing data sets into lists of :class:`EditRequest`.

Supported layouts (``format`` names in parentheses):

* ROME's CounterFact (``counterfact_rome``): ``{"case_id", "requested_rewrite": {"prompt":
  "The mother tongue of {} is", "subject", "target_new": {"str"}, "target_true": {"str"}},
  "paraphrase_prompts": [...], "neighborhood_prompts": [...], "generation_prompts": [...]}``.
* CounterFact in the EasyEdit / KnowledgeSpread layout (``counterfact_easyedit``): ``case_id,
  prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt,
  locality_ground_truth``, where ``prompt`` has the subject written in.
* zsRE in the MEND layout: ``subject, src, pred, rephrase, alt, answers, loc, loc_ans``
  (``pred``, ``cond`` and ``portability`` are ignored), read two ways: as the SPHERE/ROME/MEMIT
  reference reads it (``zsre_mend``, the default: ROME's ``dsets/zsre.py``), or as EasyEdit
  reads it (``zsre_easyedit``). See :func:`read_zsre_mend` and :func:`read_zsre_easyedit`.
* The layout of the built-in fact set (``builtin``): the fields of :class:`EditRequest` plus
  ``relation``.

Every reader takes a local JSON file (a list of records), a JSONL file (one record a line), or a
Hugging Face hub dataset id (anything that is not an existing path and does not look like one),
which is loaded with ``datasets.load_dataset(id, split=split)``. Records are validated when they
are read: a malformed one raises :class:`MalformedRecordError` naming the file (or hub id), the
record's 0-based index and the field. Every error about the data is a
:class:`~sphere_lightning.errors.DataError` (a file that is not JSON, holds no records…), every
error about the arguments a :class:`~sphere_lightning.errors.ConfigError`; the command line prints
either as one line, without a traceback.

Conventions shared by all readers: leading/trailing whitespace is stripped from every string (the
zsRE files have ``alt`` values such as ``" Captain Universe"``), and a prompt written out in full
(EasyEdit CounterFact, zsRE) becomes a template by replacing the *first* occurrence of the
subject with ``{}`` (ROME's ``dsets/zsre.py`` replaces every occurrence, which its ``format``
call cannot fill when there are two; in the shipped data the subject always occurs exactly
once).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sphere_lightning.data.requests import EditRequest
from sphere_lightning.errors import ConfigError, DataError, MissingFileError

log = logging.getLogger(__name__)

#: Values accepted by ``load_requests(format=...)`` and ``--data.format``.
FORMATS: tuple[str, ...] = (
    "auto",
    "builtin",
    "counterfact_rome",
    "counterfact_easyedit",
    "zsre_mend",
    "zsre_easyedit",
)

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


class _Record:
    """Typed, validating access to one raw record."""

    def __init__(self, raw: Any, source: str, index: int) -> None:
        self.source = source
        self.index = index
        if not isinstance(raw, Mapping):
            raise self.error(None, f"expected a JSON object, got {type(raw).__name__}")
        self.raw = raw

    def error(self, field: str | None, problem: str) -> MalformedRecordError:
        return MalformedRecordError(self.source, self.index, field, problem)

    def has(self, field: str) -> bool:
        return self._lookup(field) is not _MISSING

    def _lookup(self, field: str) -> Any:
        value: Any = self.raw
        for part in field.split("."):
            if not isinstance(value, Mapping) or part not in value or value[part] is None:
                return _MISSING
            value = value[part]
        return value

    def get(self, field: str) -> Any:
        value = self._lookup(field)
        if value is _MISSING:
            raise self.error(field, "missing")
        return value

    def string(self, field: str) -> str:
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


def _parse_counterfact_rome(rec: _Record) -> EditRequest:
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


def _optional_strings(rec: _Record, field: str, *, allow_single: bool = True) -> tuple[str, ...]:
    """A list of strings that may be absent (``()``), empty, or (if allowed) a bare string."""
    return rec.strings(field, allow_single=allow_single) if rec.has(field) else ()


def _prompts_with_optional_targets(
    rec: _Record, field: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """ROME neighbourhoods are strings; ROME's zsRE conversion uses ``{"prompt", "target"}``."""
    value = rec.get(field)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        prompts, targets = [], []
        for i, item in enumerate(value):
            sub = _Record(item, rec.source, rec.index)
            try:
                prompts.append(sub.string("prompt"))
                targets.append(sub.string("target"))
            except MalformedRecordError as err:
                raise rec.error(f"{field}[{i}].{err.field}", err.problem) from None
        return tuple(prompts), tuple(targets)
    return rec.strings(field, allow_single=False), ()


def _parse_counterfact_easyedit(rec: _Record) -> EditRequest:
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
    rec: _Record, target_new: str, target_true: str | None, locality_prompt: str
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


def _first_answer(rec: _Record) -> str:
    answers = rec.strings("answers")
    if not answers:
        raise rec.error("answers", "empty list")
    return answers[0]


def _parse_zsre_mend(rec: _Record) -> EditRequest:
    # ROME's dsets/zsre.py (used unchanged by MEMIT, AlphaEdit and SPHERE): the edit writes the
    # true answer, and the neighbourhood prompt is ``loc + "?"``, ``nq question:`` prefix kept.
    return _zsre_request(rec, _first_answer(rec), None, rec.string("loc") + "?")


def _parse_zsre_easyedit(rec: _Record) -> EditRequest:
    # EasyEdit's zsRE examples: the edit writes ``alt``; ``loc`` is the locality prompt as it is.
    return _zsre_request(rec, rec.string("alt"), _first_answer(rec), rec.string("loc"))


def _parse_builtin(rec: _Record) -> EditRequest:
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


_PARSERS: dict[str, Callable[[_Record], EditRequest]] = {
    "builtin": _parse_builtin,
    "counterfact_rome": _parse_counterfact_rome,
    "counterfact_easyedit": _parse_counterfact_easyedit,
    "zsre_mend": _parse_zsre_mend,
    "zsre_easyedit": _parse_zsre_easyedit,
}


def parse_records(
    records: Sequence[Any], source: str, format: str, *, skip_malformed: bool = False
) -> list[EditRequest]:
    """Validate raw records of a known layout and turn them into edit requests.

    Args:
        records: The raw records (JSON objects) in file order.
        source: File name or hub id, used in error messages.
        format: One of ``"builtin"``, ``"counterfact_rome"``, ``"counterfact_easyedit"``,
            ``"zsre_mend"``, ``"zsre_easyedit"``.
        skip_malformed: Drop malformed records (logging how many and the first problem) instead
            of raising.

    Returns:
        One request per (valid) record, in file order.

    Raises:
        MalformedRecordError: A record is malformed (in a CounterFact layout, also one whose
            ``target_new`` equals its ``target_true``) and ``skip_malformed`` is false.
        ConfigError: ``format`` is not a concrete layout name.
    """
    if format not in _PARSERS:
        raise ConfigError(
            f"`--data.format`: unknown record layout {format!r}; expected one of {sorted(_PARSERS)}"
        )
    parse = _PARSERS[format]
    requests: list[EditRequest] = []
    skipped: list[MalformedRecordError] = []
    for index, raw in enumerate(records):
        try:
            rec = _Record(raw, source, index)
            try:
                requests.append(parse(rec))
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
    same = sum(r.target_true is not None and r.target_new == r.target_true for r in requests)
    if same:  # zsRE as EasyEdit reads it: an ``alt`` equal to ``answers[0]``
        log.warning(
            "%s: %d record(s) have target_new == target_true (they edit towards the answer "
            "the model should already give)",
            source,
            same,
        )
    return requests


# ------------------------------------------------------------------------------------------ loading


def _looks_like_path(text: str) -> bool:
    """Whether a missing source was meant as a file, not a hub id (``name``, ``owner/name``)."""
    lowered = text.lower()
    return (
        lowered.endswith((".json", ".jsonl"))
        or text.startswith(("/", "./", "../", "~"))
        or "\\" in text
        or text.count("/") > 1
    )


def _read_json_file(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix.lower() != ".jsonl" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
            ) from err
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records")
        return data
    records: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise MalformedRecordError(
                path.name, len(records), None, f"line {lineno} is not valid JSON ({err.msg})"
            ) from err
    return records


def _load_hub(name: str, split: str) -> list[Any]:
    import datasets  # deferred: importing datasets is slow and only needed for hub ids

    try:
        dataset = datasets.load_dataset(name, split=split)
    except OSError as err:  # no network and not cached, no such dataset, …
        raise DataError(
            f"`--data.dataset` is {name!r}, which is no local file or folder, and it could not "
            f"be loaded as a Hugging Face hub dataset ({str(err).strip() or type(err).__name__})"
        ) from err
    return dataset.to_list()


def load_raw_records(source: str | Path, split: str = "train") -> tuple[str, list[Any]]:
    """Read the raw records of a local JSON/JSONL file, a local dataset folder or a hub dataset.

    Args:
        source: Path to a ``.json`` (list of records) or ``.jsonl`` file, a local folder that
            ``datasets.load_dataset`` understands, or a Hugging Face hub dataset id.
        split: Split to load for folders and hub ids (ignored for files).

    Returns:
        ``(name, records)``: the name used in error messages (file name or hub id) and the
        records in order.

    Raises:
        FileNotFoundError: ``source`` does not exist but looks like a path (it is a ``Path``,
            ends with ``.json``/``.jsonl``, starts with ``/``, ``./``, ``../`` or ``~``, or has
            more than one ``/``); hub ids are ``name`` or ``owner/name``.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path.name, _read_json_file(path)
    if path.is_dir():
        return str(source), _load_hub(str(path), split)
    text = str(source)
    if isinstance(source, Path) or _looks_like_path(text):
        raise MissingFileError(f"edit data file not found: {text} (`--data.dataset`)")
    return text, _load_hub(text, split)


def _read(source: str | Path, format: str, split: str, skip_malformed: bool) -> list[EditRequest]:
    name, records = load_raw_records(source, split)
    return parse_records(records, name, format, skip_malformed=skip_malformed)


def read_counterfact_rome(
    source: str | Path, split: str = "train", *, skip_malformed: bool = False
) -> list[EditRequest]:
    """Read CounterFact in ROME's layout (``requested_rewrite`` with a ``{}`` template).

    Args:
        source: JSON/JSONL file, local dataset folder or hub dataset id.
        split: Split for folders and hub ids.
        skip_malformed: Drop malformed records instead of raising.

    Returns:
        One request per record; ``neighborhood_answers`` is empty (the neighbourhood prompts are
        answered by ``target_true``) unless the neighbourhood items are ``{"prompt", "target"}``
        objects. ``generation_prompts`` (optional; fluency samples from them) are kept.
    """
    return _read(source, "counterfact_rome", split, skip_malformed)


def read_counterfact_easyedit(
    source: str | Path, split: str = "train", *, skip_malformed: bool = False
) -> list[EditRequest]:
    """Read CounterFact in the EasyEdit layout (``/work/shared/data/counterfact/*.json``).

    The subject's first occurrence in ``prompt`` becomes ``{}``. ``rephrase_prompt`` and
    ``locality_prompt`` may each be a string or a list of strings; ``locality_ground_truth`` a
    string (shared by all locality prompts) or a list of the same length. Where every locality
    answer equals ``ground_truth`` (true for all records of the shipped files) the request's
    ``neighborhood_answers`` is left empty, the CounterFact convention; otherwise it carries
    the answers.

    Args:
        source: JSON/JSONL file, local dataset folder or hub dataset id.
        split: Split for folders and hub ids.
        skip_malformed: Drop malformed records instead of raising.

    Returns:
        One request per record, in file order.
    """
    return _read(source, "counterfact_easyedit", split, skip_malformed)


def read_zsre_mend(
    source: str | Path, split: str = "train", *, skip_malformed: bool = False
) -> list[EditRequest]:
    """Read zsRE question-answering edits in MEND's layout, as the SPHERE reference reads them.

    This is ROME's ``dsets/zsre.py`` (``MENDQADataset``), which MEMIT, AlphaEdit and SPHERE use
    unchanged: ``prompt`` is ``src`` with the subject replaced by ``{}``; ``target_new =
    answers[0]`` (the edit writes the true answer); ``paraphrase_prompts = (rephrase,)``;
    ``neighborhood_prompts = (loc + "?",)`` with MEND's ``"nq question: "`` prefix kept;
    ``neighborhood_answers = (loc_ans,)``. ``target_true`` is ``None`` (the reference puts a
    placeholder there that no zsRE metric reads); ``alt`` is not read, so the two records of
    ``zsre_mend_train-1k.json`` with an empty ``alt`` are valid here. The records have no id, so
    ``case_id`` is the record's index (or its ``case_id`` field where present). EasyEdit's
    reading of the same files is :func:`read_zsre_easyedit`.

    Args:
        source: JSON/JSONL file, local dataset folder or hub dataset id.
        split: Split for folders and hub ids.
        skip_malformed: Drop malformed records instead of raising.

    Returns:
        One request per record, in file order.
    """
    return _read(source, "zsre_mend", split, skip_malformed)


def read_zsre_easyedit(
    source: str | Path, split: str = "train", *, skip_malformed: bool = False
) -> list[EditRequest]:
    """Read zsRE in MEND's layout as EasyEdit's zsRE examples do (``format: zsre_easyedit``).

    ``target_new = alt`` (a stripped alternative answer), ``target_true = answers[0]``,
    ``paraphrase_prompts = (rephrase,)``, ``neighborhood_prompts = (loc,)`` exactly as in the
    file (``"nq question: ..."``, no ``"?"``), ``neighborhood_answers = (loc_ans,)``; prompt
    template and ``case_id`` as in :func:`read_zsre_mend`. A record with an empty ``alt`` (two in
    ``zsre_mend_train-1k.json``) is malformed. Numbers from this reading are not comparable with
    the SPHERE/ROME/MEMIT/AlphaEdit papers, which edit towards ``answers[0]``.

    Args:
        source: JSON/JSONL file, local dataset folder or hub dataset id.
        split: Split for folders and hub ids.
        skip_malformed: Drop malformed records instead of raising.

    Returns:
        One request per record, in file order.
    """
    return _read(source, "zsre_easyedit", split, skip_malformed)


def read_builtin_format(
    source: str | Path, split: str = "train", *, skip_malformed: bool = False
) -> list[EditRequest]:
    """Read records in the layout of the built-in fact set (EditRequest's fields + relation).

    Args:
        source: JSON/JSONL file, local dataset folder or hub dataset id.
        split: Split for folders and hub ids.
        skip_malformed: Drop malformed records instead of raising.

    Returns:
        One request per record, in file order.
    """
    return _read(source, "builtin", split, skip_malformed)


def sniff_format(record: Any) -> str | None:
    """Guess the layout of a data set from the keys of its first record.

    Args:
        record: The first raw record.

    Returns:
        ``"counterfact_rome"``, ``"zsre_mend"``, ``"counterfact_easyedit"``, ``"builtin"``, or
        ``None`` when the keys match no known layout. zsRE is read as the reference reads it
        (``zsre_mend``); EasyEdit's reading (``zsre_easyedit``) is chosen explicitly.
    """
    if not isinstance(record, Mapping):
        return None
    keys = set(record)
    if "requested_rewrite" in keys:
        return "counterfact_rome"
    if "src" in keys and keys & {"answers", "alt"}:
        return "zsre_mend"
    if keys & {"ground_truth", "rephrase_prompt", "locality_prompt"}:
        return "counterfact_easyedit"
    if {"prompt", "subject", "target_new"} <= keys and keys & {
        "target_true",
        "paraphrase_prompts",
        "neighborhood_prompts",
    }:
        return "builtin"
    return None


def load_requests_with_format(
    source: str | Path,
    format: str = "auto",
    split: str = "train",
    *,
    skip_malformed: bool = False,
) -> tuple[list[EditRequest], str]:
    """Like :func:`load_requests`, but also return the layout that was used.

    Returns:
        ``(requests, layout)`` where ``layout`` is the concrete format name (never ``"auto"``).
    """
    if format not in FORMATS:
        raise ConfigError(
            f"`--data.format`: unknown data format {format!r}; expected one of {', '.join(FORMATS)}"
        )
    if str(source) == "builtin" and not Path(source).exists():
        if format not in ("auto", "builtin"):
            raise ConfigError(
                f"the built-in fact set has the 'builtin' format, not {format!r}; "
                "use format 'auto' or 'builtin'"
            )
        from sphere_lightning.data.builtin import load_builtin_facts

        return load_builtin_facts(), "builtin"
    name, records = load_raw_records(source, split)
    if not records:
        raise DataError(
            f"{_where(source, name)}: contains no records; edit data needs at least one"
        )
    if format == "auto":
        detected = sniff_format(records[0])
        if detected is None:
            keys = sorted(records[0]) if isinstance(records[0], Mapping) else type(records[0])
            raise DataError(
                f"{name}: cannot detect the data format from the first record's keys {keys}; "
                f"pass one of {', '.join(FORMATS[1:])} explicitly"
            )
        format = detected
    return parse_records(records, name, format, skip_malformed=skip_malformed), format


def _where(source: str | Path, name: str) -> str:
    """The data set as a message names it: the path of a file, else the hub id or folder."""
    path = Path(source).expanduser()
    return str(path) if path.is_file() else name


def load_requests(
    source: str,
    format: str = "auto",
    split: str = "train",
    *,
    skip_malformed: bool = False,
) -> list[EditRequest]:
    """Load edit requests from a file, a hub dataset or the built-in fact set.

    Args:
        source: ``"builtin"`` for the packaged fact set, a JSON/JSONL file path, a local dataset
            folder, or a Hugging Face hub dataset id.
        format: ``"auto"`` (detect from the first record's keys), ``"builtin"``,
            ``"counterfact_rome"``, ``"counterfact_easyedit"``, ``"zsre_mend"`` (zsRE as the
            reference reads it) or ``"zsre_easyedit"`` (zsRE as EasyEdit reads it).
        split: Split to load for hub ids and dataset folders.
        skip_malformed: Drop malformed records (logging a warning) instead of raising.

    Returns:
        The requests in file order.

    Raises:
        ConfigError: Unknown ``format``.
        DataError: No records, undetectable layout, a file that is not JSON.
        MalformedRecordError: A malformed record (unless ``skip_malformed``).
        MissingFileError: A path-like ``source`` that does not exist (a ``FileNotFoundError``).
    """
    requests, _ = load_requests_with_format(source, format, split, skip_malformed=skip_malformed)
    return requests
