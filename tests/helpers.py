"""Small helpers shared by the test modules (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer

from sphere_lightning.editors import StatisticsOptions, TargetOptions, TemplateOptions
from sphere_lightning.experiments import WITH_SPHERE, WITHOUT_SPHERE
from sphere_lightning.models.architectures import architecture_of, linear_weight

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


def tiny_alphaedit_flags(num_steps: int = 6) -> list[str]:
    """Flags that shrink ``configs/edit.yaml``'s AlphaEdit to the tiny Llama: layers 1 and 2,
    one generated context template of 4 tokens, statistics from 8 texts of 12 tokens."""
    return [
        "--model.editor.init_args.layers=[1, 2]",
        f"--model.editor.init_args.target.num_steps={num_steps}",
        "--model.editor.init_args.templates.count=1",
        "--model.editor.init_args.templates.length=4",
        "--model.editor.init_args.statistics.num_samples=8",
        "--model.editor.init_args.statistics.max_length=12",
    ]


#: AlphaEdit's arguments for the tiny Llama's layers 1 and 2 (``AlphaEdit(**TINY_ALPHAEDIT)``).
TINY_ALPHAEDIT = {
    "layers": [1, 2],
    "target": TargetOptions(num_steps=5),
    "templates": TemplateOptions(count=1, length=4),
    "statistics": StatisticsOptions(num_samples=8, max_length=12),
    "nullspace_threshold": 1e9,  # every direction is "null": the tiny model edits freely
}


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


# ---------------------------------------------------------------------- the callbacks' view


class ContextStub:
    """A stand-in for :class:`~sphere_lightning.context.EditingContext` (what callbacks see of
    the module): over a model's edited layers (``model``, ``layers``, or ``editor.layers``), or
    over plain tensors (``weights``: ``{name: W}``, returned as they are by ``edited_weight``,
    so a test may change them in place or replace them). ``log_now`` records
    ``(global_step, metrics)`` in :attr:`logged`.
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        layers: tuple[int, ...] = (1, 2),
        *,
        editor: Any = None,
        weights: dict[str, Any] | None = None,
        original_weights: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.tokenizer, self.editor = model, tokenizer, editor
        self.weights = weights
        if weights is not None:
            names = list(weights)
        elif model is not None:
            spec = architecture_of(model)
            names = [spec.weight_name(i) for i in (editor.layers if editor else layers)]
        else:
            names = []
        self.edited_parameter_names = names
        if original_weights is None:
            original_weights = {n: self.edited_weight(n).detach().clone() for n in names}
        self.original_weights = original_weights
        self.global_step = 0
        self.record_step_deltas = False
        self.editor_deltas: dict[str, Any] = {}
        self.applied_deltas: dict[str, Any] = {}
        self.suppression_increase = 0.0
        self.phase_seconds: dict[str, float] = {}
        self.pre_edit_metrics: dict[str, float] = {}
        self.final_edit_metrics: dict[str, float] = {}
        self.sampled_edit_metrics: list[dict[str, float]] = []
        self.evaluated_at_current_step = False
        self.model_name, self.dtype_name = "stub", "float32"
        self.trainer: Any = None
        self.logged: list[tuple[int, dict[str, float]]] = []

    @property
    def editor_class_path(self) -> str:
        return f"{type(self.editor).__module__}.{type(self.editor).__name__}"

    def edited_weight(self, name: str) -> torch.Tensor:
        if self.weights is not None:
            return self.weights[name]
        return linear_weight(self.model.get_submodule(name.removesuffix(".weight")))

    def evaluated_weights(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def num_edited(self) -> int:
        return 0

    def log_now(self, metrics: dict[str, float]) -> None:
        self.logged.append((self.global_step, dict(metrics)))

    @property
    def last_logged(self) -> dict[str, float]:
        """The metrics of the last ``log_now`` call."""
        return self.logged[-1][1]

    def perturb(self, scale: float = 0.5, seed: int = 1) -> None:
        """An "edit": add noise to the last edited weight."""
        g = torch.Generator().manual_seed(seed)
        weight = self.edited_weight(self.edited_parameter_names[-1])
        with torch.no_grad():
            weight.add_(scale * torch.randn(weight.shape, generator=g))


def tensorboard_scalars(log_root: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of the one TensorBoard event file under ``log_root``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = list(Path(log_root).rglob("events.out.tfevents*"))
    accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: {e.step: e.value for e in accumulator.Scalars(tag)}
        for tag in accumulator.Tags()["scalars"]
    }


def write_run_summary(
    directory: Path,
    scalars: dict[int, dict[str, float]],
    times: dict[int, float] | None = None,
    start: float = 0.0,
    finished: bool = True,
    **entries: Any,
) -> Path:
    """Write ``directory/summary.json`` as a run writes it, holding ``scalars`` (given as
    ``{step: {tag: value}}``), their step times (``times``: seconds after ``start``), whether
    the run ``finished``, and any other ``entries`` (``num_edited``, ``config``...)."""
    import json

    by_tag: dict[str, dict[str, float]] = {}
    for step in sorted(scalars):
        for tag, value in scalars[step].items():
            by_tag.setdefault(tag, {})[str(step)] = value
    summary = {
        "scalars": by_tag,
        "step_wall_time": {str(step): start + t for step, t in (times or {}).items()},
        "start_wall_time": start,
        "finished": finished,
        **entries,
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "summary.json"
    path.write_text(json.dumps(summary))
    return path
