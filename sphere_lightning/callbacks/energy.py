"""Hyperspherical energy of the edited weights, watched after every step."""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from sphere_lightning.callbacks.sphere import short_name
from sphere_lightning.callbacks.timing import add_seconds
from sphere_lightning.functional.energy import hyperspherical_energy


class HyperSphericalEnergyCallback(Callback):
    """Log the HE of every edited weight and its change since the start of the run.

    Logs ``energy/<layer>`` and ``energy_change/<layer>`` (HE − HE before the first edit). The
    baseline is logged at step 0.

    Args:
        s: Exponent of the energy: ``f_s(z) = z^-s`` for s > 0, ``log(1/z)`` for s = 0.
        every_n_steps: Compute after every n-th step.
        chunk_size: Rows of the Gram matrix computed at once (bounds memory).
    """

    def __init__(self, s: float = 1.0, every_n_steps: int = 1, chunk_size: int = 1024) -> None:
        if s < 0:
            raise ValueError(f"`s` should be ≥ 0, got {s}")
        if every_n_steps < 1:
            raise ValueError(f"`every_n_steps` should be ≥ 1, got {every_n_steps}")
        self.s = s
        self.every_n_steps = every_n_steps
        self.chunk_size = chunk_size
        self.baseline: dict[str, float] = {}

    def should_update(self, step: int) -> bool:
        """Whether to compute the energy after ``step`` applied batches."""
        return step % self.every_n_steps == 0

    def energies(self, pl_module: LightningModule) -> dict[str, float]:
        """Current HE of every edited weight."""
        return {
            name: float(
                hyperspherical_energy(
                    pl_module.edited_weight(name).detach(), self.s, chunk_size=self.chunk_size
                )
            )
            for name in pl_module.edited_parameter_names
        }

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.baseline:
            self.baseline = {
                name: float(hyperspherical_energy(weight, self.s, chunk_size=self.chunk_size))
                for name, weight in pl_module.original_weights.items()
            }
        if trainer.global_step == 0:
            metrics = {f"energy/{short_name(n)}": e for n, e in self.baseline.items()}
            metrics.update({f"energy_change/{short_name(n)}": 0.0 for n in self.baseline})
            pl_module.log_now(metrics)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.should_update(trainer.global_step):
            return
        metrics = {}
        start = time.perf_counter()
        energies = self.energies(pl_module)
        add_seconds(pl_module, "energy", time.perf_counter() - start)
        for name, energy in energies.items():
            metrics[f"energy/{short_name(name)}"] = energy
            metrics[f"energy_change/{short_name(name)}"] = energy - self.baseline[name]
        pl_module.log_now(metrics)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline = dict(state_dict.get("baseline", {}))
