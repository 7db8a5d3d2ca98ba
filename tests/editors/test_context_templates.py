"""Context templates sampled as MEMIT's ``generate_fast``, against a plain loop written out."""

from __future__ import annotations

import unicodedata

import pytest
import torch

from sphere_lightning.editors import MEMIT, TemplateOptions
from sphere_lightning.editors.templates import (
    TEMPLATE_SEED_WORDS,
    generate_context_templates,
    template_seed_prompts,
)


@torch.no_grad()
def generate_fast_templates(model, tokenizer, count, length, seed, top_k=5):
    """MEMIT's ``get_context_templates`` with ``generate_fast``'s top-k sampling, one text at a
    time, the whole sequence run again at every step (no cache, no batching, no generation
    config). Token ``j`` of text ``i`` is drawn by inverse CDF from uniform ``[i, j]`` of a
    ``(texts, length)`` float64 matrix made by a ``torch.Generator`` seeded with ``seed``."""
    # MEMIT: generate_fast(..., ["The", ...], n_gen_per_prompt=n_gen // 5); counts here are
    # multiples of 5, as the reference's.
    prompts = [word for word in TEMPLATE_SEED_WORDS for _ in range(count // 5)]
    uniforms = torch.rand(
        (len(prompts), length), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    templates, all_ids = ["{}"], []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt)["input_ids"]
        step = 0
        while len(ids) < length:  # generate_fast: `while input_ids.size(1) < max_out_len`
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            probs = torch.softmax(logits.float(), dim=0)
            top = torch.topk(probs, top_k)
            top_probs = top.values / top.values.sum()
            cdf = torch.cumsum(top_probs, 0).double()
            choice = min(int((cdf < uniforms[i, step]).sum()), top_k - 1)
            ids.append(int(top.indices[choice]))
            step += 1
        all_ids.append(ids)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
        templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates, all_ids


@pytest.fixture
def eos_prone(tokenizer):
    """Adds 2 to the EOS logit of a model's LM head, so samples often write EOS mid-text."""
    handles = []

    def rig(model):
        def hook(module, args, output):
            output = output.clone()
            output[..., tokenizer.eos_token_id] += 2.0
            return output

        handles.append(model.get_output_embeddings().register_forward_hook(hook))
        return model

    yield rig
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_templates_match_generate_fast_loop(family, make_tiny_model, tokenizer, eos_prone):
    model = eos_prone(make_tiny_model(family))
    # The model's own generation settings must play no part (generate_fast ignores them).
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.top_k = 1
    rng_before = torch.get_rng_state()
    templates = generate_context_templates(model, tokenizer, count=10, length=7, seed=3)
    expected, ids = generate_fast_templates(model, tokenizer, count=10, length=7, seed=3)
    assert templates == expected
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is not used
    # Every text is grown to the full length, past any EOS it wrote (no EOS stop), and at
    # least one did write EOS before going on, so that this is tested.
    assert all(len(row) == 7 for row in ids)
    assert any(tokenizer.eos_token_id in row[:-1] for row in ids)


def test_templates_are_seeded(make_tiny_model, tokenizer):
    model = make_tiny_model("llama")
    first = generate_context_templates(model, tokenizer, count=5, length=8, seed=0)
    assert generate_context_templates(model, tokenizer, count=5, length=8, seed=0) == first
    assert generate_context_templates(model, tokenizer, count=5, length=8, seed=1) != first
    assert first[0] == "{}" and len(first) == 6
    assert all(t.endswith(". {}") for t in first[1:])
    assert [t.split()[0] for t in first[1:]] == list(TEMPLATE_SEED_WORDS)


def test_editor_uses_the_sampler_with_its_knobs(make_tiny_model, tokenizer):
    model = make_tiny_model("gpt2")
    editor = MEMIT(layers=[1], templates=TemplateOptions(count=5, length=6), seed=4)
    assert (
        editor._generate_templates(model, tokenizer)
        == generate_fast_templates(model, tokenizer, count=5, length=6, seed=4)[0]
    )


def test_template_seed_prompts_unroll_as_generate_fast():
    the, therefore, because, i, you = TEMPLATE_SEED_WORDS
    assert template_seed_prompts(0) == []
    assert template_seed_prompts(5) == [the, therefore, because, i, you]
    # generate_fast: [p for p in prompts for _ in range(n_gen_per_prompt)], n = count // 5
    assert template_seed_prompts(10) == [the, the, therefore, therefore, because, because, i, i,
                                         you, you]  # fmt: skip
    assert template_seed_prompts(2) == [the, therefore]
    assert template_seed_prompts(7) == [the, the, therefore, therefore, because, i, you]
    with pytest.raises(ValueError, match="count"):
        template_seed_prompts(-1)
