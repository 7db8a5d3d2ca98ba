"""Norm-Anchor Scaling (NAS, arXiv 2602.02543): the anchored targets and the anchor ν against
plain re-implementations of the reference's ``compute_z`` tail and ``util/vstar_stats.py``, the
option off leaving the editors as they were, ν in the editor state, and NAS with SPHERE."""

from __future__ import annotations

import copy
import logging
import math
import random

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sphere_lightning.cli import cli_main
from sphere_lightning.editors import MEMIT, ROME, base, nas
from sphere_lightning.editors.hooks import encode_with_subject
from sphere_lightning.editors.targets import TargetResult, compute_target_values
from sphere_lightning.errors import ConfigError
from sphere_lightning.models import architecture_of
from tests.helpers import (
    REQUESTS,
    ROOT,
    _write_rome_json,
    apply_deltas,
    assert_same_deltas,
    make_editor,
    nas_request_file,
    roundtrip,
    tiny_alphaedit_flags,
)

KINDS = ["memit", "alphaedit"]


# -- the reference, written out ---------------------------------------------------------------


def reference_scale_vector_to_norm(x: torch.Tensor, target_norm: float, eps: float = 1e-10):
    """``util/vstar_stats.scale_vector_to_norm`` of github SasyaTitech/NAS."""
    if target_norm <= 0:
        return x
    denom = x.norm() + eps
    if denom <= eps:
        return x
    return x * (float(target_norm) / denom)


def reference_target(h, delta, v0, mean_norm, skip_factor=2.0):
    """The tail of the reference's ``compute_z`` (NAS, MEMIT and AlphaEdit with ``use_nas``)."""
    res_pre_mlp = h - v0
    v_star = delta + v0
    v_star_norm_orig = v_star.norm().item()
    if mean_norm > 0 and v_star_norm_orig > skip_factor * mean_norm:
        v_star = v0
    else:
        v_star = reference_scale_vector_to_norm(v_star, mean_norm)
    return res_pre_mlp + v_star


def reference_trimmed_mean(values, upper_quantile):
    """``util/vstar_stats._upper_trimmed_mean``."""
    arr = np.asarray(list(values), dtype=np.float64)
    arr.sort()
    drop_count = int(np.floor((1.0 - upper_quantile) * arr.size))
    if drop_count <= 0:
        return float(arr.mean())
    return float(arr[:-drop_count].mean())


def plain_mlp_output(model, tokenizer, request, layer) -> torch.Tensor:
    """The out-projection's output at the subject's last token: one unpadded forward pass of
    the whole bare prompt, read by a hook."""
    module = model.get_submodule(architecture_of(model).mlp_out_name(layer))
    enc = encode_with_subject(tokenizer, request.prompt, request.subject)
    store = {}
    handle = module.register_forward_hook(lambda mod, args, out: store.update(out=out))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([enc.ids]))
    finally:
        handle.remove()
    return store["out"][0, enc.subject_last].float()


# -- pure functions ---------------------------------------------------------------------------


