"""The LightningModule: one training step writes one batch of edit requests into the model."""

from __future__ import annotations

import copy
import hashlib
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import Metric
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from typing_extensions import override

from sphere_lightning.context import StepDecision, StepPolicy, weights_swapped
from sphere_lightning.data.requests import EditBatch, EditRequest
from sphere_lightning.deltas import DeltaPipeline, NonFiniteDeltaError, check_delta
from sphere_lightning.distributed import Collective, EditDDPStrategy
from sphere_lightning.editors.base import DeltaFn, Editor
from sphere_lightning.errors import ConfigError
from sphere_lightning.evaluation import ALL_EDIT_METRICS, METRIC_FAMILIES, score_continuations
from sphere_lightning.fluency import FluencyProtocol, check_fluency_protocol, measure_fluency
from sphere_lightning.functional.sampling import mean_ci95_half_width, sample_indices
from sphere_lightning.horizon import edits_after
from sphere_lightning.interrupts import sigint_deferred
from sphere_lightning.models.architectures import architecture_of, linear_weight
from sphere_lightning.models.loading import (
    DeviceMap,
    load_model,
    needs_conversion,
    prepare,
    resolve_model_path,
)
from sphere_lightning.tags import EDIT, EDIT_PRE, EDITOR, NUM_EDITED, TIME
from sphere_lightning.timing import add_seconds

#: Version of the layout of ``checkpoint["sphere_lightning"]``.
CHECKPOINT_FORMAT = 1


class CheckpointMismatchError(ConfigError):
    """A checkpoint (``--ckpt_path``) that does not belong to this run's base model, editor or
    edited layers."""


