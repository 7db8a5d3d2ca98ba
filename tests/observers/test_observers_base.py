"""EditObserver: when it measures, what it logs, its baseline, timing and checkpoint state."""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer

from sphere_lightning.callbacks import (
    CosineHeatmapCallback,
    EditObserver,
    HyperSphericalEnergyCallback,
    changes_since,
)
from sphere_lightning.errors import ConfigError
from sphere_lightning.functional import hyperspherical_energy


class WeightScale(EditObserver):
    """A custom observer: the mean |w| of every edited weight."""

    summary_key = "weight_scale"

    def measure(self, trainer, pl_module):
        return {
            f"weight_scale/{name}": float(pl_module.edited_weight(name).abs().mean())
            for name in pl_module.edited_parameter_names
        }

    def changes(self, values, baseline):
        return changes_since(values, baseline, "weight_scale/", "weight_scale_change/")


def _scales(module) -> dict[str, float]:
    """Σ|w| / #w of every edited weight, in float64, keyed by parameter name."""
    return {
        n: (module.edited_weight(n).double().abs().sum() / module.edited_weight(n).numel()).item()
        for n in module.edited_parameter_names
    }


def _run(observer, trainer, module, last_step: int) -> None:
    """Lightning's hook order over ``last_step`` batches, each an "edit" of the last layer."""
    observer.on_train_start(trainer, module)
    for step in range(1, last_step + 1):
        module.perturb(scale=0.1, seed=step)
        trainer.global_step = module.global_step = step
        observer.on_train_batch_end(trainer, module, None, None, step - 1)
    observer.on_train_end(trainer, module)


def test_every_n_steps_baseline_at_step_0_changes_and_timing(
    tiny_llama, make_stub_module, stub_trainer
):
    module = make_stub_module(tiny_llama)
    module.phase_seconds = {}
    before = _scales(module)
    observer = WeightScale(every_n_steps=3)
    _run(observer, stub_trainer, module, last_step=7)

    # Baseline at 0, then steps 3 and 6, and the final step 7 that every_n_steps skipped.
    assert [step for step, _ in module.logged] == [0, 3, 6, 7]
    step0 = module.logged[0][1]
    last = module.edited_parameter_names[-1]
    assert step0[f"weight_scale/{last}"] == pytest.approx(before[last])
    assert step0[f"weight_scale_change/{last}"] == 0.0
    assert observer.baseline == {f"weight_scale/{n}": pytest.approx(v) for n, v in before.items()}
    after = _scales(module)
    final = module.logged[-1][1]
    assert final[f"weight_scale/{last}"] == pytest.approx(after[last])
    assert final[f"weight_scale_change/{last}"] == pytest.approx(after[last] - before[last])
    assert after[last] != pytest.approx(before[last]), "the perturbation should move the scale"
    first = module.edited_parameter_names[0]
    assert final[f"weight_scale_change/{first}"] == 0.0  # never edited
    assert observer.latest_step == 7 and observer.latest == {
        f"weight_scale/{n}": pytest.approx(v) for n, v in after.items()
    }
    # Each measurement's wall time is logged and summed into the module's phase times.
    times = [metrics["time/weight_scale"] for _, metrics in module.logged]
    assert all(t > 0 for t in times)
    assert module.phase_seconds == {"weight_scale": pytest.approx(sum(times))}
    assert observer.summary(stub_trainer, module) == {
        "baseline": observer.baseline,
        "final": observer.latest,
        "final_step": 7,
    }

    every_other = WeightScale(every_n_steps=2)
    assert [step for step in range(1, 7) if every_other.should_update(step)] == [2, 4, 6]
    with pytest.raises(ConfigError, match=r"\.init_args\.every_n_steps` should be ≥ 1, got 0"):
        WeightScale(every_n_steps=0)
    with pytest.raises(TypeError, match="abstract"):
        EditObserver()


