"""MEMIT and AlphaEdit on tiny GPT-2 and Llama models: purity, shapes, efficacy, state, v*."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from jsonargparse import ArgumentError, ArgumentParser
from transformers.pytorch_utils import Conv1D

from sphere_lightning.cache import stats_cache_dir
from sphere_lightning.editors import MEMIT, AlphaEdit, Editor, base, statistics
from sphere_lightning.editors.rome import ROME_TARGET
from sphere_lightning.editors.statistics import StatisticsOptions
from sphere_lightning.editors.targets import TargetOptions, compute_target_values
from sphere_lightning.editors.templates import TemplateOptions
from sphere_lightning.models import architecture_of, linear_weight
from tests.helpers import (
    COMMON,
    LAYERS,
    _project_against_live_weight,
    _recorder,
    apply_deltas,
    logprob_gains,
    make_editor,
    plain_project_and_apply_loop,
)

FAMILIES = ["gpt2", "llama"]
KINDS = ["memit", "alphaedit"]
#: Fixed context templates for the direct v* tests (the first must be the bare prompt).
TEMPLATES = ["{}", "Because the sun was warm . {}"]


# -- one edit per (editor, family), shared by the tests that only read it ---------------------


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    """Statistics shared by the module's editors (keyed by model fingerprint, so safe)."""
    return tmp_path_factory.mktemp("stats")


