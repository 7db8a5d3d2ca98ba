"""End to end: the real CLI entry point on a tiny model, in-process."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sphere_lightning import cli as cli_module
from sphere_lightning.callbacks import CosineHeatmapCallback, EditObserver, changes_since
from sphere_lightning.cli import RunSummary, cli_main
from sphere_lightning.editors import AlphaEdit
from sphere_lightning.module import EditingModule, NonFiniteDeltaError
from tests.helpers import _fit_args, write_run_summary

ROOT = Path(__file__).resolve().parents[1]


class WeightNorm(EditObserver):
    """The documented custom observer (docs/callbacks.md): the norm of every edited weight."""

    summary_key = "weight_norm"

    def measure(self, trainer, pl_module):
        return {
            f"weight_norm/{name}": float(pl_module.edited_weight(name).norm())
            for name in pl_module.edited_parameter_names
        }

    def changes(self, values, baseline):
        return changes_since(values, baseline, "weight_norm/", "weight_norm_change/")


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    (event_file,) = list(log_dir.rglob("events.out.tfevents*"))
    acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_two_step_run_writes_tensorboard_scalars(
    tmp_path, tiny_model_dir, requests, write_rome_json
):
    data = write_rome_json(requests, tmp_path / "facts.json")
    cli_main(_fit_args(tmp_path, tiny_model_dir, data))

    scalars = _scalars(tmp_path / "logs")
    for layer in (1, 2):
        name = f"model.layers.{layer}.mlp.down_proj"
        # HE and its change at step 0 (baseline) and after each of the two steps.
        assert [s for s, _ in scalars[f"energy/{name}"]] == [0, 1, 2]
        assert [s for s, _ in scalars[f"energy_change/{name}"]] == [0, 1, 2]
        assert scalars[f"energy_change/{name}"][0][1] == 0.0
        assert scalars[f"energy_change/{name}"][-1][1] != 0.0
        assert [s for s, _ in scalars[f"sphere/rank/{name}"]] == [1, 2]
        assert all(rank >= 1 for _, rank in scalars[f"sphere/rank/{name}"])
    for metric in ("efficacy", "generalization", "specificity"):
        assert [s for s, _ in scalars[f"edit_pre/{metric}"]] == [0]
        steps = [s for s, _ in scalars[f"edit/{metric}"]]
        assert steps[0] == 0 and steps[-1] == 2
        assert all(0.0 <= v <= 1.0 for _, v in scalars[f"edit/{metric}"])
    assert scalars["edit/num_edited"] == [(1, 2.0), (2, 4.0)]
    assert list((tmp_path / "logs").rglob("*.ckpt")), "a checkpoint is written"


def test_print_config_does_not_load_a_model(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("--print_config must not load a model")

    monkeypatch.setattr("sphere_lightning.module.load_model", refuse)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(ROOT / "configs" / "edit.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "sphere_lightning.editors.AlphaEdit" in printed
    assert "SphereProjectionCallback" in printed


def test_non_finite_delta_leaves_weights_untouched(tiny_model_dir):
    module = EditingModule(editor=AlphaEdit(layers=[1, 2]), model=tiny_model_dir)
    module.configure_model()
    before = {n: module.edited_weight(n).clone() for n in module.edited_parameter_names}
    good, bad = module.edited_parameter_names
    module.pending_deltas = {
        good: torch.ones_like(before[good]),
        bad: torch.full_like(before[bad], float("nan")),
    }
    with pytest.raises(NonFiniteDeltaError, match=r"model\.layers\.2\.mlp\.down_proj"):
        module.apply_pending_deltas()
    for name, weight in before.items():
        assert torch.equal(module.edited_weight(name), weight)


def test_layer_out_of_range_names_the_flag(tiny_model_dir):
    module = EditingModule(editor=AlphaEdit(layers=[1, 40]), model=tiny_model_dir)
    with pytest.raises(ValueError, match=r"model\.editor\.init_args\.layers.*valid: 0\.\.3"):
        module.configure_model()


def test_general_eval_config_composes_with_the_edit_config(capsys):
    with pytest.raises(SystemExit):
        cli_main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "edit.yaml"),
                "--config",
                str(ROOT / "configs" / "eval" / "general.yaml"),
                "--print_config",
            ]
        )
    printed = capsys.readouterr().out
    # The eval config adds its callbacks to the edit config's, it does not replace them.
    for name in (
        "SphereProjectionCallback",
        "HyperSphericalEnergyCallback",
        "GeneralAbilityCallback",
        "DriftCallback",
        "CosineHeatmapCallback",
        "MetricTrendsCallback",
    ):
        assert f"sphere_lightning.callbacks.{name}" in printed
    for task in ("sst2", "mrpc", "cola", "rte", "mmlu", "nli"):
        assert f"- {task}" in printed


@pytest.mark.slow
def test_summary_json_agrees_with_the_last_logged_values(
    tmp_path, tiny_model_dir, requests, write_rome_json
):
    data = write_rome_json(requests, tmp_path / "facts.json")
    general = tmp_path / "general"  # four examples per task, in the shared files' layouts
    general.mkdir()
    sst2 = [
        {"sentence": f"the film is {w}", "label": i % 2, "idx": i} for i, w in enumerate("abcd")
    ]
    mmlu = [
        {
            "question": f"Where is {c} ?",
            "subject": "geography",
            "choices": list("wxyz"),
            "answer": i,
        }
        for i, c in enumerate(["Paris", "Rome", "Berlin", "Tokyo"])
    ]
    for name, rows in (("sst2", sst2), ("mmlu", mmlu)):
        (general / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = tmp_path / "observers.yaml"
    extra.write_text(
        f"""