def test_resumed_observer_keeps_its_baseline_and_warns_without_one(
    tiny_llama, make_stub_module, stub_trainer
):
    module = make_stub_module(tiny_llama)
    observer = WeightScale()
    _run(observer, stub_trainer, module, last_step=2)
    state = observer.state_dict()

    resumed = WeightScale()
    resumed.load_state_dict(state)
    logged = len(module.logged)
    resumed.on_train_start(stub_trainer, module)  # step 2: the baseline is not re-measured
    assert len(module.logged) == logged and resumed.baseline == observer.baseline
    assert resumed.latest_step == 2
    module.perturb(seed=9)
    stub_trainer.global_step = module.global_step = 3
    resumed.on_train_batch_end(stub_trainer, module, None, None, 2)
    last = module.edited_parameter_names[-1]
    change = module.logged[-1][1][f"weight_scale_change/{last}"]
    baseline = observer.baseline[f"weight_scale/{last}"]
    assert change == pytest.approx(_scales(module)[last] - baseline)

    fresh = WeightScale()  # a checkpoint without its state: the unedited model is gone
    with pytest.warns(UserWarning, match="resumed at step 3 without a stored baseline"):
        fresh.on_train_start(stub_trainer, module)
    fresh.on_train_batch_end(stub_trainer, module, None, None, 2)
    assert not any(tag.startswith("weight_scale_change/") for tag in module.logged[-1][1])


def test_energy_rebuilds_a_missing_baseline_from_the_original_weights(
    tiny_gpt2, make_stub_module, stub_trainer
):
    module = make_stub_module(tiny_gpt2)
    module.perturb()
    stub_trainer.global_step = module.global_step = 4
    callback = HyperSphericalEnergyCallback()
    callback.on_train_start(stub_trainer, module)
    assert module.logged == []
    for name, weight in module.original_weights.items():
        tag = f"energy/{name.removesuffix('.weight')}"
        assert callback.baseline[tag] == pytest.approx(hyperspherical_energy(weight, 1.0).item())
    # A baseline keyed by parameter name (older checkpoints) is rebuilt the same way.
    legacy = HyperSphericalEnergyCallback()
    legacy.load_state_dict({"baseline": dict.fromkeys(module.original_weights, 1.0)})
    legacy.on_train_start(stub_trainer, module)
    assert legacy.baseline == callback.baseline


def test_two_heatmaps_for_two_layers_keep_separate_state(
    tiny_llama, make_stub_module, stub_trainer, tmp_path
):
    module = make_stub_module(tiny_llama, layers=(1, 2))
    first, second = module.edited_parameter_names
    heatmaps = [
        CosineHeatmapCallback(layer=first, max_neurons=4, seed=1),
        CosineHeatmapCallback(layer=second, max_neurons=4, seed=2),
    ]
    assert heatmaps[0].state_key != heatmaps[1].state_key
    # Lightning accepts both in one trainer; two for the same layer would share a state key.
    Trainer(callbacks=list(heatmaps), logger=False, default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="more than one stateful callback"):
        Trainer(
            callbacks=[CosineHeatmapCallback(layer=first), CosineHeatmapCallback(layer=first)],
            logger=False,
            default_root_dir=tmp_path,
        )

    for heatmap in heatmaps:
        heatmap.on_train_start(stub_trainer, module)  # draws step 0, choosing its neurons
    chosen = [h.indices.tolist() for h in heatmaps]
    assert chosen[0] != chosen[1]
    checkpoint = {h.state_key: h.state_dict() for h in heatmaps}

    restored = [
        CosineHeatmapCallback(layer=second, max_neurons=4, seed=7),  # listed in another order
        CosineHeatmapCallback(layer=first, max_neurons=4, seed=7),
    ]
    for heatmap in restored:
        heatmap.load_state_dict(checkpoint[heatmap.state_key])
    assert [h.indices.tolist() for h in restored] == chosen[::-1]
    for heatmap, name in zip(restored, (second, first), strict=True):
        layer = name.removesuffix(".weight")
        figure = tmp_path / "figures" / f"cosine_{layer}_step0.png"
        assert figure.is_file()
        assert heatmap.summary(stub_trainer, module) == {
            layer: {"final_step": 0, "figure": str(figure)}
        }
