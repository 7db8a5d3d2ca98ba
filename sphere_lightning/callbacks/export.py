"""Export the edited model as a plain Hugging Face folder when a run ends."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from sphere_lightning.errors import ConfigError, check_writable_folder

_DIRPATH_FLAG = "ExportCallback.init_args.dirpath"


class ExportCallback(Callback):
    """At the end of ``fit``, write the edited model (as evaluations see it:
    ``pl_module.evaluated_weights()``) to ``dirpath`` as a folder that plain
    ``transformers`` loads (weights, tokenizer, ``README.md`` model card, ``edits.jsonl``), with
    :func:`sphere_lightning.export.export_module`; rank zero only.

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
                f"`ExportCallback.init_args.overwrite` should be true or false, got {overwrite!r}"
            )
        self.dirpath = Path(dirpath)
        self.overwrite = overwrite

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            # Imported in the hooks: sphere_lightning.export imports the module, which imports
            # this package.
            from sphere_lightning.export import check_out_dir

            check_out_dir(self.dirpath, self.overwrite, flag=_DIRPATH_FLAG)
            check_writable_folder(self.dirpath.parent, _DIRPATH_FLAG)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The weights evaluations see (W₀ + T(W − W₀) with `evaluation`-stage transforms) are
        # computed by every process together, then rank zero writes them.
        with pl_module.evaluated_weights():
            if not trainer.is_global_zero:
                return
            from sphere_lightning.export import export_module

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
