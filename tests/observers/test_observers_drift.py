"""Drift callback: KL(original ‖ current) and perplexity against a naive per-token loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sphere_lightning.callbacks.drift import (
    DriftCallback,
    original_weights_swapped_in,
    read_paragraphs,
)
from sphere_lightning.errors import MissingFileError

PARAGRAPHS = [
    "The city of Paris is the capital of France and it is known for the Eiffel Tower.",
    "In the morning we walked along the river\nand talked about music, art and history.",
    "He plays soccer on Sunday.",
    "The company was founded in Japan and later opened offices in Germany and Canada.",
    "A small dog ran across the park while children were playing with a red ball.",
]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "held_out.txt"
    path.write_text("\n\n".join(PARAGRAPHS[:3]) + "\n \n\n" + "\n\n".join(PARAGRAPHS[3:]) + "\n")
    return path


def _naive_drift(original, current, tokenizer, texts, max_length):
    """Per text, per position: Σ_v p₀ (log p₀ − log p) and −log p(next token), in float64."""
    kl = nll = 0.0
    count = 0
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            log_p0 = original(**ids).logits[0].double().log_softmax(-1)
            log_p = current(**ids).logits[0].double().log_softmax(-1)
        tokens = ids["input_ids"][0]
        for t in range(len(tokens) - 1):
            kl += float((log_p0[t].exp() * (log_p0[t] - log_p[t])).sum())
            nll += -float(log_p[t, tokens[t + 1]])
            count += 1
    return kl / count, math.exp(nll / count)


@pytest.mark.parametrize("tiny_model", ["gpt2", "llama"], indirect=True)
def test_kl_is_zero_before_an_edit_and_positive_after(tiny_model, make_stub_module, stub_trainer):
    module = make_stub_module(tiny_model)
    callback = DriftCallback(num_texts=5, max_length=12, batch_size=2, seed=3)
    callback.on_train_start(stub_trainer, module)
    assert len(callback.texts) == 5
    ((step, logged),) = module.logged
    assert step == 0 and logged["drift/kl"] == 0.0 and logged["time/drift"] > 0
    assert logged["drift/perplexity"] == pytest.approx(callback.perplexity) and callback.kl == 0.0

    kl, perplexity = callback.kl_and_perplexity(module)  # really runs the original model too
    assert 0.0 <= kl <= 1e-7
    assert perplexity == pytest.approx(logged["drift/perplexity"], rel=1e-6)

    module.perturb()
    edited = {n: module.edited_weight(n).detach().clone() for n in module.edited_parameter_names}
    stub_trainer.global_step = module.global_step = 1
    callback.on_train_batch_end(stub_trainer, module, None, None, 0)
    step, logged = module.logged[-1]
    assert step == 1 and logged["drift/kl"] > 1e-3 and callback.kl == logged["drift/kl"]
    # The swap to the original weights and back left the edited weights bit for bit as they were.
    for name, weight in edited.items():
        assert torch.equal(module.edited_weight(name), weight)


@pytest.mark.parametrize("tiny_model", ["gpt2", "llama"], indirect=True)
def test_kl_and_perplexity_match_a_naive_loop(tiny_model, make_stub_module, text_file, tokenizer):
    module = make_stub_module(tiny_model)
    original = copy.deepcopy(tiny_model)
    module.perturb(scale=0.3)
    callback = DriftCallback(text=str(text_file), num_texts=4, max_length=10, batch_size=3)
    kl, perplexity = callback.kl_and_perplexity(module)
    assert callback.texts == PARAGRAPHS[:4]
    naive_kl, naive_perplexity = _naive_drift(original, tiny_model, tokenizer, PARAGRAPHS[:4], 10)
    assert kl == pytest.approx(naive_kl, rel=1e-4)
    assert perplexity == pytest.approx(naive_perplexity, rel=1e-5)
    # Unedited: perplexity is the original model's, KL is 0.
    _, original_perplexity = _naive_drift(original, original, tokenizer, PARAGRAPHS[:4], 10)
    with original_weights_swapped_in(module):
        kl0, perplexity0 = callback.kl_and_perplexity(module)
    assert kl0 <= 1e-7 and perplexity0 == pytest.approx(original_perplexity, rel=1e-5)


def test_read_paragraphs_splits_on_blank_lines(text_file):
    assert read_paragraphs(text_file, 10) == PARAGRAPHS
    assert read_paragraphs(text_file, 2) == PARAGRAPHS[:2]


def test_swap_restores_the_weights_after_an_error(tiny_llama, make_stub_module):
    module = make_stub_module(tiny_llama)
    module.perturb()
    name = module.edited_parameter_names[-1]
    edited = module.edited_weight(name).detach().clone()
    with pytest.raises(RuntimeError, match="inside"), original_weights_swapped_in(module):
        assert torch.equal(module.edited_weight(name), module.original_weights[name])
        raise RuntimeError("inside")
    assert torch.equal(module.edited_weight(name), edited)


def test_resumed_callback_keeps_its_texts(tiny_llama, make_stub_module, stub_trainer):
    module = make_stub_module(tiny_llama)
    callback = DriftCallback(num_texts=3, max_length=8)
    callback.on_train_start(stub_trainer, module)
    module.perturb()
    stub_trainer.global_step = module.global_step = 1
    callback.on_train_batch_end(stub_trainer, module, None, None, 0)

    resumed = DriftCallback(num_texts=3, max_length=8, seed=123)  # another seed: not regenerated
    resumed.load_state_dict(callback.state_dict())
    logged = len(module.logged)
    resumed.on_train_start(stub_trainer, module)  # global_step 1: no step-0 baseline again
    assert len(module.logged) == logged
    assert resumed.texts == callback.texts and resumed.kl == callback.kl
    assert resumed.kl_and_perplexity(module) == pytest.approx((callback.kl, callback.perplexity))


def test_every_n_steps_and_bad_arguments(tmp_path):
    callback = DriftCallback(every_n_steps=2)
    assert [callback.should_update(s) for s in range(1, 5)] == [False, True, False, True]
    with pytest.raises(ValueError, match="every_n_steps"):
        DriftCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="max_length"):
        DriftCallback(max_length=1)
    with pytest.raises(MissingFileError, match=r"\.DriftCallback\.init_args\.text`"):
        DriftCallback(text=str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="empty"):
        DriftCallback(text=str(empty)).load_texts(None)
