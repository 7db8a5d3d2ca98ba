"""Reading activations at the subject's last token."""

from __future__ import annotations

import pytest
import torch

from sphere_lightning.editors.hooks import encode_with_subject, gather_at_subject
from sphere_lightning.models import architecture_of


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("read", ["input", "output"])
def test_gather_at_subject_matches_one_full_prompt_at_a_time(
    family, read, make_tiny_model, tokenizer, requests
):
    model = make_tiny_model(family)
    spec = architecture_of(model)
    names = [spec.mlp_out_name(0), spec.layer_name(1)]
    prompts = [encode_with_subject(tokenizer, r.prompt, r.subject) for r in requests]
    # Batches of 2 over prompts of different lengths: sorting, padding and truncation all happen.
    assert len({len(p.ids) for p in prompts}) > 1
    got = gather_at_subject(model, tokenizer, prompts, names, read=read, batch_size=2)

    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args, output):
            value = args[0] if read == "input" else output
            seen[name] = (value[0] if isinstance(value, tuple) else value)[0]

        return fn

    for i, prompt in enumerate(prompts):
        handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
        with torch.no_grad():
            model(input_ids=torch.tensor([prompt.ids]))  # the whole prompt, unpadded
        for handle in handles:
            handle.remove()
        for name in names:
            torch.testing.assert_close(
                got[name][i], seen[name][prompt.subject_last], rtol=1e-5, atol=1e-5
            )
