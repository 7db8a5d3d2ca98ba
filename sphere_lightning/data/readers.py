"""Readers that turn knowledge-editing data sets into lists of :class:`EditRequest`.

The layouts (``format`` names) and how each is detected and parsed are the registry of
:mod:`sphere_lightning.data.formats`: ``builtin``, ``counterfact_rome``,
``counterfact_easyedit``, ``zsre_mend`` and ``zsre_easyedit``. This module finds the records.

Every reader takes a local JSON file (a list of records), a JSONL file (one record a line), or a
Hugging Face hub dataset id (anything that is not an existing path and does not look like one),
which is loaded with ``datasets.load_dataset(id, split=split)``. Records are validated when they
are read: a malformed one raises :class:`MalformedRecordError` naming the file (or hub id), the
record's 0-based index and the field. Every error about the data is a
:class:`~sphere_lightning.errors.DataError` (a file that is not JSON, holds no records…), every
error about the arguments a :class:`~sphere_lightning.errors.ConfigError`; the command line prints
either as one line, without a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sphere_lightning.data.builtin import load_builtin_facts
from sphere_lightning.data.formats import (
    FORMATS,
    DataFormat,
    MalformedRecordError,
    detect_format,
    parse_records,
)
from sphere_lightning.data.formats import (
    sniff_format as sniff_format,  # re-exported: callers read it from here
)
from sphere_lightning.data.requests import EditRequest
from sphere_lightning.errors import ConfigError, DataError, MissingFileError
from sphere_lightning.paths import looks_like_path

# ------------------------------------------------------------------------------------------ loading


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
            f"`data.dataset` is {name!r}, which is no local file or folder, and it could not "
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
            or :func:`~sphere_lightning.paths.looks_like_path`); hub ids are ``name`` or
            ``owner/name``.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path.name, _read_json_file(path)
    if path.is_dir():
        return str(source), _load_hub(str(path), split)
    text = str(source)
    if isinstance(source, Path) or looks_like_path(text):
        raise MissingFileError(f"edit data file not found: {text} (`data.dataset`)")
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


def write_counterfact_rome(requests: list[EditRequest], path: str | Path) -> Path:
    """Write ``requests`` as a CounterFact file in ROME's layout (the layout
    :func:`read_counterfact_rome` reads: edit prompt, subject, targets, paraphrase and
    neighbourhood prompts); returns the path."""
    records = [
        {
            "case_id": r.case_id,
            "requested_rewrite": {
                "prompt": r.prompt,
                "subject": r.subject,
                "target_new": {"str": r.target_new},
                "target_true": {"str": r.target_true},
            },
            "paraphrase_prompts": list(r.paraphrase_prompts),
            "neighborhood_prompts": list(r.neighborhood_prompts),
        }
        for r in requests
    ]
    path = Path(path)
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


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


def load_requests_with_format(
    source: str | Path,
    format: DataFormat = "auto",
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
            f"`data.format`: unknown data format {format!r}; expected one of {', '.join(FORMATS)}"
        )
    if str(source) == "builtin" and not Path(source).exists():
        if format not in ("auto", "builtin"):
            raise ConfigError(
                f"the built-in fact set has the 'builtin' format, not {format!r}; "
                "use format 'auto' or 'builtin'"
            )
        return load_builtin_facts(), "builtin"
    name, records = load_raw_records(source, split)
    if not records:
        raise DataError(
            f"{_where(source, name)}: contains no records; edit data needs at least one"
        )
    if format == "auto":
        detected = detect_format(records)
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
    format: DataFormat = "auto",
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
