"""PRUNE and RECT as delta transforms: hand-built matrices, the official code's formulas copied in
numpy, and composition with SPHERE in both orders through a real fit on a tiny GPT-2 (Conv1D)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sphere_lightning.callbacks import (
    DeltaTransform,
    PruneCallback,
    RectCallback,
    SphereProjectionCallback,
)
from sphere_lightning.callbacks.prune import restrain_singular_values
from sphere_lightning.callbacks.rect import rect_mask
from sphere_lightning.data.datamodule import EditDataModule
from sphere_lightning.editors import MEMIT
from sphere_lightning.errors import ConfigError
from sphere_lightning.functional import project_delta
from sphere_lightning.module import EditingModule
from tests.callbacks.test_transforms import EDITOR as TRANSFORM_EDITOR
from tests.helpers import quiet_trainer

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


class _Module:
    """``original_weights``, ``edited_weight`` and ``step_metrics`` over one weight."""

    def __init__(self, original: torch.Tensor, applied: torch.Tensor | None = None) -> None:
        self.original_weights = {NAME: original}
        self.applied = original.clone() if applied is None else applied
        self.step_metrics: dict[str, float] = {}

    def edited_weight(self, name: str) -> torch.Tensor:
        return self.applied


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
    module = _Module(original)
    out = PruneCallback().transform_delta(NAME, accumulated, module)  # first step: A = ΔW
    expected_sigma = [2.0 + math.log(10.0 / 2.0), 2.0 + math.log(5.0 / 2.0), 1.5, 0.3]
    got = torch.linalg.svdvals(out)
    torch.testing.assert_close(got[:4], torch.tensor(expected_sigma, dtype=torch.float64))
    assert float(got[4:].abs().max()) < 1e-12
    # Same singular vectors: only the spectrum changed.
    torch.testing.assert_close(out, (u * torch.tensor(expected_sigma, dtype=torch.float64)) @ v.T)
    assert module.step_metrics["prune/num_rescaled/layer"] == 2.0
    assert module.step_metrics["prune/max_singular_value_ratio/layer"] == pytest.approx(5.0)


def test_prune_returns_the_step_that_lands_on_original_plus_restrained_accumulation():
    """Second step: W already holds an update; the model must end at W₀ + PRUNE(W + ΔW − W₀)."""
    g = torch.Generator().manual_seed(2)
    original = torch.randn(16, 24, generator=g)
    applied = original + 3.0 * torch.randn(16, 24, generator=g)  # a first, unrestrained update
    delta = 2.0 * torch.randn(16, 24, generator=g)
    module = _Module(original, applied)
    out = PruneCallback().transform_delta(NAME, delta, module)
    expected = reference_prune((applied + delta).double().numpy(), original.double().numpy())
    landed = (applied + out - original).double().numpy()
    np.testing.assert_allclose(landed, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert module.step_metrics["prune/num_rescaled/layer"] >= 1  # the test exercises the rescale


def test_prune_leaves_delta_untouched_below_the_bound():
    g = torch.Generator().manual_seed(3)
    original = torch.randn(8, 12, generator=g)
    delta = 1e-3 * torch.randn(8, 12, generator=g)
    module = _Module(original)
    out = PruneCallback(stage="in_loop").transform_delta(NAME, delta, module)
    assert torch.equal(out, delta)
    assert module.step_metrics["prune/num_rescaled/layer"] == 0.0


def test_prune_reads_the_bound_of_each_fits_own_original_weight():
    _, _, _, accumulated = _with_singular_values([8.0], (4, 6), seed=6)
    callback = PruneCallback()
    for sigma_max in (2.0, 4.0):  # the same callback over two models, one fit each
        module = _Module(_with_singular_values([sigma_max], (4, 6), seed=7)[3])
        callback.setup(None, module, "fit")
        out = callback.transform_delta(NAME, accumulated, module)
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
    module = _Module(weight.clone(), weight)
    out = RectCallback(ratio=ratio).transform_delta(NAME, delta, module)
    expected_mask = ranks > ranks.numel() - kept
    assert int(expected_mask.sum()) == kept
    assert torch.equal(out != 0, expected_mask)
    assert torch.equal(out[expected_mask], delta[expected_mask])
    assert module.step_metrics["rect/kept_fraction/layer"] == pytest.approx(kept / ranks.numel())


def test_rect_divides_by_the_weight_as_applied_so_far():
    delta, weight, ranks = _distinct_relative_changes((6, 5), seed=5)
    original = torch.ones(6, 5)  # |ΔW / W₀| would rank the entries by |ΔW| instead
    module = _Module(original, weight)
    out = RectCallback().transform_delta(NAME, delta, module)
    assert torch.equal(out != 0, ranks > 30 - 13)  # k = 18: 13 kept
    by_original = rect_mask(delta, original, 0.4)
    assert not torch.equal(out != 0, by_original)


@pytest.mark.parametrize("seed", range(3))
def test_rect_matches_the_reference_code(seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(24, 40, generator=g)
    weight[0, :3] = 0.0  # W + 1e-8: finite, very large relative changes
    delta = torch.randn(24, 40, generator=g) * 1e-2
    out = RectCallback(ratio=0.4).transform_delta(NAME, delta, _Module(weight.clone(), weight))
    np.testing.assert_array_equal(out.numpy(), reference_rect(delta.numpy(), weight.numpy()))


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan"), True])
def test_rect_rejects_a_ratio_outside_the_unit_interval(ratio):
    with pytest.raises(ConfigError, match=r"`init_args\.ratio` should be in \(0, 1\]"):
        RectCallback(ratio=ratio)


@pytest.mark.parametrize("cls", [PruneCallback, RectCallback])
def test_transforms_reject_an_unknown_stage(cls):
    with pytest.raises(ValueError, match="`stage` should be `in_loop` or `after_loop`, got 'late'"):
        cls(stage="late")


# -- through a fit: composed with SPHERE, both orders ---------------------------------------------

#: The tiny-model editor settings of the transform tests; MEMIT has no null-space threshold.
EDITOR = {k: v for k, v in TRANSFORM_EDITOR.items() if k != "nullspace_threshold"}
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
    module = EditingModule(editor=MEMIT(**EDITOR), model=model_dir, fluency_prompts=0)
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
