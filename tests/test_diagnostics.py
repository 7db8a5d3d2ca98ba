"""Collapse diagnostics and the usable horizon, each against a plain computation."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sphere_lightning import experiments
from sphere_lightning.callbacks import (
    CollapseDiagnosticsCallback,
    DriftCallback,
    SphereProjectionCallback,
)
from sphere_lightning.cli import cli_main
from sphere_lightning.editors import (
    MEMIT,
    ROME,
    AlphaEdit,
    LocateThenEditEditor,
    TemplateOptions,
)
from sphere_lightning.editors import rome as rome_module
from sphere_lightning.editors.base import value_norm_metrics
from sphere_lightning.editors.rome import ROME_TARGET
from sphere_lightning.errors import ConfigError
from sphere_lightning.functional import key_energy, key_leak, principal_share
from sphere_lightning.functional.diagnostics import share_in, subspace_overlap
from sphere_lightning.horizon import Evaluation, usable_horizon
from sphere_lightning.models.architectures import architecture_of
from tests.helpers import (
    ROOT,
    TINY_ALPHAEDIT,
    ContextStub,
    tensorboard_scalars,
    tiny_alphaedit_flags,
    write_run_summary,
)

# -- plain references --------------------------------------------------------------------------


def plain_principal_basis(weight: torch.Tensor, beta: float) -> torch.Tensor:
    """Top-r eigenvectors of C = Ŵᵀ Ŵ / n from a plain d x d eigh (float64), r by the rule
    r = 1 + #{k : cumsum(λ)_k / Σλ ≤ β}."""
    w = weight.double()
    w_hat = w / w.norm(dim=1, keepdim=True)
    c = w_hat.T @ w_hat / w.shape[0]
    evals, evecs = torch.linalg.eigh(c)
    evals, evecs = evals.flip(0), evecs.flip(1)
    ratios = torch.cumsum(evals, 0) / evals.sum()
    r = 1 + int((ratios <= beta).sum())
    return evecs[:, :r]


def plain_share(delta: torch.Tensor, basis: torch.Tensor) -> float:
    """‖ΔW P‖² / ‖ΔW‖² with the explicit d x d projector P = U Uᵀ."""
    projector = basis @ basis.T
    d = delta.double()
    return float((d @ projector).norm() ** 2 / d.norm() ** 2)


def plain_leak(delta: torch.Tensor, weight: torch.Tensor, keys: torch.Tensor) -> float:
    """‖ΔW K₀‖ / ‖W K₀‖ from the keys themselves."""
    return float((delta.double() @ keys).norm() / (weight.double() @ keys).norm())


# -- functional --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 30), (40, 16)])  # n < d (Gram path) and n > d
@pytest.mark.parametrize("beta", [0.3, 0.5, 0.9])
def test_principal_share_matches_an_explicit_eigendecomposition(shape, beta):
    g = torch.Generator().manual_seed(1)
    # A weight with a few dominant input directions, as trained weights have.
    weight = torch.randn(*shape, generator=g) + 3 * torch.randn(shape[0], 2, generator=g) @ (
        torch.randn(2, shape[1], generator=g)
    )
    delta = torch.randn(*shape, generator=g)
    basis = plain_principal_basis(weight, beta)
    share, rank = principal_share(delta, weight, beta)
    assert rank == basis.shape[1]
    assert float(share) == pytest.approx(plain_share(delta, basis), rel=1e-5)
    # A ΔW inside the principal space is all in it; one orthogonal to it, none.
    inside = delta.double() @ basis @ basis.T
    assert float(principal_share(inside, weight, beta)[0]) == pytest.approx(1.0, rel=1e-5)
    outside = delta.double() - inside
    assert float(principal_share(outside, weight, beta)[0]) == pytest.approx(0.0, abs=1e-5)


def test_random_directions_have_share_r_over_d():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(20, 24, generator=g) + torch.randn(20, 1, generator=g) @ torch.ones(1, 24)
    delta = torch.randn(20_000, 24, generator=g, dtype=torch.float64)  # many random rows
    basis = plain_principal_basis(weight, 0.5)
    tall = weight.repeat(1000, 1)  # the same neurons, so the same principal space
    share, rank = principal_share(delta, tall.double(), 0.5)
    assert rank == basis.shape[1]
    assert float(share) == pytest.approx(rank / 24, abs=0.01)


