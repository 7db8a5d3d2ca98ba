"""The reports kept in ``results/`` are what their summaries give: each folder's ``table.md``
and ``table.json`` are rebuilt with ``--report-only`` and must come out byte for byte the same,
so no committed number can drift from the run that measured it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sphere_lightning.experiments import cli, report
from tests.helpers import ROOT

RESULTS = ROOT / "results"
SUITES = ROOT / "configs" / "horizon"


def _recorded() -> list[str]:
    """Folders of ``results/`` that a suite file of ``configs/horizon/`` names."""
    if not RESULTS.is_dir():
        return []
    return sorted(
        p.name for p in RESULTS.iterdir() if p.is_dir() and (SUITES / f"{p.name}.yaml").is_file()
    )


def _reports(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): path.read_text(encoding="utf-8")
        for name in ("table.md", "table.json")
        for path in sorted(folder.rglob(name))
    }


def test_every_results_folder_has_its_suite_file():
    folders = sorted(p.name for p in RESULTS.iterdir() if p.is_dir())
    assert folders, "results/ holds no recorded suite"
    assert folders == _recorded(), "a results/ folder without configs/horizon/<name>.yaml"


@pytest.mark.parametrize("name", _recorded())
def test_a_recorded_report_is_rebuilt_unchanged_from_its_summaries(name, tmp_path, monkeypatch):
    # the figures are rebuilt by the same code from the same table; only the text is compared
    monkeypatch.setattr(report, "plot_comparison", lambda table, path: path.touch())
    monkeypatch.setattr(report, "plot_suite", lambda table, path: path.touch())
    shutil.copytree(RESULTS, tmp_path / "results", symlinks=True)
    shutil.copytree(SUITES, tmp_path / "configs" / "horizon")
    monkeypatch.chdir(tmp_path)  # the tables record the paths as given, relative to the repo
    out = Path("results") / name
    before = _reports(out)
    assert "table.md" in before, f"results/{name} has no table.md"

    suite = f"configs/horizon/{name}.yaml"
    code = cli.main(["--suite", suite, "--out", str(out), "--report-only"])

    assert code == 0
    after = _reports(out)
    assert after.keys() == before.keys()
    for path, text in before.items():
        assert after[path] == text, (
            f"results/{name}/{path} is not what its summaries give: rebuild it with "
            f"python -m sphere_lightning experiments --suite {suite} "
            f"--out results/{name} --report-only"
        )
