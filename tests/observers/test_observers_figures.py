"""Figures: cosine heatmap values and files, the log_now recorder, trends and Spearman."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.image import imread
from scipy.stats import spearmanr
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sphere_lightning.callbacks.figures import (
    CosineHeatmapCallback,
    MetricTrendsCallback,
    edits_at,
    spearman_correlation,
)
from sphere_lightning.errors import ConfigError


def _image_tags(logger: TensorBoardLogger) -> list[str]:
    logger.experiment.flush()
    accumulator = EventAccumulator(logger.log_dir)
    accumulator.Reload()
    return accumulator.Tags()["images"]


@pytest.fixture
def tb_trainer(stub_trainer, tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    stub_trainer.loggers = [logger]
    stub_trainer.log_dir = logger.log_dir
    return stub_trainer


@pytest.mark.parametrize("tiny_model", ["gpt2", "llama"], indirect=True)
def test_heatmap_png_and_values_match_direct_cosines(tiny_model, make_stub_module, tb_trainer):
    module = make_stub_module(tiny_model)
    layer = module.edited_parameter_names[-1].removesuffix(".weight")
    callback = CosineHeatmapCallback(max_neurons=8, seed=1)
    callback.on_train_start(tb_trainer, module)
    indices = callback.indices.clone()
    assert len(indices) == 8 and indices.unique().numel() == 8

    module.perturb()
    tb_trainer.global_step = 1
    callback.on_train_batch_end(tb_trainer, module, None, None, 0)
    assert torch.equal(callback.indices, indices)  # the same neurons at every step

    rows = module.edited_weight(module.edited_parameter_names[-1]).detach()[indices]  # out × in
    direct = torch.tensor(
        [[float(F.cosine_similarity(rows[i], rows[j], dim=0)) for j in range(8)] for i in range(8)]
    )
    torch.testing.assert_close(callback.latest_similarity, direct, atol=1e-6, rtol=0)
    figures = tb_trainer.log_dir + "/figures"
    for step in (0, 1):
        image = imread(f"{figures}/cosine_{layer}_step{step}.png")
        assert image.ndim == 3 and image.shape[0] > 100
    assert _image_tags(tb_trainer.loggers[0]) == [f"figures/cosine/{layer}"]


def test_heatmap_layer_choice_and_state(tiny_llama, make_stub_module):
    module = make_stub_module(tiny_llama, layers=(0, 1, 2))
    names = module.edited_parameter_names
    assert CosineHeatmapCallback().parameter_name(module) == names[-1]
    assert CosineHeatmapCallback(layer=names[0]).parameter_name(module) == names[0]
    module_path = names[1].removesuffix(".weight")
    assert CosineHeatmapCallback(layer=module_path).parameter_name(module) == names[1]
    with pytest.raises(ConfigError, match=r"\.init_args\.layer` should be one of"):
        CosineHeatmapCallback(layer="model.layers.3.mlp.down_proj").parameter_name(module)
    with pytest.raises(ValueError, match="max_neurons"):
        CosineHeatmapCallback(max_neurons=1)
    with pytest.raises(ValueError, match="every_n_steps"):
        CosineHeatmapCallback(every_n_steps=0)

    callback = CosineHeatmapCallback(max_neurons=5)
    callback.similarity(module)
    resumed = CosineHeatmapCallback(max_neurons=5, seed=99)
    resumed.load_state_dict(callback.state_dict())
    assert torch.equal(resumed.neuron_indices(32), callback.indices)
    assert torch.equal(CosineHeatmapCallback(max_neurons=64).neuron_indices(32), torch.arange(32))


def test_spearman_against_a_hand_ranked_example():
    # x ranks 1..5; y = [2, 1, 4, 3, 5] ranks [2, 1, 4, 3, 5]; d = [−1, 1, −1, 1, 0], Σd² = 4
    # ρ = 1 − 6·Σd² / (n(n² − 1)) = 1 − 24 / 120 = 0.8
    assert spearman_correlation([10, 20, 30, 40, 50], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert spearman_correlation([1, 2, 3], [9, 5, 1]) == pytest.approx(-1.0)
    x, y = [1.0, 2.0, 2.0, 3.0, 5.0, 4.0], [3.0, 3.0, 1.0, 2.0, 5.0, 6.0]  # ties: mean ranks
    assert spearman_correlation(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-6)
    assert spearman_correlation([1, 2], [2, 1]) is None
    assert spearman_correlation([1, 2, 3], [1, 1, 1]) is None
    with pytest.raises(ValueError, match="length"):
        spearman_correlation([1, 2, 3], [1, 2])


class _Module(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.logged: list[dict[str, float]] = []

    def log_now(self, metrics: dict[str, float]) -> None:
        self.logged.append(dict(metrics))


def test_log_now_wrapper_records_and_still_logs(stub_trainer):
    module = _Module()
    callback = MetricTrendsCallback()
    callback.setup(stub_trainer, module, "fit")
    module.log_now({"energy/a": 3.0, "edit/efficacy": torch.tensor(0.5)})
    assert module.logged == [{"energy/a": 3.0, "edit/efficacy": torch.tensor(0.5)}]
    assert callback.history == {"energy/a": {0: 3.0}, "edit/efficacy": {0: 0.5}}

    callback.teardown(stub_trainer, module, "fit")
    assert "log_now" not in module.__dict__
    module.log_now({"energy/a": 4.0})
    assert module.logged[-1] == {"energy/a": 4.0} and callback.history["energy/a"] == {0: 3.0}


def _run_trends(module, trainer, callback, metric_steps):
    """Steps 0..4: HE of two layers rising every step; metrics at ``metric_steps``."""
    efficacy = {0: 0.2, 2: 0.9, 4: 0.7}
    specificity = {0: 0.8, 2: 0.6, 4: 0.5}
    callback.setup(trainer, module, "fit")
    for step in range(5):
        trainer.global_step = module.global_step = step
        module.log_now({"energy/l1": 10.0 + step, "energy/l2": 100.0 + 2 * step})
        if step in metric_steps:
            module.log_now(
                {
                    "edit/efficacy": efficacy[step],
                    "edit/specificity": specificity[step],
                    "edit/generalization": 0.5,  # constant: correlation undefined
                    "edit/num_evaluated": 10.0 * step,  # a counter, not a metric
                }
            )
            callback.on_validation_end(trainer, module)


def test_trends_log_spearman_and_write_png(tiny_llama, make_stub_module, tb_trainer):
    module = make_stub_module(tiny_llama)
    tb_trainer.datamodule = SimpleNamespace(edits_per_step=10)
    callback = MetricTrendsCallback()
    _run_trends(module, tb_trainer, callback, metric_steps=(0, 2, 4))
    callback.on_train_end(tb_trainer, module)  # nothing new since the last validation: no repeat

    correlations = [
        (s, {k: v for k, v in m.items() if k.startswith("corr")})
        for s, m in module.logged
        if any(k.startswith("corr") for k in m)
    ]
    # At step 4 mean HE rises over steps 0, 2, 4; efficacy 0.2, 0.9, 0.7 ranks 1, 3, 2:
    # Σd² = 0 + 1 + 1 = 2, ρ = 1 − 6·2 / (3·8) = 0.5; specificity falls: ρ = −1.
    expected = {"correlation/spearman/efficacy": 0.5, "correlation/spearman/specificity": -1.0}
    assert correlations == [(4, pytest.approx(expected))]
    assert "correlation/spearman/efficacy" not in callback.history  # summaries are not trends
    assert callback.metric_tags() == ["edit/efficacy", "edit/generalization", "edit/specificity"]
    assert callback.mean_energy()[2] == pytest.approx((12.0 + 104.0) / 2)
    assert edits_at(tb_trainer, 4) == 40
    tb_trainer.datamodule.num_edits = 35  # the last step holds fewer edits
    assert edits_at(tb_trainer, 4) == 35
    assert imread(tb_trainer.log_dir + "/figures/trends.png").ndim == 3
    assert _image_tags(tb_trainer.loggers[0]) == ["figures/trends"]

    resumed = MetricTrendsCallback()
    resumed.load_state_dict(callback.state_dict())
    assert resumed.history == callback.history


def test_trends_with_too_few_points_log_no_correlation(tiny_llama, make_stub_module, tb_trainer):
    module = make_stub_module(tiny_llama)
    callback = MetricTrendsCallback()
    _run_trends(module, tb_trainer, callback, metric_steps=(0, 2))
    callback.on_train_end(tb_trainer, module)
    assert not any(k.startswith("correlation") for _, m in module.logged for k in m)
    assert callback.correlations == {}
    assert edits_at(tb_trainer, 4) == 4  # no datamodule: steps
    assert imread(tb_trainer.log_dir + "/figures/trends.png").ndim == 3