trainer:
  val_check_interval: 1
  callbacks+:
    - class_path: sphere_lightning.callbacks.GeneralAbilityCallback
      init_args: {{tasks: [sst2, mmlu], data_dir: {general}, limit: 4, progress: false}}
    - class_path: sphere_lightning.callbacks.DriftCallback
      init_args: {{num_texts: 3, max_length: 12}}
    - class_path: sphere_lightning.callbacks.MetricTrendsCallback
    - class_path: {__name__}.WeightNorm
    - class_path: sphere_lightning.callbacks.CosineHeatmapCallback
      init_args: {{layer: model.layers.1.mlp.down_proj, max_neurons: 4, seed: 1}}
    - class_path: sphere_lightning.callbacks.CosineHeatmapCallback
      init_args: {{layer: model.layers.2.mlp.down_proj, max_neurons: 4, seed: 2}}
model:
  fluency_prompts: 2
  fluency_max_new_tokens: 5
"""
    )
    args = _fit_args(tmp_path, tiny_model_dir, data)
    args[3:3] = ["--config", str(extra)]
    cli = cli_main(args)

    scalars = _scalars(tmp_path / "logs")
    (path,) = list((tmp_path / "logs").rglob("summary.json"))
    summary = json.loads(path.read_text())

    def last(tag):
        return scalars[tag][-1]

    assert summary["global_step"] == 2 and summary["num_edited"] == 4
    for metric in ("efficacy", "generalization", "specificity", "fluency"):
        assert summary["edit"]["pre"][metric] == pytest.approx(scalars[f"edit_pre/{metric}"][0][1])
        assert last(f"edit/{metric}")[0] == 2
        assert summary["edit"]["final"][metric] == pytest.approx(last(f"edit/{metric}")[1])
        if metric != "fluency":  # the per-batch protocol, right after each batch
            assert [s for s, _ in scalars[f"edit_batch/{metric}"]] == [1, 2]
    for task in ("sst2", "mmlu"):
        for metric, value in summary["general"][task]["final"].items():
            assert last(f"general/{task}/{metric}") == (2, pytest.approx(value))
            assert scalars[f"general/{task}/{metric}"][0] == (
                0,
                pytest.approx(summary["general"][task]["baseline"][metric]),
            )
    assert scalars["drift/kl"][0] == (0, 0.0)
    assert last("drift/kl") == (2, pytest.approx(summary["drift"]["kl"]))
    assert summary["drift"]["kl"] > 0
    assert last("drift/perplexity") == (2, pytest.approx(summary["drift"]["perplexity"]))
    assert set(summary["drift"]) == {"kl", "perplexity"}
    assert summary["spearman_with_energy"]  # three evaluations: steps 0, 1 and 2
    for tag, rho in summary["spearman_with_energy"].items():  # edit/<metric>: ρ
        assert last(tag.replace("edit/", "correlation/spearman/")) == (2, pytest.approx(rho))
    assert set(summary["energy"]) == {f"model.layers.{i}.mlp.down_proj" for i in (1, 2)}
    for layer, energy in summary["energy"].items():
        assert last(f"energy/{layer}") == (2, pytest.approx(energy["final"]))
        assert scalars[f"energy/{layer}"][0] == (0, pytest.approx(energy["baseline"]))
    # A custom observer: its scalars at x = applied batches, its entry, its phase time.
    norms = summary["weight_norm"]
    assert norms["final_step"] == 2 and len(norms["final"]) == 2
    for tag, value in norms["final"].items():
        assert [s for s, _ in scalars[tag]] == [0, 1, 2]
        assert scalars[tag][0] == (0, pytest.approx(norms["baseline"][tag]))
        assert last(tag) == (2, pytest.approx(value))
        change = tag.replace("weight_norm/", "weight_norm_change/")
        assert scalars[change][0] == (0, 0.0)
        assert last(change) == (2, pytest.approx(value - norms["baseline"][tag]))
    assert [s for s, _ in scalars["time/weight_norm"]] == [0, 1, 2]
    assert summary["phase_seconds"]["weight_norm"] > 0
    # Two heatmaps, one per layer: separate summary entries and checkpoint states.
    heatmaps = [c for c in cli.trainer.callbacks if isinstance(c, CosineHeatmapCallback)]
    assert {h.layer for h in heatmaps} == set(summary["cosine_heatmap"])
    for heatmap in heatmaps:
        entry = summary["cosine_heatmap"][heatmap.layer]
        assert entry["final_step"] == 2 and Path(entry["figure"]).is_file()
    (checkpoint_path,) = list((tmp_path / "logs").rglob("*.ckpt"))
    states = torch.load(checkpoint_path, weights_only=False)["callbacks"]
    indices = [states[h.state_key]["indices"] for h in heatmaps]
    assert indices == [h.indices.tolist() for h in heatmaps] and indices[0] != indices[1]
    assert summary["config"]["data"]["num_edits"] == 4
    assert summary["wall_seconds"] > 0
    # Every scalar the run logged is in summary.json, tag for tag and step for step, with the
    # values of the TensorBoard events (float32 there; hp_metric is the logger's own).
    assert summary["finished"] is True
    recorded = {
        t: {int(s): v for s, v in by_step.items()} for t, by_step in summary["scalars"].items()
    }
    logged = {tag: dict(values) for tag, values in scalars.items() if tag != "hp_metric"}
    assert recorded.keys() == logged.keys()
    for tag, values in logged.items():
        assert recorded[tag].keys() == values.keys(), tag
        torch.testing.assert_close(
            torch.tensor([recorded[tag][s] for s in values], dtype=torch.float32),
            torch.tensor(list(values.values()), dtype=torch.float32),
            rtol=0, atol=0, equal_nan=True, msg=tag,
        )  # fmt: skip
    times = {int(s): t for s, t in summary["step_wall_time"].items()}
    assert sorted(times) == [0, 1, 2]
    assert summary["start_wall_time"] <= times[0] <= times[1] <= times[2]
    assert {"compute_deltas", "evaluation", "drift", "general/sst2", "figures/trends"} <= set(
        summary["phase_seconds"]
    )


def test_a_resumed_run_keeps_the_earlier_summary_scalars_up_to_its_checkpoint(
    tmp_path, monkeypatch
):
    # The stopped process's last summary.json: an evaluation at step 2 (after the checkpoint of
    # step 2 was saved) and a step 3 past the checkpoint.
    write_run_summary(
        tmp_path,
        {1: {"a": 1.0}, 2: {"a": 2.0, "edit/efficacy": 0.25}, 3: {"a": 3.0}},
        times={1: 1.0, 2: 2.0, 3: 3.0},
        finished=False,
    )
    trainer = SimpleNamespace(loggers=[], default_root_dir=str(tmp_path), is_global_zero=True)
    summary = RunSummary(config={"data": {}}, started=0.0)
    summary.keep_earlier(trainer, step=2)
    assert summary.earlier == {
        "scalars": {"a": {1: 1.0, 2: 2.0}, "edit/efficacy": {2: 0.25}},
        "step_wall_time": {1: 1.0, 2: 2.0},
    }
    # The resumed process's own scalars (restored from the checkpoint, then logged) win.
    own = {"scalars": {"a": {1: 1.0, 2: 2.0, 3: 30.0}}, "step_wall_time": {1: 1.0, 2: 2.0, 3: 9.0}}
    monkeypatch.setattr(cli_module, "summarise", lambda trainer, module: dict(own))
    written = json.loads(summary.write(trainer, None, finished=True).read_text())
    assert written["scalars"] == {
        "a": {"1": 1.0, "2": 2.0, "3": 30.0},
        "edit/efficacy": {"2": 0.25},
    }
    assert written["step_wall_time"] == {"1": 1.0, "2": 2.0, "3": 9.0}
    assert written["finished"] is True and written["config"] == {"data": {}}