def test_principal_share_of_zero_or_without_directions_is_zero():
    weight = torch.randn(6, 8)
    assert float(principal_share(torch.zeros(6, 8), weight, 0.5)[0]) == 0.0
    share, rank = principal_share(torch.randn(6, 8), weight, 0.0)
    assert rank == 0 and float(share) == 0.0
    with pytest.raises(ValueError, match="shape of `weight`"):
        principal_share(torch.randn(6, 7), weight, 0.5)


def test_share_in_a_given_basis_matches_the_explicit_projector():
    g = torch.Generator().manual_seed(5)
    basis, _ = torch.linalg.qr(torch.randn(10, 3, generator=g, dtype=torch.float64))
    delta = torch.randn(7, 10, generator=g)
    assert float(share_in(delta, basis)) == pytest.approx(plain_share(delta, basis), rel=1e-6)
    assert float(share_in(delta, basis[:, :0])) == 0.0
    with pytest.raises(ValueError, match="10 rows"):
        share_in(delta, basis[:9])


def plain_overlap(first: torch.Tensor, second: torch.Tensor) -> float:
    """tr(P_A P_B) / min(r_A, r_B) with the explicit d x d projectors P = U Uᵀ."""
    p_first = first.double() @ first.double().T
    p_second = second.double() @ second.double().T
    return float(torch.trace(p_first @ p_second) / min(first.shape[1], second.shape[1]))


def test_subspace_overlap_matches_the_explicit_projectors():
    g = torch.Generator().manual_seed(6)
    first, _ = torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=torch.float64))
    second, _ = torch.linalg.qr(torch.randn(12, 6, generator=g, dtype=torch.float64))
    value = float(subspace_overlap(first, second))
    assert value == pytest.approx(plain_overlap(first, second), rel=1e-10)
    assert 0 < value < 1
    # The same subspace in another basis; one inside a larger one; an orthogonal one.
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    assert float(subspace_overlap(first, first @ rotation)) == pytest.approx(1.0)
    full, _ = torch.linalg.qr(torch.cat([first, second], dim=1))
    assert float(subspace_overlap(first, full)) == pytest.approx(1.0)
    complement = full[:, 4:] - first @ (first.T @ full[:, 4:])
    complement, _ = torch.linalg.qr(complement)
    assert float(subspace_overlap(first, complement)) == pytest.approx(0.0, abs=1e-12)
    assert float(subspace_overlap(first, second[:, :0])) == 0.0
    with pytest.raises(ValueError, match="same number of rows"):
        subspace_overlap(first, second[:11])


def test_random_subspaces_overlap_by_about_r_over_d():
    g = torch.Generator().manual_seed(7)
    values = []
    for _ in range(200):
        first, _ = torch.linalg.qr(torch.randn(40, 5, generator=g, dtype=torch.float64))
        second, _ = torch.linalg.qr(torch.randn(40, 10, generator=g, dtype=torch.float64))
        values.append(float(subspace_overlap(first, second)))
    assert sum(values) / len(values) == pytest.approx(10 / 40, abs=0.02)


def test_key_leak_matches_explicit_preserved_keys():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(16, 200, generator=g, dtype=torch.float64)  # K₀: d x n
    keys[:, :100] *= 4  # not isotropic
    moment = keys @ keys.T / keys.shape[1]  # C = K₀ K₀ᵀ / n
    weight = torch.randn(10, 16, generator=g, dtype=torch.float64)
    delta = torch.randn(10, 16, generator=g, dtype=torch.float64) * 0.1
    expected_energy = float((weight @ keys).norm() ** 2 / keys.shape[1])
    assert float(key_energy(weight, moment)) == pytest.approx(expected_energy, rel=1e-5)
    assert float(key_energy(weight, moment, dtype=torch.float64)) == pytest.approx(
        expected_energy, rel=1e-12
    )
    assert float(key_leak(delta, weight, moment)) == pytest.approx(
        plain_leak(delta, weight, keys), rel=1e-5
    )
    # An update in the keys' null space leaks nothing.
    q, _ = torch.linalg.qr(keys[:, :12])  # keys span 12 of 16 dimensions below
    low_rank = q @ torch.randn(12, 200, generator=g, dtype=torch.float64)
    null = torch.eye(16, dtype=torch.float64) - q @ q.T
    c = low_rank @ low_rank.T / 200
    assert float(key_leak(delta @ null, weight, c, dtype=torch.float64)) == pytest.approx(
        0.0, abs=1e-6
    )
    with pytest.raises(ValueError, match="16 x 16"):
        key_energy(weight, moment[:8, :8])


