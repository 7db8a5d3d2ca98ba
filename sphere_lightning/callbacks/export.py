"""Export the edited model as a plain Hugging Face folder when a run ends."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from sphere_lightning.callbacks.sphere import SphereProjectionCallback
from sphere_lightning.context import EditingContext
from sphere_lightning.distributed import run_log_dir
from sphere_lightning.errors import ConfigError, callback_flag, check_writable_folder
from sphere_lightning.export_writer import SPHERE_SETTINGS, EditedRun, check_out_dir, write_export

_DIRPATH_FLAG = "trainer.callbacks.ExportCallback.init_args.dirpath"


def sphere_settings(callbacks: Iterable[Any]) -> list[dict[str, Any]]:
    """The settings of every :class:`SphereProjectionCallback` among ``callbacks``, in order."""
    return [
        {name: getattr(c, name) for name in SPHERE_SETTINGS}
        for c in callbacks
        if isinstance(c, SphereProjectionCallback)
    ]


def export_module(
    pl_module: EditingContext,
    datamodule: LightningDataModule,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
) -> Path:
    """Export the model of an :class:`~sphere_lightning.module.EditingModule` as evaluations
    see it now (:meth:`~sphere_lightning.module.EditingModule.evaluated_weights`: W₀ + T(W − W₀)
    with delta transforms of stage ``evaluation``, else the live weights).

    The module must be attached to a trainer (the number of edits and the SPHERE callbacks come
    from it). Weights are written in the run's dtype; the model in memory is not changed.
    """
    trainer = pl_module.trainer
    num_edited = pl_module.num_edited()
    run = EditedRun(
        base_model=pl_module.model_name,
        run_dtype=pl_module.dtype_name,
        editor=pl_module.editor_class_path,
        edited_parameters=list(pl_module.edited_parameter_names),
        sphere=sphere_settings(trainer.callbacks),
        sphere_source=None,
        requests=list(datamodule.requests[:num_edited]),
        pre_edit_metrics=dict(pl_module.pre_edit_metrics),
        final_edit_metrics=dict(pl_module.final_edit_metrics),
        source=f"the run in memory (log folder {run_log_dir(trainer)})",
    )
    with pl_module.evaluated_weights():
        return write_export(pl_module.model, pl_module.tokenizer, run, out_dir, overwrite=overwrite)


class ExportCallback(Callback):
    """At the end of ``fit``, write the edited model (as evaluations see it:
    ``pl_module.evaluated_weights()``) to ``dirpath`` as a folder that plain
    ``transformers`` loads (weights, tokenizer, ``README.md`` model card, ``edits.jsonl``), with
    :func:`export_module`; rank zero only.

    ``dirpath`` is checked when fit starts (it must be empty or absent, unless ``overwrite``, and
    its parent writable), so a run does not edit for hours to fail at the end.

    Args:
        dirpath: The folder to create.
        overwrite: Replace ``dirpath`` if it exists and is not empty.
    """

    def __init__(self, dirpath: str | os.PathLike, overwrite: bool = False) -> None:
        if not isinstance(dirpath, (str, os.PathLike)) or not str(dirpath).strip():
            raise ConfigError(f"`{_DIRPATH_FLAG}` should be a folder path, got {dirpath!r}")
        if not isinstance(overwrite, bool):
            raise ConfigError(
                f"{callback_flag('ExportCallback', 'overwrite')} should be true or false, "
                f"got {overwrite!r}"
            )
        self.dirpath = Path(dirpath)
        self.overwrite = overwrite

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            check_out_dir(self.dirpath, self.overwrite, flag=_DIRPATH_FLAG)
            check_writable_folder(self.dirpath.parent, _DIRPATH_FLAG)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The weights evaluations see (W₀ + T(W − W₀) with `evaluation`-stage transforms) are
        # computed by every process together, then rank zero writes them.
        with pl_module.evaluated_weights():
            if not trainer.is_global_zero:
                return
            if not pl_module.evaluated_at_current_step:
                rank_zero_warn(
                    "ExportCallback: the edit metrics were not measured after the last batch "
                    "before the export; the model card reports the last evaluation (set "
                    "`trainer.val_check_interval` so that one falls on the last batch)"
                )
            path = export_module(
                pl_module, trainer.datamodule, self.dirpath, overwrite=self.overwrite
            )
        rank_zero_info(f"Exported the edited model to {path}")