def checkpoint_meta(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The ``sphere_lightning`` entry of a checkpoint; :class:`CheckpointMismatchError` if it has
    none of this format (a checkpoint of another program or version)."""
    meta = checkpoint.get("sphere_lightning")
    if not isinstance(meta, Mapping) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(
            "The checkpoint (`--ckpt_path`) was not written by this version of "
            f"sphere_lightning (no `sphere_lightning` entry of format {CHECKPOINT_FORMAT})"
        )
    return dict(meta)


def base_model_fingerprint(model: torch.nn.Module, names: list[str]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the parameters ``names`` of the
    (unedited) model: two base models share it only if the weights an edit touches are equal."""
    digest = hashlib.sha256()
    for name in sorted(names):
        tensor = model.get_parameter(name).detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _without_nan(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each metric's per-request scores without NaN (a request with no prompt of that kind);
    metrics left with no score are dropped."""
    kept = {name: values[~values.isnan()] for name, values in scores.items()}
    return {name: values for name, values in kept.items() if len(values)}


class SampleMoments(Metric):
    """Σx, Σx² and the count of the non-NaN values seen (NaN: a request with no prompt of that
    kind); across processes each is summed, so the mean and the spread are those of every
    rank's share together."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("total", "total_sq", "count"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().to(device=self.total.device, dtype=torch.float64)
        values = values[~values.isnan()]
        self.total += values.sum()
        self.total_sq += values.square().sum()
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        """``[Σx, Σx², n]`` (float64)."""
        return torch.stack([self.total, self.total_sq, self.count])


def check_strategy(strategy: object) -> None:
    """Refuse a multi-process strategy other than :class:`EditDDPStrategy`: Lightning's own DDP
    wraps the model to average gradients, and editing has none to average."""
    if isinstance(strategy, ParallelStrategy) and not isinstance(strategy, EditDDPStrategy):
        raise ConfigError(
            f"`trainer.strategy` {type(strategy).__name__} is not supported for editing: use "
            "`edit_ddp` (Lightning's DDP that splits each batch's requests across the "
            "processes and applies the same ΔW on every one), e.g. `--trainer.strategy edit_ddp "
            "--trainer.devices 2`"
        )


class DeltaApplier(torch.optim.Optimizer):
    """The "optimizer" of an editing run: its ``step`` applies the module's pending ΔW.

    Lightning calls ``on_before_optimizer_step`` on every callback before the deltas are
    applied; the ``after_loop`` delta transforms then run in
    :meth:`EditingModule.apply_pending_deltas`.
    """

    def __init__(self, module: EditingModule) -> None:
        params = [module.model.get_parameter(n) for n in module.edited_parameter_names]
        super().__init__(params, defaults={})
        self._module = module

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch signature
        if closure is not None:
            with torch.enable_grad():
                closure()
        self._module.apply_pending_deltas()


class EditingModule(LightningModule):
    """Sequential knowledge editing of a causal LM.

    Callbacks see it through :class:`~sphere_lightning.context.EditingContext`, which it
    implements. Each step runs the trainer's delta transforms through one
    :class:`~sphere_lightning.deltas.DeltaPipeline`, built in :meth:`setup`, and logs the scalars
    they return with the step's own. A :class:`~sphere_lightning.context.StepPolicy` among the
    callbacks (the HE alarm) is asked after each attempt of a step whether it stands; the module
    undoes the step (edited weights and editor state, as copied before it) and edits the batch
    again or leaves it out, as the policy decides.

    Edit metrics follow two protocols, each under its own prefix:

    - ``edit/*``, the lifelong protocol: after all edits so far, over all facts edited so far
      (at ``val_check_interval`` and after the last batch; ``edit_pre/*`` and ``edit/*`` at step
      0 hold the pre-edit values over every fact the run will edit);
    - ``edit_batch/*``: right after each batch, over that batch only.

    Args:
        editor: Computes ΔW for each batch (``class_path`` of an :class:`Editor`).
        model: ``smollm2-135m`` (embedded), a ``.gguf`` file, a local folder or a hub id.
        dtype: Weight dtype: ``float32``, ``bfloat16`` or ``float16``.
        device_map: Place a model too big for one device across several, with
            transformers/accelerate: ``auto`` or ``{module name: device}``. Lightning then
            leaves the model where it was placed (one process: ``trainer.devices: 1``); every
            editor, transform and callback works on each layer's own device. ``null``
            (default): the whole model on the trainer's device.
        score_batch_size: Distinct prompts per forward pass when scoring edit metrics (sequences
            per pass for fluency generations).
        batch_metrics: Score each batch right after it is applied (``edit_batch/*``).
        fluency_prompts: Fluency (ROME/MEMIT's weighted 2/3-gram entropy of generated text, ×100
            as their tables report it) is measured from the prompts of the first this-many facts
            of the run, before the first edit (``edit_pre/fluency``) and in the lifelong
            protocol (``edit/fluency``, over the facts edited so far). 0 turns it off.
        fluency_protocol: ``rome`` (ROME's seeded top-5 samples from each fact's
            ``generation_prompts``, 100 tokens with the prompt), ``greedy`` (greedy
            continuations of the edit prompts), or ``auto``: ``rome`` when the facts carry
            generation prompts (ROME's CounterFact layout), else ``greedy``.
        fluency_max_new_tokens: Tokens generated per edit prompt by the ``greedy`` protocol.
        fluency_seed: Seed of the ``rome`` protocol's sampling (the same draws at every
            evaluation, so pre- and post-edit values differ by the model only).
        eval_sample_size: Score an intermediate lifelong evaluation (``edit/*`` at
            ``val_check_interval`` before the last batch) on a simple random sample of this many
            of the facts edited so far, and the pre-edit evaluation on step 0's sample of the
            facts the run will edit; ``null`` (default) scores every one. Fluency is measured
            on the sample too. The final evaluation (after the last batch, at ``max_steps``, and
            ``validate``/``test``) always scores every edited fact. A sampled value is logged
            with ``edit/<metric>_ci95``, the half-width of its 95 % confidence interval (normal
            approximation with the sample standard deviation and the finite-population
            correction, :func:`~sphere_lightning.functional.sampling.mean_ci95_half_width`),
            and ``edit/num_evaluated`` is the sample's size (``edit/num_edited`` the number
            edited). For a 10,000-edit run, 1,000 keeps the half-width of a 0/1 metric below
            ~0.03.
        eval_sample_seed: Seed of the sample. The sample at a step depends on this seed and the
            step only (not on the global RNG state), so a resumed run and every process of a
            data-parallel run score the same facts.
    """

    def __init__(
        self,
        editor: Editor,
        model: str = "smollm2-135m",
        dtype: str = "float32",
        device_map: DeviceMap | None = None,
        score_batch_size: int = 64,
        batch_metrics: bool = True,
        fluency_prompts: int = 16,
        fluency_max_new_tokens: int = 50,
        fluency_protocol: FluencyProtocol = "auto",
        fluency_seed: int = 0,
        eval_sample_size: int | None = None,
        eval_sample_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["editor"])
        self.automatic_optimization = False
        self.editor = editor
        self.model_name = model
        self.dtype_name = dtype
        self.device_map = device_map
        self.score_batch_size = score_batch_size
        self.batch_metrics = batch_metrics
        if fluency_prompts < 0:
            raise ConfigError(f"`model.fluency_prompts` should be ≥ 0, got {fluency_prompts}")
        if fluency_max_new_tokens < 1:
            raise ConfigError(
                f"`model.fluency_max_new_tokens` should be ≥ 1, got {fluency_max_new_tokens}"
            )
        check_fluency_protocol(fluency_protocol)
        if fluency_seed < 0:
            raise ConfigError(f"`model.fluency_seed` should be ≥ 0, got {fluency_seed}")
        if eval_sample_size is not None and (
            isinstance(eval_sample_size, bool)
            or not isinstance(eval_sample_size, int)
            or eval_sample_size < 1
        ):
            raise ConfigError(
                f"`model.eval_sample_size` should be an integer ≥ 1 or null, got "
                f"{eval_sample_size!r}"
            )
        if eval_sample_seed < 0:
            raise ConfigError(f"`model.eval_sample_seed` should be ≥ 0, got {eval_sample_seed}")
        self.eval_sample_size = eval_sample_size
        self.eval_sample_seed = eval_sample_seed
        self.fluency_prompts = fluency_prompts
        self.fluency_max_new_tokens = fluency_max_new_tokens
        self.fluency_protocol = fluency_protocol
        self.fluency_seed = fluency_seed
        #: The protocol the last fluency measurement used (``rome``/``greedy``; None before).
        self.fluency_protocol_used: str | None = None
        self.final_edit_metrics: dict[str, float] = {}
        #: Every sampled intermediate evaluation: ``{"step", "num_edited", "num_evaluated",
        #: <metric>, <metric>_ci95}`` (``summary.json``'s ``edit.sampled``).
        self.sampled_edit_metrics: list[dict[str, float]] = []
        self.model = None
        self.tokenizer = None
        self.pending_deltas: dict[str, torch.Tensor] = {}
        # Off by default: the editor's ΔW would otherwise be kept beside the transformed one.
        self.record_step_deltas = False
        self.editor_deltas: dict[str, torch.Tensor] = {}
        self.applied_deltas: dict[str, torch.Tensor] = {}
        #: Added to SPHERE's α while a step policy has a step edited again (0 otherwise).
        self.suppression_increase = 0.0
        #: The trainer's delta transforms, in order (built in :meth:`setup`).
        self.delta_pipeline = DeltaPipeline()
        #: The trainer's step policy, if any (found in :meth:`setup`).
        self.step_policy: StepPolicy | None = None
        self.step_metrics: dict[str, float] = {}
        self.original_weights: dict[str, torch.Tensor] = {}
        self.pre_edit_metrics: dict[str, float] = {}
        self.phase_seconds: dict[str, float] = {}
        #: Every scalar sent to the loggers, ``{tag: {step: value}}`` (a tag logged twice at a
        #: step keeps its last value); kept in checkpoints, so a resumed run keeps its history.
        self.scalars: dict[str, dict[int, float]] = {}
        #: ``{step: time.time()}`` of the last scalars logged at each step.
        self.step_wall_time: dict[int, float] = {}
        #: ``time.time()`` when the run was set up first (a resumed run keeps its own).
        self.start_wall_time: float | None = None
        # NaN (a request with no prompt of a kind) is left out of the mean; across processes
        # torchmetrics sums the values, squares and counts of every rank's share.
        self._metrics = torch.nn.ModuleDict({k: SampleMoments() for k in ALL_EDIT_METRICS})
        #: The unedited model's argmax tokens of each (prompt, answer) scored so far
        #: (:meth:`unedited_predictions`); recomputed after a resume.
        self._unedited_predictions: dict[tuple[str, str], tuple[int, ...]] = {}
        #: Positions (edit order) of the facts the running evaluation scores; None: all edited.
        self._eval_positions: set[int] | None = None
        self._evaluated_step = -1
        #: :func:`base_model_fingerprint` of the unedited model (set when it loads).
        self.base_fingerprint: str | None = None
        # ``evaluated_weights``: whether they are swapped in now, and the last ones computed
        # with the versions of the live weights they were computed from.
        self._evaluating = False
        self._evaluated_cache: tuple[tuple[int, ...], dict[str, torch.Tensor]] | None = None
        # Checkpoints hold the edited parameters only; the rest comes from the base model.
        self.strict_loading = False

    # -- model -------------------------------------------------------------------------------

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        if needs_conversion(self.model_name):
            # A GGUF file is converted into the model cache once, by rank 0.
            self.collective.run_first_on_rank_zero(lambda: resolve_model_path(self.model_name))
        self.attach_model(*load_model(self.model_name, self.dtype_name, self.device_map))

    def attach_model(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Edit ``model``, already built in memory, instead of loading ``model.model``.

        For models that exist only in memory (built from a config with random weights, as
        ``benchmarks/gpu_check.py`` does at Llama-3-8B shape): call before ``trainer.fit``, and
        :meth:`configure_model` keeps it. ``model.model`` then only names it in checkpoints.
        The model is put in editing state (eval, frozen, pad token set) and its edited
        weights are recorded as the originals.
        """
        prepare(model, tokenizer)
        self.model, self.tokenizer = model, tokenizer
        architecture_of(self.model).check_layers(
            self.model, self.editor.layers, flag="model.editor.init_args.layers"
        )
        names = self.edited_parameter_names
        self.original_weights = {name: self.edited_weight(name).detach().clone() for name in names}
        self.base_fingerprint = base_model_fingerprint(self.model, names)

    @override
    def _apply(self, fn, recurse: bool = True):
        # A model placed with ``device_map`` stays where it was put: Lightning's move of the
        # module to the trainer's device (``.to``) reaches the metrics only.
        if self.device_map is None or self.model is None or not recurse:
            return super()._apply(fn, recurse)
        model, self._modules["model"] = self._modules["model"], None  # skipped by _apply
        try:
            return super()._apply(fn, recurse)
        finally:
            self._modules["model"] = model

    @override
    def train(self, mode: bool = True) -> EditingModule:
        # Editing never wants dropout: the LM stays in eval mode whatever Lightning does.
        super().train(mode)
        if self.model is not None:
            self.model.eval()
        return self

    @property
    def collective(self) -> Collective:
        """The processes of the run (one unless the strategy is ``edit_ddp``)."""
        return Collective.of(self._trainer)

    @property
    def edited_parameter_names(self) -> list[str]:
        """Names of the parameters the editor changes."""
        return self.editor.edited_parameter_names(self.model)

    @property
    def editor_class_path(self) -> str:
        """``module.Class`` of the editor, as a config's ``class_path`` names it."""
        return f"{type(self.editor).__module__}.{type(self.editor).__name__}"

    def edited_weight(self, name: str) -> torch.Tensor:
        """The current weight of an edited parameter, as an (out × in) view."""
        return linear_weight(self.model.get_submodule(name.removesuffix(".weight")))

    # -- editing -----------------------------------------------------------------------------

    @override
    def configure_optimizers(self) -> DeltaApplier:
        return DeltaApplier(self)

    @override
    def setup(self, stage: str) -> None:
        if self.start_wall_time is None:  # a resumed run's comes from its checkpoint
            self.start_wall_time = time.time()
        check_strategy(self.trainer.strategy)
        if self.device_map is not None and self.trainer.world_size > 1:
            raise ConfigError(
                "`model.device_map` places one model across devices and `trainer.devices` "
                f"asks for {self.trainer.world_size} processes: use one or the other"
            )
        self.delta_pipeline = DeltaPipeline.of(self.trainer.callbacks)
        policies = [c for c in self.trainer.callbacks if isinstance(c, StepPolicy)]
        if len(policies) > 1:
            names = ", ".join(type(p).__name__ for p in policies)
            raise ConfigError(f"`trainer.callbacks` holds more than one step policy ({names})")
        self.step_policy = policies[0] if policies else None

    @override
    def on_fit_start(self) -> None:
        start = time.perf_counter()
        collective = self.collective
        self.editor.collective = collective
        self.editor.progress = self.editor.progress and collective.rank == 0
        # Rank 0 computes the statistics and writes them to the cache; the others then read it.
        collective.run_first_on_rank_zero(lambda: self.editor.setup(self.model, self.tokenizer))
        self.editor.synchronise(collective)
        self._add_time("setup", start, log=False)

    @override
    def on_train_start(self) -> None:
        if self.global_step == 0 and not self.pre_edit_metrics:
            start = time.perf_counter()
            everything = self.trainer.datamodule.requests
            # Like an intermediate evaluation, the pre-edit one scores the seeded sample of
            # step 0 (of the facts the run will edit) when ``eval_sample_size`` is set.
            positions = sample_indices(
                len(everything), self.eval_sample_size, self.eval_sample_seed, 0
            ).tolist()
            requests = [everything[p] for p in positions]
            scores = self.edit_scores(requests)
            self.pre_edit_metrics = {
                k: float(v.nanmean()) for k, v in scores.items() if not v.isnan().all()
            }
            intervals = {}
            if len(requests) < len(everything):
                for name, values in scores.items():
                    values = values[~values.isnan()].double()
                    ci = mean_ci95_half_width(
                        float(values.sum()), float(values.square().sum()), len(values),
                        len(everything),
                    )  # fmt: skip
                    if ci == ci:
                        intervals[f"{name}_ci95"] = ci
            fluency = self.fluency(requests)
            if fluency is not None:
                self.pre_edit_metrics["fluency"] = fluency
            self._add_time("evaluation", start, log=False)
            rank_zero_info(
                f"Pre-edit metrics over {len(requests)} of {len(everything)} requests: "
                f"{self.pre_edit_metrics}"
            )
            metrics = {f"{EDIT_PRE}{k}": v for k, v in self.pre_edit_metrics.items()}
            metrics.update({f"{EDIT}{k}": v for k, v in self.pre_edit_metrics.items()})
            metrics.update({f"{EDIT_PRE}{k}": v for k, v in intervals.items()})
            metrics.update({f"{EDIT}{k}": v for k, v in intervals.items()})
            metrics[f"{EDIT_PRE}num_evaluated"] = float(len(requests))
            self.log_now(metrics)

    @override
    def training_step(self, batch: EditBatch, batch_idx: int) -> None:
        """Edit one batch; with a step policy, ask it after each attempt whether the step stands
        and undo it, then edit the batch again or leave it out, as it decides (the policy bounds
        its retries)."""
        expected = self.global_step * self.trainer.datamodule.edits_per_step
        if batch.positions[0] != expected:
            raise RuntimeError(
                f"Step {self.global_step} received the requests from position "
                f"{batch.positions[0]} of the edit order, expected {expected}: the data and "
                "the applied batches are out of step (a request would be edited twice or "
                "skipped)"
            )
        policy = self.step_policy
        before = self._copy_step_state() if policy is not None and policy.undoes_steps else None
        decision, attempt = StepDecision(), 0
        while True:
            self._edit_batch(batch, counted=attempt > 0, increase=decision.suppression_increase)
            if policy is None:
                return
            decision = policy.review_step(self, attempt)
            if decision.action == "accept":
                return
            if before is None:
                raise RuntimeError(
                    f"{type(policy).__name__} decided `{decision.action}` on step "
                    f"{self.global_step}, but does not undo steps (`undoes_steps` is False)"
                )
            self._restore_step_state(before)
            if decision.action == "skip":
                return
            attempt += 1

    def _edit_batch(self, batch: EditBatch, counted: bool, increase: float) -> None:
        """Compute, transform and apply the batch's ΔW, update the editor's state, and log the
        step's scalars. ``counted``: a retry of a step Lightning has already counted (its ΔW is
        applied without another optimizer step); ``increase``: the retry's raise of SPHERE's α."""
        self.editor_deltas, self.applied_deltas = {}, {}
        self.suppression_increase = increase
        try:
            start = time.perf_counter()
            transform = self._in_loop_transform()
            if self.editor.transform_in_loop:
                deltas = self.editor.compute_deltas(
                    self.model, self.tokenizer, batch.requests, transform=transform
                )
            else:
                # An editor without a layer loop: its in-loop transforms run here, layer by layer.
                raw = self.editor.compute_deltas(self.model, self.tokenizer, batch.requests)
                deltas = {name: transform(name, delta) for name, delta in raw.items()}
            self._add_time("compute_deltas", start)
            self.pending_deltas = deltas
            # The step lands as a whole: a Ctrl-C from here on is delivered once the weights and
            # the editor's state are both updated (before here, nothing in the model changed).
            with sigint_deferred():
                start = time.perf_counter()
                if counted:
                    self.apply_pending_deltas()
                else:
                    self.optimizers().step()  # Lightning counts the step: global_step + 1
                self._add_time("transform_and_apply", start)
                start = time.perf_counter()
                self.editor.after_apply(self.model, self.tokenizer, batch.requests)
                self._add_time("after_apply", start)
        finally:
            self.suppression_increase = 0.0
        self.pending_deltas = {}
        if self.batch_metrics:
            start = time.perf_counter()
            for name, values in _without_nan(self.edit_scores(batch.requests)).items():
                self.step_metrics[f"edit_batch/{name}"] = float(values.mean())
            self._add_time("batch_evaluation", start)
        self.step_metrics.update({f"{EDITOR}{k}": v for k, v in self.editor.last_metrics.items()})
        self.step_metrics.update({f"{TIME}{k}": v for k, v in self.editor.last_timings.items()})
        self.step_metrics[NUM_EDITED] = float(batch.positions[-1] + 1)
        self.log_now(self.step_metrics)
        self.step_metrics = {}

    def _copy_step_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The edited weights and the editor's sequential state, copied before a step that a
        step policy may have undone."""
        weights = {
            name: self.edited_weight(name).detach().clone() for name in self.edited_parameter_names
        }
        return weights, copy.deepcopy(self.editor.state_dict())

    def _restore_step_state(self, state: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> None:
        """Put back the edited weights and the editor's state of :meth:`_copy_step_state`, bit
        for bit (all of it, also when Ctrl-C arrives meanwhile)."""
        weights, editor_state = state
        with torch.no_grad(), sigint_deferred():
            for name, saved in weights.items():
                self.edited_weight(name).copy_(saved)
            # A fresh copy each time: load_state_dict may keep references later steps mutate.
            self.editor.load_state_dict(copy.deepcopy(editor_state))

    @override
    def on_train_batch_end(self, outputs: Any, batch: EditBatch, batch_idx: int) -> None:
        # After the callbacks' hooks (Lightning calls the module's last).
        self.editor_deltas, self.applied_deltas = {}, {}

    def _in_loop_transform(self) -> DeltaFn:
        """One function ``(name, ΔW) -> ΔW`` that checks the editor's ΔW, then runs it through
        the pipeline's ``in_loop`` transforms, checking each one's output and keeping their
        scalars for the step (the editor calls it per layer, inside its loop, before the
        layer's update is placed)."""

        def transform(name: str, delta: torch.Tensor) -> torch.Tensor:
            editor = type(self.editor).__name__
            if name not in self.original_weights:
                raise KeyError(f"{editor} returned ΔW for {name!r}, not an edited parameter")
            try:
                check_delta(delta, name, self.edited_weight(name).shape, editor)
            except NonFiniteDeltaError as error:
                raise NonFiniteDeltaError(f"Step {self.global_step}: {error}") from None
            if self.record_step_deltas:  # summed: ROME calls this once per request
                held = self.editor_deltas.get(name)
                self.editor_deltas[name] = delta if held is None else held + delta
            delta, metrics = self.delta_pipeline.in_loop(name, delta, self)
            self.step_metrics.update(metrics)
            return delta

        return transform

    def apply_pending_deltas(self) -> None:
        """Run the pending ΔW through the ``after_loop`` transforms, then add each to its
        weight: all of them, or none if any is invalid."""
        if self.pending_deltas:
            self.pending_deltas, metrics = self.delta_pipeline.whole_batch(
                "after_loop", self.pending_deltas, self
            )
            self.step_metrics.update(metrics)
        for name, delta in self.pending_deltas.items():
            if name not in self.original_weights:
                raise KeyError(f"ΔW for {name!r}, which is not an edited parameter")
            try:
                check_delta(delta, name, self.edited_weight(name).shape, "The ΔW to apply")
            except NonFiniteDeltaError as error:
                raise NonFiniteDeltaError(f"Step {self.global_step}: {error}") from None
        collective = self.collective
        with torch.no_grad():
            for name, delta in self.pending_deltas.items():
                weight = self.edited_weight(name)
                delta = delta.to(device=weight.device, dtype=weight.dtype)
                # Every process applies rank 0's ΔW: the weights stay bit-identical across ranks.
                weight.add_(collective.broadcast_(delta))
        if self.record_step_deltas:
            self.applied_deltas = dict(self.pending_deltas)

    # -- evaluation --------------------------------------------------------------------------

    @contextmanager
    def evaluated_weights(self) -> Iterator[None]:
        """Within the block the edited weights are the ones evaluations see; on exit (also on
        error) the live weights are put back bit for bit.

        Without delta transforms of stage ``evaluation`` these are the live weights and nothing
        changes. With them, each edited weight holds W₀ + T(W − W₀): the total update since the
        unedited weight W₀, through every ``evaluation`` transform in ``trainer.callbacks``
        order (:meth:`~sphere_lightning.deltas.DeltaTransform.apply_to_batch`),
        while editing goes on from the plain W. They are computed once per state of the live
        weights (the transforms' scalars are logged then, at ``global_step``) and kept, so
        every evaluation of a step reuses them. Nested blocks swap once.
        """
        if not self.delta_pipeline.stage("evaluation") or self._evaluating:
            yield
            return
        names = self.edited_parameter_names
        evaluated = self._compute_evaluated_weights(names)
        self._evaluating = True
        try:
            with weights_swapped(self, evaluated):
                yield
        finally:
            self._evaluating = False
            # The copies back bump the versions; the contents are those cached.
            self._evaluated_cache = (self._weight_versions(names), evaluated)

    def _weight_versions(self, names: list[str]) -> tuple[int, ...]:
        """Version counters of the edited parameters: any in-place change (an applied step, a
        rollback, a loaded checkpoint) moves them."""
        return tuple(self.model.get_parameter(name)._version for name in names)

    def _compute_evaluated_weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        """``{name: W₀ + T(W − W₀)}`` for the live weights W (cached, see
        :meth:`evaluated_weights`)."""
        versions = self._weight_versions(names)
        if self._evaluated_cache is not None and self._evaluated_cache[0] == versions:
            return self._evaluated_cache[1]
        self._evaluated_cache = None  # let the old tensors go before the new ones are made
        # In at least float32 (the official code's precision), also for a bfloat16 model.
        totals = {}
        for name in names:
            weight = self.edited_weight(name).detach()
            dtype = torch.promote_types(weight.dtype, torch.float32)
            original = self.original_weights[name].to(weight.device, dtype)
            totals[name] = weight.to(dtype) - original
        totals, produced = self.delta_pipeline.whole_batch("evaluation", totals, self)
        collective = self.collective
        evaluated = {}
        for name in names:
            weight = self.edited_weight(name)
            total = totals[name].to(weight.device)
            original = self.original_weights[name].to(weight.device, total.dtype)
            # Every process evaluates rank 0's weights, as every one applies rank 0's ΔW.
            evaluated[name] = collective.broadcast_((original + total).to(weight.dtype))
        if produced:
            self.log_now(produced)
        return evaluated

    def edit_scores(self, requests: list[EditRequest]) -> dict[str, torch.Tensor]:
        """Per-request efficacy, generalization and specificity under the current weights
        (each process scores its share of ``requests``; every process returns all rows), in
        the :meth:`evaluated_weights`."""
        with self.evaluated_weights():
            return self.collective.map(self._local_edit_scores, requests)

    def _local_edit_scores(self, requests: list[EditRequest]) -> dict[str, torch.Tensor]:
        family = METRIC_FAMILIES[self.trainer.datamodule.metric_family]
        if not requests:
            return {name: torch.empty(0) for name in family.names}
        extra = {"unedited": self.unedited_predictions} if family.needs_unedited else {}
        return family.scores(
            self.model,
            self.tokenizer,
            requests,
            batch_size=self.score_batch_size,
            progress=self.show_progress,
            desc=f"Edit metrics ({len(requests)} facts)",
            **extra,
        )

    @property
    def show_progress(self) -> bool:
        """Whether long work shows a progress bar: the trainer has one, on the main process."""
        return self.trainer.progress_bar_callback is not None and self.trainer.is_global_zero

    def unedited_predictions(
        self, prompts: Sequence[str], answers: Sequence[str]
    ) -> list[tuple[int, ...]]:
        """The unedited model's argmax token at each answer position of each (prompt, answer),
        teacher forced (KnowEdit's locality compares the edited model's with them).

        Computed once per pair, with every edited weight set back to W₀ for the time it takes
        (:meth:`unedited_weights`), and kept.
        """
        memo = self._unedited_predictions
        missing = [
            pair for pair in dict.fromkeys(zip(prompts, answers, strict=True)) if pair not in memo
        ]
        if missing:
            with self.unedited_weights():
                scores = score_continuations(
                    self.model,
                    self.tokenizer,
                    [p for p, _ in missing],
                    [a for _, a in missing],
                    self.score_batch_size,
                    progress=self.show_progress,
                    desc=f"Unedited predictions ({len(missing)} probes)",
                    predictions=True,
                )
            memo.update(zip(missing, scores.predicted, strict=True))
        return [memo[pair] for pair in zip(prompts, answers, strict=True)]

    @contextmanager
    def unedited_weights(self) -> Iterator[None]:
        """Within the block every edited weight is its unedited W₀; on exit (also on error) the
        weights there before are put back bit for bit."""
        with weights_swapped(self, self.original_weights):
            yield

    def fluency(self, requests: list[EditRequest]) -> float | None:
        """Fluency (×100) of the first ``fluency_prompts`` requests under ``fluency_protocol``;
        records the protocol used in ``fluency_protocol_used``."""
        if self.fluency_prompts == 0 or not requests:
            return None
        with self.evaluated_weights():
            score, self.fluency_protocol_used = measure_fluency(
                self.model,
                self.tokenizer,
                requests[: self.fluency_prompts],
                self.fluency_protocol,
                seed=self.fluency_seed,
                greedy_max_new_tokens=self.fluency_max_new_tokens,
                batch_size=self.score_batch_size,
            )
        return score

    def num_edited(self) -> int:
        """How many requests have been written into the model so far."""
        data = self.trainer.datamodule
        return edits_after(self.global_step, data.edits_per_step, len(data.requests))

    def is_final_evaluation(self) -> bool:
        """Whether a validation now is the run's final one: every request applied, the last
        step of ``max_steps``, the trainer stopping, or outside ``fit`` (``validate``)."""
        trainer = self.trainer
        return (
            trainer.state.fn != TrainerFn.FITTING
            or self.num_edited() >= len(trainer.datamodule.requests)
            or 0 <= trainer.max_steps <= self.global_step
            or trainer.should_stop
        )

    def evaluation_sample(self, final: bool) -> torch.Tensor:
        """Positions (edit order, sorted) of the facts an evaluation now scores: every edited
        fact when ``final`` or without ``eval_sample_size``, else the seeded sample of this step
        (:func:`~sphere_lightning.functional.sampling.sample_indices`)."""
        size = None if final else self.eval_sample_size
        return sample_indices(self.num_edited(), size, self.eval_sample_seed, self.global_step)

    def _start_evaluation(self, final: bool) -> None:
        positions = self.evaluation_sample(final)
        sampled = len(positions) < self.num_edited()
        self._eval_positions = set(positions.tolist()) if sampled else None

    def _evaluate(self, batch: EditBatch) -> None:
        num, sample = self.num_edited(), self._eval_positions
        edited = [
            r
            for r, p in zip(batch.requests, batch.positions, strict=True)
            if p < num and (sample is None or p in sample)
        ]
        if not edited:
            return
        # This process's share only: the metrics sum every process's values and counts.
        start, stop = self.collective.bounds(len(edited))
        with self.evaluated_weights():
            scores = self._local_edit_scores(edited[start:stop])
        for name, values in scores.items():
            self._metrics[name].update(values)

    def _log_edit_metrics(self, prefix: str) -> None:
        num_edited = self.num_edited()
        if num_edited == 0:
            return
        sample = self._eval_positions
        evaluated = sorted(sample) if sample is not None else range(num_edited)
        metrics = {f"{prefix}/num_evaluated": float(len(evaluated))}
        for name, metric in self._metrics.items():
            if metric.update_called:
                # On every process: it gathers their shares.
                total, total_sq, count = metric.compute().tolist()
                if count > 0:  # else no request had a prompt of this kind
                    metrics[f"{prefix}/{name}"] = total / count
                if sample is not None and count > 0:
                    ci = mean_ci95_half_width(total, total_sq, int(count), num_edited)
                    if ci == ci:
                        metrics[f"{prefix}/{name}_ci95"] = ci
            metric.reset()
        start = time.perf_counter()
        requests = self.trainer.datamodule.requests
        fluency = self.fluency([requests[p] for p in evaluated[: self.fluency_prompts]])
        if fluency is not None:
            metrics[f"{prefix}/fluency"] = fluency
        self._add_time("evaluation", start, log=False)
        if sample is not None:  # else num_evaluated is the number edited
            metrics[f"{prefix}/num_edited"] = float(num_edited)
        self.log_now(metrics)
        self._eval_positions = None
        if prefix != "edit":
            return
        values = {k.split("/", 1)[1]: v for k, v in metrics.items()}
        if sample is not None:
            self.sampled_edit_metrics.append({"step": self.global_step, **values})
            return
        self.final_edit_metrics = values
        self._evaluated_step = self.global_step

    @override
    def on_validation_epoch_start(self) -> None:
        self._start_evaluation(final=self.is_final_evaluation())

    @override
    def on_test_epoch_start(self) -> None:
        self._start_evaluation(final=True)

    @override
    def validation_step(self, batch: EditBatch, batch_idx: int) -> None:
        start = time.perf_counter()
        self._evaluate(batch)
        self._add_time("evaluation", start, log=False)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_edit_metrics("edit")

    @override
    def test_step(self, batch: EditBatch, batch_idx: int) -> None:
        self._evaluate(batch)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_edit_metrics("edit_test")

    @property
    def evaluated_at_current_step(self) -> bool:
        """Whether edit metrics over every edited fact were logged at the current
        ``global_step`` (a sampled evaluation does not count)."""
        return self._evaluated_step == self.global_step

    # -- utilities ---------------------------------------------------------------------------

    def log_now(self, metrics: dict[str, float]) -> None:
        """Send scalars to the loggers at ``global_step``, the number of applied batches.

        Every editing scalar uses this x-axis: pre-edit values and baselines at step 0, the
        state after the k-th batch at step k (``self.log`` would put a step's values one step
        early, and is not allowed in ``on_train_start``). The values are also kept in
        :attr:`scalars`, with the time in :attr:`step_wall_time`.
        """
        step = self.global_step
        for tag, value in metrics.items():
            self.scalars.setdefault(tag, {})[step] = float(value)
        self.step_wall_time[step] = time.time()
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    def _add_time(self, phase: str, start: float, log: bool = True) -> None:
        """Add wall time to ``phase_seconds`` (and, if ``log``, to this step's scalars)."""
        seconds = time.perf_counter() - start
        add_seconds(self, phase, seconds)
        if log:
            self.step_metrics[f"{TIME}{phase}"] = seconds

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only what the base model cannot rebuild: the edited parameters (in the LM's
        own layout, e.g. GPT-2's Conv1D orientation), the editor's sequential state, the run's
        metrics, timings and logged scalars, and the RNG states; the untouched base weights are
        left out."""
        names = self.edited_parameter_names
        checkpoint["state_dict"] = {
            f"model.{name}": self.model.get_parameter(name).detach() for name in names
        }
        checkpoint["sphere_lightning"] = {
            "format": CHECKPOINT_FORMAT,
            "base_model": {
                "name": self.model_name,
                "dtype": self.dtype_name,
                "fingerprint": self.base_fingerprint,
            },
            "editor": {"class_path": self.editor_class_path},
            "edited_parameters": names,
            "editor_state": self.editor.state_dict(),
            "num_edited": self.num_edited() if self._trainer is not None else 0,
            "pre_edit_metrics": self.pre_edit_metrics,
            "final_edit_metrics": self.final_edit_metrics,
            "sampled_edit_metrics": self.sampled_edit_metrics,
            "evaluated_step": self._evaluated_step,
            "fluency_protocol_used": self.fluency_protocol_used,
            "phase_seconds": self.phase_seconds,
            "scalars": self.scalars,
            "step_wall_time": self.step_wall_time,
            "start_wall_time": self.start_wall_time,
            "log_dir": self.trainer.log_dir if self._trainer is not None else None,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Raise :class:`CheckpointMismatchError` unless ``checkpoint`` was written by a run on
        this base model (fingerprint of the unedited weights), editor and edited layers. Needs
        the model loaded (:meth:`configure_model`)."""
        meta = checkpoint_meta(checkpoint)
        base = meta["base_model"]
        if base["fingerprint"] != self.base_fingerprint:
            raise CheckpointMismatchError(
                f"The checkpoint (`--ckpt_path`) edits base model {base['name']!r} "
                f"({base['dtype']}), but "
                f"`model.model` is {self.model_name!r} ({self.dtype_name}) and its weights differ "
                f"(fingerprint {str(base['fingerprint'])[:12]}… vs "
                f"{str(self.base_fingerprint)[:12]}…): resume on the base model the run "
                "started from"
            )
        editor = self.editor_class_path
        if meta["editor"]["class_path"] != editor:
            raise CheckpointMismatchError(
                "The checkpoint (`--ckpt_path`) was written by editor "
                f"{meta['editor']['class_path']}, the config asks for {editor}"
            )
        names = self.edited_parameter_names
        stored = [key.removeprefix("model.") for key in checkpoint.get("state_dict", {})]
        if sorted(stored) != sorted(names):
            raise CheckpointMismatchError(
                f"The checkpoint (`--ckpt_path`) holds edited parameters {sorted(stored)}, but "
                f"the config edits {sorted(names)} (`model.editor.init_args.layers`)"
            )

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check that the checkpoint belongs to this base model, editor and edited layers, then
        restore the editor's state, the metrics and the RNG states (Lightning then loads the
        edited parameters over the freshly loaded base model)."""
        self.check_checkpoint(checkpoint)
        meta = checkpoint["sphere_lightning"]
        self.editor.load_state_dict(meta["editor_state"])
        # The model is still the base model here (Lightning loads the edited parameters after
        # this hook): rebuild the statistics-derived state from it, as the first run did.
        start = time.perf_counter()
        self.editor.setup(self.model, self.tokenizer)
        self.pre_edit_metrics = dict(meta["pre_edit_metrics"])
        self.final_edit_metrics = dict(meta["final_edit_metrics"])
        self.sampled_edit_metrics = list(meta.get("sampled_edit_metrics", []))
        self._evaluated_step = meta["evaluated_step"]
        self.fluency_protocol_used = meta["fluency_protocol_used"]
        self.phase_seconds = dict(meta["phase_seconds"])
        self.scalars = {tag: dict(values) for tag, values in meta.get("scalars", {}).items()}
        self.step_wall_time = dict(meta.get("step_wall_time", {}))
        self.start_wall_time = meta.get("start_wall_time", self.start_wall_time)
        self._add_time("setup", start, log=False)
        torch.set_rng_state(meta["rng"]["torch"])
        random.setstate(meta["rng"]["python"])