def test_value_norm_metrics_are_the_mean_and_largest_row_norm():
    values = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, -12.0]])
    norms = [math.sqrt(sum(x * x for x in row)) for row in values.tolist()]
    metrics = value_norm_metrics(values)
    assert metrics["v_norm_mean"] == pytest.approx(sum(norms) / len(norms))
    assert metrics["v_norm_max"] == pytest.approx(max(norms))


def test_rome_reports_the_norms_of_every_v_star(make_tiny_model, tokenizer, requests, monkeypatch):
    captured: list[torch.Tensor] = []
    compute = rome_module.compute_target_values

    def spy(*args, **kwargs):
        result = compute(*args, **kwargs)
        captured.append(result.values[0].detach().clone())
        return result

    monkeypatch.setattr(rome_module, "compute_target_values", spy)
    model = make_tiny_model("llama")
    editor = ROME(
        layers=[1, 2],
        mom2_adjustment=False,
        target=dataclasses.replace(ROME_TARGET, num_steps=2),
        templates=TemplateOptions(count=1, length=4),
    )
    editor.progress = False
    editor.setup(model, tokenizer)
    editor.compute_deltas(model, tokenizer, requests[:2])
    assert len(captured) == 4  # one v* per request and layer
    norms = [math.sqrt(sum(x * x for x in v.tolist())) for v in captured]
    assert editor.last_metrics["v_norm_mean"] == pytest.approx(sum(norms) / 4, rel=1e-6)
    assert editor.last_metrics["v_norm_max"] == pytest.approx(max(norms), rel=1e-6)


# -- usable horizon ----------------------------------------------------------------------------


def test_horizon_ends_at_the_first_efficacy_below_the_threshold():
    evaluations = [
        Evaluation(0, efficacy=0.3),  # the pre-edit model: not counted
        Evaluation(1000, efficacy=0.95, drift_kl=0.1),
        Evaluation(2000, efficacy=0.8, drift_kl=0.2),  # equal: not below
        Evaluation(3000, efficacy=0.79, drift_kl=0.3),
        Evaluation(4000, efficacy=0.5, drift_kl=2.0),
    ]
    horizon = usable_horizon(evaluations, 5000)
    assert (horizon.edits, horizon.crossed_by, horizon.label) == (3000, ("efficacy",), "3000")
    assert horizon.evaluated == 4


def test_horizon_ends_at_the_first_drift_above_the_threshold():
    evaluations = [
        Evaluation(100, efficacy=0.99),
        Evaluation(200, drift_kl=1.0),  # equal: not above
        Evaluation(300, drift_kl=1.5),
        Evaluation(300, efficacy=0.9),  # the same evaluation point, measured apart
        Evaluation(400, efficacy=0.1),
    ]
    horizon = usable_horizon(reversed(evaluations), 400)  # order of the input does not matter
    assert (horizon.edits, horizon.crossed_by) == (300, ("drift_kl",))
    both = usable_horizon([Evaluation(50, 0.5, 3.0)], 50)
    assert both.crossed_by == ("drift_kl", "efficacy")


def test_horizon_never_crossed_is_beyond_the_edits_made():
    evaluations = [Evaluation(500, 0.9, 0.5), Evaluation(1000, float("nan"), 0.9)]
    horizon = usable_horizon(evaluations, 1000)
    assert horizon.edits is None and horizon.label == "beyond 1000"
    assert horizon.as_dict()["crossed_by"] == []
    # Configurable thresholds.
    strict = usable_horizon(evaluations, 1000, efficacy_threshold=0.95, drift_kl_threshold=2.0)
    assert strict.label == "500"
    assert usable_horizon([Evaluation(0, 0.1)], 10).label == "not evaluated"
    with pytest.raises(ValueError, match="efficacy_threshold"):
        usable_horizon([], 0, efficacy_threshold=1.5)
    with pytest.raises(ValueError, match="drift_kl_threshold"):
        usable_horizon([], 0, drift_kl_threshold=-1.0)


