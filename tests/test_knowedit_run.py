"""KnowEdit end to end: a CLI run's summary, and the unedited predictions locality compares with."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sphere_lightning.cli import cli_main
from sphere_lightning.data.datamodule import EditDataModule
from sphere_lightning.editors import AlphaEdit
from sphere_lightning.evaluation import KNOWEDIT_METRICS, score_continuations
from sphere_lightning.module import EditingModule
from tests.helpers import KNOWEDIT_RECORDS, TINY_ALPHAEDIT, _fit_args, quiet_trainer, write_json


def test_knowedit_run_summary(tmp_path, tiny_model_dir):
    data = write_json(tmp_path / "knowedit.json", KNOWEDIT_RECORDS)
    args = _fit_args(tmp_path, tiny_model_dir, data)
    cli_main([*args, "--model.fluency_prompts=2", "--model.fluency_max_new_tokens=5"])

    (path,) = list((tmp_path / "logs").rglob("summary.json"))
    edit = json.loads(path.read_text())["edit"]
    final, pre = edit["final"], edit["pre"]
    families = [
        "portability_subject_aliasing",
        "portability_reasoning",
        "portability_logical_generalization",
        "locality_relation_specificity",
        "locality_forgetfulness",
    ]
    for name in ["edit_success", "generalization", "portability", "locality", *families]:
        assert 0.0 <= final[name] <= 1.0, name
    # Two of the four facts have a ground truth other than target_new: efficacy is over them.
    assert final["efficacy"] in (0.0, 0.5, 1.0)
    assert final["num_evaluated"] == 4
    assert set(final) - {"num_evaluated"} <= set(edit["protocols"])
    assert set(KNOWEDIT_METRICS) <= set(edit["protocols"])
    # Before any edit the model is the unedited one: every token is the same as before.
    assert pre["locality"] == 1.0
    assert pre["locality_relation_specificity"] == pre["locality_forgetfulness"] == 1.0


#: (prompt, answer) pairs no evaluation of the run has seen (nothing memoised for them).
FRESH_PAIRS = [
    ("Toyota was founded in the country of", "Germany"),
    ("The capital of France is", "the city of Paris"),
    ("Lionel Messi plays the sport of", "basketball or tennis"),
    ("Nokia makes", "phones and software"),
    ("The mother tongue of Danielle Darrieux is", "English"),
]


def test_unedited_predictions_after_editing(tmp_path, tiny_model_dir):
    data = EditDataModule(
        dataset=str(write_json(tmp_path / "knowedit.json", KNOWEDIT_RECORDS)),
        num_edits=4,
        edits_per_step=2,
    )
    module = EditingModule(
        editor=AlphaEdit(**TINY_ALPHAEDIT), model=tiny_model_dir, fluency_prompts=0
    )
    quiet_trainer(default_root_dir=tmp_path).fit(module, datamodule=data)
    assert data.metric_family == "knowedit"

    names = module.edited_parameter_names
    live = {name: module.edited_weight(name).detach().clone() for name in names}
    assert any(not torch.equal(live[n], module.original_weights[n]) for n in names)
    prompts, answers = [p for p, _ in FRESH_PAIRS], [a for _, a in FRESH_PAIRS]

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    expected = score_continuations(
        fresh, module.tokenizer, prompts, answers, predictions=True
    ).predicted
    edited = score_continuations(
        module.model, module.tokenizer, prompts, answers, predictions=True
    ).predicted
    assert list(edited) != list(expected), "the edit changes some prediction"

    assert module.unedited_predictions(prompts, answers) == list(expected)
    for name in names:
        assert torch.equal(module.edited_weight(name), live[name]), name
    # Memoised: asked again (in another order, with a repeat), the same tokens.
    again = module.unedited_predictions(prompts[::-1] + prompts[:1], answers[::-1] + answers[:1])
    assert again == list(expected)[::-1] + list(expected)[:1]
    # The live weights come back bit for bit also when the block fails.
    with pytest.raises(RuntimeError, match="inside"), module.unedited_weights():
        for name in names:
            assert torch.equal(module.edited_weight(name), module.original_weights[name])
        raise RuntimeError("inside")
    for name in names:
        assert torch.equal(module.edited_weight(name), live[name]), name
