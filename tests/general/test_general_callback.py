"""GeneralAbilityCallback on a tiny model through a stub of the module's public surface."""

from __future__ import annotations

import json

import pytest
import torch
from jsonargparse import ArgumentParser

from sphere_lightning.callbacks.general import GeneralAbilityCallback
from sphere_lightning.errors import ConfigError
from sphere_lightning.general import TASKS, GeneralTask, HubDataset, get_task
from tests.helpers import ContextStub


class _Capitals(GeneralTask):
    """A task whose options are in the tiny tokenizer's vocabulary (GLUE's label words are not)."""

    name = "capitals"
    options = (" Paris", " Rome", " London", " Tokyo")
    text_fields = ("question",)
    labels = {0: 0, 1: 1, 2: 2, 3: 3}
    hub = HubDataset("none/none", None, "test")

    def prompt(self, record):
        return record["question"]


#: Short records, mostly in the tiny tokenizer's vocabulary.
RECORDS = {
    "sst2": [
        {"sentence": "the music was good", "label": 1},
        {"sentence": "the room was loud", "label": 0},
        {"sentence": "the food was good", "label": 1},
    ],
    "cola": [
        {"sentence": "the dog ran across the park", "label": 1},
        {"sentence": "park the across ran", "label": 0},
    ],
    "mmlu": [
        {
            "question": "Where is the Louvre?",
            "subject": "geography",
            "choices": ["Paris", "Rome", "London", "Tokyo"],
            "answer": 0,
        },
        {
            "question": "Who makes phones?",
            "subject": "business",
            "choices": ["Toyota", "Nokia", "Honda", "Nintendo"],
            "answer": 1,
        },
    ],
    "capitals": [
        {"question": "The Louvre is in the city of", "label": 0},
        {"question": "The Colosseum is in", "label": 1},
        {"question": "Big Ben is in the city of", "label": 2},
        {"question": "The headquarters of the company is located in the city of", "label": 3},
        {"question": "After the war the family moved to", "label": 2},
        {"question": "The capital of France is", "label": 0},
    ],
}
NAMES = list(RECORDS)


class _Trainer:
    global_step = 0


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "capitals", _Capitals)
    for name, records in RECORDS.items():
        lines = "".join(json.dumps(r) + "\n" for r in records)
        (tmp_path / f"{name}.jsonl").write_text(lines)
    return str(tmp_path)


def _expected(model, tokenizer, data_dir, name):
    task = get_task(name)
    return task.evaluate(model, tokenizer, task.read(f"{data_dir}/{name}.jsonl"))


def test_logs_baseline_then_change_and_resumes(tiny_gpt2, tokenizer, data_dir):
    module, trainer = ContextStub(tiny_gpt2, tokenizer), _Trainer()
    callback = GeneralAbilityCallback(NAMES, data_dir=data_dir, every_n_steps=2, progress=False)
    callback.setup(trainer, module, "fit")
    assert [len(callback.examples[n]) for n in NAMES] == [3, 2, 2, 6]

    callback.on_train_start(trainer, module)
    ((_, logged),) = module.logged
    baseline = {n: _expected(tiny_gpt2, tokenizer, data_dir, n) for n in RECORDS}
    assert set(baseline["cola"]) == {"accuracy", "f1", "mcc"}
    assert set(baseline["sst2"]) == {"accuracy", "f1"}
    for name, values in baseline.items():
        assert logged[f"time/general/{name}"] >= 0
        for metric, value in values.items():
            assert logged[f"general/{name}/{metric}"] == pytest.approx(value)
            assert logged[f"general_change/{name}/{metric}"] == 0.0
    assert callback.by_task(callback.baseline) == callback.by_task(callback.latest) == baseline
    assert callback.baseline["general/cola/mcc"] == baseline["cola"]["mcc"]  # {tag: value}
    assert len(logged) == 2 * 9 + 4  # 9 metrics, each value and change, and 4 timings

    # An "edit" of the last MLP; step 1 is not scored (every_n_steps=2).
    with torch.no_grad():
        tiny_gpt2.transformer.h[-1].mlp.c_proj.weight.mul_(-3.0)
    trainer.global_step = 1
    callback.on_train_batch_end(trainer, module, None, None, 0)
    assert len(module.logged) == 1
    trainer.global_step = 2
    callback.on_train_batch_end(trainer, module, None, None, 1)
    now = {n: _expected(tiny_gpt2, tokenizer, data_dir, n) for n in RECORDS}
    assert now["capitals"] != baseline["capitals"], "the perturbation should move the metrics"
    for name, values in now.items():
        for metric, value in values.items():
            assert module.last_logged[f"general/{name}/{metric}"] == pytest.approx(value)
            change = module.last_logged[f"general_change/{name}/{metric}"]
            assert change == pytest.approx(value - baseline[name][metric])
    assert callback.by_task(callback.latest) == now and callback.latest_step == 2
    assert callback.summary(trainer, module)["capitals"] == {
        "baseline": baseline["capitals"],
        "final": now["capitals"],
        "final_step": 2,
    }

    # Resume at step 2: the baseline comes from the checkpoint, nothing is re-measured.
    resumed = GeneralAbilityCallback(NAMES, data_dir=data_dir, progress=False)
    resumed.load_state_dict(callback.state_dict())
    resumed_module = ContextStub(tiny_gpt2, tokenizer)
    resumed.on_train_start(trainer, resumed_module)
    assert resumed_module.logged == []
    assert resumed.baseline == callback.baseline and resumed.latest_step == 2
    # Training ends at step 3, which every_n_steps=2 skipped: it is scored at the end.
    trainer.global_step = 3
    resumed.on_train_end(trainer, resumed_module)
    assert resumed.latest_step == 3 and "general_change/sst2/f1" in resumed_module.last_logged