def test_runner_tables_report_the_horizon_of_every_run(tmp_path):
    pair = tmp_path / "alphaedit"
    pre = {"edit/efficacy": 0.2, "drift/kl": 0.0}
    write_run_summary(pair / "without_sphere", {
        0: pre,
        1: {"edit/num_edited": 100.0, "edit/efficacy": 0.9, "drift/kl": 0.5},
        2: {"edit/num_edited": 200.0, "edit/efficacy": 0.85, "drift/kl": 1.5},
        3: {"edit/num_edited": 300.0, "edit/efficacy": 0.6, "drift/kl": 3.0},
    })  # fmt: skip
    write_run_summary(pair / "with_sphere", {
        0: pre,
        1: {"edit/num_edited": 100.0, "edit/efficacy": 0.95, "drift/kl": 0.1},
        3: {"edit/num_edited": 300.0, "edit/efficacy": 0.9, "drift/kl": 0.2},
    })  # fmt: skip

    markdown, data, _ = experiments.write_report(pair)
    runs = json.loads(data.read_text())["runs"]
    assert runs["without_sphere"]["usable_horizon"]["edits"] == 200
    assert runs["without_sphere"]["usable_horizon"]["crossed_by"] == ["drift_kl"]
    assert runs["with_sphere"]["usable_horizon"]["label"] == "beyond 300"
    text = markdown.read_text()
    assert "- without SPHERE: 200 edits (drift KL > 1)" in text
    assert "- with SPHERE: beyond 300 edits" in text
    # The thresholds are the runner's flags.
    assert (
        experiments.main(["--report-only", "--out", str(pair), "--horizon-efficacy", "0.92"]) == 0
    )
    runs = json.loads(data.read_text())["runs"]
    assert runs["without_sphere"]["usable_horizon"]["label"] == "100"
    assert runs["with_sphere"]["usable_horizon"]["label"] == "300"
    with pytest.raises(SystemExit):
        experiments.main(["--report-only", "--out", str(pair), "--horizon-drift-kl", "-1"])

    # The suite table: a column of labels.
    pairs = [experiments.Pair("alphaedit", Path("alphaedit.yaml"), pair)]
    table = experiments.build_suite_table(pairs)
    assert [row["values"]["usable_horizon"] for row in table["rows"]] == ["200", "beyond 300"]
    suite_md = experiments.format_suite_markdown(table)
    assert "| alphaedit | with |" in suite_md and "| beyond 300 |" in suite_md


# -- the callback ------------------------------------------------------------------------------


def _trainer(callbacks: list) -> SimpleNamespace:
    data = SimpleNamespace(edits_per_step=2, requests=list(range(10)))
    return SimpleNamespace(
        callbacks=callbacks, global_step=0, datamodule=data, sanity_checking=False
    )