@pytest.fixture(
    scope="module",
    params=[(k, f) for k in KINDS for f in FAMILIES],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def edited(request, make_tiny_model, tokenizer, requests, stats_dir):
    kind, family = request.param
    model = make_tiny_model(family)
    editor = make_editor(kind, model, tokenizer, cache_dir=str(stats_dir))
    editor.setup(model, tokenizer)
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    targets = []

    def keep_targets(*args, **kwargs):
        targets.append(compute_target_values(*args, **kwargs))
        return targets[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(base, "compute_target_values", keep_targets)
        deltas = editor.compute_deltas(model, tokenizer, requests)
    return SimpleNamespace(
        kind=kind,
        family=family,
        model=model,
        editor=editor,
        before=before,
        deltas=deltas,
        target=targets[0],
    )


def test_compute_deltas_leaves_the_model_unchanged(edited, tokenizer):
    after = edited.model.state_dict()
    assert after.keys() == edited.before.keys()
    changed = [name for name, t in after.items() if not torch.equal(t, edited.before[name])]
    assert changed == []
    assert not edited.model.training
    assert not any(p.requires_grad for p in edited.model.parameters())
    assert tokenizer.padding_side == "right"


def test_one_linear_shaped_delta_per_edited_layer(edited):
    model, deltas = edited.model, edited.deltas
    spec = architecture_of(model)
    assert list(deltas) == [spec.weight_name(layer) for layer in LAYERS]
    assert list(deltas) == edited.editor.edited_parameter_names(model)
    for layer in LAYERS:
        module = model.get_submodule(spec.mlp_out_name(layer))
        delta = deltas[spec.weight_name(layer)]
        assert delta.shape == linear_weight(module).shape
        assert delta.dtype == module.weight.dtype
        assert torch.isfinite(delta).all()
        assert delta.abs().sum() > 0
        hidden = model.config.hidden_size
        assert delta.shape[0] == hidden  # out × in
        if isinstance(module, Conv1D):
            assert delta.shape == module.weight.T.shape != module.weight.shape


def test_deltas_raise_the_probability_of_the_new_target(edited, tokenizer, requests):
    gains = logprob_gains(copy.deepcopy(edited.model), tokenizer, requests, edited.deltas)
    # A 32-wide random model mixes positions a lot, so an edit of one request can cost another a
    # little; the batch as a whole must clearly gain, and nearly every request with it.
    assert sum(gains) / len(gains) > 0.1, gains
    assert sum(g > 0 for g in gains) >= len(gains) - 1, gains


def test_the_subject_representation_moves_towards_v_star(edited, tokenizer, requests):
    model, editor, target = copy.deepcopy(edited.model), edited.editor, edited.target
    spec = architecture_of(model)
    apply_deltas(model, edited.deltas)
    block = spec.blocks(model)[editor.target_layer]
    reached = []
    for i, r in enumerate(requests):
        prefix = r.prompt[: r.prompt.index("{}")] + r.subject
        position = len(tokenizer(prefix)["input_ids"]) - 1
        captured = {}
        handle = block.register_forward_hook(_recorder(captured, "out", read="output"))
        with torch.no_grad():
            model(input_ids=torch.tensor([tokenizer(r.filled_prompt)["input_ids"]]))
        handle.remove()
        hidden = captured["out"][0, position]
        reached.append(
            (
                (hidden - target.values[i]).norm() / (target.initial[i] - target.values[i]).norm()
            ).item()
        )
    # Most requests' representations land close to their v*. MEMIT brings every one closer
    # (not exactly there: it spreads the change over two layers and trades it against other
    # keys); AlphaEdit may only move within the null space, so a request can end up further.
    assert sorted(reached)[len(reached) // 2] < 0.5, reached
    if edited.kind == "memit":
        assert max(reached) < 1.0, reached


# -- setup errors -------------------------------------------------------------------------


@pytest.mark.parametrize("editor_cls", [MEMIT, AlphaEdit])
def test_a_layer_the_model_lacks_is_rejected_at_setup(editor_cls, tiny_llama, tokenizer):
    editor = editor_cls(**{**COMMON, "layers": [1, 99]})
    with pytest.raises(ValueError, match="layers") as info:
        editor.setup(tiny_llama, tokenizer)
    assert "99" in str(info.value)
    assert "0..3" in str(info.value)


def test_a_target_layer_the_model_lacks_is_rejected_at_setup(tiny_gpt2, tokenizer):
    editor = MEMIT(**{**COMMON, "target_layer": 7})
    with pytest.raises(ValueError, match="target_layer"):
        editor.setup(tiny_gpt2, tokenizer)


def test_a_target_layer_below_the_edited_layers_is_rejected():
    with pytest.raises(ValueError, match="target_layer"):
        MEMIT(**{**COMMON, "target_layer": 1})


# -- sequential state -----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_alphaedit_after_apply_accumulates_the_keys(
    family, make_tiny_model, tokenizer, requests, stats_dir
):
    model = make_tiny_model(family)
    editor = make_editor("alphaedit", model, tokenizer, str(stats_dir), num_steps=5)
    editor.setup(model, tokenizer)
    assert all(dim > 0 for dim in editor.nullspace_dims.values()), editor.nullspace_dims
    assert all(editor.key_cache[layer].trace() == 0 for layer in LAYERS)

    first, second = requests[:2], requests[2:4]
    apply_deltas(model, editor.compute_deltas(model, tokenizer, first))
    editor.after_apply(model, tokenizer, first)
    traces = {layer: editor.key_cache[layer].trace().item() for layer in LAYERS}
    assert all(t > 0 for t in traces.values())
    keys = editor.compute_keys(model, tokenizer, first, LAYERS)
    for layer in LAYERS:
        torch.testing.assert_close(editor.key_cache[layer], keys[layer].T @ keys[layer])

    apply_deltas(model, editor.compute_deltas(model, tokenizer, second))
    editor.after_apply(model, tokenizer, second)
    assert all(editor.key_cache[layer].trace().item() > traces[layer] for layer in LAYERS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_round_trip(kind, family, make_tiny_model, tokenizer, requests, stats_dir):
    model = make_tiny_model(family)
    editor = make_editor(kind, model, tokenizer, str(stats_dir), num_steps=5)
    editor.setup(model, tokenizer)
    base = copy.deepcopy(model)
    first, second = requests[:1], requests[1:3]
    apply_deltas(model, editor.compute_deltas(model, tokenizer, first))
    editor.after_apply(model, tokenizer, first)

    buffer = io.BytesIO()
    torch.save(editor.state_dict(), buffer)  # as a checkpoint would
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    fresh = make_editor(kind, base, tokenizer, str(stats_dir), num_steps=5)
    fresh.load_state_dict(state)
    # Only sequential state travels: the statistics-derived parts are rebuilt by setup on the
    # base model (as a resumed run does before its edited weights load), bit for bit.
    assert set(state) == (
        {"context_templates", "key_cache"} if kind == "alphaedit" else {"context_templates"}
    )
    fresh.setup(base, tokenizer)
    assert fresh.context_templates == editor.context_templates
    if kind == "alphaedit":
        assert fresh.nullspace_dims == editor.nullspace_dims
        for layer in LAYERS:
            assert torch.equal(fresh.projectors[layer], editor.projectors[layer])
            assert torch.equal(fresh.key_cache[layer], editor.key_cache[layer])
    else:
        for layer in LAYERS:
            assert torch.equal(fresh.covariances[layer], editor.covariances[layer])

    expected = editor.compute_deltas(model, tokenizer, second)
    restored = fresh.compute_deltas(model, tokenizer, second)
    assert expected.keys() == restored.keys()
    for name in expected:
        torch.testing.assert_close(restored[name], expected[name])


# -- statistics -------------------------------------------------------------------------------


def test_second_moments_are_cached_on_disk(tiny_llama, tokenizer, monkeypatch):
    calls = []
    real = statistics.generate_corpus

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(statistics, "generate_corpus", spy)
    spec = architecture_of(tiny_llama)
    options = {"num_samples": 8, "max_length": 8}

    first = statistics.second_moments(tiny_llama, tokenizer, spec, [2, 1], **options)
    assert len(calls) == 1
    files = sorted(stats_cache_dir().glob("*.pt"))
    assert len(files) == 2
    assert sorted(first) == [1, 2]
    for cov in first.values():
        assert cov.shape == (64, 64)
        assert cov.dtype == torch.float32
        torch.testing.assert_close(cov, cov.T)
        assert torch.linalg.eigvalsh(cov.double()).min() > -1e-6

    second = statistics.second_moments(tiny_llama, tokenizer, spec, [1, 2], **options)
    assert len(calls) == 1, "second call should load from the cache"
    for layer in first:
        assert torch.equal(first[layer], second[layer])

    # An editor with the same statistics options uses the same cache.
    editor = MEMIT(
        layers=[1, 2],
        statistics=StatisticsOptions(num_samples=8, max_length=8),
        templates=TemplateOptions(count=0),
    )
    editor.setup(tiny_llama, tokenizer)
    assert len(calls) == 1
    assert torch.equal(editor.covariances[1], first[1])

    # Other options, or other weights below the layer, are a different cache entry.
    statistics.second_moments(tiny_llama, tokenizer, spec, [1], num_samples=4, max_length=8)
    assert len(calls) == 2
    with torch.no_grad():
        spec.blocks(tiny_llama)[0].mlp.up_proj.weight.mul_(1.5)
    statistics.second_moments(tiny_llama, tokenizer, spec, [1], **options)
    assert len(calls) == 3


CORPUS_PARAGRAPHS = [
    "The city of Paris is the capital of France and it is known for the Eiffel Tower .",
    "In the morning we walked along the river and talked about music , art and history .",
    "Short text .",  # ≤ 20 characters: skipped by the reader
    "Many people speak English , French , German , Spanish , Italian or Japanese at home .",
    "He plays soccer on Sunday .",
    "The company was founded in Japan and later opened offices in Germany and Canada .",
    "It was a cold day when the train arrived at the station near the old bridge .",
    "This book tells the story of a king who lived in a castle by the sea .",
]


def naive_second_moments(model, tokenizer, texts, module_names, max_length):
    """E[k kᵀ] by the definition: one text at a time, every token's out-projection input."""
    sums = dict.fromkeys(module_names, 0.0)
    count = 0
    for text in texts:
        ids = tokenizer(text)["input_ids"][:max_length]
        inputs = {}
        handles = [
            model.get_submodule(name).register_forward_hook(_recorder(inputs, name))
            for name in module_names
        ]
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        for handle in handles:
            handle.remove()
        count += len(ids)
        for name in module_names:
            keys = inputs[name][0].double()
            sums[name] = sums[name] + keys.T @ keys
    return {name: (total / count).float() for name, total in sums.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_second_moments_of_a_text_file_match_the_definition(
    family, make_tiny_model, tokenizer, tmp_path
):
    model = make_tiny_model(family)
    spec = architecture_of(model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS_PARAGRAPHS) + "\n", encoding="utf-8")
    num_samples, max_length, layers = 6, 12, [0, 2]

    result = statistics.second_moments(
        model,
        tokenizer,
        spec,
        layers,
        corpus=str(corpus),
        num_samples=num_samples,
        max_length=max_length,
        batch_size=4,  # two batches, the first padded
    )
    texts = [p for p in CORPUS_PARAGRAPHS if len(p) > 20][:num_samples]
    names = [spec.mlp_out_name(layer) for layer in layers]
    expected = naive_second_moments(model, tokenizer, texts, names, max_length)
    for layer, name in zip(layers, names, strict=True):
        torch.testing.assert_close(result[layer], expected[name], rtol=1e-4, atol=1e-6)


# -- the v* optimisation ----------------------------------------------------------------------


def _target_values(model, tokenizer, requests, **options):
    spec = architecture_of(model)
    return compute_target_values(
        model,
        tokenizer,
        spec,
        requests,
        2,
        TEMPLATES,
        TargetOptions(**{"num_steps": 12, "lr": 0.5, **options}),
        progress=False,
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("skip_lower_layers", "reuse_prefix", "group_by_suffix"),
    [
        (True, False, False),
        (False, True, False),
        (False, False, True),
        (True, True, False),
        (True, True, True),
    ],
)
def test_fast_paths_are_the_same_mathematics(
    family, skip_lower_layers, reuse_prefix, group_by_suffix, make_tiny_model, tokenizer, requests
):
    model = make_tiny_model(family)
    spec = architecture_of(model)
    lower_mlp = spec.blocks(model)[0].mlp
    calls = []
    handle = lower_mlp.register_forward_hook(lambda *args: calls.append(1))
    fast_options = {
        "skip_lower_layers": skip_lower_layers,
        "reuse_prefix": reuse_prefix,
        "group_by_suffix": group_by_suffix,
    }
    try:
        short = _target_values(model, tokenizer, requests[:2], num_steps=2, **fast_options)
        short_calls = len(calls)
        fast = _target_values(model, tokenizer, requests[:2], **fast_options)
        fast_calls = len(calls) - short_calls
        slow = _target_values(
            model,
            tokenizer,
            requests[:2],
            skip_lower_layers=False,
            reuse_prefix=False,
            group_by_suffix=False,
        )
        slow_calls = len(calls) - fast_calls - short_calls
    finally:
        handle.remove()
    assert max(fast.steps) == 12 and max(short.steps) == 2
    if skip_lower_layers:
        # The lower blocks ran only in the first pass, never per step.
        assert fast_calls == short_calls
        assert slow_calls > fast_calls
    else:
        assert fast_calls > short_calls
    torch.testing.assert_close(fast.initial, slow.initial, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.values, slow.values, rtol=0, atol=1e-4)
    assert fast.losses == pytest.approx(slow.losses, abs=1e-4)
    assert fast.steps == slow.steps
    assert not torch.equal(fast.values, fast.initial)


@pytest.mark.parametrize("family", FAMILIES)
def test_requests_optimised_together_equal_each_alone(family, make_tiny_model, tokenizer, requests):
    model = make_tiny_model(family)
    pair = [requests[0], requests[3]]  # different prompt lengths: padding is exercised
    together = _target_values(model, tokenizer, pair)
    alone = [_target_values(model, tokenizer, [r]) for r in pair]
    one_per_chunk = _target_values(model, tokenizer, pair, batch_size=1)
    for i, single in enumerate(alone):
        torch.testing.assert_close(together.values[i], single.values[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(together.initial[i], single.initial[0], rtol=0, atol=1e-5)
        assert together.losses[i] == pytest.approx(single.losses[0], abs=1e-4)
    torch.testing.assert_close(together.values, one_per_chunk.values, rtol=0, atol=1e-4)


def _reference_v_star(model, tokenizer, request, layer, templates, steps, lr):
    """ROME/MEMIT's ``compute_z`` for one request, written plainly: one unpadded forward pass of
    the whole model per prompt and step, the full vocabulary at every position, and the reference
    code's loss (NLL + 0.0625·KL(current ‖ initial) + 0.5·‖δ‖/‖h‖²), clamp and early stop."""
    from sphere_lightning.editors.hooks import encode_with_subject
    from sphere_lightning.models.batching import encode_target

    block = architecture_of(model).blocks(model)[layer]
    target = encode_target(tokenizer, request.target_new)
    prompts = [
        encode_with_subject(tokenizer, t.format(request.prompt), request.subject) for t in templates
    ]
    kl_prompt = encode_with_subject(tokenizer, "{} is a", request.subject)
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)
    seen = {}

    def run(ids, at, add):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            seen["h"] = hidden[0, at].detach().clone()
            hidden = hidden.clone()
            if add:
                hidden[0, at] = hidden[0, at] + delta
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = block.register_forward_hook(hook)
        try:
            return model(input_ids=torch.tensor([ids])).logits[0].float()
        finally:
            handle.remove()

    with torch.no_grad():
        run(prompts[0].ids, prompts[0].subject_last, add=False)
        h = seen["h"]
        kl_init = F.log_softmax(run(kl_prompt.ids, kl_prompt.subject_last, add=False), -1)
        kl_init = kl_init[kl_prompt.subject_last]
    optimizer = torch.optim.Adam([delta], lr=lr)
    for step in range(steps):
        optimizer.zero_grad()
        nll = 0.0
        for enc in prompts:
            logp = F.log_softmax(run(enc.ids + target[:-1], enc.subject_last, add=True), -1)
            first = len(enc.ids) - 1
            picked = [logp[first + k, tok] for k, tok in enumerate(target)]
            nll = nll - torch.stack(picked).sum() / len(target)
        nll = nll / len(prompts)
        kl_logp = F.log_softmax(run(kl_prompt.ids, kl_prompt.subject_last, add=True), -1)
        kl_logp = kl_logp[kl_prompt.subject_last]
        kl = (kl_logp.exp() * (kl_logp - kl_init)).sum()
        loss = nll + 0.0625 * kl + 0.5 * delta.norm() / h.norm() ** 2
        if loss < 5e-2 or step == steps - 1:  # the reference's last iteration only measures
            break
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            max_norm = 0.75 * h.norm()
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return h + delta.detach(), loss.item()


@pytest.mark.parametrize("family", FAMILIES)
def test_v_star_matches_a_plain_reimplementation_of_the_reference(
    family, make_tiny_model, tokenizer, requests
):
    model = make_tiny_model(family)
    spec = architecture_of(model)
    batch = [requests[0], requests[3]]
    ours = compute_target_values(
        model, tokenizer, spec, batch, 2, TEMPLATES, TargetOptions(num_steps=12), progress=False
    )
    for i, request in enumerate(batch):
        value, loss = _reference_v_star(model, tokenizer, request, 2, TEMPLATES, 12, 0.5)
        torch.testing.assert_close(ours.values[i], value, rtol=0, atol=1e-4)
        assert ours.losses[i] == pytest.approx(loss, abs=1e-4)


# -- delta transforms inside the layer loop ----------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_in_loop_transform_matches_a_plain_project_and_apply_loop(
    kind, family, make_tiny_model, tokenizer, requests, tmp_path
):
    """Each layer's residual is read with the transformed lower updates in place."""
    model = make_tiny_model(family)
    editor = make_editor(kind, model, tokenizer, cache_dir=str(tmp_path))
    editor.setup(model, tokenizer)
    spec = architecture_of(model)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    project = _project_against_live_weight(model)

    ours = editor.compute_deltas(model, tokenizer, requests, transform=project)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed"

    expected = plain_project_and_apply_loop(editor, model, tokenizer, requests, project)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-5)
    # Projecting after the loop gives another update above the first layer: the test can tell.
    after = editor.compute_deltas(model, tokenizer, requests)
    top = spec.weight_name(LAYERS[-1])
    assert not torch.allclose(project(top, after[top]), ours[top], rtol=1e-3, atol=1e-4)


def test_keys_are_averaged_in_two_levels_as_the_reference():
    keys = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3) ** 1.5
    expected = torch.stack(
        [
            torch.stack([keys[i, 0], (keys[i, 1] + keys[i, 2] + keys[i, 3]) / 3]).mean(0)
            for i in range(2)
        ]
    )
    torch.testing.assert_close(base.average_over_templates(keys), expected)
    assert not torch.allclose(base.average_over_templates(keys), keys.mean(1))
    torch.testing.assert_close(base.average_over_templates(keys[:, :1]), keys[:, 0])


def test_compute_keys_uses_the_two_level_mean(tiny_llama, tokenizer, requests, tmp_path):
    editor = make_editor("memit", tiny_llama, tokenizer, cache_dir=str(tmp_path))
    editor.context_templates = ["{}", "Because the sun was warm . {}", "I said . {}"]
    spec = architecture_of(tiny_llama)
    module = tiny_llama.get_submodule(spec.mlp_out_name(LAYERS[0]))
    per_template = []
    for template in editor.context_templates:
        rows = []
        for r in requests[:2]:
            encoded = base.encode_with_subject(tokenizer, template.format(r.prompt), r.subject)
            store = {}
            handle = module.register_forward_hook(_recorder(store, "in"))
            with torch.no_grad():
                tiny_llama(input_ids=torch.tensor([encoded.ids]))
            handle.remove()
            rows.append(store["in"][0, encoded.subject_last])
        per_template.append(torch.stack(rows))
    expected = (per_template[0] + (per_template[1] + per_template[2]) / 2) / 2
    keys = editor.compute_keys(tiny_llama, tokenizer, requests[:2], [LAYERS[0]])[LAYERS[0]]
    torch.testing.assert_close(keys, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("class_path", "default_target"),
    [
        ("sphere_lightning.editors.AlphaEdit", TargetOptions()),
        ("sphere_lightning.editors.ROME", ROME_TARGET),
    ],
)
def test_an_option_group_keeps_the_fields_a_config_does_not_give(class_path, default_target):
    """``target: {num_steps: 3}`` changes that field only; the others keep the editor's own
    defaults (ROME's clamp 4), and an unknown field is refused by name."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--editor", type=Editor)
    config = {
        "class_path": class_path,
        "init_args": {"target": {"num_steps": 3}, "statistics": {"num_samples": 8}},
    }
    editor = parser.instantiate_classes(parser.parse_args(["--editor", json.dumps(config)])).editor
    assert editor.target == dataclasses.replace(default_target, num_steps=3)
    assert editor.statistics == StatisticsOptions(num_samples=8)
    assert editor.templates == TemplateOptions()
    config["init_args"]["target"] = {"num_stepz": 3}
    with pytest.raises(ArgumentError, match="num_stepz"):
        parser.parse_args(["--editor", json.dumps(config)])
