"""General ability (GLUE, MMLU, NLI) of the model as edits pile up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from sphere_lightning.callbacks.observer import EditObserver, changes_since
from sphere_lightning.context import EditingContext
from sphere_lightning.distributed import Collective
from sphere_lightning.errors import ConfigError, callback_flag
from sphere_lightning.general.base import GeneralExample, GeneralTask
from sphere_lightning.general.tasks import TASKS, get_task
from sphere_lightning.tags import GENERAL, GENERAL_CHANGE

#: Per-task settings of the callback accepted in the dict form of ``tasks``; any other setting
#: is an argument of the task's constructor (``max_new_tokens`` of the generating tasks).
_TASK_SETTINGS = ("limit", "batch_size")


class GeneralAbilityCallback(EditObserver):
    """Score zero-shot general-ability tasks before the first edit and every few edit batches.

    Each task (see :mod:`sphere_lightning.general.tasks`) is multiple choice scored by the
    log-likelihood of its answer options. Logs, at x = number of applied edit batches:

    - ``general/<task>/<metric>``: accuracy, F1 (and MCC for CoLA);
    - ``general_change/<task>/<metric>``: the value minus its value before the first edit;
    - ``time/general/<task>``: seconds the task took.

    The baseline is measured in ``on_train_start`` when no batch has been applied yet, and is
    saved in checkpoints so a resumed run keeps measuring change against the unedited model.
    Afterwards the tasks run every ``every_n_steps`` batches, and once more at the end of training
    if the last batch was not scored, so :attr:`latest` always describes the final model (see
    :class:`~sphere_lightning.callbacks.EditObserver`). :meth:`by_task` turns :attr:`baseline`
    and :attr:`latest` (``{tag: value}``) into ``{task: {metric: value}}``, the shape of
    ``summary.json``'s ``general.<task>.{baseline,final}`` (with ``final_step``).

    Args:
        tasks: Task names (``sst2``, ``mrpc``, ``cola``, ``rte``, ``mmlu``, ``nli``,
            ``nli_reference``, ``boolq``, ``nq_open``, ``gsm8k``), or a mapping from task name
            to per-task overrides of ``limit`` and ``batch_size`` and arguments of the task
            itself, e.g.
            ``{"sst2": {}, "mmlu": {"limit": 500, "batch_size": 4}, "gsm8k": {"max_new_tokens":
            8}}``.
        data_dir: Folder holding ``<task>.jsonl`` for every task (the layouts of
            ``../shared/data/general``; ``nli_reference`` reads ``nli.jsonl``); relative paths
            are relative to the working directory.
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

    summary_key = "general"

    def _flag(self, name: str) -> str:
        """An option of this callback as messages name it."""
        return callback_flag(type(self).__name__, name)

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
        super().__init__(every_n_steps)
        if not tasks:
            raise ConfigError(
                f"{self._flag('tasks')} should name at least one task of {sorted(TASKS)}"
            )
        overrides = dict(tasks) if isinstance(tasks, dict) else {name: {} for name in tasks}
        self.tasks: dict[str, GeneralTask] = {}
        for name, settings in overrides.items():
            options = {k: v for k, v in (settings or {}).items() if k not in _TASK_SETTINGS}
            try:
                self.tasks[name] = get_task(name, **options)  # raises, listing the known tasks
            except TypeError as error:
                raise ConfigError(
                    f"{self._flag('tasks')}: unknown setting(s) {sorted(options)} for task "
                    f"{name!r}: {error}; the "
                    f"callback's per-task settings are {list(_TASK_SETTINGS)}, any other is an "
                    "argument of the task"
                ) from None
        paths = dict(paths or {})
        stray = sorted(set(paths) - set(overrides))
        if stray:
            raise ConfigError(
                f"{self._flag('paths')} names task(s) {stray} that are not in "
                f"{self._flag('tasks')} ({list(overrides)})"
            )
        self.limits: dict[str, int | None] = {}
        self.batch_sizes: dict[str, int] = {}
        for name, settings in overrides.items():
            settings = settings or {}
            self.limits[name] = settings.get("limit", limit)
            self.batch_sizes[name] = settings.get("batch_size", batch_size)
            if self.limits[name] is not None and self.limits[name] < 1:
                raise ConfigError(
                    f"{self._flag('limit')} should be ≥ 1 or None, got {self.limits[name]} ({name})"
                )
            if self.batch_sizes[name] < 1:
                raise ConfigError(
                    f"{self._flag('batch_size')} should be ≥ 1, got {self.batch_sizes[name]} "
                    f"({name})"
                )
        self.data_dir = data_dir
        self.paths = paths
        self.progress = progress
        self.examples: dict[str, list[GeneralExample]] = {}

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
        stem = self.tasks[name].data_file or name
        path = Path(self.data_dir).expanduser() / f"{stem}.jsonl"
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

    @override
    def measure(self, trainer: Trainer, pl_module: EditingContext) -> dict[str, float]:
        """Score every task on the module's model: ``{"general/<task>/<metric>": value}``,
        each task timed as phase ``general/<task>``."""
        examples = self.load_examples()
        collective = Collective.of(trainer)
        values: dict[str, float] = {}
        for name, task in self.tasks.items():
            with self.timed(f"{GENERAL}{name}"):
                scores = task.evaluate(
                    pl_module.model,
                    pl_module.tokenizer,
                    examples[name],
                    batch_size=self.batch_sizes[name],
                    progress=self.progress and trainer.is_global_zero,
                    collective=collective,
                )
            values.update({f"{GENERAL}{name}/{metric}": v for metric, v in scores.items()})
        return values

    @override
    def changes(self, values: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
        return changes_since(values, baseline, GENERAL, GENERAL_CHANGE)

    def by_task(self, values: dict[str, float] | None) -> dict[str, dict[str, float]]:
        """``{"general/<task>/<metric>": value}`` as ``{task: {metric: value}}`` (every task,
        empty where ``values`` has none of its metrics)."""
        nested: dict[str, dict[str, float]] = {name: {} for name in self.tasks}
        for tag, value in (values or {}).items():
            name, metric = tag.removeprefix(GENERAL).split("/", 1)
            nested.setdefault(name, {})[metric] = value
        return nested

    @override
    def summary(self, trainer: Trainer, pl_module: EditingContext) -> dict[str, Any]:
        baseline, latest = self.by_task(self.baseline), self.by_task(self.latest)
        step = self.latest_step
        return {
            name: {"baseline": baseline[name], "final": latest[name], "final_step": step}
            for name in self.tasks
        }

    # --------------------------------------------------------------------------------- hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.load_examples()  # a missing or malformed file fails before any edit is made

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        for key in ("baseline", "latest"):  # {task: {metric: value}} in older checkpoints
            values = state.get(key)
            if values and all(isinstance(v, dict) for v in values.values()):
                state[key] = {
                    f"{GENERAL}{name}/{metric}": value
                    for name, metrics in values.items()
                    for metric, value in metrics.items()
                }
        super().load_state_dict(state)
