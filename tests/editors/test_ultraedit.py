"""UltraEdit against a plain reimplementation of the reference (XiaojieGu/UltraEdit's
``editor/ultraedit.py`` and ``nets.RunningMeanStd``), on tiny GPT-2 and Llama models."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from sphere_lightning.editors import UltraEdit
from sphere_lightning.errors import ConfigError
from sphere_lightning.models import architecture_of, linear_weight
from sphere_lightning.models.batching import encode_target
from tests.helpers import apply_deltas, logprob_gains

FAMILIES = ["gpt2", "llama"]
LAYERS = [1, 2]
LR = 1e-2
EPS = torch.finfo(torch.float32).eps


class NaiveRunningMeanStd:
    """``nets.RunningMeanStd`` as the reference writes it (in float64), except that one row's
    variance counts as 0 (the reference's unbiased ``x.var(0)`` is NaN there)."""

    def __init__(self, size: int) -> None:
        self.n = torch.zeros(1, dtype=torch.float64)
        self.mean = torch.zeros(size, dtype=torch.float64)
        self.var = torch.zeros(size, dtype=torch.float64)
        self.std = torch.zeros(size, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        n = self.n + x.shape[0]
        delta = x.mean(0) - self.mean
        self.mean += x.shape[0] * delta / n
        batch_var = x.var(0) if x.shape[0] > 1 else torch.zeros_like(delta)
        self.var += x.shape[0] * batch_var + self.n * x.shape[0] * delta.pow(2) / n
        self.std = (self.var / (n - 1 + EPS)).sqrt()
        self.n = n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.std + EPS)


def naive_ultraedit(model, tokenizer, requests, layers, normalisers, lr, chunk_size):
    """One UltraEdit step written plainly: per request an unpadded forward pass through a copy
    whose edited weights require gradients, the chunk's loss the mean NLL over all its target
    tokens; keys and output gradients read with hooks and ``retain_grad``; the statistics updated
    chunk by chunk, module by module (``cache``); then per module, row by row, the pseudo-values
    and ΔWᵀ = (KᵀK + I)⁻¹ Kᵀ V (``predict_param_shifts``). Updates ``normalisers`` in place."""
    model = copy.deepcopy(model)
    spec = architecture_of(model)
    names = [spec.mlp_out_name(layer) for layer in layers]
    for name in names:
        model.get_submodule(name).weight.requires_grad_(True)
    encoded = []
    for r in requests:
        prompt = tokenizer(r.filled_prompt)["input_ids"]
        target = encode_target(tokenizer, r.target_new)
        encoded.append((prompt, target))
    order = sorted(encoded, key=lambda e: len(e[0]) + len(e[1]) - 1, reverse=True)
    keys = {name: [] for name in names}
    grads = {name: [] for name in names}
    for start in range(0, len(order), chunk_size):
        chunk = order[start : start + chunk_size]
        total = sum(len(target) for _, target in chunk)
        chunk_keys = {name: [] for name in names}
        chunk_grads = {name: [] for name in names}
        for prompt, target in chunk:
            store = {}
            hooks = []
            for name in names:

                def hook(module, args, output, name=name, store=store):
                    store[name] = (args[0].detach(), output)
                    output.retain_grad()

                hooks.append(model.get_submodule(name).register_forward_hook(hook))
            ids = torch.tensor([prompt + target[:-1]])
            logits = model(input_ids=ids).logits[0]
            for h in hooks:
                h.remove()
            positions = [len(prompt) - 1 + i for i in range(len(target))]
            nll = sum(
                -F.log_softmax(logits[p].float(), -1)[t]
                for p, t in zip(positions, target, strict=True)
            )
            (nll / total).backward()
            for name in names:
                inputs, output = store[name]
                for p in positions:
                    chunk_keys[name].append(inputs[0, p].double())
                    chunk_grads[name].append(output.grad[0, p].double())
        for name in names:
            k, g = torch.stack(chunk_keys[name]), torch.stack(chunk_grads[name])
            shape = (k.shape[1], g.shape[1])
            if shape not in normalisers:
                normalisers[shape] = NaiveRunningMeanStd(k.shape[1] + g.shape[1])
            normalisers[shape].update(torch.cat((k, g), -1))
            keys[name] += chunk_keys[name]
            grads[name] += chunk_grads[name]
    deltas = {}
    for layer, name in zip(layers, names, strict=True):
        k, g = torch.stack(keys[name]), torch.stack(grads[name])
        normaliser = normalisers[(k.shape[1], g.shape[1])]
        rows = []
        for k_i, g_i in zip(k, g, strict=True):
            z = normaliser(torch.cat((k_i, g_i)))
            k_hat, g_hat = z[: k.shape[1]], z[k.shape[1] :]
            rows.append(-lr * (k_hat * k_hat).sum() * g_hat)
        v = torch.stack(rows)
        mat = k.T @ k + torch.eye(k.shape[1], dtype=k.dtype)
        deltas[spec.weight_name(layer)] = (torch.linalg.inv(mat) @ k.T @ v).T
    return deltas


@pytest.fixture
def long_requests(requests):
    """The shared requests, three of them with multi-token targets (teacher-forced)."""
    longer = {0: "English and French", 2: "the north of Germany", 4: "Tokyo , not Seoul"}
    return [replace(r, target_new=longer.get(i, r.target_new)) for i, r in enumerate(requests)]


def make(**overrides) -> UltraEdit:
    editor = UltraEdit(**{"layers": LAYERS, "lr": LR, "forward_batch_size": 2, **overrides})
    editor.progress = False
    return editor


def assert_state_equals(editor: UltraEdit, normalisers: dict) -> None:
    state = editor.state_dict()["normalisers"]
    assert sorted(state) == sorted(f"{d_in}x{d_out}" for d_in, d_out in normalisers)
    for (d_in, d_out), naive in normalisers.items():
        ours = state[f"{d_in}x{d_out}"]
        # The keys and gradients come from float32 passes, batched and padded here and one
        # unpadded request at a time in the reference: they agree to float32 rounding (2e-6
        # relative seen on an AVX2-only CPU); a missed or doubled row moves them far more.
        for key in ("n", "mean", "var", "std"):
            torch.testing.assert_close(ours[key], getattr(naive, key), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_deltas_and_statistics_match_a_plain_reimplementation(
    family, make_tiny_model, tokenizer, long_requests
):
    """Two sequential batches (the second on the model the first edited): ΔW of each and the
    running statistics after both equal the plain loop's."""
    model = make_tiny_model(family)
    editor = make()
    normalisers: dict = {}
    for batch in (long_requests[:3], long_requests[3:]):
        ours = editor.compute_deltas(model, tokenizer, batch)
        expected = naive_ultraedit(model, tokenizer, batch, LAYERS, normalisers, LR, 2)
        assert list(ours) == list(expected)
        for name, delta in expected.items():
            assert delta.abs().max() > 1e-3
            torch.testing.assert_close(ours[name].double(), delta, rtol=0, atol=1e-5)
        apply_deltas(model, ours)
        editor.after_apply(model, tokenizer, batch)
    assert_state_equals(editor, normalisers)
    # Both layers share one normaliser (same shape), fed by every chunk of every batch twice.
    (stats,) = editor.state_dict()["normalisers"].values()
    tokens = sum(len(encode_target(tokenizer, r.target_new)) for r in long_requests)
    assert stats["n"].item() == len(LAYERS) * tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_applied_deltas_raise_multi_token_targets(
    family, make_tiny_model, tokenizer, long_requests
):
    model = make_tiny_model(family)
    deltas = make().compute_deltas(model, tokenizer, long_requests)
    gains = logprob_gains(copy.deepcopy(model), tokenizer, long_requests, deltas)
    assert min(gains) > 0.1, gains


def test_statistics_change_only_when_a_step_is_applied(make_tiny_model, tokenizer, requests):
    """A computed but never applied step (rolled back, or recomputed with other transforms)
    leaves the statistics as they were; the next computation gives the same ΔW."""
    model = make_tiny_model("llama")
    editor = make()
    first = editor.compute_deltas(model, tokenizer, requests[:2])
    assert editor.state_dict() == {"normalisers": {}}
    again = editor.compute_deltas(model, tokenizer, requests[:2])
    for name in first:
        assert torch.equal(first[name], again[name])
    editor.after_apply(model, tokenizer, requests[:2])
    (stats,) = editor.state_dict()["normalisers"].values()
    assert stats["n"].item() == 2 * len(LAYERS)
    editor.after_apply(model, tokenizer, requests[:2])  # nothing pending: no second commit
    (stats,) = editor.state_dict()["normalisers"].values()
    assert stats["n"].item() == 2 * len(LAYERS)


def test_chunking_is_part_of_the_algorithm(make_tiny_model, tokenizer, requests):
    """The loss is a mean per chunk and each chunk updates the statistics once, so
    ``forward_batch_size`` changes ΔW (as the reference's ``batch_size``)."""
    model = make_tiny_model("gpt2")
    one = make(forward_batch_size=1).compute_deltas(model, tokenizer, requests)
    all_ = make(forward_batch_size=5).compute_deltas(model, tokenizer, requests)
    assert not all(torch.allclose(one[n], all_[n]) for n in one)


def test_conv1d_delta_is_in_the_linear_convention(make_tiny_model, tokenizer, requests):
    model = make_tiny_model("gpt2")
    spec = architecture_of(model)
    deltas = make().compute_deltas(model, tokenizer, requests)
    for layer in LAYERS:
        weight = linear_weight(model.get_submodule(spec.mlp_out_name(layer)))
        assert deltas[spec.weight_name(layer)].shape == weight.shape == (32, 128)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"lr": 0.0}, r"editor\.init_args\.lr.*0"),
        ({"lr": -1e-6}, r"editor\.init_args\.lr.*-1e-06"),
        ({"l2": 0.0}, r"editor\.init_args\.l2.*0"),
        ({"forward_batch_size": 0}, r"editor\.init_args\.forward_batch_size.*0"),
        ({"layers": []}, "layers"),
    ],
)
def test_rejects_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        UltraEdit(**options)


def test_rejects_layers_the_model_lacks(make_tiny_model, tokenizer):
    model = make_tiny_model("llama")
    with pytest.raises(ConfigError, match=r"editor\.init_args\.layers.*\[7\]"):
        make(layers=[1, 7]).setup(model, tokenizer)