@pytest.mark.parametrize(
    ("family", "sphere_reference", "neuron_rows"),
    [
        ("llama", None, "linear"),
        ("llama", "current", "linear"),
        ("llama", "original", "linear"),
        ("gpt2", "current", "stored"),  # Conv1D: the neurons are the stored (in x out) rows
    ],
)
def test_callback_logs_each_quantity_as_computed_plainly(
    make_tiny_model, family, sphere_reference, neuron_rows
):
    model = make_tiny_model(family)
    editor = MEMIT(layers=[0, 1])
    module = ContextStub(model, editor=editor)
    g = torch.Generator().manual_seed(4)
    keys = {}
    editor.covariances = {}
    for layer, name in zip(editor.layers, module.edited_parameter_names, strict=True):
        d_in = module.edited_weight(name).shape[1]
        keys[name] = torch.randn(d_in, 50, generator=g, dtype=torch.float64)
        editor.covariances[layer] = (keys[name] @ keys[name].T / 50).float()
    editor.last_metrics = {"v_loss": 1.0, "v_norm_mean": 2.5, "v_norm_max": 4.0}
    callbacks: list = []
    sphere = None
    if sphere_reference is not None:
        sphere = SphereProjectionCallback(
            0.3, 0.8, reference=sphere_reference, neuron_rows=neuron_rows
        )
        callbacks.append(sphere)
    callback = CollapseDiagnosticsCallback(default_cumulative_ratio=0.6)
    callbacks.append(callback)
    trainer = _trainer(callbacks)
    callback.setup(trainer, module, "fit")
    assert module.record_step_deltas
    callback.on_train_start(trainer, module)  # the baseline: norms only
    name0 = module.edited_parameter_names[0]
    layer0 = name0.removesuffix(".weight")
    assert module.logged[0][1][f"diag/update_norm/{layer0}"] == 0.0
    assert f"diag/principal_share/{layer0}" not in module.logged[0][1]

    with torch.no_grad():  # one edit batch, by hand, as the module runs it
        module.edited_weight(name0).add_(0.5)  # the current weight differs from the original
    before = {n: module.edited_weight(n).detach().clone() for n in module.edited_parameter_names}
    raw = {n: 0.1 * torch.randn(w.shape, generator=g) for n, w in before.items()}
    module.editor_deltas = raw
    callback.on_before_optimizer_step(trainer, module, optimizer=None)
    beta = 0.3 if sphere is not None else 0.6
    applied = {}
    for name, delta in raw.items():  # SPHERE as the module runs it, on the weight before
        applied[name] = sphere.transform_delta(name, delta, module)[0] if sphere else delta
        with torch.no_grad():
            module.edited_weight(name).add_(applied[name])
    module.applied_deltas = applied
    trainer.global_step = 1
    callback.on_train_batch_end(trainer, module, None, None, 0)

    logged = module.last_logged
    for name in module.edited_parameter_names:
        layer = name.removesuffix(".weight")
        after = module.edited_weight(name).double()
        assert logged[f"diag/weight_norm/{layer}"] == pytest.approx(float(after.norm()))
        original = module.original_weights[name].double()
        assert logged[f"diag/update_norm/{layer}"] == pytest.approx(
            float((after - original).norm())
        )
        ratio = float(applied[name].double().norm() / before[name].double().norm())
        assert logged[f"diag/delta_ratio/{layer}"] == pytest.approx(ratio)
        # On the editor's ΔW, before SPHERE's projection, in SPHERE's principal space.
        reference = (
            module.original_weights[name] if sphere_reference == "original" else before[name]
        )
        delta = raw[name]
        if neuron_rows == "stored":
            reference, delta = reference.T, delta.T
        basis = plain_principal_basis(reference, beta)
        assert logged[f"diag/principal_share/{layer}"] == pytest.approx(
            plain_share(delta, basis), rel=1e-5
        )
        assert logged[f"diag/principal_share_random/{layer}"] == basis.shape[1] / len(basis)
        # The accumulated update W − W₀ (here the earlier +0.5 and this batch), in the same space.
        accumulated = after - original
        if neuron_rows == "stored":
            accumulated = accumulated.T
        assert logged[f"diag/update_principal_share/{layer}"] == pytest.approx(
            plain_share(accumulated, basis), rel=1e-5
        )
        # And in U₀, the unedited weight's principal space, against which the current U turns.
        unedited = module.original_weights[name]
        original_basis = plain_principal_basis(
            unedited.T if neuron_rows == "stored" else unedited, beta
        )
        assert logged[f"diag/original_principal_share/{layer}"] == pytest.approx(
            plain_share(accumulated, original_basis), rel=1e-5
        )
        assert logged[f"diag/principal_overlap/{layer}"] == pytest.approx(
            plain_overlap(original_basis, basis), rel=1e-5
        )
        if sphere_reference == "original":
            assert logged[f"diag/principal_overlap/{layer}"] == pytest.approx(1.0)
        elif name == name0:  # the weight moved (+0.5 everywhere), and its principal space too
            assert logged[f"diag/principal_overlap/{layer}"] < 0.999
        assert logged[f"diag/key_leak/{layer}"] == pytest.approx(
            plain_leak(applied[name], before[name], keys[name]), rel=1e-4
        )
    assert logged["diag/v_norm_mean"] == 2.5 and logged["diag/v_norm_max"] == 4.0
    summary = callback.summary(trainer, module)
    assert summary["cumulative_ratio"] == {
        "value": beta,
        "from": "default" if sphere is None else "SphereProjectionCallback",
    }
    assert summary["history"]["step"] == [0, 1] and summary["history"]["edits"] == [0, 2]
    assert summary["history"][f"diag/delta_ratio/{layer0}"][0] is None

    # Resumed from its state, it keeps the history.
    resumed = CollapseDiagnosticsCallback()
    resumed.load_state_dict(callback.state_dict())
    assert resumed.history == callback.history


