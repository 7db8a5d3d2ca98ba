"""Why a model collapses under sequential editing: per-batch, per-layer diagnostics of the updates,
and the run's usable horizon."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from sphere_lightning.callbacks.drift import DriftCallback, original_weights_swapped_in
from sphere_lightning.callbacks.observer import EditObserver
from sphere_lightning.callbacks.sphere import SphereProjectionCallback, short_name
from sphere_lightning.context import EditingContext
from sphere_lightning.editors import MEMIT, AlphaEdit
from sphere_lightning.errors import ConfigError, callback_flag
from sphere_lightning.functional.diagnostics import key_leak, share_in, subspace_overlap
from sphere_lightning.functional.projection import principal_directions
from sphere_lightning.horizon import (
    DRIFT_KL_THRESHOLD,
    EFFICACY_THRESHOLD,
    Evaluation,
    UsableHorizon,
    edits_after,
    usable_horizon,
)
from sphere_lightning.models.architectures import architecture_of
from sphere_lightning.tags import DIAG

#: The editor's scalars re-logged under ``diag/`` (``editor/<name>`` holds them too).
_VALUE_NORMS = ("v_norm_mean", "v_norm_max")


class CollapseDiagnosticsCallback(EditObserver):
    """Log what each batch's update does to each edited weight, and the run's usable horizon.

    After every ``every_n_steps``-th batch, per edited layer (tags ``diag/<quantity>/<layer>``):

    - ``weight_norm``: ‖W‖_F of the weight after the batch;
    - ``update_norm``: ‖W − W₀‖_F, the update accumulated since the unedited weight W₀;
    - ``delta_ratio``: ‖ΔW‖ / ‖W‖ of the batch's update as applied (after every delta
      transform) against the weight it was added to;
    - ``principal_share``: ‖ΔW U‖² / ‖ΔW‖² of the editor's ΔW *before* any transform (so before
      SPHERE's projection, and whether SPHERE is on or off): the share of its energy in the
      principal space U of the weight's neurons
      (:func:`~sphere_lightning.functional.diagnostics.principal_share`), the subspace SPHERE
      projects away from. U is found as SPHERE finds it: with the ``cumulative_ratio`` β, the
      ``reference`` weight and the ``neuron_rows`` of the first
      :class:`~sphere_lightning.callbacks.SphereProjectionCallback` in the trainer's callbacks,
      else with ``default_cumulative_ratio``, the weight before the batch and the rows of its
      (out × in) view;
    - ``principal_share_random``: r/d, the expected share of a direction drawn at random (r =
      dim U, d = the weight's input size), to read ``principal_share`` against;
    - ``update_principal_share``: the same share for the accumulated update W − W₀ (after the
      batch, in the same U). Updates whose principal parts point the same way batch after batch
      add up there faster than their other parts, which add like a random walk; then this share
      exceeds the per-batch ``principal_share``, and a projection that removes a few percent of
      each batch removes much more of the sum;
    - ``original_principal_share``: the share of W − W₀ in U₀, the principal space of the
      unedited weight W₀ (same β and neurons; found once). Below r/d when a projection keeps the
      updates out of the directions that were principal before editing, even where
      ``update_principal_share`` (in the current U) is not: an accumulated update as large as
      the weight turns the weight's principal space towards itself;
    - ``principal_overlap``: ‖U₀ᵀ U‖²_F / min(r₀, r), how much of U₀ the current U still spans
      (:func:`~sphere_lightning.functional.diagnostics.subspace_overlap`; 1: unchanged, about
      r/d for unrelated subspaces);
    - ``key_leak`` (AlphaEdit and MEMIT, with ``key_leak``): ‖ΔW K₀‖ / ‖W K₀‖ of the applied
      update on the preserved keys K₀, from the editor's key second moment C = E[k kᵀ] (the
      statistics AlphaEdit builds its null-space projector from):
      √(tr(ΔW C ΔWᵀ) / tr(W C Wᵀ)), W the weight before the batch
      (:func:`~sphere_lightning.functional.diagnostics.key_leak`).

    and, for editors that compute target values v* (MEMIT, AlphaEdit, ROME), ``diag/v_norm_mean``
    and ``diag/v_norm_max``: the mean and largest ‖v*‖ over the batch's requests (the editor's
    ``last_metrics``). ``weight_norm`` and ``update_norm`` also have a baseline at step 0. The
    weights are the live ones, from which editing goes on (with delta transforms of stage
    ``evaluation``, not the ones evaluations see). List it after an
    :class:`~sphere_lightning.callbacks.HEAlarmCallback`, so that it measures the attempt the
    alarm keeps.

    **Usable horizon.** The number of edits at the first evaluation where the lifelong efficacy
    (``edit/efficacy``) is below ``efficacy_threshold`` or the KL of a
    :class:`~sphere_lightning.callbacks.DriftCallback` is above ``drift_kl_threshold``; "beyond
    N" if the run never crosses (:func:`~sphere_lightning.horizon.usable_horizon`). Only the
    evaluations the run makes count (every ``val_check_interval``, every drift measurement).

    **summary.json** (``diagnostics``): ``cumulative_ratio`` (β used and where it came from),
    ``history`` (a list per tag, with ``step`` and ``edits``, ``null`` where a tag was not
    measured), ``final`` (the last values), ``evaluations`` (edits, efficacy, drift KL) and
    ``usable_horizon`` (``edits``, ``label`` such as ``"3000"`` or ``"beyond 10000"``,
    ``crossed_by``, ``num_edited`` and the thresholds).

    Cost per measured batch and layer: one eigendecomposition as SPHERE's (on the smaller of
    n × n and d × d; one more per layer for U₀, once per run, U₀ then held), a copy of the
    weight before the update, and with ``key_leak`` two products with C (d_in²) and C itself
    held per layer (read once from the editor's statistics cache; MEMIT's own C is shared).

    Args:
        every_n_steps: Measure after every n-th batch.
        default_cumulative_ratio: β of the principal space when no SphereProjectionCallback is
            listed (the paper's 0.5).
        key_leak: Measure ``key_leak`` for editors with preserved-key statistics (AlphaEdit,
            MEMIT).
        efficacy_threshold: The horizon ends at efficacy below this.
        drift_kl_threshold: The horizon ends at drift KL above this.
    """

    summary_key = "diagnostics"
    phase = "diagnostics"
    # The updates land in the live weights: measure those, not the evaluated ones.
    evaluates_model = False

    def __init__(
        self,
        every_n_steps: int = 1,
        default_cumulative_ratio: float = 0.5,
        key_leak: bool = True,
        efficacy_threshold: float = EFFICACY_THRESHOLD,
        drift_kl_threshold: float = DRIFT_KL_THRESHOLD,
    ) -> None:
        if (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ConfigError(
                f"{callback_flag(type(self).__name__, 'every_n_steps')} should be an integer ≥ 1, "
                f"got {every_n_steps!r}"
            )
        super().__init__(every_n_steps)
        checks = (
            ("default_cumulative_ratio", default_cumulative_ratio, "in [0, 1]", 0.0, 1.0),
            ("efficacy_threshold", efficacy_threshold, "in [0, 1]", 0.0, 1.0),
            ("drift_kl_threshold", drift_kl_threshold, "≥ 0", 0.0, float("inf")),
        )
        for flag, value, allowed, low, high in checks:
            # ``not low <= v <= high`` also rejects NaN.
            if isinstance(value, bool) or not low <= value <= high:
                raise ConfigError(
                    f"{callback_flag(type(self).__name__, flag)} should be {allowed}, got {value}"
                )
        self.default_cumulative_ratio = default_cumulative_ratio
        self.key_leak = key_leak
        self.efficacy_threshold = efficacy_threshold
        self.drift_kl_threshold = drift_kl_threshold
        #: One row per measurement: ``{"step", "edits", <tag>: value}``.
        self.history: list[dict[str, float]] = []
        #: ``{step: Evaluation}`` of every lifelong evaluation and drift measurement seen.
        self.evaluations: dict[int, Evaluation] = {}
        # (step, {name: weight before the update}) of the batch being applied.
        self._before: tuple[int, dict[str, torch.Tensor]] | None = None
        self._moments: dict[str, torch.Tensor] | None = None
        self._original_bases: dict[str, tuple[float, torch.Tensor]] = {}

    # -- what is measured against what ---------------------------------------------------------

    @staticmethod
    def sphere(trainer: Trainer) -> SphereProjectionCallback | None:
        """The first SphereProjectionCallback of the trainer, if any."""
        return next((c for c in trainer.callbacks if isinstance(c, SphereProjectionCallback)), None)

    def cumulative_ratio(self, trainer: Trainer) -> float:
        """β of the principal space: SPHERE's, else ``default_cumulative_ratio``."""
        sphere = self.sphere(trainer)
        return sphere.cumulative_ratio if sphere is not None else self.default_cumulative_ratio

    def key_moments(self, pl_module: EditingContext) -> dict[str, torch.Tensor]:
        """``{parameter name: C}``, the editor's preserved-key second moments (empty without
        ``key_leak`` or for editors without them). Read once, after the editor's setup."""
        if self._moments is None:
            editor = pl_module.editor
            moments: dict[int, torch.Tensor] = {}
            if self.key_leak and isinstance(editor, MEMIT) and editor.covariances is not None:
                moments = editor.covariances
            elif self.key_leak and isinstance(editor, AlphaEdit | MEMIT):
                # AlphaEdit keeps only the null-space projectors built from C; C itself comes
                # from the statistics cache its setup wrote, read on the unedited model (a
                # resumed run is edited here, and its keys would be other keys).
                with original_weights_swapped_in(pl_module):
                    moments = editor.second_moments(pl_module.model, pl_module.tokenizer)
            self._moments = {}
            if moments:
                spec = architecture_of(pl_module.model)
                self._moments = {spec.weight_name(layer): c for layer, c in moments.items()}
        return self._moments

    def original_basis(
        self, name: str, original: torch.Tensor, transposed: bool, ratio: float
    ) -> torch.Tensor:
        """U₀, the principal space of the unedited weight ``name`` (its neurons as SPHERE reads
        them: the stored rows where ``transposed``), found once per run and β."""
        held = self._original_bases.get(name)
        if held is None or held[0] != ratio:
            weight = original.mT if transposed else original
            held = (ratio, principal_directions(weight, ratio))
            self._original_bases[name] = held
        return held[1]

    # -- hooks ---------------------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pl_module.record_step_deltas = True

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> None:
        # The weights are still those before the batch; only a copy is taken here, so that the
        # measurement's time counts as this callback's, not as the edit's.
        step = trainer.global_step + 1
        self._before = None
        if not self.should_update(step) or not pl_module.editor_deltas:
            return
        with torch.no_grad():
            weights = {
                name: pl_module.edited_weight(name).detach().clone()
                for name in pl_module.editor_deltas
            }
        self._before = (step, weights)

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.collect_evaluations(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.collect_evaluations(trainer, pl_module, validation=True)

    # -- measurement ---------------------------------------------------------------------------

    @override
    def measure(self, trainer: Trainer, pl_module: EditingContext) -> dict[str, float]:
        self.collect_evaluations(trainer, pl_module)
        step = trainer.global_step
        before = self._before[1] if self._before is not None and self._before[0] == step else {}
        self._before = None
        sphere = self.sphere(trainer)
        ratio = self.cumulative_ratio(trainer)
        values: dict[str, float] = {}
        with torch.no_grad():
            for name in pl_module.edited_parameter_names:
                layer = short_name(name)
                weight = pl_module.edited_weight(name).detach()
                original = pl_module.original_weights[name].to(weight.device)
                accumulated = weight.to(torch.float32) - original.to(torch.float32)
                values[f"{DIAG}weight_norm/{layer}"] = _norm(weight)
                values[f"{DIAG}update_norm/{layer}"] = _norm(accumulated)
                applied = pl_module.applied_deltas.get(name)
                raw = pl_module.editor_deltas.get(name)
                if name not in before or applied is None or raw is None:
                    continue
                weight_before = before[name]
                applied = applied.to(weight.device)
                values[f"{DIAG}delta_ratio/{layer}"] = _norm(applied) / max(
                    _norm(weight_before), 1e-30
                )
                use_original = sphere is not None and sphere.reference == "original"
                reference = original if use_original else weight_before
                raw = raw.to(weight.device)
                transposed = sphere is not None and sphere.stored_transposed(pl_module, name)
                if transposed:  # its neurons: Conv1D's stored rows
                    raw, reference, accumulated = raw.mT, reference.mT, accumulated.mT
                original_basis = self.original_basis(name, original, transposed, ratio)
                # Against the unedited weight, U is U₀, held: no eigendecomposition per batch.
                basis = original_basis if use_original else principal_directions(reference, ratio)
                values[f"{DIAG}principal_share/{layer}"] = float(share_in(raw, basis))
                values[f"{DIAG}principal_share_random/{layer}"] = basis.shape[1] / len(basis)
                values[f"{DIAG}update_principal_share/{layer}"] = float(
                    share_in(accumulated, basis)
                )
                values[f"{DIAG}original_principal_share/{layer}"] = float(
                    share_in(accumulated, original_basis)
                )
                values[f"{DIAG}principal_overlap/{layer}"] = float(
                    subspace_overlap(original_basis, basis)
                )
                moment = self.key_moments(pl_module).get(name)
                if moment is not None:
                    values[f"{DIAG}key_leak/{layer}"] = float(
                        key_leak(applied, weight_before, moment.to(weight.device))
                    )
            if before:
                metrics = pl_module.editor.last_metrics
                values.update(
                    {f"{DIAG}{k}": float(metrics[k]) for k in _VALUE_NORMS if k in metrics}
                )
        self.history.append({"step": step, "edits": self.edits_at(trainer, step), **values})
        return values

    # -- the usable horizon --------------------------------------------------------------------

    @staticmethod
    def edits_at(trainer: Trainer, step: int) -> int:
        """Edits applied after ``step`` batches."""
        data = trainer.datamodule
        return edits_after(step, data.edits_per_step, len(data.requests))

    def _record(
        self, step: int, edits: int, efficacy: float | None = None, drift_kl: float | None = None
    ) -> None:
        held = self.evaluations.get(step, Evaluation(edits))
        self.evaluations[step] = Evaluation(
            edits,
            held.efficacy if efficacy is None else efficacy,
            held.drift_kl if drift_kl is None else drift_kl,
        )

    def collect_evaluations(
        self, trainer: Trainer, pl_module: EditingContext, validation: bool = False
    ) -> None:
        """Record the latest drift KL of every DriftCallback and, after a validation, the
        lifelong efficacy it logged (full or sampled)."""
        drift: dict[int, float] = {}  # the largest KL of any drift text, per step
        for callback in trainer.callbacks:
            if isinstance(callback, DriftCallback) and callback.latest_step:
                if callback.kl is not None:
                    step = callback.latest_step
                    drift[step] = max(drift.get(step, callback.kl), callback.kl)
        for step, kl in drift.items():
            self._record(step, self.edits_at(trainer, step), drift_kl=kl)
        if not validation:
            return
        step = trainer.global_step
        sampled = pl_module.sampled_edit_metrics
        if pl_module.evaluated_at_current_step:
            efficacy = pl_module.final_edit_metrics.get("efficacy")
        elif sampled and sampled[-1].get("step") == step:
            efficacy = sampled[-1].get("efficacy")
        else:
            return
        if efficacy is not None and step > 0:
            self._record(step, pl_module.num_edited(), efficacy=efficacy)

    def horizon(self, trainer: Trainer, pl_module: EditingContext) -> UsableHorizon:
        """The usable horizon over the evaluations recorded so far."""
        return usable_horizon(
            self.evaluations.values(),
            pl_module.num_edited(),
            self.efficacy_threshold,
            self.drift_kl_threshold,
        )

    # -- summary and state ---------------------------------------------------------------------

    @override
    def summary(self, trainer: Trainer, pl_module: EditingContext) -> dict[str, Any]:
        self.collect_evaluations(trainer, pl_module)
        sphere = self.sphere(trainer)
        tags = list(dict.fromkeys(tag for row in self.history for tag in row))
        return {
            "cumulative_ratio": {
                "value": self.cumulative_ratio(trainer),
                "from": "SphereProjectionCallback" if sphere is not None else "default",
            },
            "history": {tag: [row.get(tag) for row in self.history] for tag in tags},
            "final": self.latest,
            "final_step": self.latest_step,
            "evaluations": [
                {"step": step, **vars(evaluation)}
                for step, evaluation in sorted(self.evaluations.items())
            ],
            "usable_horizon": self.horizon(trainer, pl_module).as_dict(),
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        evaluations = [{"step": s, **vars(e)} for s, e in sorted(self.evaluations.items())]
        return {**super().state_dict(), "history": self.history, "evaluations": evaluations}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = [dict(row) for row in state_dict.get("history", [])]
        self.evaluations = {
            int(row["step"]): Evaluation(int(row["edits"]), row["efficacy"], row["drift_kl"])
            for row in state_dict.get("evaluations", [])
        }


def _norm(tensor: torch.Tensor) -> float:
    """‖tensor‖_F, accumulated in float64."""
    return float(torch.linalg.vector_norm(tensor, dtype=torch.float64))
