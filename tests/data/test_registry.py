"""Tests for the registry of record layouts and the import layering of the data package."""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sphere_lightning.data import formats
from sphere_lightning.data.formats import (
    FORMAT_REGISTRY,
    FORMATS,
    MalformedRecordError,
    RecordFormat,
    detect_format,
    parse_records,
    sniff_format,
)

DATA_PACKAGE = Path(formats.__file__).parent

#: Every key any layout's detection looks at.
KEYS = (
    "requested_rewrite",
    "src",
    "answers",
    "alt",
    "ground_truth",
    "rephrase_prompt",
    "locality_prompt",
    "prompt",
    "subject",
    "target_new",
    "target_true",
    "paraphrase_prompts",
    "neighborhood_prompts",
)


def reference_sniff(keys: set[str]) -> str | None:
    """Layout detection written out as one plain if-chain, in priority order."""
    if "requested_rewrite" in keys:
        return "counterfact_rome"
    if "src" in keys and ("answers" in keys or "alt" in keys):
        return "zsre_mend"
    if "ground_truth" in keys or "rephrase_prompt" in keys or "locality_prompt" in keys:
        return "counterfact_easyedit"
    if "prompt" in keys and "subject" in keys and "target_new" in keys:
        if "target_true" in keys or "paraphrase_prompts" in keys or "neighborhood_prompts" in keys:
            return "builtin"
    return None


def test_registry_names_are_the_formats() -> None:
    assert FORMATS[0] == "auto"
    assert sorted(FORMAT_REGISTRY) == sorted(FORMATS[1:])
    for name, entry in FORMAT_REGISTRY.items():
        assert isinstance(entry, RecordFormat) and entry.name == name


def test_auto_picks_the_first_accepting_layout_for_every_key_set() -> None:
    for size in range(len(KEYS) + 1):
        for keys in itertools.combinations(KEYS, size):
            record = dict.fromkeys(keys, "x")
            expected = reference_sniff(set(keys))
            assert detect_format([record, {"other": 1}]) == expected, keys
            assert sniff_format(record) == expected, keys


def test_sniff_rejects_what_is_no_record() -> None:
    for entry in FORMAT_REGISTRY.values():
        assert not entry.sniff([])
        assert not entry.sniff(["requested_rewrite"])
    assert detect_format([]) is None
    # EasyEdit's reading of zsRE is never detected; zsRE files are read as the reference does.
    zsre = {"subject": "s", "src": "q s?", "answers": ["a"], "alt": "b", "loc": "l"}
    assert not FORMAT_REGISTRY["zsre_easyedit"].sniff([zsre])
    assert detect_format([zsre]) == "zsre_mend"


def test_entry_parse_is_parse_records() -> None:
    good = {"case_id": 7, "subject": "Paris", "prompt": "{} is in", "target_new": "Italy"}
    bad = {"case_id": 8, "subject": "Rome", "prompt": "{} is in"}
    entry = FORMAT_REGISTRY["builtin"]
    (request,) = entry.parse([good], "mine.json")
    assert (request.case_id, request.subject, request.target_new) == (7, "Paris", "Italy")
    assert parse_records([good], "mine.json", "builtin") == [request]
    with pytest.raises(
        MalformedRecordError, match=r"^mine\.json, record 1, field 'target_new': missing$"
    ):
        entry.parse([good, bad], "mine.json")
    assert entry.parse([bad, good], "mine.json", skip_malformed=True) == [request]


def _imports_within_data(path: Path) -> set[str]:
    """Modules of ``sphere_lightning.data`` that ``path`` imports anywhere (also in functions)."""
    siblings = {p.stem for p in DATA_PACKAGE.glob("*.py")} - {"__init__"}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["sphere_lightning", "data"] and len(parts) > 2:
                if parts[2] in siblings:
                    found.add(parts[2])
    return found - {path.stem}


def test_data_modules_import_each_other_without_a_cycle() -> None:
    graph = {
        path.stem: _imports_within_data(path)
        for path in DATA_PACKAGE.glob("*.py")
        if path.stem != "__init__"
    }
    assert "formats" in graph["builtin"] and "builtin" in graph["readers"]
    done: set[str] = set()

    def visit(module: str, stack: tuple[str, ...]) -> None:
        assert module not in stack, f"import cycle: {' -> '.join((*stack, module))}"
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, (*stack, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def _fresh_python(code: str) -> subprocess.CompletedProcess[Any]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("first", ["builtin", "formats", "readers"])
def test_each_module_imports_first_in_a_fresh_interpreter(first: str) -> None:
    code = (
        f"import sphere_lightning.data.{first}\n"
        "from sphere_lightning.data.builtin import load_builtin_facts\n"
        "from sphere_lightning.data.readers import load_requests\n"
        "facts = load_builtin_facts()\n"
        "assert load_requests('builtin') == facts and len(facts) > 300\n"
        "print(len(facts))\n"
    )
    result = _fresh_python(code)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) > 300


@pytest.mark.parametrize(
    ("flag", "bad", "choices"),
    [
        ("format", "csv", FORMATS),
        ("metric_family", "squad", ("auto", "counterfact", "zsre", "knowedit")),
    ],
)
def test_choices_are_validated_by_the_parser_and_by_init(
    flag: str, bad: str, choices: tuple[str, ...]
) -> None:
    from jsonargparse import ArgumentParser

    from sphere_lightning.data.datamodule import EditDataModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(EditDataModule, "data")
    for good in choices:
        assert parser.parse_args([f"--data.{flag}={good}"]).data[flag] == good
    with pytest.raises(Exception, match=rf"data\.{flag}"):
        parser.parse_args([f"--data.{flag}={bad}"])
    with pytest.raises(ValueError) as info:
        EditDataModule(**{flag: bad})
    assert f"`data.{flag}` must be one of {', '.join(choices)}, got {bad!r}" in str(info.value)
