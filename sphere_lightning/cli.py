"""Command line: ``python -m sphere_lightning fit|validate|test --config ...``."""

from __future__ import annotations

import warnings

from lightning.pytorch.cli import LightningCLI

from sphere_lightning.data.datamodule import EditDataModule
from sphere_lightning.module import EditingModule

TRAINER_DEFAULTS = {
    "max_epochs": 1,
    "num_sanity_val_steps": 0,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "edit"},
    },
}


class EditingCLI(LightningCLI):
    """LightningCLI that also evaluates once more after the last edit, if it was not already."""

    def after_fit(self) -> None:
        """Log final edit metrics at the last step if validation did not run there."""
        if self.trainer.interrupted or self.model.evaluated_at_current_step:
            return
        self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)


def cli_main(args: list[str] | None = None) -> EditingCLI:
    """Run the CLI; ``args`` replaces ``sys.argv[1:]`` (tests call this in-process)."""
    # The edited LM is kept in eval mode on purpose (no dropout while editing).
    warnings.filterwarnings(
        "ignore", message=r".*module\(s\) in eval mode at the start of training"
    )
    return EditingCLI(
        EditingModule,
        EditDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
    )
