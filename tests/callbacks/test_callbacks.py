"""SPHERE and HE callbacks against the functional maths, through the module's public attributes."""

from __future__ import annotations

import pytest
import torch

from sphere_lightning.callbacks import HyperSphericalEnergyCallback, SphereProjectionCallback
from sphere_lightning.functional import hyperspherical_energy, project_delta


class _Module:
    """The public surface callbacks use, over two random weights."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.weights = {f"layer{i}.weight": torch.randn(12, 20, generator=g) for i in range(2)}
        self.original_weights = {n: w.clone() for n, w in self.weights.items()}
        self.edited_parameter_names = list(self.weights)
        self.pending_deltas = {n: torch.randn(12, 20, generator=g) for n in self.weights}
        self.step_metrics: dict[str, float] = {}
        self.logged: list[dict[str, float]] = []

    def edited_weight(self, name: str) -> torch.Tensor:
        return self.weights[name]

    def log_now(self, metrics: dict[str, float]) -> None:
        self.logged.append(dict(metrics))


class _Trainer:
    global_step = 0


@pytest.mark.parametrize("stage", ["in_loop", "after_loop"])
@pytest.mark.parametrize("reference", ["current", "original"])
def test_sphere_callback_projects_every_pending_delta(reference, stage):
    module = _Module()
    module.weights["layer0.weight"] += 5.0  # current and original now differ
    raw = {n: d.clone() for n, d in module.pending_deltas.items()}
    callback = SphereProjectionCallback(
        cumulative_ratio=0.5, suppression=0.8, reference=reference, stage=stage
    )
    callback.on_before_optimizer_step(_Trainer(), module, optimizer=None)
    if stage == "in_loop":  # the hook leaves in-loop work to the editor's loop
        assert all(torch.equal(module.pending_deltas[n], d) for n, d in raw.items())
        for name, delta in raw.items():
            module.pending_deltas[name] = callback.apply_in_loop(name, delta, module)
    for name, delta in raw.items():
        weight = module.weights[name] if reference == "current" else module.original_weights[name]
        expected, rank = project_delta(delta, weight, 0.5, 0.8)
        torch.testing.assert_close(module.pending_deltas[name], expected)
        assert module.step_metrics[f"sphere/rank/{name.removesuffix('.weight')}"] == rank


def test_sphere_callback_rejects_bad_arguments():
    with pytest.raises(ValueError, match="cumulative_ratio"):
        SphereProjectionCallback(cumulative_ratio=1.5)
    with pytest.raises(ValueError, match="suppression"):
        SphereProjectionCallback(suppression=-0.1)
    with pytest.raises(ValueError, match="`current` or `original`"):
        SphereProjectionCallback(reference="edited")
    with pytest.raises(ValueError, match="`in_loop`, `after_loop` or `evaluation`"):
        SphereProjectionCallback(stage="before")


def test_energy_callback_logs_energy_and_change_and_resumes():
    module = _Module()
    trainer = _Trainer()
    callback = HyperSphericalEnergyCallback(s=2.0)
    callback.on_train_start(trainer, module)
    baseline = hyperspherical_energy(module.original_weights["layer1.weight"], 2.0).item()
    assert module.logged[0]["energy/layer1"] == pytest.approx(baseline)
    assert module.logged[0]["energy_change/layer1"] == 0.0

    module.weights["layer1.weight"] = (
        module.weights["layer1.weight"] + module.pending_deltas["layer1.weight"]
    )
    trainer.global_step = 1
    callback.on_train_batch_end(trainer, module, None, None, 0)
    now = hyperspherical_energy(module.weights["layer1.weight"], 2.0).item()
    assert module.logged[-1]["energy/layer1"] == pytest.approx(now)
    assert module.logged[-1]["energy_change/layer1"] == pytest.approx(now - baseline)

    resumed = HyperSphericalEnergyCallback(s=2.0)
    resumed.load_state_dict(callback.state_dict())
    assert resumed.baseline == callback.baseline


def test_energy_callback_every_n_steps():
    callback = HyperSphericalEnergyCallback(every_n_steps=3)
    assert [callback.should_update(step) for step in range(1, 7)] == [
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    with pytest.raises(ValueError, match="every_n_steps"):
        HyperSphericalEnergyCallback(every_n_steps=0)
