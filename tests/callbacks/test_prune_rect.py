"""PRUNE and RECT as delta transforms: hand-built matrices, the official code's formulas copied in
numpy, composition with SPHERE in both orders through a real fit on a tiny GPT-2 (Conv1D), and
PRUNE (+ SPHERE) applied only to the evaluated weights, as the official MEMIT_prune code."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback

from sphere_lightning.callbacks import (
    DeltaTransform,
    EditObserver,
    PruneCallback,
    RectCallback,
    SphereProjectionCallback,
)
from sphere_lightning.callbacks.prune import restrain_singular_values
from sphere_lightning.callbacks.rect import rect_mask
from sphere_lightning.data.datamodule import EditDataModule
from sphere_lightning.editors import MEMIT, Editor
from sphere_lightning.errors import ConfigError
from sphere_lightning.functional import project_delta
from sphere_lightning.models.architectures import linear_weight
from sphere_lightning.module import EditingModule
from tests.helpers import TINY_ALPHAEDIT, ContextStub, quiet_trainer

NAME = "layer.weight"

# -- the official code, transcribed into numpy (float64) -----------------------------------------


def reference_prune(current_weight: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``experiments/evaluate.py`` (``MEMIT_prune``): the restrained accumulated update."""
    delta = current_weight - v
    s_orig = np.linalg.svd(v, compute_uv=False)
    max_sigma = s_orig.max()
    u_upd, s_upd, vt_upd = np.linalg.svd(delta, full_matrices=False)
    adjusted_s = np.where(s_upd > max_sigma, np.log(s_upd) - np.log(max_sigma) + max_sigma, s_upd)
    return u_upd @ np.diag(adjusted_s) @ vt_upd


def reference_rect(upd_matrix: np.ndarray, w: np.ndarray, k_percent: int = 40) -> np.ndarray:
    """``memit/memit_rect_main.py``, with ``torch.kthvalue`` (1-based) as a sort."""
    epsilon = 1e-8
    delta = np.abs(upd_matrix.astype(np.float64) / (w + np.float32(epsilon)))
    threshold = np.sort(delta.reshape(-1))[int(delta.size * (100 - k_percent) / 100) - 1]
    mask = delta >= threshold
    upd_matrix_rect = np.zeros_like(upd_matrix)
    upd_matrix_rect[mask] = upd_matrix[mask]
    return upd_matrix_rect


# -- unit level: a stand-in for the module's public surface --------------------------------------


def _module(original: torch.Tensor, applied: torch.Tensor | None = None) -> ContextStub:
    """The callbacks' view of one weight: ``original`` is W₀, ``applied`` (default: W₀) the
    weight as applied so far (``module.weights[NAME]``)."""
    live = original.clone() if applied is None else applied
    return ContextStub(weights={NAME: live}, original_weights={NAME: original})


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q


def _with_singular_values(sigma: list[float], shape: tuple[int, int], seed: int) -> tuple:
    """(U, σ, V, U diag(σ) Vᵀ) with orthonormal U (n × r) and V (d × r), float64."""
    g = torch.Generator().manual_seed(seed)
    u, v = _orthonormal(shape[0], len(sigma), g), _orthonormal(shape[1], len(sigma), g)
    s = torch.tensor(sigma, dtype=torch.float64)
    return u, s, v, (u * s) @ v.T


def test_prune_rescales_exactly_the_singular_values_above_the_original_largest():
    _, _, _, original = _with_singular_values([2.0, 1.0, 0.5], (6, 9), seed=0)
    u, _, v, accumulated = _with_singular_values([10.0, 5.0, 1.5, 0.3], (6, 9), seed=1)
    module = _module(original)
    out, metrics = PruneCallback().transform_delta(NAME, accumulated, module)  # A = ΔW
    expected_sigma = [2.0 + math.log(10.0 / 2.0), 2.0 + math.log(5.0 / 2.0), 1.5, 0.3]
    got = torch.linalg.svdvals(out)
    torch.testing.assert_close(got[:4], torch.tensor(expected_sigma, dtype=torch.float64))
    assert float(got[4:].abs().max()) < 1e-12
    # Same singular vectors: only the spectrum changed.
    torch.testing.assert_close(out, (u * torch.tensor(expected_sigma, dtype=torch.float64)) @ v.T)
    assert metrics["prune/num_rescaled/layer"] == 2.0
    assert metrics["prune/max_singular_value_ratio/layer"] == pytest.approx(5.0)