def test_key_leak_reads_the_preserved_keys_of_the_unedited_model(
    make_tiny_model, tokenizer, tmp_path
):
    """A resumed run's weights are already edited when the callback first reads C: it must still
    be the unedited model's E[k kᵀ], the one AlphaEdit's null space was built from."""
    model = make_tiny_model("llama")
    options = dict(TINY_ALPHAEDIT)

    def editor_caching_in(cache: str) -> AlphaEdit:
        stats = dataclasses.replace(options["statistics"], cache_dir=str(tmp_path / cache))
        return AlphaEdit(**{**options, "statistics": stats})

    def moments_of(model, cache: str) -> dict[int, torch.Tensor]:
        return editor_caching_in(cache).second_moments(model, tokenizer)

    unedited = moments_of(model, "unedited")
    editor = editor_caching_in("run")
    module = ContextStub(model, tokenizer, editor=editor)
    with torch.no_grad():  # the state a resume restores: layer 1 edited, so layer 2's keys move
        module.edited_weight(module.edited_parameter_names[0]).mul_(3.0)
    edited_weights = {n: module.edited_weight(n).clone() for n in module.edited_parameter_names}
    edited = moments_of(model, "edited")
    assert not torch.allclose(edited[2], unedited[2], rtol=1e-3)  # the test can tell them apart

    moments = CollapseDiagnosticsCallback().key_moments(module)

    spec = architecture_of(model)
    assert set(moments) == {spec.weight_name(layer) for layer in editor.layers}
    for layer in editor.layers:
        torch.testing.assert_close(moments[spec.weight_name(layer)], unedited[layer])
    for name, weight in edited_weights.items():  # the live weights are back, bit for bit
        assert torch.equal(module.edited_weight(name), weight)


def test_callback_collects_the_evaluations_behind_the_horizon():
    callback = CollapseDiagnosticsCallback(efficacy_threshold=0.9, drift_kl_threshold=0.5)
    drift = DriftCallback()
    trainer = _trainer([drift, callback])
    module = SimpleNamespace(
        sampled_edit_metrics=[],
        final_edit_metrics={},
        evaluated_at_current_step=False,
        num_edited=lambda: min(trainer.global_step * 2, 10),
    )
    for step, efficacy, kl, sampled in [
        (1, 0.95, 0.1, True),
        (2, 0.92, 0.6, False),
        (3, 0.5, 0.7, True),
    ]:
        trainer.global_step = step
        drift.latest, drift.latest_step = {"drift/kl": kl}, step
        if sampled:
            module.sampled_edit_metrics.append({"step": step, "efficacy": efficacy})
            module.evaluated_at_current_step = False
        else:
            module.final_edit_metrics = {"efficacy": efficacy}
            module.evaluated_at_current_step = True
        callback.on_validation_end(trainer, module)
    assert callback.evaluations == {
        1: Evaluation(2, 0.95, 0.1), 2: Evaluation(4, 0.92, 0.6), 3: Evaluation(6, 0.5, 0.7)
    }  # fmt: skip
    horizon = callback.horizon(trainer, module)
    assert (horizon.edits, horizon.crossed_by) == (4, ("drift_kl",))


def test_callback_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="every_n_steps"):
        CollapseDiagnosticsCallback(every_n_steps=0)
    with pytest.raises(ConfigError, match="default_cumulative_ratio"):
        CollapseDiagnosticsCallback(default_cumulative_ratio=1.5)
    with pytest.raises(ConfigError, match="efficacy_threshold"):
        CollapseDiagnosticsCallback(efficacy_threshold=float("nan"))
    with pytest.raises(ConfigError, match="drift_kl_threshold"):
        CollapseDiagnosticsCallback(drift_kl_threshold=-0.1)


