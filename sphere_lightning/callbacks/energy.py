"""Hyperspherical energy of the edited weights, watched after every step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Trainer
from typing_extensions import override

from sphere_lightning.callbacks.observer import EditObserver, changes_since
from sphere_lightning.callbacks.sphere import short_name
from sphere_lightning.context import EditingContext
from sphere_lightning.errors import ConfigError, callback_flag
from sphere_lightning.functional.energy import hyperspherical_energy
from sphere_lightning.tags import ENERGY, ENERGY_CHANGE


class HyperSphericalEnergyCallback(EditObserver):
    """Log the HE of every edited weight and its change since the start of the run.

    Logs ``energy/<layer>`` and ``energy_change/<layer>`` (HE − HE before the first edit), the
    baseline at step 0. A run resumed from a checkpoint without this callback's state rebuilds
    the baseline from ``pl_module.original_weights``. ``summary.json``:
    ``energy.<layer>.{baseline,final}``.

    Args:
        s: Exponent of the energy: ``f_s(z) = z^-s`` for s > 0, ``log(1/z)`` for s = 0.
        every_n_steps: Compute after every n-th step.
        chunk_size: Rows of the Gram matrix computed at once (bounds memory).
    """

    summary_key = "energy"

    def __init__(self, s: float = 1.0, every_n_steps: int = 1, chunk_size: int = 1024) -> None:
        super().__init__(every_n_steps)
        if s < 0:
            raise ConfigError(f"{callback_flag(type(self).__name__, 's')} should be ≥ 0, got {s}")
        if chunk_size < 1:
            raise ConfigError(
                f"{callback_flag(type(self).__name__, 'chunk_size')} should be ≥ 1, "
                f"got {chunk_size}"
            )
        self.s = s
        self.chunk_size = chunk_size

    def energies(self, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """``{"energy/<layer>": HE}`` of the given ``{parameter name: weight}``."""
        return {
            f"{ENERGY}{short_name(name)}": float(
                hyperspherical_energy(weight.detach(), self.s, chunk_size=self.chunk_size)
            )
            for name, weight in weights.items()
        }

    @override
    def measure(self, trainer: Trainer, pl_module: EditingContext) -> dict[str, float]:
        names = pl_module.edited_parameter_names
        return self.energies({name: pl_module.edited_weight(name) for name in names})

    @override
    def changes(self, values: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
        return changes_since(values, baseline, ENERGY, ENERGY_CHANGE)

    @override
    def baseline_after_resume(
        self, trainer: Trainer, pl_module: EditingContext
    ) -> dict[str, float] | None:
        return self.energies(pl_module.original_weights)

    @override
    def summary(self, trainer: Trainer, pl_module: EditingContext) -> dict[str, Any]:
        baseline = self.baseline or {}
        return {
            tag.removeprefix(ENERGY): {"baseline": baseline.get(tag), "final": value}
            for tag, value in self.latest.items()
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.baseline is not None and not all(t.startswith(ENERGY) for t in self.baseline):
            # Keyed by parameter name (an older checkpoint): rebuilt in on_train_start.
            self.baseline = None
