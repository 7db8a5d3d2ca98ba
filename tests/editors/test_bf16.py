"""bfloat16 models: every editor edits a bf16 tiny Llama with float32 deltas computed from
float32/float64 intermediates (v* δ in float32, statistics accumulated in float64 and kept in
float32, solves in float64), and SPHERE and HE read a bf16 weight in float32."""

from __future__ import annotations

import copy

import pytest
import torch

from sphere_lightning.functional import hyperspherical_energy, project_delta
from sphere_lightning.models import linear_weight
from tests.helpers import EDITORS, logprob_gains
from tests.helpers import make_contract_editor as make_editor


@pytest.mark.parametrize("kind", EDITORS)
def test_a_bf16_model_is_edited(kind, make_tiny_model, tokenizer, requests, tmp_path):
    model = make_tiny_model("llama").to(torch.bfloat16)
    editor = make_editor(kind, model, tokenizer, str(tmp_path))
    editor.setup(model, tokenizer)
    for moments in (getattr(editor, "covariances", None), getattr(editor, "projectors", None)):
        if moments is not None:
            assert all(m.dtype == torch.float32 for m in moments.values())
    before = {n: p.clone() for n, p in model.named_parameters()}
    deltas = editor.compute_deltas(model, tokenizer, requests)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "pure"
    for name, delta in deltas.items():
        assert delta.dtype == torch.float32 and torch.isfinite(delta).all(), name
        assert delta.abs().max() > 0, name
        # The update survives the cast into the bf16 weight: most entries still move it.
        weight = model.get_parameter(name)
        moved = (weight.float() + delta).to(torch.bfloat16) != weight
        assert moved.float().mean() > 0.5, name
    gains = logprob_gains(copy.deepcopy(model), tokenizer, requests, deltas)
    assert sum(gains) / len(gains) > 0.2, gains


def test_sphere_and_energy_of_a_bf16_weight_are_computed_in_float32(make_tiny_model):
    model = make_tiny_model("llama")
    weight32 = linear_weight(model.model.layers[1].mlp.down_proj).detach()
    weight16 = weight32.to(torch.bfloat16)
    delta = torch.randn(weight32.shape, generator=torch.Generator().manual_seed(0))
    projected16, _ = project_delta(delta, weight16, 0.5, 0.8)
    projected32, _ = project_delta(delta, weight16.float(), 0.5, 0.8)
    assert projected16.dtype == torch.float32
    torch.testing.assert_close(projected16, projected32)
    energy16 = hyperspherical_energy(weight16)
    assert energy16.dtype in (torch.float32, torch.float64)
    torch.testing.assert_close(energy16, hyperspherical_energy(weight16.float()))
