"""The editor interface; the key/v* machinery ROME, MEMIT and AlphaEdit share; the MEMIT-style
layer loop MEMIT and AlphaEdit share."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.data.requests import EditRequest
from sphere_lightning.distributed import SINGLE, Collective
from sphere_lightning.editors.hooks import (
    EncodedPrompt,
    WeightSnapshot,
    encode_with_subject,
    gather_at_subject,
)
from sphere_lightning.editors.nas import (
    NASOptions,
    anchor_requests,
    anchor_values,
    mlp_outputs,
    upper_trimmed_mean,
)
from sphere_lightning.editors.statistics import StatisticsOptions, second_moments
from sphere_lightning.editors.targets import TargetOptions, TargetResult, compute_target_values
from sphere_lightning.editors.templates import TemplateOptions, generate_context_templates
from sphere_lightning.errors import EDITOR_ARGS, ConfigError, editor_flag
from sphere_lightning.models.architectures import architecture_of, linear_weight

log = logging.getLogger(__name__)


def average_over_templates(keys: torch.Tensor) -> torch.Tensor:
    """Average keys ``(n, t, d)`` read through ``t`` context templates into ``(n, d)``.

    Two levels, as the reference's ``compute_ks`` (MEMIT, AlphaEdit, SPHERE): template 0 is the
    bare prompt and forms one group, the generated templates form the other; the key is the mean
    of the two group means, so the bare prompt weighs 1/2 however many templates there are (a
    flat mean would give it 1/t).
    """
    if keys.shape[1] == 1:
        return keys[:, 0]
    return (keys[:, 0] + keys[:, 1:].mean(1)) / 2


def value_norm_metrics(values: torch.Tensor) -> dict[str, float]:
    """``v_norm_mean`` and ``v_norm_max``: the mean and the largest ‖v*‖ over the rows of
    ``values`` (one target value per request), for an editor's ``last_metrics``."""
    norms = values.detach().double().norm(dim=-1)
    return {"v_norm_mean": float(norms.mean()), "v_norm_max": float(norms.max())}


#: ``(parameter name, ΔW) -> ΔW``: the in-loop delta transforms an editor applies per layer.
DeltaFn = Callable[[str, torch.Tensor], torch.Tensor]


