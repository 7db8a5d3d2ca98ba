"""The command line's entry point: ``sphere-lightning`` (the installed console script) and
``python -m sphere_lightning`` take the same subcommands, each with its own ``--help``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from sphere_lightning import __main__ as entry
from tests.helpers import ROOT


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )


@pytest.fixture(scope="module")
def script() -> str:
    """The installed console script (``pip install -e .`` puts it on the PATH)."""
    path = shutil.which("sphere-lightning")
    assert path is not None, "no `sphere-lightning` on the PATH: run `pip install -e .`"
    return path


def test_the_console_script_lists_every_subcommand(script):
    result = _run([script, "--help"])

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: sphere-lightning ")
    listed = result.stdout.split("subcommands:", 1)[1]
    for name, description in entry.SUBCOMMANDS.items():
        assert name in listed
        assert description.split()[0] in listed
    assert set(entry.SUBCOMMANDS) == {"fit", "validate", "test", "export", "experiments"}


@pytest.mark.parametrize("subcommand", ["export", "experiments"])
def test_the_console_script_routes_every_subcommand(script, subcommand):
    result = _run([script, subcommand, "--help"])

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: sphere-lightning {subcommand} ")
    assert "--out" in result.stdout


def test_the_console_script_routes_fit_to_lightning_cli(script):
    result = _run([script, "fit", "--help"])

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: sphere-lightning [options] fit ")
    assert "--model.editor" in result.stdout
    assert "args parameter" not in result.stderr  # LightningCLI reads the command line itself


@pytest.mark.parametrize(
    ("module", "usage"),
    [
        (["sphere_lightning", "export"], "python -m sphere_lightning export"),
        (["sphere_lightning", "experiments"], "python -m sphere_lightning experiments"),
        (["sphere_lightning.experiments"], "python -m sphere_lightning.experiments"),
    ],
    ids=["export", "experiments", "experiments-alias"],
)
def test_python_dash_m_takes_the_same_subcommands(module, usage):
    result = _run([sys.executable, "-m", *module, "--help"])

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {usage} ")


def test_help_in_process_lists_the_subcommands(capsys):
    assert entry.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in entry.SUBCOMMANDS)


def test_no_subcommand_shows_the_help_and_fails(capsys):
    with pytest.raises(SystemExit) as info:
        entry.main([])
    assert info.value.code == 2
    assert "experiments" in capsys.readouterr().err


def test_an_unknown_subcommand_names_the_choices(capsys):
    with pytest.raises(SystemExit) as info:
        entry.main(["compare"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert (
        "unknown subcommand 'compare' (choose from fit, validate, test, export, experiments)" in err
    )


def test_a_user_mistake_in_experiments_is_one_paragraph(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        entry.main(["experiments", "--report-only", "--out", str(tmp_path / "nothing")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("usage: ") and "error: --report-only: no runs under --out" in err


@pytest.mark.parametrize(
    ("argv0", "name"),
    [
        (
            "/usr/lib/python3/site-packages/sphere_lightning/__main__.py",
            "python -m sphere_lightning",
        ),
        ("/home/me/.local/bin/sphere-lightning", "sphere-lightning"),
    ],
)
def test_usage_names_the_command_as_it_was_called(argv0, name):
    assert entry.program_name(argv0) == name