def test_anchor_values_match_the_reference_row_by_row():
    generator = torch.Generator().manual_seed(0)
    n, d, anchor = 7, 16, 5.0  # ‖m + δ‖ ≈ √32 < 2ν for standard normal m and δ
    h = torch.randn(n, d, generator=generator)
    m = torch.randn(n, d, generator=generator)
    delta = torch.randn(n, d, generator=generator)
    delta[2] = 10 * delta[2] + 10.0  # ‖m + δ‖ > 2ν: δ dropped
    h[4], delta[4] = 0.0, -m[4]  # m + δ = 0 exactly: left as it is
    values = h + delta
    effective = values - h  # what the editor's v* gives as δ
    result = nas.anchor_values(values, h, m, anchor, 2.0)
    for j in range(n):
        expected = reference_target(h[j], effective[j], m[j], anchor)
        torch.testing.assert_close(result.targets[j], expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(result.norms[j], (effective[j] + m[j]).norm())
    assert result.skipped.tolist() == [j == 2 for j in range(n)]
    torch.testing.assert_close(result.targets[2], h[2])  # v = m: the target is h
    torch.testing.assert_close(result.targets[4], h[4] - m[4])  # v = 0 stays 0
    kept = [j for j in range(n) if j not in (2, 4)]
    torch.testing.assert_close(
        (result.targets[kept] - h[kept] + m[kept]).norm(dim=-1), torch.full((len(kept),), anchor)
    )
    # Another skip factor moves the threshold; ν ≤ 0 neither skips nor scales.
    wide = nas.anchor_values(values, h, m, anchor, 1e6)
    assert not wide.skipped.any()
    torch.testing.assert_close(
        wide.targets[2], reference_target(h[2], effective[2], m[2], anchor, 1e6)
    )
    off = nas.anchor_values(values, h, m, 0.0, 2.0)
    torch.testing.assert_close(off.targets, (h - m) + (effective + m))


@pytest.mark.parametrize("n", [1, 4, 19, 20, 101])
@pytest.mark.parametrize("quantile", [0.95, 0.75, 0.5, 1.0])
def test_upper_trimmed_mean_is_the_references(n, quantile):
    norms = torch.rand(n, generator=torch.Generator().manual_seed(n)) * 10
    expected = reference_trimmed_mean(norms.double().tolist(), quantile)
    assert nas.upper_trimmed_mean(norms, quantile) == pytest.approx(expected, rel=1e-12)


def test_upper_trimmed_mean_drops_the_largest():
    norms = torch.tensor([1.0, 2.0, 3.0, 100.0])
    assert nas.upper_trimmed_mean(norms, 0.75) == pytest.approx(2.0)
    assert nas.upper_trimmed_mean(norms, 1.0) == pytest.approx(26.5)
    with pytest.raises(ValueError, match="non-finite"):
        nas.upper_trimmed_mean(torch.tensor([1.0, math.inf]), 0.95)


def test_sample_is_the_references_draw():
    pool = list(range(50))
    assert nas.sample_requests(pool, 10, 3) == random.Random(3).sample(pool, 10)
    assert nas.sample_requests(pool, 50, 3) == pool
    assert nas.sample_requests(pool, 80, 3) == pool


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("num_requests", 0, r"`model\.editor\.init_args\.nas\.num_requests` must be ≥ 1, got 0"),
        ("skip_factor", 0.0, r"`model\.editor\.init_args\.nas\.skip_factor` must be > 0"),
        ("upper_quantile", 0.0, r"`model\.editor\.init_args\.nas\.upper_quantile` must be in"),
        ("upper_quantile", 1.5, r"`model\.editor\.init_args\.nas\.upper_quantile` must be in"),
        ("requests", " ", r"`model\.editor\.init_args\.nas\.requests` must be 'builtin'"),
    ],
)
def test_bad_options_name_the_flag(flag, value, message):
    with pytest.raises(ConfigError, match=message):
        MEMIT(layers=[1], nas=nas.NASOptions(enabled=True, **{flag: value}))


def test_rome_has_no_nas():
    with pytest.raises(TypeError, match="nas"):
        ROME(nas=nas.NASOptions(enabled=True))


