"""The contract every editor keeps (ROME, FT, MEMIT, AlphaEdit, AlphaEdit with NAS, UltraEdit ×
tiny GPT-2 and Llama), and the ROME- and FT-specific mathematics against plain reimplementations."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sphere_lightning.editors import (
    FT,
    MEMIT,
    ROME,
    AlphaEdit,
    KeyValueEditor,
    LocateThenEditEditor,
    TemplateOptions,
    rome,
)
from sphere_lightning.editors.hooks import encode_with_subject
from sphere_lightning.editors.rome import ROME_TARGET
from sphere_lightning.editors.targets import compute_target_values
from sphere_lightning.errors import ConfigError
from sphere_lightning.models import architecture_of, linear_weight
from sphere_lightning.models.batching import encode_target
from tests.helpers import (
    EDITORS,
    apply_deltas,
    assert_same_deltas,
    logprob_gains,
    roundtrip,
)
from tests.helpers import make_contract_editor as make_editor

FAMILIES = ["gpt2", "llama"]


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    """Statistics shared by the module's editors (keyed by model fingerprint, so safe)."""
    return str(tmp_path_factory.mktemp("stats"))


@pytest.fixture(
    scope="module",
    params=[(k, f) for k in EDITORS for f in FAMILIES],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def edited(request, make_tiny_model, tokenizer, requests, stats_dir):
    """One ``compute_deltas`` per (editor, family) on all five requests, shared by the tests
    that only read it."""
    kind, family = request.param
    model = make_tiny_model(family)
    editor = make_editor(kind, model, tokenizer, stats_dir)
    editor.setup(model, tokenizer)
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    deltas = editor.compute_deltas(model, tokenizer, requests)
    return SimpleNamespace(
        kind=kind, family=family, model=model, editor=editor, before=before, grads=grads,
        deltas=deltas,
    )  # fmt: skip


def test_compute_deltas_leaves_the_model_bit_identical(edited, tokenizer):
    after = edited.model.state_dict()
    assert after.keys() == edited.before.keys()
    changed = [name for name, t in after.items() if not torch.equal(t, edited.before[name])]
    assert changed == []
    assert {n: p.requires_grad for n, p in edited.model.named_parameters()} == edited.grads
    assert not edited.model.training
    assert tokenizer.padding_side == "right"


def test_one_delta_per_edited_layer_in_the_weights_shape(edited):
    model, deltas = edited.model, edited.deltas
    spec = architecture_of(model)
    names = edited.editor.edited_parameter_names(model)
    assert list(deltas) == names == [spec.weight_name(layer) for layer in edited.editor.layers]
    for layer, name in zip(edited.editor.layers, names, strict=True):
        weight = linear_weight(model.get_submodule(spec.mlp_out_name(layer)))
        assert deltas[name].shape == weight.shape  # out × in, also for GPT-2's Conv1D
        assert deltas[name].shape[0] == model.config.hidden_size
        assert deltas[name].dtype == weight.dtype
        assert torch.isfinite(deltas[name]).all()
        assert deltas[name].abs().sum() > 0


def test_applied_deltas_raise_the_new_targets_probability(edited, tokenizer, requests):
    gains = logprob_gains(copy.deepcopy(edited.model), tokenizer, requests, edited.deltas)
    # A 32-wide random model mixes positions a lot, so one request's edit can cost another (ROME
    # edits one after another, each against the weights the earlier ones left): the batch as a
    # whole must clearly gain, and most requests with it.
    assert sum(gains) / len(gains) > 0.2, gains
    assert sum(g > 0 for g in gains) > len(gains) / 2, gains


def test_the_same_seed_gives_identical_deltas(
    edited, make_tiny_model, tokenizer, requests, tmp_path
):
    """A fresh editor with the same options (and statistics recomputed in a fresh cache) on a
    fresh copy of the model reproduces the deltas bit for bit."""
    model = make_tiny_model(edited.family)
    editor = make_editor(edited.kind, model, tokenizer, str(tmp_path))
    editor.setup(model, tokenizer)
    assert_same_deltas(editor.compute_deltas(model, tokenizer, requests), edited.deltas)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", EDITORS)
def test_state_dict_round_trip_gives_identical_subsequent_deltas(
    kind, family, make_tiny_model, tokenizer, requests, stats_dir
):
    model = make_tiny_model(family)
    editor = make_editor(kind, model, tokenizer, stats_dir, num_steps=5)
    editor.setup(model, tokenizer)
    unedited = copy.deepcopy(model)
    first, second = requests[:2], requests[2:4]
    apply_deltas(model, editor.compute_deltas(model, tokenizer, first))
    editor.after_apply(model, tokenizer, first)

    state = roundtrip(editor.state_dict())
    fresh = make_editor(kind, unedited, tokenizer, stats_dir, num_steps=5)
    fresh.load_state_dict(state)
    fresh.setup(unedited, tokenizer)  # a resumed run sets up before its edited weights load
    assert roundtrip(fresh.state_dict()).keys() == state.keys()
    expected = editor.compute_deltas(model, tokenizer, second)
    assert_same_deltas(fresh.compute_deltas(model, tokenizer, second), expected)
    # The state makes them equal: without it they differ.
    if kind in ("alphaedit", "alphaedit_nas", "ultraedit"):
        stateless = make_editor(kind, unedited, tokenizer, stats_dir, num_steps=5)
        stateless.setup(unedited, tokenizer)
        without = stateless.compute_deltas(model, tokenizer, second)
        assert not all(torch.equal(without[n], expected[n]) for n in expected)


# -- ROME -----------------------------------------------------------------------------------


def _spd(d: int, generator: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, 2 * d, generator=generator, dtype=torch.float64)
    return a @ a.T / (2 * d) + 0.1 * torch.eye(d, dtype=torch.float64)


@pytest.fixture
def rome_targets(monkeypatch) -> list:
    """The v* results of every ``compute_target_values`` call ROME makes, in order."""
    targets = []

    def keep(*args, **kwargs):
        targets.append(compute_target_values(*args, **kwargs))
        return targets[-1]

    monkeypatch.setattr(rome, "compute_target_values", keep)
    return targets


def test_rank_one_update_is_roms_closed_form():
    generator = torch.Generator().manual_seed(0)
    d_in, d_out = 12, 7
    cov = _spd(d_in, generator)
    k, k_cur = torch.randn(2, d_in, generator=generator, dtype=torch.float64)
    r = torch.randn(d_out, generator=generator, dtype=torch.float64)

    # The paper's closed form when the direction key is the current one: r (C⁻¹k)ᵀ / (kᵀC⁻¹k).
    c_inv_k = torch.linalg.solve(cov, k)
    expected = torch.outer(r, c_inv_k) / torch.dot(k, c_inv_k)
    torch.testing.assert_close(rome.rank_one_update(k, k, r, cov), expected)
    # The direction from the template-averaged key, the scale from the bare prompt's:
    # ΔW k_cur = r exactly, and ΔW x = 0 for every x C-orthogonal to k.
    delta = rome.rank_one_update(k, k_cur, r, cov)
    torch.testing.assert_close(delta, torch.outer(r, c_inv_k) / torch.dot(k_cur, c_inv_k))
    torch.testing.assert_close(delta @ k_cur, r)
    x = torch.randn(d_in, generator=generator, dtype=torch.float64)
    x = x - torch.dot(x, c_inv_k) / torch.dot(k, c_inv_k) * k  # xᵀC⁻¹k = 0
    torch.testing.assert_close(delta @ x, torch.zeros(d_out, dtype=torch.float64))
    assert torch.linalg.matrix_rank(delta) == 1
    # mom2_adjustment off: u = k.
    torch.testing.assert_close(
        rome.rank_one_update(k, k_cur, r), torch.outer(r, k) / torch.dot(k_cur, k)
    )


def _read_at(model, module_name: str, ids: list[int], position: int, read: str) -> torch.Tensor:
    """The module's input or output at ``position`` of one unpadded forward pass."""
    store = {}

    def hook(module, args, output):
        value = args[0] if read == "input" else output
        store["value"] = value[0] if isinstance(value, tuple) else value

    handle = model.get_submodule(module_name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return store["value"][0, position].double()


@pytest.mark.parametrize("family", FAMILIES)
def test_rome_delta_matches_a_plain_reimplementation(
    family, make_tiny_model, tokenizer, requests, tmp_path, rome_targets
):
    """For one request: ΔW = r (C⁻¹k̄)ᵀ / (k_curᵀ C⁻¹ k̄) with k̄ the flat template mean of the
    out-projection's input, k_cur the bare prompt's, r = v* − h, all read by hand; and the edited
    model's block output at the subject is v*."""
    model = make_tiny_model(family)
    spec = architecture_of(model)
    editor = make_editor(
        "rome", model, tokenizer, str(tmp_path), templates=TemplateOptions(count=2, length=4)
    )
    editor.setup(model, tokenizer)
    request, layer = requests[1], 1
    delta = editor.compute_deltas(model, tokenizer, [request])[spec.weight_name(layer)]

    out_proj, block = spec.mlp_out_name(layer), spec.layer_name(layer)
    keys = []
    for template in editor.context_templates:
        enc = encode_with_subject(tokenizer, template.format(request.prompt), request.subject)
        keys.append(_read_at(model, out_proj, enc.ids, enc.subject_last, "input"))
    bare = encode_with_subject(tokenizer, request.prompt, request.subject)
    k_cur = _read_at(model, out_proj, bare.ids, bare.subject_last, "input")
    h = _read_at(model, block, bare.ids, bare.subject_last, "output")
    v_star = rome_targets[0].values[0].double()
    c_inv_k = torch.linalg.solve(editor.covariances[layer].double(), torch.stack(keys).mean(0))
    expected = torch.outer(v_star - h, c_inv_k) / torch.dot(k_cur, c_inv_k)
    torch.testing.assert_close(delta.double(), expected, rtol=1e-4, atol=1e-5)

    apply_deltas(model, {spec.weight_name(layer): delta})
    reached = _read_at(model, block, bare.ids, bare.subject_last, "output")
    torch.testing.assert_close(reached, v_star, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_rome_edits_requests_one_after_another(
    family, make_tiny_model, tokenizer, requests, stats_dir
):
    """A batch's ΔW is the first request's plus the second's computed with the first in place."""
    model = make_tiny_model(family)
    editor = make_editor("rome", model, tokenizer, stats_dir, num_steps=5)
    editor.setup(model, tokenizer)
    together = editor.compute_deltas(model, tokenizer, requests[:2])
    first = editor.compute_deltas(model, tokenizer, requests[:1])
    edited = copy.deepcopy(model)
    apply_deltas(edited, first)
    second = editor.compute_deltas(edited, tokenizer, requests[1:2])
    for name, delta in together.items():
        torch.testing.assert_close(delta, first[name] + second[name], rtol=1e-4, atol=1e-6)
    # Not the same as both computed against the unedited weights.
    alone = editor.compute_deltas(model, tokenizer, requests[1:2])
    assert not all(torch.allclose(alone[n], second[n], atol=1e-6) for n in second)


@pytest.mark.parametrize("family", FAMILIES)
def test_rome_bounds_v_star_by_the_mlp_output(
    family, make_tiny_model, tokenizer, requests, stats_dir, rome_targets
):
    """ROME clamps ‖v* − m‖ at ``target.clamp_norm_factor`` ‖m‖ with m the MLP output (not the block
    output, as MEMIT)."""
    model = make_tiny_model(family)
    spec = architecture_of(model)
    factor = 0.05
    editor = make_editor(
        "rome",
        model,
        tokenizer,
        stats_dir,
        num_steps=10,
        target={"lr": 2.0, "clamp_norm_factor": factor},
    )
    editor.setup(model, tokenizer)
    request = requests[0]
    editor.compute_deltas(model, tokenizer, [request])
    bare = encode_with_subject(tokenizer, request.prompt, request.subject)
    m = _read_at(model, spec.mlp_out_name(1), bare.ids, bare.subject_last, "output")
    h = _read_at(model, spec.layer_name(1), bare.ids, bare.subject_last, "output")
    assert abs(m.norm() - h.norm()) > 0.1 * h.norm()  # the two bounds differ
    step = (rome_targets[0].values[0] - rome_targets[0].initial[0]).norm().item()
    assert step == pytest.approx(factor * m.norm().item(), rel=1e-3)


def test_rome_shares_keys_and_v_star_but_not_the_layer_loop():
    """ROME builds on the shared k/v* machinery, not on MEMIT's layer loop: no ``solve``."""
    assert issubclass(ROME, KeyValueEditor) and not issubclass(ROME, LocateThenEditEditor)
    assert not hasattr(ROME, "solve") and not hasattr(ROME, "target_values")
    assert issubclass(MEMIT, LocateThenEditEditor) and issubclass(AlphaEdit, LocateThenEditEditor)


def test_rome_has_no_target_layer_and_checks_its_clamp():
    with pytest.raises(TypeError, match="target_layer"):
        ROME(layers=[1], target_layer=3)
    with pytest.raises(
        ConfigError, match=r"`model\.editor\.init_args\.target\.clamp_norm_factor`.*-1"
    ):
        ROME(layers=[1], target=dataclasses.replace(ROME_TARGET, clamp_norm_factor=-1))


# -- FT -------------------------------------------------------------------------------------


def _reference_ft(model, tokenizer, requests, layers, num_steps, lr):
    """ROME's FT written plainly: Adam on the weights themselves, one unpadded forward pass per
    request, teacher-forced mean NLL of the target tokens, averaged over the requests."""
    model = copy.deepcopy(model)
    spec = architecture_of(model)
    params = [model.get_parameter(spec.weight_name(layer)) for layer in layers]
    originals = [linear_weight(model.get_submodule(spec.mlp_out_name(i))).clone() for i in layers]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(num_steps):
        optimizer.zero_grad()
        losses = []
        for r in requests:
            prompt = tokenizer(r.filled_prompt)["input_ids"]
            target = encode_target(tokenizer, r.target_new)
            logp = F.log_softmax(model(input_ids=torch.tensor([prompt + target])).logits[0], -1)
            nll = [-logp[len(prompt) - 1 + i, t] for i, t in enumerate(target)]
            losses.append(torch.stack(nll).mean())
        torch.stack(losses).mean().backward()
        optimizer.step()
    return {
        spec.weight_name(i): (
            linear_weight(model.get_submodule(spec.mlp_out_name(i))) - w0
        ).detach()
        for i, w0 in zip(layers, originals, strict=True)
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_ft_matches_a_plain_fine_tuning_loop(family, make_tiny_model, tokenizer, requests):
    model = make_tiny_model(family)
    editor = FT(layers=[1, 2], num_steps=3, lr=1e-3, batch_size=len(requests))
    ours = editor.compute_deltas(model, tokenizer, requests)
    expected = _reference_ft(model, tokenizer, requests, [1, 2], num_steps=3, lr=1e-3)
    for name, delta in expected.items():
        assert delta.abs().max() > 1e-3
        torch.testing.assert_close(ours[name], delta, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_ft_norm_constraint_bounds_every_weight(family, make_tiny_model, tokenizer, requests):
    model = make_tiny_model(family)
    eps = 1e-3
    editor = FT(layers=[1, 2], num_steps=5, lr=1e-2, norm_constraint=eps)
    deltas = editor.compute_deltas(model, tokenizer, requests)
    for delta in deltas.values():
        assert delta.abs().max().item() == pytest.approx(eps, rel=1e-3)  # binding, not exceeded


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_steps": 0}, "num_steps.*0"),
        ({"lr": 0.0}, "lr.*0"),
        ({"norm_constraint": -1.0}, "norm_constraint.*-1"),
        ({"batch_size": 0}, "batch_size.*0"),
        ({"weight_decay": -0.5}, "weight_decay.*-0.5"),
    ],
)
def test_ft_rejects_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        FT(layers=[1], **options)