# -- one run ----------------------------------------------------------------------------------


def test_cli_run_logs_the_diagnostics_and_the_horizon(
    tmp_path, tiny_model_dir, requests, write_rome_json, monkeypatch
):
    values: list[torch.Tensor] = []  # v* of every batch
    target_values = LocateThenEditEditor.target_values

    def spy(self, *args, **kwargs):
        result = target_values(self, *args, **kwargs)
        values.append(result.values.detach().clone())
        return result

    monkeypatch.setattr(LocateThenEditEditor, "target_values", spy)
    data = write_rome_json(requests[:2], tmp_path / "facts.json")
    diagnostics = {
        "class_path": "sphere_lightning.callbacks.CollapseDiagnosticsCallback",
        # Any KL after an edit is above 0: the horizon ends at the first drift measurement.
        "init_args": {"drift_kl_threshold": 0.0},
    }
    drift = {
        "class_path": "sphere_lightning.callbacks.DriftCallback",
        "init_args": {"num_texts": 2, "max_length": 8},
    }
    cli = cli_main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "edit.yaml"),
            f"--model.model={tiny_model_dir}",
            *tiny_alphaedit_flags(num_steps=2),
            "--model.batch_metrics=false",
            "--model.fluency_prompts=0",
            f"--data.dataset={data}",
            "--data.num_edits=2",
            "--data.edits_per_step=1",
            f"--trainer.callbacks+={json.dumps(drift)}",
            f"--trainer.callbacks+={json.dumps(diagnostics)}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )
    scalars = tensorboard_scalars(tmp_path / "logs")
    layers = [name.removesuffix(".weight") for name in cli.model.edited_parameter_names]
    for layer in layers:
        for quantity in ("weight_norm", "update_norm"):
            assert set(scalars[f"diag/{quantity}/{layer}"]) == {0, 1, 2}
        for quantity in (
            "delta_ratio",
            "principal_share",
            "principal_share_random",
            "update_principal_share",
            "original_principal_share",
            "principal_overlap",
            "key_leak",
        ):
            assert set(scalars[f"diag/{quantity}/{layer}"]) == {1, 2}
        assert 0 < scalars[f"diag/principal_share/{layer}"][2] <= 1
        final = cli.model.edited_weight(f"{layer}.weight").double()
        original = cli.model.original_weights[f"{layer}.weight"].double()
        assert scalars[f"diag/update_norm/{layer}"][2] == pytest.approx(
            float((final - original).norm()), rel=1e-5
        )
    assert len(values) == 2  # one v* optimisation per batch
    for step, batch in enumerate(values, start=1):
        norms = batch.double().norm(dim=-1)
        assert scalars["diag/v_norm_mean"][step] == pytest.approx(float(norms.mean()), rel=1e-5)
        assert scalars["diag/v_norm_max"][step] == pytest.approx(float(norms.max()), rel=1e-5)
        assert scalars["editor/v_norm_mean"][step] == scalars["diag/v_norm_mean"][step]

    (path,) = list((tmp_path / "logs").rglob("summary.json"))
    summary = json.loads(path.read_text())["diagnostics"]
    assert summary["cumulative_ratio"] == {"value": 0.5, "from": "SphereProjectionCallback"}
    assert summary["history"]["step"] == [0, 1, 2]
    horizon = summary["usable_horizon"]
    assert horizon["edits"] == 1 and horizon["crossed_by"] == ["drift_kl"]
    drift_logged = {step: value for step, value in scalars["drift/kl"].items() if step > 0}
    assert {e["step"]: e["drift_kl"] for e in summary["evaluations"]} == pytest.approx(drift_logged)
    assert summary["evaluations"][-1]["efficacy"] == pytest.approx(scalars["edit/efficacy"][2])
    # The runner, from summary.json's scalars with the same thresholds, finds the same horizon.
    run = experiments.RunLog.read(path.parent)
    assert run.horizon(drift_kl_threshold=0.0).as_dict() == horizon