def test_prune_returns_the_step_that_lands_on_original_plus_restrained_accumulation():
    """Second step: W already holds an update; the model must end at W₀ + PRUNE(W + ΔW − W₀)."""
    g = torch.Generator().manual_seed(2)
    original = torch.randn(16, 24, generator=g)
    applied = original + 3.0 * torch.randn(16, 24, generator=g)  # a first, unrestrained update
    delta = 2.0 * torch.randn(16, 24, generator=g)
    module = _module(original, applied)
    out, metrics = PruneCallback().transform_delta(NAME, delta, module)
    expected = reference_prune((applied + delta).double().numpy(), original.double().numpy())
    landed = (applied + out - original).double().numpy()
    np.testing.assert_allclose(landed, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert metrics["prune/num_rescaled/layer"] >= 1  # the test exercises the rescale


def test_prune_leaves_delta_untouched_below_the_bound():
    g = torch.Generator().manual_seed(3)
    original = torch.randn(8, 12, generator=g)
    delta = 1e-3 * torch.randn(8, 12, generator=g)
    module = _module(original)
    out, metrics = PruneCallback(stage="in_loop").transform_delta(NAME, delta, module)
    assert torch.equal(out, delta)
    assert metrics["prune/num_rescaled/layer"] == 0.0


def test_prune_reads_the_bound_of_each_fits_own_original_weight():
    _, _, _, accumulated = _with_singular_values([8.0], (4, 6), seed=6)
    callback = PruneCallback()
    for sigma_max in (2.0, 4.0):  # the same callback over two models, one fit each
        module = _module(_with_singular_values([sigma_max], (4, 6), seed=7)[3])
        callback.setup(None, module, "fit")
        out, _ = callback.transform_delta(NAME, accumulated, module)
        expected = sigma_max + math.log(8.0 / sigma_max)
        assert float(torch.linalg.matrix_norm(out, ord=2)) == pytest.approx(expected)


def test_restrain_singular_values_is_continuous_and_logarithmic():
    sigma = torch.tensor([0.5, 2.0, 2.0 * math.e, 2.0 * math.e**3], dtype=torch.float64)
    got = restrain_singular_values(sigma, 2.0)
    torch.testing.assert_close(got, torch.tensor([0.5, 2.0, 3.0, 5.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="bound"):
        restrain_singular_values(sigma, 0.0)


def _distinct_relative_changes(shape: tuple[int, int], seed: int) -> tuple:
    """(ΔW, W, ranks): |ΔW / W| takes the values 1..numel in a random order, W of mixed sign."""
    g = torch.Generator().manual_seed(seed)
    numel = shape[0] * shape[1]
    ranks = (torch.randperm(numel, generator=g) + 1).reshape(shape)
    weight = torch.rand(shape, generator=g) + 0.5
    weight = weight * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return sign * ranks.double() * weight.double(), weight, ranks


@pytest.mark.parametrize(
    ("shape", "ratio", "kept"),
    [
        ((10, 10), 0.4, 41),  # k = 60: the 60th smallest and the 40 above it
        ((7, 3), 0.25, 7),  # k = ⌊21 · 0.75⌋ = 15
        ((4, 5), 1.0, 20),  # k = 0: everything
        ((1, 2), 0.4, 2),  # k = ⌊1.2⌋ = 1: the smallest is the threshold, both kept
    ],
)
def test_rect_keeps_the_largest_relative_changes(shape, ratio, kept):
    delta, weight, ranks = _distinct_relative_changes(shape, seed=4)
    module = _module(weight.clone(), weight)
    out, metrics = RectCallback(ratio=ratio).transform_delta(NAME, delta, module)
    expected_mask = ranks > ranks.numel() - kept
    assert int(expected_mask.sum()) == kept
    assert torch.equal(out != 0, expected_mask)
    assert torch.equal(out[expected_mask], delta[expected_mask])
    assert metrics["rect/kept_fraction/layer"] == pytest.approx(kept / ranks.numel())


def test_rect_divides_by_the_weight_as_applied_so_far():
    delta, weight, ranks = _distinct_relative_changes((6, 5), seed=5)
    original = torch.ones(6, 5)  # |ΔW / W₀| would rank the entries by |ΔW| instead
    module = _module(original, weight)
    out, _ = RectCallback().transform_delta(NAME, delta, module)
    assert torch.equal(out != 0, ranks > 30 - 13)  # k = 18: 13 kept
    by_original = rect_mask(delta, original, 0.4)
    assert not torch.equal(out != 0, by_original)


@pytest.mark.parametrize("seed", range(3))
def test_rect_matches_the_reference_code(seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(24, 40, generator=g)
    weight[0, :3] = 0.0  # W + 1e-8: finite, very large relative changes
    delta = torch.randn(24, 40, generator=g) * 1e-2
    module = _module(weight.clone(), weight)
    out, _ = RectCallback(ratio=0.4).transform_delta(NAME, delta, module)
    np.testing.assert_array_equal(out.numpy(), reference_rect(delta.numpy(), weight.numpy()))


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan"), True])
def test_rect_rejects_a_ratio_outside_the_unit_interval(ratio):
    flag = r"`trainer\.callbacks\.RectCallback\.init_args\.ratio`"
    with pytest.raises(ConfigError, match=flag + r" should be in \(0, 1\]"):
        RectCallback(ratio=ratio)


@pytest.mark.parametrize("cls", [PruneCallback, RectCallback])
def test_transforms_reject_an_unknown_stage(cls):
    with pytest.raises(
        ConfigError,
        match=rf"`trainer\.callbacks\.{cls.__name__}\.init_args\.stage` should be `in_loop`, "
        "`after_loop` or `evaluation`, got 'late'",
    ):
        cls(stage="late")


# -- through a fit: composed with SPHERE, both orders ---------------------------------------------

#: The tiny-model editor settings of the transform tests; MEMIT has no null-space threshold.
TINY_ALPHAEDIT = {k: v for k, v in TINY_ALPHAEDIT.items() if k != "nullspace_threshold"}
SPHERE = {"cumulative_ratio": 0.5, "suppression": 0.8, "stage": "after_loop"}


class _Spy(DeltaTransform):
    """Records, per step, each ΔW it is handed and the weight applied so far; after the step,
    the weight the model holds. Passes ΔW on unchanged."""

    def __init__(self) -> None:
        super().__init__(stage="after_loop")
        self.seen: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        self.after: list[dict[str, torch.Tensor]] = []

    def transform_deltas(self, deltas, pl_module):
        self.seen.append(
            {n: (d.clone(), pl_module.edited_weight(n).detach().clone()) for n, d in deltas.items()}
        )
        return deltas

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(
            {n: pl_module.edited_weight(n).detach().clone() for n in pl_module.original_weights}
        )


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer, make_tiny_model) -> str:
    """A tiny GPT-2 (Conv1D: stored in × out) and its tokenizer; one step of MEMIT on it gives
    ΔW with singular values far above the original weight's, so PRUNE acts."""
    path = tmp_path_factory.mktemp("gpt2")
    make_tiny_model("gpt2").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _fit(model_dir, requests, write_rome_json, tmp_path, transforms, steps=1) -> EditingModule:
    module = EditingModule(editor=MEMIT(**TINY_ALPHAEDIT), model=model_dir, fluency_prompts=0)
    module.configure_model()
    for name in module.edited_parameter_names:  # the orientation case under test
        stored = module.model.get_submodule(name.removesuffix(".weight")).weight
        assert stored.shape == module.edited_weight(name).T.shape
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_rome_json(requests[: 2 * steps], tmp_path / "facts.json")
    data = EditDataModule(dataset=str(path), num_edits=2 * steps, edits_per_step=2)
    quiet_trainer(transforms).fit(module, datamodule=data)
    return module


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 SVD/eigh error (PRUNE's SVD, as the reference's, is float32): 1e-4 of
    the largest entry."""
    atol = 1e-4 * float(expected.abs().max())
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-4, atol=atol)


def _sphere(delta: torch.Tensor, applied: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """SPHERE with U from the weight applied so far (``reference="current"``)."""
    return project_delta(delta, applied, SPHERE["cumulative_ratio"], SPHERE["suppression"])[0]


def _prune(delta: torch.Tensor, applied: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """The step's ΔW that lands the model on W₀ + reference PRUNE(W + ΔW − W₀)."""
    restrained = reference_prune((applied + delta).double().numpy(), original.double().numpy())
    return (torch.from_numpy(restrained) - (applied - original).double()).float()


def _rect(delta: torch.Tensor, applied: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(reference_rect(delta.numpy(), applied.numpy()))


@pytest.mark.parametrize(
    ("method", "make", "reference"),
    [("prune", PruneCallback, _prune), ("rect", RectCallback, _rect)],
    ids=["prune", "rect"],
)
def test_composition_with_sphere_in_both_orders(
    method, make, reference, gpt2_dir, requests, write_rome_json, tmp_path
):
    """List order is application order: spies around each transform show that each one gets
    what the previous passed on and returns the reference formula of it, that the live model
    holds the last output, and that the two orders give different updates."""
    applied = {}
    for order in ("first", "second"):
        spies = [_Spy(), _Spy(), _Spy()]
        pair = [make(), SphereProjectionCallback(**SPHERE)]
        formulas = [reference, _sphere]
        if order == "second":
            pair.reverse()
            formulas.reverse()
        transforms = [spies[0], pair[0], spies[1], pair[1], spies[2]]
        module = _fit(gpt2_dir, requests, write_rome_json, tmp_path / order, transforms)
        for name in module.edited_parameter_names:
            original = module.original_weights[name]
            for before, formula, after in zip(spies, formulas, spies[1:], strict=False):
                delta, weight = before.seen[0][name]
                assert torch.equal(weight, original)  # one step: nothing applied before it
                _close(after.seen[0][name][0], formula(delta, weight, original))
            _close(module.edited_weight(name) - original, spies[2].seen[0][name][0])
            applied[order, name] = module.edited_weight(name) - original
            if method == "prune":  # PRUNE acts on this ΔW
                raw = spies[0].seen[0][name][0]
                sigma_raw = torch.linalg.matrix_norm(raw, ord=2)
                assert sigma_raw > 2 * torch.linalg.matrix_norm(original, ord=2)
    for name in module.edited_parameter_names:
        a, b = applied["first", name], applied["second", name]
        assert float((a - b).norm()) > 1e-2 * float(a.norm()), f"{method}: the orders agree"


def test_prune_over_steps_holds_original_plus_restrained_accumulation(
    gpt2_dir, requests, write_rome_json, tmp_path
):
    spy = _Spy()
    module = _fit(gpt2_dir, requests, write_rome_json, tmp_path, [spy, PruneCallback()], steps=2)
    assert len(spy.seen) == len(spy.after) == 2
    for step in range(2):
        for name in module.edited_parameter_names:
            delta, applied = spy.seen[step][name]
            original = module.original_weights[name]
            landed = spy.after[step][name] - original
            _close(landed, (applied - original) + _prune(delta, applied, original))
            if step == 1:  # the second step starts from the restrained weight
                assert torch.equal(applied, spy.after[0][name])


# -- PRUNE (and SPHERE) at `stage: evaluation`, as the official MEMIT_prune ----------------------

STEPS = 5  # every request of the conftest set, one a step


class _ConstantEditor(Editor):
    """The same ΔW at every step: per edited weight W₀ (largest singular value m), a fixed
    rank-2 D = 3 m u₁v₁ᵀ + 1.5 m u₂v₂ᵀ, so PRUNE rescales from the first step on."""

    def __init__(self, layers: tuple[int, ...] = (1, 2)) -> None:
        super().__init__(layers)
        self.fixed: dict[str, torch.Tensor] = {}

    def compute_deltas(self, model, tokenizer, requests, transform=None):
        out = {}
        for i, name in enumerate(self.edited_parameter_names(model)):
            if name not in self.fixed:
                weight = linear_weight(model.get_submodule(name.removesuffix(".weight")))
                m = float(torch.linalg.matrix_norm(weight.detach().double(), ord=2))
                shape = tuple(weight.shape)
                self.fixed[name] = _with_singular_values([3 * m, 1.5 * m], shape, seed=10 + i)[3]
            out[name] = self.fixed[name].float()
        return out


class _WeightRecorder(EditObserver):
    """The edited weights as an observer sees them, after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, dict[str, torch.Tensor]] = {}

    def measure(self, trainer, pl_module):
        self.seen[trainer.global_step] = {
            n: pl_module.edited_weight(n).detach().clone() for n in pl_module.original_weights
        }
        return {}


class _LiveRecorder(Callback):
    """The live edited weights after every step (outside any evaluation)."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen[trainer.global_step] = {
            n: pl_module.edited_weight(n).detach().clone() for n in pl_module.original_weights
        }


class _CountEvaluations(DeltaTransform):
    """An `evaluation` transform that passes the total update on and counts its calls."""

    def __init__(self) -> None:
        super().__init__(stage="evaluation")
        self.calls = 0

    def transform_deltas(self, deltas, pl_module):
        self.calls += 1
        return deltas


def _fit_constant(model_dir, requests, write_rome_json, tmp_path, transforms) -> EditingModule:
    module = EditingModule(editor=_ConstantEditor(), model=model_dir, fluency_prompts=0)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_rome_json(requests[:STEPS], tmp_path / "facts.json")
    data = EditDataModule(dataset=str(path), num_edits=STEPS, edits_per_step=1)
    quiet_trainer(transforms).fit(module, datamodule=data)
    return module


def _plain_projection(delta: np.ndarray, weight: np.ndarray, beta: float, alpha: float):
    """SPHERE written out: U = top-r eigenvectors of Ŵᵀ Ŵ / n (rows of W normalised),
    r = 1 + #{k : cumsum(λ)_k / Σλ ≤ β}; ΔW (I − α U Uᵀ)."""
    unit = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    eigenvalues, eigenvectors = np.linalg.eigh(unit.T @ unit / unit.shape[0])
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    rank = 1 + int((np.cumsum(eigenvalues) / eigenvalues.sum() <= beta).sum())
    u = eigenvectors[:, :rank]
    return delta @ (np.eye(weight.shape[1]) - alpha * u @ u.T)


def _evaluated_reference(original: torch.Tensor, total: np.ndarray, sphere: bool) -> np.ndarray:
    """evaluate.py's MEMIT_prune weights: W₀ + PRUNE(ΣΔ), then SPHERE against W₀."""
    w0 = original.double().numpy()
    restrained = reference_prune(w0 + total, w0)
    if sphere:
        restrained = _plain_projection(restrained, w0, 0.5, 0.8)
    return w0 + restrained


def _numpy_close(actual: torch.Tensor, expected: np.ndarray) -> None:
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual.double().numpy(), expected, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("sphere", [False, True], ids=["prune", "prune+sphere"])
def test_evaluation_stage_evaluates_pruned_total_while_the_live_model_keeps_plain_updates(
    sphere, gpt2_dir, requests, write_rome_json, tmp_path
):
    observer, live, counter = _WeightRecorder(), _LiveRecorder(), _CountEvaluations()
    transforms = [PruneCallback(stage="evaluation")]
    if sphere:  # the paper presets' composition
        transforms.append(
            SphereProjectionCallback(0.5, 0.8, reference="original", stage="evaluation")
        )
    module = _fit_constant(
        gpt2_dir, requests, write_rome_json, tmp_path, [*transforms, counter, observer, live]
    )
    deltas = module.editor.fixed
    for name, original in module.original_weights.items():
        for step in range(1, STEPS + 1):
            total = step * deltas[name].numpy()
            # The live model: W₀ + ΣΔ, the plain updates.
            _numpy_close(live.seen[step][name], original.double().numpy() + total)
            # What evaluations see: W₀ + PRUNE(ΣΔ) (then SPHERE with U from W₀).
            _numpy_close(observer.seen[step][name], _evaluated_reference(original, total, sphere))
        assert torch.equal(observer.seen[0][name], original)  # baseline: nothing to prune
        # After the run the model holds the live weights again.
        assert torch.equal(module.edited_weight(name), live.seen[STEPS][name])
    # Computed once per state of the live weights (before the edits and after each), however
    # many evaluations (batch metrics, the observer, the final validation) read them.
    assert counter.calls == STEPS + 1


def test_live_and_evaluation_stages_differ_on_equal_updates(
    gpt2_dir, requests, write_rome_json, tmp_path
):
    observers = {}
    for stage in ("evaluation", "after_loop"):
        observers[stage] = _WeightRecorder()
        module = _fit_constant(
            gpt2_dir,
            requests,
            write_rome_json,
            tmp_path / stage,
            [PruneCallback(stage=stage), observers[stage]],
        )
    for name, original in module.original_weights.items():
        w0, delta = original.double().numpy(), module.editor.fixed[name].numpy()
        # Live: each step prunes the weight as restrained so far plus ΔW (a plain loop).
        restrained = np.zeros_like(w0)
        for _ in range(STEPS):
            restrained = reference_prune(w0 + restrained + delta, w0)
        live = observers["after_loop"].seen[STEPS][name]
        _numpy_close(live, w0 + restrained)
        evaluated = observers["evaluation"].seen[STEPS][name]
        _numpy_close(evaluated, _evaluated_reference(original, STEPS * delta, sphere=False))
        # On this run the live mode's update is far from the reference's (0.25 of it).
        update = (evaluated - original).double()
        gap = float((live.double() - evaluated.double()).norm() / update.norm())
        assert gap > 0.2, gap


def test_live_prune_drifts_from_the_reference_over_a_long_run_of_equal_updates():
    """100 equal updates D (σ = 3 m and 1.5 m, m = σ_max of W₀): live, each step lands on
    W₀ + PRUNE(W + D − W₀); the reference evaluates W₀ + PRUNE(100 D). The live spectrum
    settles near a fixed point of σ ↦ m + log(σ / m + 3) while the reference's keeps growing
    as m + log(300): the updates differ by 55 % of the reference's."""
    _, _, _, original = _with_singular_values([2.0, 1.0, 0.5], (6, 9), seed=0)
    _, _, _, delta = _with_singular_values([6.0, 3.0], (6, 9), seed=1)
    callback, module = PruneCallback(), _module(original)
    for _ in range(100):
        module.weights[NAME] = (
            module.weights[NAME] + callback.transform_delta(NAME, delta, module)[0]
        )
    live = (module.weights[NAME] - original).numpy()
    reference = reference_prune((original + 100 * delta).numpy(), original.numpy())
    gap = np.linalg.norm(live - reference) / np.linalg.norm(reference)
    assert 0.5 < gap < 0.6, gap


class _FailingObserver(EditObserver):
    """Fails in the middle of a measurement, after checking it sees the evaluated weights."""

    def measure(self, trainer, pl_module):
        if trainer.global_step == 1:
            name = pl_module.edited_parameter_names[0]
            self.evaluated = pl_module.edited_weight(name).detach().clone()
            raise RuntimeError("evaluation failed")
        return {}


def test_a_failing_evaluation_leaves_the_live_weights(
    gpt2_dir, requests, write_rome_json, tmp_path
):
    failing = _FailingObserver()
    module = EditingModule(editor=_ConstantEditor(), model=gpt2_dir, fluency_prompts=0)
    path = write_rome_json(requests[:STEPS], tmp_path / "facts.json")
    data = EditDataModule(dataset=str(path), num_edits=STEPS, edits_per_step=1)
    trainer = quiet_trainer([PruneCallback(stage="evaluation"), failing])
    with pytest.raises(RuntimeError, match="evaluation failed"):
        trainer.fit(module, datamodule=data)
    name = module.edited_parameter_names[0]
    live = module.original_weights[name] + module.editor.fixed[name].float()
    torch.testing.assert_close(module.edited_weight(name), live, rtol=0, atol=1e-6)
    assert float((failing.evaluated - live).abs().max()) > 1e-3  # it did see other weights


def test_prune_at_evaluation_restrains_the_total_update_it_is_given():
    _, _, _, original = _with_singular_values([2.0, 1.0], (6, 9), seed=0)
    _, _, _, total = _with_singular_values([10.0, 1.5], (6, 9), seed=1)
    applied = original + 100.0  # the live weight plays no part: the total is W − W₀ already
    module = _module(original, applied)
    out, _ = PruneCallback(stage="evaluation").transform_delta(NAME, total, module)
    expected = reference_prune((original + total).numpy(), original.numpy())
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-10)


def test_paper_prune_presets_defer_prune_and_sphere_to_evaluation():
    from sphere_lightning.export import evaluation_transforms_in_config

    root = Path(__file__).resolve().parents[2] / "configs" / "paper"
    for preset in sorted(root.glob("*_prune.yaml")):
        found = evaluation_transforms_in_config(preset)
        assert found == ["PruneCallback", "SphereProjectionCallback"], preset.name
    assert evaluation_transforms_in_config(root / "llama3-8b_memit.yaml") == []


def test_export_callback_writes_the_evaluated_weights(
    gpt2_dir, requests, write_rome_json, tmp_path
):
    from transformers import AutoModelForCausalLM

    from sphere_lightning.callbacks import ExportCallback

    out = tmp_path / "export"
    module = _fit_constant(
        gpt2_dir,
        requests,
        write_rome_json,
        tmp_path / "run",
        [PruneCallback(stage="evaluation"), ExportCallback(out)],
    )
    exported = AutoModelForCausalLM.from_pretrained(out)
    for name, original in module.original_weights.items():
        weight = linear_weight(exported.get_submodule(name.removesuffix(".weight"))).detach()
        total = STEPS * module.editor.fixed[name].numpy()
        _numpy_close(weight, _evaluated_reference(original, total, sphere=False))
        # The live model still holds the plain updates.
        _numpy_close(module.edited_weight(name).detach(), original.double().numpy() + total)
