"""Sampled intermediate lifelong evaluations: the seeded sample, its confidence interval, and a
CLI run on the tiny Llama that samples in the middle and scores every fact at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sphere_lightning.cli import cli_main
from sphere_lightning.errors import ConfigError
from sphere_lightning.functional.sampling import mean_ci95_half_width, sample_indices
from sphere_lightning.module import EditingModule
from tests.helpers import ROOT, tiny_alphaedit_flags


def test_sample_is_a_fixed_seeded_subset_of_the_edited_facts():
    sample = sample_indices(1000, 100, seed=0, step=7)
    assert sample.dtype == torch.int64 and len(sample) == 100
    assert len(set(sample.tolist())) == 100
    assert sample.tolist() == sorted(sample.tolist())
    assert 0 <= int(sample.min()) and int(sample.max()) < 1000
    # The global RNG state plays no part: a resumed run draws the same facts.
    torch.manual_seed(123)
    torch.rand(10)
    assert torch.equal(sample_indices(1000, 100, seed=0, step=7), sample)
    assert not torch.equal(sample_indices(1000, 100, seed=0, step=8), sample)
    assert not torch.equal(sample_indices(1000, 100, seed=1, step=7), sample)
    # No size, or one at least the population: every fact.
    assert torch.equal(sample_indices(5, None, seed=0, step=1), torch.arange(5))
    assert torch.equal(sample_indices(5, 5, seed=0, step=1), torch.arange(5))
    assert sample_indices(0, 3, seed=0, step=0).numel() == 0
    with pytest.raises(ValueError, match="`size` should be ≥ 1 or None, got 0"):
        sample_indices(5, 0, seed=0, step=1)


def test_sample_is_uniform_over_the_facts():
    counts = torch.zeros(20)
    for step in range(2000):
        counts[sample_indices(20, 5, seed=0, step=step)] += 1
    # Each fact is drawn with probability 5/20: 500 of 2,000 draws, sd ≈ 19.4.
    assert (counts - 500).abs().max() < 6 * 19.4


@pytest.mark.parametrize(
    "values, population",
    [
        ([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0], 100),
        ([0.25, 0.5, 0.75, 1.0, 0.0, 0.5], 7),
        (np.random.default_rng(0).uniform(size=300).tolist(), 10_000),
    ],
)
def test_ci95_matches_the_normal_interval_with_finite_population_correction(values, population):
    x = np.asarray(values)
    n = len(x)
    low, high = stats.norm.interval(
        0.95, loc=x.mean(), scale=stats.sem(x) * math.sqrt((population - n) / (population - 1))
    )
    half = mean_ci95_half_width(float(x.sum()), float((x**2).sum()), n, population)
    assert half == pytest.approx((high - low) / 2, rel=1e-9)
    assert half > 0


def test_ci95_edge_cases():
    assert mean_ci95_half_width(3.0, 3.0, 5, 5) == 0.0  # the whole population: no error
    assert mean_ci95_half_width(4.0, 4.0, 4, 10) == 0.0  # no spread in the sample
    assert math.isnan(mean_ci95_half_width(1.0, 1.0, 1, 10))  # one value: no spread to estimate
    with pytest.raises(ValueError, match="should be ≤ `population`"):
        mean_ci95_half_width(1.0, 1.0, 6, 5)


@pytest.mark.parametrize("size", [0, -3, True, 2.5])
def test_bad_sample_size_names_the_flag(size):
    with pytest.raises(ConfigError, match="`model.eval_sample_size` should be an integer ≥ 1"):
        EditingModule(editor=None, eval_sample_size=size)


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    (event_file,) = list(log_dir.rglob("events.out.tfevents*"))
    acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_cli_samples_intermediate_evaluations_and_scores_every_fact_at_the_end(
    tmp_path, tiny_model_dir, requests, write_rome_json, monkeypatch
):
    data = write_rome_json(requests, tmp_path / "facts.json")
    scored: list[tuple[int, list]] = []  # (global step, requests) of every lifelong evaluation
    original = EditingModule._evaluate

    def record(self, batch):
        original(self, batch)
        num, sample = self.num_edited(), self._eval_positions
        chosen = [
            r
            for r, p in zip(batch.requests, batch.positions, strict=True)
            if p < num and (sample is None or p in sample)
        ]
        scored.append((self.global_step, chosen))

    monkeypatch.setattr(EditingModule, "_evaluate", record)
    cli = cli_main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "edit.yaml"),
            f"--model.model={tiny_model_dir}",
            *tiny_alphaedit_flags(num_steps=3),
            "--model.editor.init_args.nullspace_threshold=1e9",
            "--model.eval_sample_size=2",
            "--model.eval_sample_seed=5",
            "--model.batch_metrics=false",
            "--model.fluency_prompts=1",
            "--model.fluency_max_new_tokens=3",
            f"--data.dataset={data}",
            "--data.num_edits=4",
            "--data.edits_per_step=1",
            "--trainer.val_check_interval=1",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )
    order = cli.datamodule.requests
    by_step: dict[int, list] = {}
    for step, chosen in scored:
        by_step.setdefault(step, []).extend(chosen)
    # Steps 1 and 2 edited no more facts than the sample size: every one. Step 3 scored the
    # seeded sample of the 3 edited facts; step 4 (the last batch) every fact.
    assert by_step[1] == order[:1] and by_step[2] == order[:2]
    assert by_step[3] == [order[i] for i in sample_indices(3, 2, seed=5, step=3).tolist()]
    assert by_step[4] == order[:4]

    scalars = _scalars(tmp_path / "logs")
    assert scalars["edit/num_evaluated"] == [(1, 1.0), (2, 2.0), (3, 2.0), (4, 4.0)]
    assert (3, 3.0) in scalars["edit/num_edited"]
    # The pre-edit evaluation scores step 0's sample of the 4 facts the run will edit.
    assert scalars["edit_pre/num_evaluated"] == [(0, 2.0)]
    for metric in ("efficacy", "generalization", "specificity"):
        # Only the sampled evaluations (pre-edit and step 3) have one.
        pre, ci = scalars[f"edit/{metric}_ci95"]
        assert pre[0] == 0 and ci[0] == 3 and ci[1] >= 0
    (path,) = list((tmp_path / "logs").rglob("summary.json"))
    summary = json.loads(path.read_text())
    (sampled,) = summary["edit"]["sampled"]
    assert sampled["step"] == 3 and sampled["num_edited"] == 3 and sampled["num_evaluated"] == 2
    for metric in ("efficacy", "generalization", "specificity"):
        assert sampled[f"{metric}_ci95"] == pytest.approx(scalars[f"edit/{metric}_ci95"][1][1])
        assert sampled[metric] == pytest.approx(dict(scalars[f"edit/{metric}"])[3])
    final = summary["edit"]["final"]
    assert final["num_evaluated"] == 4 and not any(k.endswith("_ci95") for k in final)
    assert "fluency" in sampled and "fluency" in final