def test_resume_without_baseline_warns_and_logs_no_change(tiny_llama, tokenizer, data_dir):
    module, trainer = ContextStub(tiny_llama, tokenizer), _Trainer()
    trainer.global_step = 4
    callback = GeneralAbilityCallback(["sst2"], data_dir=data_dir, limit=2, progress=False)
    with pytest.warns(UserWarning, match="without a stored baseline"):
        callback.on_train_start(trainer, module)
    callback.on_train_batch_end(trainer, module, None, None, 0)
    assert set(module.last_logged) == {
        "general/sst2/accuracy",
        "general/sst2/f1",
        "time/general/sst2",
    }
    assert len(callback.examples["sst2"]) == 2


def test_arguments_are_checked(tmp_path, data_dir):
    flag = r"`trainer\.callbacks\.GeneralAbilityCallback\.init_args\."
    with pytest.raises(ValueError, match=r"Unknown general-ability task 'glue'.*'sst2'"):
        GeneralAbilityCallback(["glue"])
    unknown = r"tasks`: unknown setting\(s\) \['shots'\].*'limit'"
    with pytest.raises(ConfigError, match=flag + unknown):
        GeneralAbilityCallback({"sst2": {"shots": 5}})
    with pytest.raises(ConfigError, match=flag + r"paths` names task\(s\) \['mmlu'\]"):
        GeneralAbilityCallback(["sst2"], paths={"mmlu": "cais/mmlu"})
    with pytest.raises(ValueError, match="every_n_steps"):
        GeneralAbilityCallback(["sst2"], every_n_steps=0)
    with pytest.raises(ConfigError, match=flag + r"limit` should be ≥ 1 or None, got 0 \(mmlu\)"):
        GeneralAbilityCallback({"sst2": {}, "mmlu": {"limit": 0}})
    callback = GeneralAbilityCallback(["sst2", "rte"], data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match=r"rte\.jsonl does not exist.*'nyu-mll/glue'"):
        callback.setup(_Trainer(), None, "fit")
    # A per-task path (or hub id) and data_dir=None bypass the folder.
    callback = GeneralAbilityCallback(
        {"sst2": {"limit": 1}}, data_dir=None, paths={"sst2": f"{data_dir}/sst2.jsonl"}
    )
    assert callback.source("sst2") == f"{data_dir}/sst2.jsonl"
    assert len(callback.load_examples()["sst2"]) == 1
    assert GeneralAbilityCallback(["mmlu"], data_dir=None).source("mmlu") is None


def test_cli_builds_the_callback_from_a_config(data_dir):
    parser = ArgumentParser()
    parser.add_class_arguments(GeneralAbilityCallback, "general")
    config = parser.parse_args(
        [
            "--general.tasks",
            '{"sst2": {}, "mmlu": {"limit": 1, "batch_size": 2}}',
            f"--general.data_dir={data_dir}",
            "--general.every_n_steps=5",
        ]
    )
    callback = parser.instantiate_classes(config).general
    assert callback.limits == {"sst2": 200, "mmlu": 1}
    assert callback.batch_sizes == {"sst2": 16, "mmlu": 2}
    assert callback.every_n_steps == 5
    help_text = parser.format_help()
    assert "Score the first ``limit`` examples" in help_text


def test_task_arguments_in_the_per_task_settings_reach_the_task():
    callback = GeneralAbilityCallback(
        tasks={"gsm8k": {"max_new_tokens": 8, "limit": 3}, "nq_open": {}}, data_dir=None
    )
    assert callback.tasks["gsm8k"].max_new_tokens == 8
    assert callback.limits["gsm8k"] == 3
    assert callback.tasks["nq_open"].max_new_tokens == 20  # the reference's number
    with pytest.raises(ValueError, match=r"`max_new_tokens` should be ≥ 1, got 0"):
        GeneralAbilityCallback(tasks={"gsm8k": {"max_new_tokens": 0}}, data_dir=None)