# -- on a tiny model --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", KINDS)
def test_nas_targets_and_anchor_match_the_reference(
    kind, family, make_tiny_model, tokenizer, requests, tmp_path, monkeypatch
):
    """ν is the trimmed mean of ‖m + δ‖ over the seeded sample, optimised on the bare prompt;
    every request's target is the reference's; and the solve receives exactly those targets."""
    model = make_tiny_model(family)
    options = nas.NASOptions(
        enabled=True, requests=nas_request_file(tmp_path), num_requests=4, upper_quantile=0.75
    )
    editor = make_editor(kind, model, tokenizer, str(tmp_path), num_steps=8, seed=1, nas=options)
    editor.setup(model, tokenizer)
    seen: dict[str, TargetResult] = {}
    target_values, anchor_value_norms = editor.target_values, editor.anchor_value_norms

    def keep_plain(*args):
        seen["plain"] = target_values(*args)
        return seen["plain"]

    def keep_anchored(*args):
        seen["anchored"] = anchor_value_norms(*args)
        return seen["anchored"]

    monkeypatch.setattr(editor, "target_values", keep_plain)
    monkeypatch.setattr(editor, "anchor_value_norms", keep_anchored)
    batch = requests[:3]
    deltas = editor.compute_deltas(model, tokenizer, batch)
    layer = editor.target_layer

    # ν: the reference's draw (random.Random(seed).sample), bare prompt only, m read plainly.
    sample = random.Random(1).sample(REQUESTS, 4)
    bare = compute_target_values(
        model, tokenizer, architecture_of(model), sample, layer, ["{}"], editor.target
    )
    norms = [
        (bare.values[j] - bare.initial[j] + plain_mlp_output(model, tokenizer, r, layer)).norm()
        for j, r in enumerate(sample)
    ]
    expected_anchor = reference_trimmed_mean([float(x) for x in norms], 0.75)
    assert editor.nas_anchor == pytest.approx(expected_anchor, rel=1e-5)

    plain = seen["plain"]
    for j, request in enumerate(batch):
        m = plain_mlp_output(model, tokenizer, request, layer)
        delta = plain.values[j] - plain.initial[j]
        expected = reference_target(plain.initial[j], delta, m, editor.nas_anchor)
        torch.testing.assert_close(seen["anchored"].values[j], expected, rtol=1e-5, atol=1e-5)
    assert "nas_value_norm" in editor.last_metrics and "nas_skipped" in editor.last_metrics

    # The layer loop solves for the anchored targets: NAS off, fed them, gives the same ΔW.
    off = make_editor(kind, model, tokenizer, str(tmp_path), num_steps=8, seed=1)
    off.setup(model, tokenizer)
    monkeypatch.setattr(off, "target_values", lambda *args: seen["anchored"])
    assert_same_deltas(off.compute_deltas(model, tokenizer, batch), deltas)


@pytest.mark.parametrize("kind", KINDS)
def test_nas_off_runs_no_nas_code(
    kind, make_tiny_model, tokenizer, requests, tmp_path, monkeypatch
):
    """Off (the default), whatever the other NAS knobs say: no NAS code runs, no state is
    added, and the deltas are bit for bit those of an editor built without any NAS knob."""
    model = make_tiny_model("llama")
    default = make_editor(kind, model, tokenizer, str(tmp_path), num_steps=5)
    default.setup(model, tokenizer)
    expected = default.compute_deltas(model, tokenizer, requests[:2])

    def refuse(*args, **kwargs):
        raise AssertionError("NAS code ran with nas off")

    for name in ("anchor_values", "mlp_outputs", "anchor_requests", "upper_trimmed_mean"):
        monkeypatch.setattr(base, name, refuse)
    editor = make_editor(
        kind,
        model,
        tokenizer,
        str(tmp_path),
        num_steps=5,
        nas=nas.NASOptions(
            enabled=False,
            requests=str(tmp_path / "missing.json"),
            num_requests=2,
            skip_factor=0.1,
        ),
    )
    editor.setup(model, tokenizer)
    assert_same_deltas(editor.compute_deltas(model, tokenizer, requests[:2]), expected)
    assert "nas_anchor" not in editor.state_dict()
    assert editor.state_dict().keys() == default.state_dict().keys()
    assert not any(key.startswith("nas") for key in editor.last_metrics)


