"""Small helpers shared by the test modules (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer

from sphere_lightning.experiments import WITH_SPHERE, WITHOUT_SPHERE

ROOT = Path(__file__).resolve().parents[1]


def quiet_trainer(callbacks: list | None = None, **overrides: Any) -> Trainer:
    """A one-epoch CPU ``Trainer`` without logger, checkpoints, progress bar, model summary or
    sanity check; ``overrides`` replace any of these."""
    options: dict[str, Any] = {
        "callbacks": callbacks or [],
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return Trainer(**{**options, **overrides})


def tiny_alphaedit_flags(v_num_steps: int = 6) -> list[str]:
    """Flags that shrink ``configs/edit.yaml``'s AlphaEdit to the tiny Llama: layers 1 and 2,
    one generated context template of 4 tokens, statistics from 8 texts of 12 tokens."""
    return [
        "--model.editor.init_args.layers=[1, 2]",
        f"--model.editor.init_args.v_num_steps={v_num_steps}",
        "--model.editor.init_args.num_context_templates=1",
        "--model.editor.init_args.context_template_length=4",
        "--model.editor.init_args.stats_num_samples=8",
        "--model.editor.init_args.stats_max_length=12",
    ]


def run_cli(args: list[str], pythonpath: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python -m sphere_lightning *args`` in a subprocess from the repository root, with one
    thread, ``pythonpath`` (test helper modules) first on the path and ``env`` on top of ours."""
    full = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "sphere_lightning", *args],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


# ---------------------------------------------------------------------- experiment runner

#: The experiment suite and the configs it lists (one per base editor).
EXPERIMENT_SUITE = ROOT / "configs" / "experiments" / "suite.yaml"
EXPERIMENT_CONFIGS = sorted(
    p for p in EXPERIMENT_SUITE.parent.glob("*.yaml") if p != EXPERIMENT_SUITE
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: The order of a pair's runs in tables and figures.
RUNS_ORDER = (WITHOUT_SPHERE, WITH_SPHERE)


def markdown_rows(text: str, table: int = 0) -> list[list[str]]:
    """The body rows of the ``table``-th markdown table of ``text``."""
    tables: list[list[str]] = []
    previous = ""
    for line in text.splitlines():
        if line.startswith("| "):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append(line)
        previous = line
    rows = tables[table] if table < len(tables) else []
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]
