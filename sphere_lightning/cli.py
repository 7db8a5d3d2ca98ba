"""Command line: ``python -m sphere_lightning fit|validate|test --config ...``."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from sphere_lightning.cache import CACHE_ENV, models_cache_dir, stats_cache_dir
from sphere_lightning.callbacks import EditObserver
from sphere_lightning.checkpoints import last_checkpoint
from sphere_lightning.data.datamodule import EditDataModule
from sphere_lightning.distributed import run_log_dir
from sphere_lightning.errors import check_writable_folder
from sphere_lightning.models.loading import needs_conversion
from sphere_lightning.module import EditingModule
from sphere_lightning.protocols import edit_protocols

TRAINER_DEFAULTS = {
    "max_epochs": 1,
    "num_sanity_val_steps": 0,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "edit"},
    },
}


def _logger_args(trainer_config: Any) -> Any | None:
    """The ``init_args`` of a single logger with ``save_dir``/``name``/``version`` (e.g.
    TensorBoardLogger), else None."""
    logger = trainer_config.get("logger") if trainer_config is not None else None
    init_args = logger.get("init_args") if hasattr(logger, "get") else None
    if init_args is None or not all(k in init_args for k in ("save_dir", "name", "version")):
        return None
    return init_args


def output_folders(trainer: Any, module: Any) -> list[tuple[str, Path]]:
    """The folders a run writes into, each with the flag that sets it: the loggers' ``save_dir``
    (or ``trainer.default_root_dir`` without a logger), checkpoint folders set explicitly, the
    editor's statistics cache and, for a model that is converted once (GGUF, embedded), the model
    cache."""
    folders: list[tuple[str, Path]] = []
    for logger in getattr(trainer, "loggers", []):
        if getattr(logger, "save_dir", None) is not None:
            folders.append(("trainer.logger.init_args.save_dir", Path(logger.save_dir)))
    if not folders and getattr(trainer, "default_root_dir", None) is not None:
        folders.append(("trainer.default_root_dir", Path(trainer.default_root_dir)))
    for callback in getattr(trainer, "checkpoint_callbacks", []):
        if getattr(callback, "dirpath", None) is not None:
            flag = f"trainer.callbacks.{type(callback).__name__}.init_args.dirpath"
            folders.append((flag, Path(callback.dirpath)))
    stats = getattr(getattr(module, "editor", None), "statistics", None)
    if stats is not None:
        cache_dir = stats.cache_dir
        flag = "model.editor.init_args.statistics.cache_dir" if cache_dir else f"${CACHE_ENV}"
        folders.append((flag, stats_cache_dir(cache_dir)))
    if needs_conversion(getattr(module, "model_name", "")):
        folders.append((f"${CACHE_ENV}", models_cache_dir()))
    return folders


def check_output_folders(trainer: Any, module: Any) -> None:
    """Fail early, before the model loads, if a folder the run writes into is not writable
    (:func:`output_folders`, :func:`check_writable_folder`)."""
    for flag, folder in output_folders(trainer, module):
        check_writable_folder(folder, flag)


class EditingCLI(LightningCLI):
    """LightningCLI that resumes a run in its own log folder, evaluates once more after the last
    edit (if it was not already) and writes ``summary.json`` into the run's log folder: after
    every evaluation with ``finished: false`` (:class:`RunSummary`), and at the end of the run
    with ``finished: true``.

    ``fit --ckpt_path last`` takes the newest ``last.ckpt`` under the logger's
    ``save_dir/name`` (Lightning's own ``last`` looks only in the new run's folder), and a
    checkpoint inside a run's ``<version>/checkpoints/`` continues that run's folder: the logger
    writes its TensorBoard events into it, dropping any the interrupted run logged after the
    checkpoint, so the curves go on at the right step. Checkpoints load with
    ``weights_only=True`` (no pickled code runs) unless ``--weights_only false``.
    """

    def before_instantiate_classes(self) -> None:
        """Point a resumed ``fit`` at the run folder of its checkpoint."""
        if self.subcommand != "fit":
            return
        config = self.config["fit"]
        if config.get("weights_only") is None:
            config["weights_only"] = True
        ckpt_path = config.get("ckpt_path")
        logger = _logger_args(config.get("trainer"))
        if not ckpt_path or logger is None or logger["version"] is not None:
            return
        if ckpt_path == "last":
            runs = Path(logger["save_dir"]) / (logger["name"] or "")
            found = last_checkpoint(runs, folder="*/checkpoints")
            if found is None:
                return  # Lightning warns and starts afresh
            config["ckpt_path"] = ckpt_path = str(found)
        path = Path(ckpt_path)
        run_dir = path.parent.parent
        if (
            path.parent.name == "checkpoints"
            and run_dir.parent.resolve()
            == (Path(logger["save_dir"]) / (logger["name"] or "")).resolve()
        ):
            logger["version"] = run_dir.name
            rank_zero_info(f"Resuming run {run_dir} from {path}")

    def before_fit(self) -> None:
        """Start the run's wall clock and its :class:`RunSummary`; on resume, drop events logged
        after the checkpoint (TensorBoard's and ``summary.json``'s)."""
        check_output_folders(self.trainer, self.model)  # fail before the model loads
        self._fit_started = time.perf_counter()
        self._summary = RunSummary(self._resolved_config(), self._fit_started)
        self.trainer.callbacks.append(self._summary)
        ckpt_path = self.config["fit"].get("ckpt_path")
        logger = self.trainer.logger
        if ckpt_path and Path(ckpt_path).is_file():
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            # Refuse a checkpoint of another model before anything is written into the run's
            # folder (its config.yaml, a new TensorBoard events file).
            self.model.configure_model()
            self.model.check_checkpoint(checkpoint)
            if hasattr(logger, "_kwargs"):
                logger._kwargs.setdefault("purge_step", int(checkpoint["global_step"]) + 1)
            self._summary.keep_earlier(self.trainer, int(checkpoint["global_step"]))

    def after_fit(self) -> None:
        """Log final edit metrics at the last step if validation did not run there; summarise."""
        if self.trainer.interrupted:
            return
        if not self.model.evaluated_at_current_step:
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        path = self._summary.write(self.trainer, self.model, finished=True)
        if path is not None:
            rank_zero_info(f"Run summary: {path}")

    def _resolved_config(self) -> dict[str, Any]:
        parser = self._parser(self.subcommand)
        config = self.config.get(str(self.subcommand), self.config)
        return yaml.safe_load(parser.dump(config, skip_none=False, skip_check=True))


class RunSummary(Callback):
    """Writes the run's ``summary.json`` (:func:`write_summary`) after every evaluation, with
    ``finished: false``; :class:`EditingCLI` writes the last one, ``finished: true``.

    Listed after the run's own callbacks, it writes once their ``on_validation_end`` hooks have
    logged. A resumed run's ``summary.json`` keeps the scalars of the earlier ``summary.json``
    up to the checkpoint's step (:meth:`keep_earlier`): the evaluation at that step comes after
    the checkpoint was saved, so the checkpoint's history lacks it.

    Args:
        config: The run's resolved config (``summary.json``'s ``config``).
        started: ``time.perf_counter()`` when the ``fit`` command started (``wall_seconds``).
    """

    def __init__(self, config: dict[str, Any], started: float) -> None:
        self.config = config
        self.started = started
        self.earlier: dict[str, Any] = {}

    def keep_earlier(self, trainer: Trainer, step: int) -> None:
        """Keep the scalars and step times up to ``step`` of the ``summary.json`` that the run
        folder holds (a resumed run's, written by the process that was stopped)."""
        log_dir = run_log_dir(trainer)
        path = Path(log_dir) / "summary.json" if log_dir is not None else None
        if path is None or not path.is_file():
            return
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        self.earlier = {
            "scalars": {
                tag: {int(s): v for s, v in values.items() if int(s) <= step}
                for tag, values in (summary.get("scalars") or {}).items()
            },
            "step_wall_time": {
                int(s): t
                for s, t in (summary.get("step_wall_time") or {}).items()
                if int(s) <= step
            },
        }

    def write(self, trainer: Trainer, module: EditingModule, finished: bool) -> Path | None:
        """Write ``summary.json`` now; returns its path (``None`` off rank zero)."""
        return write_summary(
            trainer,
            module,
            config=self.config,
            wall_seconds=time.perf_counter() - self.started,
            finished=finished,
            earlier=self.earlier,
        )

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.write(trainer, pl_module, finished=False)


def summarise(trainer, module: EditingModule) -> dict[str, Any]:
    """Final and pre-edit values of everything a run watches, read from the module and from
    every :class:`~sphere_lightning.callbacks.EditObserver` in ``trainer.callbacks`` (the same
    numbers they last logged), each under its ``summary_key``, and every scalar the module
    logged (``scalars``, ``{tag: {step: value}}``) with the time each step's were logged
    (``step_wall_time``) and the run's start (``start_wall_time``), as ``time.time()``."""
    summary: dict[str, Any] = {
        "global_step": trainer.global_step,
        "num_edited": module.num_edited(),
        "edit": {
            "protocol": "after all edits, over all edited facts (lifelong)",
            "protocols": edit_protocols(trainer.datamodule, module.fluency_protocol_used),
            "pre": module.pre_edit_metrics,
            "final": module.final_edit_metrics,
            # Intermediate evaluations on a sample (`model.eval_sample_size`), with their CIs.
            "sampled": module.sampled_edit_metrics,
        },
        "phase_seconds": dict(module.phase_seconds),
        "scalars": {tag: dict(values) for tag, values in module.scalars.items()},
        "step_wall_time": dict(module.step_wall_time),
        "start_wall_time": module.start_wall_time,
    }
    for callback in trainer.callbacks:
        if isinstance(callback, EditObserver) and callback.summary_key is not None:
            _add_entry(summary, callback, callback.summary(trainer, module))
    return summary


def _add_entry(summary: dict[str, Any], observer: EditObserver, entry: Any) -> None:
    """Put ``entry`` under ``observer.summary_key``. Entries sharing a key merge when both are
    dicts with distinct keys (one heatmap per layer); otherwise the later one goes under the
    observer's ``state_key``."""
    key = observer.summary_key
    held = summary.get(key)
    if key not in summary:
        summary[key] = entry
    elif isinstance(held, dict) and isinstance(entry, dict) and not set(held) & set(entry):
        summary[key] = {**held, **entry}
    else:
        rank_zero_warn(
            f"summary.json already has an entry {key!r}; {type(observer).__name__}'s goes under "
            f"{observer.state_key!r} (give it another `summary_key`)"
        )
        summary[observer.state_key] = entry


def write_summary(
    trainer,
    module: EditingModule,
    config: dict[str, Any],
    wall_seconds: float,
    finished: bool = True,
    earlier: dict[str, Any] | None = None,
) -> Path | None:
    """Write ``summary.json`` into the run's log folder (rank zero only); returns its path.

    ``finished``: whether the run has ended (``false`` while it goes on); ``earlier``:
    ``scalars`` and ``step_wall_time`` of an earlier process of the run, under this one's.
    """
    log_dir = run_log_dir(trainer)
    if not trainer.is_global_zero or log_dir is None:
        return None
    summary = summarise(trainer, module)
    earlier = earlier or {}
    held, scalars = earlier.get("scalars") or {}, summary["scalars"]
    summary["scalars"] = {
        tag: {**held.get(tag, {}), **scalars.get(tag, {})} for tag in {**held, **scalars}
    }
    summary["step_wall_time"] = {
        **(earlier.get("step_wall_time") or {}),
        **summary["step_wall_time"],
    }
    summary["finished"] = finished
    summary["wall_seconds"] = wall_seconds
    summary["config"] = config
    path = Path(log_dir) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Replaced whole: a reader (the experiment runner's report) never sees half a file.
    written = path.with_name("summary.json.tmp")
    written.write_text(json.dumps(summary, indent=2, default=str))
    written.replace(path)
    return path


def cli_main(args: list[str] | None = None, prog: str | None = None) -> EditingCLI:
    """Run the CLI; ``args`` replaces ``sys.argv[1:]`` (tests call this in-process), ``prog``
    is how usage names the command (default: the script's file name)."""
    # The edited LM is kept in eval mode on purpose (no dropout while editing).
    warnings.filterwarnings(
        "ignore", message=r".*module\(s\) in eval mode at the start of training"
    )
    # A checkpoint is meant to hold the weights after the batch's update (its manual
    # "optimizer" step), which is what Lightning warns it will save.
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
    return EditingCLI(
        EditingModule,
        EditDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={} if prog is None else {"prog": prog},
        args=args,
    )
