"""The v* speed options: most-probable early stopping against a plain per-prompt check, bf16
autocast against float32, ``auto`` precision against the path it resolves to, and the defaults
leaving the float32 / loss-stop arithmetic alone."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from sphere_lightning.data.requests import EditRequest
from sphere_lightning.editors import AlphaEdit, targets
from sphere_lightning.editors.hooks import encode_with_subject
from sphere_lightning.editors.targets import (
    TargetOptimisation,
    TargetOptions,
    compute_target_values,
)
from sphere_lightning.errors import ConfigError
from sphere_lightning.models import architecture_of
from sphere_lightning.models.batching import encode_target

FAMILIES = ["gpt2", "llama"]
TEMPLATES = ["{}", "Because the sun was warm . {}"]
LAYER = 2
#: Short prompts whose subject is at or near the end, so that δ (one position of a tiny random
#: model) can make the target the argmax: two of these reach it within a few steps, three not.
SHORT = [
    EditRequest(case_id=i, subject=s, prompt=p, target_new=new, target_true=true)
    for i, (p, s, new, true) in enumerate(
        [
            ("The city of {}", "Paris", "Rome", "London"),
            ("The language of {} is", "Brazil", "Spanish", "Portuguese"),
            ("The capital of {}", "France", "Berlin", "Paris"),
            ("{} plays", "Lionel Messi", "basketball", "soccer"),
            ("The headquarters of {}", "Nintendo", "Seoul", "Kyoto"),
        ]
    )
]


def _optimisation(model, tokenizer, requests, **options) -> TargetOptimisation:
    return TargetOptimisation(
        model,
        tokenizer,
        architecture_of(model),
        requests,
        LAYER,
        TEMPLATES,
        TargetOptions(**options),
    )


def _target_is_argmax_everywhere(model, tokenizer, request, delta: torch.Tensor) -> bool:
    """One unpadded forward of the whole model per prompt, δ added at the subject's last token:
    is ``target_new`` the argmax at every target position of every prompt?"""
    block = architecture_of(model).blocks(model)[LAYER]
    target = encode_target(tokenizer, request.target_new)
    for template in TEMPLATES:
        enc = encode_with_subject(tokenizer, template.format(request.prompt), request.subject)

        def add(module, args, output, at=enc.subject_last):
            hidden = (output[0] if isinstance(output, tuple) else output).clone()
            hidden[0, at] += delta
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = block.register_forward_hook(add)
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([enc.ids + target[:-1]])).logits[0]
        finally:
            handle.remove()
        first = len(enc.ids) - 1
        for k, token in enumerate(target):
            if int(logits[first + k].argmax()) != token:
                return False
    return True


def _trajectory(run: TargetOptimisation) -> list[torch.Tensor]:
    """Record δ (all requests) at every step, as the loss of that step sees it."""
    deltas: list[torch.Tensor] = []
    chunk_loss = run.chunk_loss

    def recording(chunk, rows):
        if not deltas or not torch.equal(deltas[-1], run.delta.detach()):
            deltas.append(run.delta.detach().clone())
        return chunk_loss(chunk, rows)

    run.chunk_loss = recording
    return deltas


@pytest.mark.parametrize("family", FAMILIES)
def test_most_probable_stop_matches_a_per_prompt_argmax_check(family, make_tiny_model, tokenizer):
    model = make_tiny_model(family)
    requests = SHORT
    steps = 20
    # Threshold 0: the loss (≥ 0) never stops a request, so only the argmax rule can.
    free = _optimisation(model, tokenizer, requests, num_steps=steps, loss_threshold=0.0)
    deltas = _trajectory(free)
    free.run(progress=False)
    assert len(deltas) == steps
    stopping = _optimisation(
        model,
        tokenizer,
        requests,
        num_steps=steps,
        loss_threshold=0.0,
        early_stop="most_probable",
    )
    result = stopping.run(progress=False)
    stopped_early = 0
    for i, request in enumerate(requests):
        hits = [_target_is_argmax_everywhere(model, tokenizer, request, d[i]) for d in deltas]
        expected = hits.index(True) if True in hits else steps - 1
        stopped_early += expected < steps - 1
        assert result.steps[i] == expected + 1, (i, hits)
        torch.testing.assert_close(
            result.values[i], result.initial[i] + deltas[expected][i], rtol=0, atol=1e-4
        )
    assert 0 < stopped_early < len(requests), "both outcomes are exercised"


@pytest.mark.parametrize("family", FAMILIES)
def test_most_probable_stop_keeps_the_loss_threshold(family, make_tiny_model, tokenizer, requests):
    model = make_tiny_model(family)
    requests = [*requests, *SHORT]
    loose = {"num_steps": 12, "loss_threshold": 1.0}
    by_loss = _optimisation(model, tokenizer, requests, **loose).run(progress=False)
    both = _optimisation(model, tokenizer, requests, early_stop="most_probable", **loose).run(
        progress=False
    )
    # ENCORE's stop comes in addition to the loss threshold: never later.
    assert all(b <= a for a, b in zip(by_loss.steps, both.steps, strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_is_close_to_float32_and_keeps_delta_float32(
    family, make_tiny_model, tokenizer, requests
):
    model = make_tiny_model(family)
    before = {n: (p.dtype, p.clone()) for n, p in model.named_parameters()}
    exact = _optimisation(model, tokenizer, requests, num_steps=6).run(progress=False)
    low = _optimisation(model, tokenizer, requests, num_steps=6, precision="bf16")
    linear_inputs: set[torch.dtype] = set()
    upper = architecture_of(model).blocks(model)[LAYER + 1]
    matrices = [m for m in upper.modules() if getattr(m, "weight", None) is not None]
    handles = [
        m.register_forward_pre_hook(lambda m, args: linear_inputs.add(m.weight.dtype))
        for m in matrices
    ]
    adam_dtypes: set[torch.dtype] = set()
    step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        adam_dtypes.update(v.dtype for s in self.state.values() for v in s.values() if v.dim())
        return out

    torch.optim.Adam.step = spy
    try:
        result = low.run(progress=False)
    finally:
        torch.optim.Adam.step = step
        for handle in handles:
            handle.remove()
    assert torch.bfloat16 in linear_inputs, "the blocks above the edit point ran in bf16"
    assert low.delta.dtype == torch.float32 and result.values.dtype == torch.float32
    assert adam_dtypes == {torch.float32}
    # The pass without δ below the edit point is float32: h is exact.
    torch.testing.assert_close(result.initial, exact.initial, rtol=0, atol=1e-6)
    moved = (exact.values - exact.initial).norm(dim=-1)
    error = (result.values - exact.values).norm(dim=-1)
    assert (error < 0.1 * moved).all(), (error, moved)
    assert result.losses == pytest.approx(exact.losses, rel=0.1, abs=0.05)
    for name, param in model.named_parameters():  # weights and dtypes restored exactly
        assert param.dtype == before[name][0] and torch.equal(param, before[name][1]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_options_off_are_the_float32_loss_stop_path(family, make_tiny_model, tokenizer, requests):
    model = make_tiny_model(family)
    spec = architecture_of(model)
    default = compute_target_values(
        model, tokenizer, spec, requests, LAYER, TEMPLATES, TargetOptions(), progress=False
    )
    explicit = compute_target_values(
        model,
        tokenizer,
        spec,
        requests,
        LAYER,
        TEMPLATES,
        TargetOptions(early_stop="loss", precision="float32"),
        progress=False,
    )
    assert torch.equal(default.values, explicit.values)
    assert default.losses == explicit.losses and default.steps == explicit.steps
    # A model whose weights require grad gets the same v*, no weight gradient, its flags back.
    model.requires_grad_(True)
    trainable = compute_target_values(
        model, tokenizer, spec, requests, LAYER, TEMPLATES, TargetOptions(), progress=False
    )
    assert torch.equal(trainable.values, default.values)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_the_options_are_checked():
    flag = r"`model\.editor\.init_args\.target\."
    with pytest.raises(ConfigError, match=flag + "early_stop`.*most_probable.*'argmax'"):
        TargetOptions(early_stop="argmax")
    with pytest.raises(ConfigError, match=flag + "precision`.*bf16.*'fp16'"):
        TargetOptions(precision="fp16")
    for field in ("num_steps", "batch_size"):
        with pytest.raises(ConfigError, match=flag + field + "` must be ≥ 1, got 0"):
            TargetOptions(**{field: 0})
    editor = AlphaEdit(target=TargetOptions(early_stop="most_probable", precision="bf16"))
    assert dataclasses.asdict(editor.target)["early_stop"] == "most_probable"
    assert editor.target.precision == "bf16"


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_keeps_h_exact_and_its_kl_starts_at_zero(family, make_tiny_model, tokenizer, requests):
    model = make_tiny_model(family)
    exact = _optimisation(model, tokenizer, requests, num_steps=6).run(progress=False)
    low = _optimisation(model, tokenizer, requests, num_steps=6, precision="bf16")
    result = low.run(progress=False)
    # h (block ``layer``'s output, v*'s origin) is the float32 one, bit for bit.
    assert torch.equal(result.initial, exact.initial)
    moved = (exact.values - exact.initial).norm(dim=-1)
    assert ((result.values - exact.values).norm(dim=-1) < 0.1 * moved).all()
    assert low._head_bf16 is None  # the bf16 copy of the head is dropped on exit

    # With δ = 0 the steps' bf16 path (upper blocks and head) gives the initial distribution:
    # the KL term, the difference of the loss at kl_factor 1 and 0, starts at ~0.
    probe = _optimisation(model, tokenizer, requests, precision="bf16")
    head_inputs: list[torch.dtype] = []
    linear = torch.nn.functional.linear

    def spy(x, weight, *args):
        if weight.shape[0] == model.config.vocab_size:
            head_inputs.append(weight.dtype)
        return linear(x, weight, *args)

    with probe._frozen(), probe._precision():
        probe.prepare()
        probe.measure_initial()
        assert all(c.kl_init.dtype == torch.float32 for c in probe.chunks)
        probe.delta = torch.zeros_like(probe.initial)
        handle = probe.install_hook()
        try:
            with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
                mp.setattr(torch.nn.functional, "linear", spy)
                for chunk in probe.chunks:
                    rows = torch.arange(len(chunk.ids))
                    probe.opts = dataclasses.replace(probe.opts, kl_factor=1.0)
                    with_kl, _ = probe.chunk_loss(chunk, rows)
                    probe.opts = dataclasses.replace(probe.opts, kl_factor=0.0)
                    without, _ = probe.chunk_loss(chunk, rows)
                    torch.testing.assert_close(with_kl, without, rtol=0, atol=1e-6)
        finally:
            handle.remove()
    assert head_inputs and set(head_inputs) == {torch.bfloat16}, "the head's matmul ran in bf16"


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_never_casts_the_head(family, make_tiny_model, tokenizer, requests):
    model = make_tiny_model(family)
    run = _optimisation(model, tokenizer, requests, num_steps=3)
    dtypes: set[torch.dtype] = set()
    handle = run.lm_head.register_forward_pre_hook(lambda m, args: dtypes.add(args[0].dtype))
    try:
        with run._precision():
            assert run._head_bf16 is None
        run.run(progress=False)
    finally:
        handle.remove()
    assert dtypes == {torch.float32}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_template_prefix_runs_once_and_changes_nothing(
    family, make_tiny_model, tokenizer, requests
):
    """The tokens a context template puts before every prompt run once, not once per request;
    v* is that of the pass that runs every prefix whole."""
    model = make_tiny_model(family)
    embed = model.get_input_embeddings()
    results, tokens = {}, {}
    for share in (False, True):
        seen = []
        handle = embed.register_forward_hook(
            lambda m, args, out, seen=seen: seen.append(args[0].numel())
        )
        try:
            results[share] = _optimisation(
                model, tokenizer, requests, num_steps=4, share_template_prefix=share
            ).run(progress=False)
        finally:
            handle.remove()
        tokens[share] = sum(seen)
    template_tokens = len(tokenizer("Because the sun was warm .").input_ids)
    # Each request but one no longer runs the template's tokens (at least all but the last).
    assert tokens[False] - tokens[True] >= (len(requests) - 1) * (template_tokens - 1)
    torch.testing.assert_close(results[True].initial, results[False].initial, rtol=0, atol=1e-5)
    torch.testing.assert_close(results[True].values, results[False].values, rtol=0, atol=1e-4)
    assert results[True].steps == results[False].steps


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "native"),
    [(False, False, False), (True, False, True), (False, True, True)],
)
def test_native_bf16_reads_the_cpu(monkeypatch, avx512_bf16, amx, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert targets.native_bf16(torch.device("cpu")) is native


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_is_bf16_only_where_it_is_native(
    monkeypatch, native, make_tiny_model, tokenizer, requests
):
    model = make_tiny_model("llama")
    monkeypatch.setattr(targets, "native_bf16", lambda device: native)
    expected = "bf16" if native else "float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the explicit run of the native path does not warn
        reference = _optimisation(model, tokenizer, requests, num_steps=4, precision=expected)
        auto = _optimisation(model, tokenizer, requests, num_steps=4, precision="auto")
    assert auto.precision == reference.precision == expected
    # The same path: bit for bit the same v*, losses and steps as the precision it resolved to.
    a, r = auto.run(progress=False), reference.run(progress=False)
    assert torch.equal(a.values, r.values) and a.losses == r.losses and a.steps == r.steps


def test_explicit_bf16_without_native_support_warns_and_runs_bf16(
    monkeypatch, make_tiny_model, tokenizer, requests
):
    model = make_tiny_model("llama")
    monkeypatch.setattr(targets, "native_bf16", lambda device: False)
    with pytest.warns(UserWarning, match=r"target\.precision` is bf16.*emulated.*`auto`"):
        low = _optimisation(model, tokenizer, requests, precision="bf16")
    assert low.precision == "bf16"
