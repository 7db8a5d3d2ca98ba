"""SPHERE and HE callbacks against the functional maths, through the module's public attributes."""

from __future__ import annotations

import pytest
import torch

from sphere_lightning.callbacks import HyperSphericalEnergyCallback, SphereProjectionCallback
from sphere_lightning.deltas import DeltaPipeline
from sphere_lightning.functional import hyperspherical_energy, project_delta
from tests.helpers import ContextStub


def _module() -> tuple[ContextStub, dict[str, torch.Tensor]]:
    """The callbacks' view of a module over two random weights, and a random ΔW for each."""
    g = torch.Generator().manual_seed(0)
    weights = {f"layer{i}.weight": torch.randn(12, 20, generator=g) for i in range(2)}
    return ContextStub(weights=weights), {n: torch.randn(12, 20, generator=g) for n in weights}


class _Trainer:
    global_step = 0


@pytest.mark.parametrize("stage", ["in_loop", "after_loop"])
@pytest.mark.parametrize("reference", ["current", "original"])
def test_sphere_callback_projects_every_delta_and_returns_its_scalars(reference, stage):
    module, raw = _module()
    module.weights["layer0.weight"] += 5.0  # current and original now differ
    callback = SphereProjectionCallback(
        cumulative_ratio=0.5, suppression=0.8, reference=reference, stage=stage
    )
    pipeline = DeltaPipeline([callback])
    out, metrics = pipeline.whole_batch("after_loop", raw, module)
    if stage == "in_loop":  # after the loop, only after_loop transforms run
        assert all(torch.equal(out[n], d) for n, d in raw.items()) and not metrics
        out = {}
        for name, delta in raw.items():
            out[name], produced = pipeline.in_loop(name, delta, module)
            metrics.update(produced)
    for name, delta in raw.items():
        weight = module.weights[name] if reference == "current" else module.original_weights[name]
        expected, rank = project_delta(delta, weight, 0.5, 0.8)
        torch.testing.assert_close(out[name], expected)
        assert metrics[f"sphere/rank/{name.removesuffix('.weight')}"] == rank


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
    module, deltas = _module()
    trainer = _Trainer()
    callback = HyperSphericalEnergyCallback(s=2.0)
    callback.on_train_start(trainer, module)
    baseline = hyperspherical_energy(module.original_weights["layer1.weight"], 2.0).item()
    assert module.logged[0][1]["energy/layer1"] == pytest.approx(baseline)
    assert module.logged[0][1]["energy_change/layer1"] == 0.0

    module.weights["layer1.weight"] = module.weights["layer1.weight"] + deltas["layer1.weight"]
    trainer.global_step = 1
    callback.on_train_batch_end(trainer, module, None, None, 0)
    now = hyperspherical_energy(module.weights["layer1.weight"], 2.0).item()
    assert module.last_logged["energy/layer1"] == pytest.approx(now)
    assert module.last_logged["energy_change/layer1"] == pytest.approx(now - baseline)

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
