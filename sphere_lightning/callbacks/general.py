"""General ability (GLUE, MMLU, NLI) of the model as edits pile up."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from sphere_lightning.callbacks.timing import add_seconds
from sphere_lightning.general.base import GeneralExample, GeneralTask
from sphere_lightning.general.tasks import TASKS, get_task

#: Per-task settings accepted in the dict form of ``tasks``.
_TASK_SETTINGS = ("limit", "batch_size")


class GeneralAbilityCallback(Callback):
    """Score zero-shot general-ability tasks before the first edit and every few edit batches.

    Each task (see :mod:`sphere_lightning.general.tasks`) is multiple choice scored by the
    log-likelihood of its answer options. Logs, at x = number of applied edit batches:

    - ``general/<task>/<metric>``: accuracy, F1 (and MCC for CoLA);
    - ``general_change/<task>/<metric>``: the value minus its value before the first edit;
    - ``time/general/<task>``: seconds the task took.

    The baseline is measured in ``on_train_start`` when no batch has been applied yet, and is
    saved in checkpoints so a resumed run keeps measuring change against the unedited model.
    Afterwards the tasks run every ``every_n_steps`` batches, and once more at the end of training
    if the last batch was not scored, so :attr:`latest` always describes the final model.

    Attributes:
        baseline: ``{task: {metric: value}}`` before the first edit.
        latest: ``{task: {metric: value}}`` at the last evaluation.
        latest_step: The ``global_step`` of :attr:`latest` (``None`` before any evaluation).

    Args:
        tasks: Task names (``sst2``, ``mrpc``, ``cola``, ``rte``, ``mmlu``, ``nli``), or a mapping
            from task name to per-task overrides of ``limit`` and ``batch_size``, e.g.
            ``{"sst2": {}, "mmlu": {"limit": 500, "batch_size": 4}}``.
        data_dir: Folder holding ``<task>.jsonl`` for every task (the layouts of
            ``../shared/data/general``); relative paths are relative to the working directory.
            ``None`` reads every task not in ``paths`` from its Hugging Face hub dataset
            (``nyu-mll/glue``, ``cais/mmlu``; needs network access).
        every_n_steps: Evaluate after every n-th applied edit batch.
        limit: Score the first ``limit`` examples of each task (``None``: all of them).
        batch_size: Sequences per forward pass when scoring options.
        paths: Per-task data source overriding ``data_dir``: a JSONL file, or a hub id written
            ``"<id>[:<config>][@<split>]"`` (``"nyu-mll/glue"`` uses the task's own config and
            split; ``"cais/mmlu:all@validation"`` names both).
        progress: Show a tqdm bar per task while it is scored.
    """

    def __init__(
        self,
        tasks: list[str] | dict[str, dict[str, Any]],
        data_dir: str | None = "../shared/data/general",
        every_n_steps: int = 1,
        limit: int | None = 200,
        batch_size: int = 16,
        paths: dict[str, str] | None = None,
        progress: bool = True,
    ) -> None:
        if not tasks:
            raise ValueError(f"`tasks` should name at least one task of {sorted(TASKS)}")
        overrides = dict(tasks) if isinstance(tasks, dict) else {name: {} for name in tasks}
        for name, settings in overrides.items():
            get_task(name)  # raises, listing the known tasks
            unknown = set(settings or {}) - set(_TASK_SETTINGS)
            if unknown:
                raise ValueError(
                    f"Unknown setting(s) {sorted(unknown)} for task {name!r}; "
                    f"per-task settings are {list(_TASK_SETTINGS)}"
                )
        if every_n_steps < 1:
            raise ValueError(f"`every_n_steps` should be ≥ 1, got {every_n_steps}")
        paths = dict(paths or {})
        stray = sorted(set(paths) - set(overrides))
        if stray:
            raise ValueError(
                f"`paths` names task(s) {stray} that are not in `tasks` ({list(overrides)})"
            )
        self.tasks: dict[str, GeneralTask] = {name: get_task(name) for name in overrides}
        self.limits: dict[str, int | None] = {}
        self.batch_sizes: dict[str, int] = {}
        for name, settings in overrides.items():
            settings = settings or {}
            self.limits[name] = settings.get("limit", limit)
            self.batch_sizes[name] = settings.get("batch_size", batch_size)
            if self.limits[name] is not None and self.limits[name] < 1:
                raise ValueError(f"`limit` should be ≥ 1 or None, got {self.limits[name]} ({name})")
            if self.batch_sizes[name] < 1:
                raise ValueError(
                    f"`batch_size` should be ≥ 1, got {self.batch_sizes[name]} ({name})"
                )
        self.data_dir = data_dir
        self.paths = paths
        self.every_n_steps = every_n_steps
        self.progress = progress
        self.examples: dict[str, list[GeneralExample]] = {}
        self.baseline: dict[str, dict[str, float]] = {}
        self.latest: dict[str, dict[str, float]] = {}
        self.latest_step: int | None = None

    # ---------------------------------------------------------------------------------- data

    def source(self, name: str) -> str | None:
        """Where task ``name`` is read from: a file, a hub id, or ``None`` for its hub default.

        Raises:
            FileNotFoundError: The task's file under ``data_dir`` does not exist.
        """
        if name in self.paths:
            return self.paths[name]
        if self.data_dir is None:
            return None
        path = Path(self.data_dir).expanduser() / f"{name}.jsonl"
        if not path.is_file():
            hub = self.tasks[name].hub
            raise FileNotFoundError(
                f"General-ability data for task {name!r} not found: {path.resolve()} does not "
                f"exist. Point `data_dir` at the folder holding <task>.jsonl, give this task a "
                f"file or hub id in `paths` (e.g. paths={{{name!r}: {hub.path!r}}} reads {hub} "
                "from the Hugging Face hub), or set `data_dir` to null to read every task from "
                "the hub."
            )
        return str(path)

    def load_examples(self) -> dict[str, list[GeneralExample]]:
        """Read (once) the examples of every task."""
        for name, task in self.tasks.items():
            if name not in self.examples:
                self.examples[name] = task.read(self.source(name), limit=self.limits[name])
        return self.examples

    # ---------------------------------------------------------------------------- evaluation

    def should_update(self, step: int) -> bool:
        """Whether to evaluate after ``step`` applied batches."""
        return step % self.every_n_steps == 0

    def evaluate(
        self, pl_module: LightningModule
    ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """Score every task on the module's model.

        Returns:
            ``({task: {metric: value}}, {task: seconds})``.
        """
        examples = self.load_examples()
        values: dict[str, dict[str, float]] = {}
        seconds: dict[str, float] = {}
        for name, task in self.tasks.items():
            start = time.perf_counter()
            values[name] = task.evaluate(
                pl_module.model,
                pl_module.tokenizer,
                examples[name],
                batch_size=self.batch_sizes[name],
                progress=self.progress,
            )
            seconds[name] = time.perf_counter() - start
        return values, seconds

    def _evaluate_and_log(self, pl_module: LightningModule, step: int) -> None:
        values, seconds = self.evaluate(pl_module)
        if step == 0:
            self.baseline = values
        metrics: dict[str, float] = {}
        for name, task_values in values.items():
            for metric, value in task_values.items():
                metrics[f"general/{name}/{metric}"] = value
                if metric in self.baseline.get(name, {}):
                    metrics[f"general_change/{name}/{metric}"] = value - self.baseline[name][metric]
            metrics[f"time/general/{name}"] = seconds[name]
            add_seconds(pl_module, f"general/{name}", seconds[name])
        self.latest = values
        self.latest_step = step
        pl_module.log_now(metrics)

    # --------------------------------------------------------------------------------- hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.load_examples()  # a missing or malformed file fails before any edit is made

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step == 0:
            self._evaluate_and_log(pl_module, 0)
        elif not self.baseline:
            rank_zero_warn(
                "GeneralAbilityCallback: resumed at step "
                f"{trainer.global_step} without a stored baseline; `general_change/*` will not "
                "be logged (the pre-edit model is gone)."
            )

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.should_update(trainer.global_step):
            self._evaluate_and_log(pl_module, trainer.global_step)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step > 0 and self.latest_step != trainer.global_step:
            self._evaluate_and_log(pl_module, trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "latest": self.latest, "latest_step": self.latest_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline = {k: dict(v) for k, v in state_dict.get("baseline", {}).items()}
        self.latest = {k: dict(v) for k, v in state_dict.get("latest", {}).items()}
        self.latest_step = state_dict.get("latest_step")