class Editor(ABC):
    """Computes weight updates ΔW for a batch of edit requests.

    ``compute_deltas`` is pure: it returns ``{parameter name: ΔW}`` with ΔW in the ``nn.Linear``
    (out × in) convention and leaves the model exactly as it found it. The caller (the
    LightningModule) transforms and applies the deltas, then calls ``after_apply``. Sequential state
    (statistics, accumulated keys) lives on the instance and travels through ``state_dict``.
    """

    #: Whether :meth:`compute_deltas` applies its ``transform`` argument inside its layer loop.
    transform_in_loop: bool = False

    def __init__(self, layers: Sequence[int]) -> None:
        if not layers:
            raise ConfigError(f"{editor_flag('layers')} must name at least one layer")
        self.layers = sorted(int(i) for i in layers)
        self.last_metrics: dict[str, float] = {}
        #: Seconds spent per phase in the last ``compute_deltas`` call.
        self.last_timings: dict[str, float] = {}
        #: Show tqdm bars while computing deltas.
        self.progress = True
        #: The processes of the run; an editor may split per-request work across them
        #: (:meth:`Collective.map`) as long as every process returns the same ΔW.
        self.collective: Collective = SINGLE

    def setup(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Check the layers against the model and prepare anything the editor needs."""
        architecture_of(model).check_layers(model, self.layers, flag=f"{EDITOR_ARGS}.layers")

    def synchronise(self, collective: Collective) -> None:
        """Once every process has run :meth:`setup`: make what each derived on its own equal to
        rank 0's (nothing by default)."""
        return None

    def edited_parameter_names(self, model: PreTrainedModel) -> list[str]:
        """Names of the parameters this editor changes."""
        spec = architecture_of(model)
        return [spec.weight_name(layer) for layer in self.layers]

    @abstractmethod
    def compute_deltas(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        transform: DeltaFn | None = None,
    ) -> dict[str, torch.Tensor]:
        """ΔW for each edited parameter; must leave the model unchanged.

        ``transform(name, ΔW) -> ΔW`` (the in-loop delta transforms, e.g. SPHERE) is applied to
        each layer's ΔW as soon as it is computed, and the returned deltas are the transformed
        ones. An editor that places a layer's update temporarily so that the layers above see
        it places the transformed one. An editor without a layer loop may ignore
        ``transform``; the caller then applies it afterwards (``transform_in_loop = False``).
        """

    def after_apply(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
    ) -> None:
        """Update sequential state once the (transformed) deltas are in the model."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The editor's sequential state."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        return None


class KeyValueEditor(Editor):
    """Shared machinery of the locate-then-edit editors: keys k and target values v*.

    Owns what ROME, MEMIT and AlphaEdit all read: the context templates every prompt is also
    read through, the keys (the input of an edited out-projection at the subject's last token,
    averaged over the templates), the key second moments E[k kᵀ] and the options of the v*
    optimisation. How keys and v* become ΔW is the subclass's: ROME's loop over requests, or the
    MEMIT-style layer loop of :class:`LocateThenEditEditor`.

    Args:
        layers: Blocks whose MLP out-projection is edited.
        target: How v* is optimised (:class:`~sphere_lightning.editors.targets.TargetOptions`).
        templates: The context templates
            (:class:`~sphere_lightning.editors.templates.TemplateOptions`).
        statistics: Where the key second moments come from
            (:class:`~sphere_lightning.editors.statistics.StatisticsOptions`).
        seed: Seed of the generated templates and of generated statistics text.
        key_batch_size: Prompts per forward pass when reading keys.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 5, 6, 7),
        target: TargetOptions = TargetOptions(),
        templates: TemplateOptions = TemplateOptions(),
        statistics: StatisticsOptions = StatisticsOptions(),
        seed: int = 0,
        key_batch_size: int = 64,
    ) -> None:
        super().__init__(layers)
        if key_batch_size < 1:
            raise ConfigError(f"{editor_flag('key_batch_size')} must be ≥ 1, got {key_batch_size}")
        self.target = target
        self.templates = templates
        self.statistics = statistics
        self.seed = seed
        self.key_batch_size = key_batch_size
        self.context_templates: list[str] | None = None

    # -- setup -------------------------------------------------------------------------------

    def setup(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Check layers; generate context templates once."""
        super().setup(model, tokenizer)
        if self.context_templates is None:
            self.context_templates = self._generate_templates(model, tokenizer)

    def synchronise(self, collective: Collective) -> None:
        """Rank 0's context templates on every process (sampled text; one set for all)."""
        self.context_templates = collective.broadcast_object(self.context_templates)

    def _generate_templates(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> list[str]:
        """``"{}"`` plus generated prefixes, sampled as MEMIT's ``generate_fast`` does (top-k 5,
        fixed length, seeded); see :mod:`~sphere_lightning.editors.templates`."""
        return generate_context_templates(
            model, tokenizer, self.templates.count, self.templates.length, self.seed
        )

    def second_moments(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> dict[int, torch.Tensor]:
        """``E[k kᵀ]`` per edited layer (cached on disk), float32 on that layer's device."""
        spec = architecture_of(model)
        moments = second_moments(
            model, tokenizer, spec, self.layers, **asdict(self.statistics), seed=self.seed
        )
        return {
            layer: moment.to(linear_weight(model.get_submodule(spec.mlp_out_name(layer))).device)
            for layer, moment in moments.items()
        }

    # -- keys --------------------------------------------------------------------------------

    def _context_prompts(
        self, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
    ) -> list[EncodedPrompt]:
        return [
            encode_with_subject(tokenizer, template.format(r.prompt), r.subject)
            for r in requests
            for template in self.context_templates
        ]

    def compute_keys(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        layers: Sequence[int],
    ) -> dict[int, torch.Tensor]:
        """Key of each request at each layer, ``(n, d_in)``: the input of the layer's
        out-projection at the subject's last token, averaged over context templates as the
        reference does (:meth:`average_templates`). Each process reads its share of the
        requests; every process returns all keys."""
        spec = architecture_of(model)
        names = [spec.mlp_out_name(layer) for layer in layers]
        t = len(self.context_templates)

        def read(share: Sequence[EditRequest]) -> dict[int, torch.Tensor]:
            acts = gather_at_subject(
                model,
                tokenizer,
                self._context_prompts(tokenizer, share),
                names,
                read="input",
                batch_size=self.key_batch_size,
            )
            return {
                layer: self.average_templates(acts[name].view(len(share), t, -1))
                for layer, name in zip(layers, names, strict=True)
            }

        return self.collective.map(read, requests)

    def average_templates(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys ``(n, t, d)`` read through ``t`` templates into ``(n, d)``; MEMIT's two-level
        mean (:func:`average_over_templates`) unless an editor's reference averages otherwise."""
        return average_over_templates(keys)

    transform_in_loop = True

    def state_dict(self) -> dict[str, Any]:
        return {"context_templates": self.context_templates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.context_templates = state.get("context_templates")


class LocateThenEditEditor(KeyValueEditor):
    """The MEMIT-style layer loop on top of the shared k/v* machinery.

    v* is optimised once per batch at :attr:`target_layer`; then for each layer ℓ (bottom to
    top), with the updates of the lower layers in place, the residual
    ``(v* − h) / (#layers left)`` at the target layer is written into layer ℓ's out-projection by
    the subclass's :meth:`solve`.

    Args:
        layers: Blocks whose MLP out-projection is edited.
        target_layer: Block after which v* is optimised; default the last of ``layers``.
        target: How v* is optimised (:class:`~sphere_lightning.editors.targets.TargetOptions`).
        templates: The context templates
            (:class:`~sphere_lightning.editors.templates.TemplateOptions`).
        statistics: Where the key second moments come from
            (:class:`~sphere_lightning.editors.statistics.StatisticsOptions`).
        seed: Seed of the generated templates, generated statistics text and NAS's sample.
        key_batch_size: Prompts per forward pass when reading keys.
        nas: Norm-Anchor Scaling (arXiv 2602.02543; :mod:`~sphere_lightning.editors.nas`,
            :class:`~sphere_lightning.editors.nas.NASOptions`): with ``nas.enabled`` the MLP value
            m + δ of every v* is rescaled to ν, its mean norm on the unedited model, before the
            solve (δ dropped above ``nas.skip_factor`` · ν).
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 5, 6, 7),
        target_layer: int | None = None,
        target: TargetOptions = TargetOptions(),
        templates: TemplateOptions = TemplateOptions(),
        statistics: StatisticsOptions = StatisticsOptions(),
        seed: int = 0,
        key_batch_size: int = 64,
        nas: NASOptions = NASOptions(),
    ) -> None:
        super().__init__(layers, target, templates, statistics, seed, key_batch_size)
        self.target_layer = self.layers[-1] if target_layer is None else int(target_layer)
        if self.target_layer < self.layers[-1]:
            raise ConfigError(
                f"{editor_flag('target_layer')} ({self.target_layer}) must not be below the "
                f"last edited layer ({self.layers[-1]})"
            )
        self.nas = nas
        #: ν, NAS's anchor: measured on the model before the first edit, then sequential state.
        self.nas_anchor: float | None = None

    def setup(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Check layers and the target layer; generate context templates once."""
        spec = architecture_of(model)
        spec.check_layers(model, self.layers, flag=f"{EDITOR_ARGS}.layers")
        spec.check_layers(model, [self.target_layer], flag=f"{EDITOR_ARGS}.target_layer")
        super().setup(model, tokenizer)

    # -- the layer loop ----------------------------------------------------------------------

    def compute_deltas(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        transform: DeltaFn | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the MEMIT layer loop; the subclass's :meth:`solve` turns keys into ΔW.

        Each layer's ΔW goes through ``transform`` before it is put in place for the layers
        above (as the official AlphaEdit + SPHERE code projects inside the loop), so their keys
        and residuals are read with the transformed lower updates. Every temporary update is
        undone before returning, also when ``transform`` or ``solve`` raises.
        """
        if self.context_templates is None:
            self.setup(model, tokenizer)
        spec = architecture_of(model)
        timings = {"v_star": 0.0, "keys": 0.0, "solve": 0.0, "transform": 0.0}
        start = time.perf_counter()
        target = self.target_values(model, tokenizer, requests)
        timings["v_star"] = time.perf_counter() - start
        self.last_metrics = {
            "v_loss": float(torch.tensor(target.losses).mean()),
            "v_steps": float(torch.tensor(target.steps, dtype=torch.float).mean()),
        }
        if self.nas.enabled:
            start = time.perf_counter()
            target = self.anchor_value_norms(model, tokenizer, requests, target)
            timings["nas"] = time.perf_counter() - start
        self.last_metrics.update(value_norm_metrics(target.values))  # the v* solved for
        bare = [encode_with_subject(tokenizer, r.prompt, r.subject) for r in requests]
        block = spec.layer_name(self.target_layer)
        deltas: dict[str, torch.Tensor] = {}
        with WeightSnapshot(model, spec) as snapshot:
            for i, layer in enumerate(
                tqdm(self.layers, desc="Solving", leave=False, disable=not self.progress)
            ):
                start = time.perf_counter()
                keys = self.compute_keys(model, tokenizer, requests, [layer])[layer]
                current = self.collective.map(
                    lambda share: gather_at_subject(
                        model,
                        tokenizer,
                        share,
                        [block],
                        read="output",
                        batch_size=self.key_batch_size,
                    )[block],
                    bare,
                )
                timings["keys"] += time.perf_counter() - start
                start = time.perf_counter()
                # On the edited layer's device (the target layer may sit on another one).
                residual = (target.values - current).to(keys.device) / (len(self.layers) - i)
                delta = self.solve(i, layer, keys.double(), residual.double()).float()
                timings["solve"] += time.perf_counter() - start
                name = spec.weight_name(layer)
                if transform is not None:
                    start = time.perf_counter()
                    delta = transform(name, delta)
                    timings["transform"] += time.perf_counter() - start
                snapshot.add(layer, delta)
                deltas[name] = delta
        self.last_timings = timings
        return deltas

    def target_values(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
    ) -> TargetResult:
        """v* of every request at :attr:`target_layer`. The optimisation is independent per
        request, so each process optimises its share and every process returns all of them."""

        def optimise(share: Sequence[EditRequest]) -> dict[str, torch.Tensor]:
            result = compute_target_values(
                model,
                tokenizer,
                architecture_of(model),
                share,
                self.target_layer,
                self.context_templates,
                self.target,
                progress=self.progress,
            )
            return {
                "values": result.values,
                "initial": result.initial,
                "losses": torch.tensor(result.losses, dtype=torch.float64),
                "steps": torch.tensor(result.steps, dtype=torch.float64),
            }

        rows = self.collective.map(optimise, requests)
        return TargetResult(
            rows["values"],
            rows["initial"],
            rows["losses"].tolist(),
            [int(step) for step in rows["steps"].tolist()],
        )

    def measure_nas_anchor(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> float:
        """ν: the upper-trimmed mean of ‖m + δ‖ over the ``nas.requests`` sample, with δ
        optimised by this editor's v* options on the bare prompt only (the reference's
        ``get_or_compute_mean_vstar_norm``). Each process optimises its share."""
        requests = anchor_requests(self.nas, self.seed)

        def norms(share: Sequence[EditRequest]) -> torch.Tensor:
            target = compute_target_values(
                model,
                tokenizer,
                architecture_of(model),
                share,
                self.target_layer,
                ["{}"],
                self.target,
                progress=self.progress,
            )
            m = mlp_outputs(model, tokenizer, share, self.target_layer, self.key_batch_size)
            return (target.values - target.initial + m.to(target.values)).norm(dim=-1)

        anchor = upper_trimmed_mean(self.collective.map(norms, requests), self.nas.upper_quantile)
        log.info("NAS: anchor ν = %.6g from %d requests", anchor, len(requests))
        return anchor

    def anchor_value_norms(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        target: TargetResult,
    ) -> TargetResult:
        """NAS on this batch's v* (:func:`~sphere_lightning.editors.nas.anchor_values`), ν
        measured first if it is not known yet; m is read from the model as it is."""
        if self.nas_anchor is None:
            self.nas_anchor = self.measure_nas_anchor(model, tokenizer)
        m = self.collective.map(
            lambda share: mlp_outputs(
                model, tokenizer, share, self.target_layer, self.key_batch_size
            ),
            requests,
        )
        anchored = anchor_values(
            target.values, target.initial, m, self.nas_anchor, self.nas.skip_factor
        )
        self.last_metrics.update(
            {
                "nas_value_norm": float(anchored.norms.mean()),
                "nas_skipped": float(anchored.skipped.float().mean()),
            }
        )
        return TargetResult(anchored.targets, target.initial, target.losses, target.steps)

    @abstractmethod
    def solve(
        self, index: int, layer: int, keys: torch.Tensor, residual: torch.Tensor
    ) -> torch.Tensor:
        """ΔW (out × in) that maps ``keys`` (n × d_in) to ``residual`` (n × d_out) at ``layer``.

        ``index`` is the position of ``layer`` in :attr:`layers`.
        """

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.nas_anchor is not None:
            state["nas_anchor"] = self.nas_anchor
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.nas_anchor = state.get("nas_anchor")
        if self.nas.enabled and self.nas_anchor is None:
            log.warning(
                "NAS: the restored editor state holds no anchor ν; it is measured at the next "
                "batch, on the model as it then is (edited), not on the unedited model"
            )
