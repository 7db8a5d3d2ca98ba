"""The documentation: the MkDocs site under ``docs/`` builds strictly, and the README stays a
front page that points into it.

``mkdocs build --strict`` turns every warning into a failure, and ``mkdocs.yml`` makes a warning
of each of these: a link to a missing page or anchor, a page of ``docs/`` left out of the nav, a
``::: module`` API page or a ``[name][dotted.path]`` cross-reference that does not resolve.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

README = ROOT / "README.md"
#: The README is the front page; the reference lives in docs/.
README_MAX_LINES = 250


def _nav_pages(nav: list) -> list[str]:
    """Every page path in an MkDocs ``nav`` (nested sections flattened)."""
    pages: list[str] = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            pages.extend(_nav_pages(value))
        else:
            pages.append(value)
    return pages


def _mkdocs_config() -> dict:
    """``mkdocs.yml`` as plain data (it uses no YAML tags)."""
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of ``config`` into ``site`` (skips without mkdocs)."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[dev]'")
    pytest.importorskip(
        "mkdocstrings_handlers.python",
        reason="mkdocstrings' python handler is not installed: pip install -e '.[dev]'",
    )
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config)]
    return subprocess.run(
        [*command, "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_docs_build_strictly(tmp_path):
    result = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert (tmp_path / "index.html").is_file()


def test_docs_build_fails_on_a_broken_link_or_reference(tmp_path):
    """The strict build is a check: a copy of the docs with a missing page, a missing anchor and
    an API cross-reference to nothing fails, naming each."""
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    page = docs / "run.md"
    broken = "[a](missing.md) [b](tensorboard.md#no-such-anchor) [c][sphere_lightning.no_such_name]"
    page.write_text(page.read_text(encoding="utf-8") + "\n" + broken + "\n", encoding="utf-8")
    config = _mkdocs_config()
    config["docs_dir"] = str(docs)
    for plugin in config["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            plugin["mkdocstrings"]["handlers"]["python"]["paths"] = [str(ROOT)]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config), encoding="utf-8")

    result = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    for name in ("missing.md", "no-such-anchor", "sphere_lightning.no_such_name"):
        assert name in output, output[-3000:]


def test_every_docs_page_is_in_the_nav():
    nav = _nav_pages(_mkdocs_config()["nav"])
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(nav) == pages


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t.split("#")[0] for t in targets if "://" not in t and not t.startswith("#")]
    assert local, "the README points into docs/"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = next(line for line in ci.splitlines() if "pytest" in line)
    assert command.strip() in README.read_text(encoding="utf-8")