def test_the_anchor_is_state_and_is_not_measured_again(
    make_tiny_model, tokenizer, requests, tmp_path, monkeypatch, caplog
):
    """ν measured before the first edit travels in the state: an editor restored from it on the
    edited model does not measure again and gives the same deltas; one without it measures the
    edited model, and gets another ν."""
    model = make_tiny_model("llama")
    options = {
        "num_steps": 5,
        "nas": nas.NASOptions(enabled=True, requests=nas_request_file(tmp_path)),
    }
    editor = make_editor("memit", model, tokenizer, str(tmp_path), **options)
    editor.setup(model, tokenizer)
    unedited = copy.deepcopy(model)
    apply_deltas(model, editor.compute_deltas(model, tokenizer, requests[:2]))
    state = roundtrip(editor.state_dict())
    assert state["nas_anchor"] == editor.nas_anchor > 0

    fresh = make_editor("memit", model, tokenizer, str(tmp_path), **options)
    fresh.load_state_dict(state)
    fresh.setup(unedited, tokenizer)  # a resumed run sets up before its edited weights load

    def refuse(*args):
        raise AssertionError("a restored anchor is measured again")

    monkeypatch.setattr(fresh, "measure_nas_anchor", refuse)
    assert_same_deltas(
        fresh.compute_deltas(model, tokenizer, requests[2:4]),
        editor.compute_deltas(model, tokenizer, requests[2:4]),
    )
    stateless = make_editor("memit", model, tokenizer, str(tmp_path), **options)
    stateless.setup(unedited, tokenizer)
    stateless.compute_deltas(model, tokenizer, requests[2:4])
    assert stateless.nas_anchor != pytest.approx(editor.nas_anchor, rel=1e-3)
    with caplog.at_level(logging.WARNING, logger=base.__name__):
        make_editor("memit", model, tokenizer, str(tmp_path), **options).load_state_dict(
            {"context_templates": state["context_templates"]}
        )
    assert "holds no anchor" in caplog.text


def test_missing_anchor_requests_name_the_flag(make_tiny_model, tokenizer, requests, tmp_path):
    model = make_tiny_model("llama")
    editor = make_editor(
        "memit",
        model,
        tokenizer,
        str(tmp_path),
        num_steps=2,
        nas=nas.NASOptions(enabled=True, requests=str(tmp_path / "missing.json")),
    )
    editor.setup(model, tokenizer)
    with pytest.raises(ConfigError, match=r"`model\.editor\.init_args\.nas\.requests`"):
        editor.compute_deltas(model, tokenizer, requests[:1])


def test_nas_with_sphere_through_the_cli(tmp_path, tiny_model_dir, requests):
    """configs/edit.yaml (AlphaEdit + SPHERE in the loop) with NAS on: two steps run, the
    checkpoint carries ν, and the editor logs the NAS scalars."""
    data = _write_rome_json(requests, tmp_path / "facts.json")
    cli_main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "edit.yaml"),
            f"--model.model={tiny_model_dir}",
            *tiny_alphaedit_flags(num_steps=4),
            "--model.editor.init_args.nullspace_threshold=1e9",
            "--model.editor.init_args.nas.enabled=true",
            f"--model.editor.init_args.nas.requests={data}",
            "--model.editor.init_args.nas.num_requests=3",
            f"--data.dataset={data}",
            "--data.num_edits=4",
            "--data.edits_per_step=2",
            "--model.fluency_prompts=1",
            "--model.fluency_max_new_tokens=2",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )
    (checkpoint,) = list((tmp_path / "logs").rglob("last.ckpt"))
    meta = torch.load(checkpoint, map_location="cpu", weights_only=True)["sphere_lightning"]
    assert meta["editor"]["class_path"] == "sphere_lightning.editors.alphaedit.AlphaEdit"
    assert meta["editor_state"]["nas_anchor"] > 0
    (events,) = list((tmp_path / "logs").rglob("events.out.tfevents*"))
    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert [e.step for e in accumulator.Scalars("editor/nas_value_norm")] == [1, 2]
    assert [e.step for e in accumulator.Scalars("editor/nas_skipped")] == [1, 2]
    assert any(tag.startswith("sphere/rank/") for tag in tags)
