"""The editor interface, and the locate-then-edit machinery MEMIT and AlphaEdit share."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
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
from sphere_lightning.editors.statistics import GENERATED, second_moments
from sphere_lightning.editors.targets import (
    EARLY_STOPS,
    PRECISIONS,
    TargetOptions,
    TargetResult,
    compute_target_values,
)
from sphere_lightning.editors.templates import generate_context_templates
from sphere_lightning.errors import ConfigError
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
            raise ConfigError("`layers` must name at least one layer")
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
        architecture_of(model).check_layers(model, self.layers, flag="editor.init_args.layers")

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


class LocateThenEditEditor(Editor):
    """Shared machinery of MEMIT-style editors: keys k, target values v*, and the layer loop.

    For each layer ℓ (bottom to top), with the updates of the lower layers in place, the residual
    ``(v* − h) / (#layers left)`` at the target layer is written into layer ℓ's out-projection by
    the subclass's :meth:`solve`.

    Args:
        layers: Blocks whose MLP out-projection is edited.
        target_layer: Block after which v* is optimised; default the last of ``layers``.
        v_num_steps: Optimisation steps of v* per request.
        v_lr: Adam learning rate of v*.
        v_loss_threshold: A request's v* optimisation stops once its loss is below this.
        clamp_norm_factor: ‖v* − h‖ is clamped to this times ‖h‖.
        kl_factor: Weight of the KL term that keeps "{subject} is a" unchanged.
        v_weight_decay: Weight of ‖v* − h‖ / ‖h‖² (ROME/MEMIT's formula).
        v_batch_size: Requests per forward pass in the v* optimisation (memory only).
        skip_lower_layers: Replay the blocks below the target layer from a cache during the v*
            optimisation instead of recomputing them (same result, less work).
        reuse_prefix: Compute the key/value cache of the prompt tokens before the subject's last
            token once per batch; by causality they do not depend on v* (same result, less work).
        share_template_prefix: With ``reuse_prefix``, run the tokens a context template puts
            before every prompt once per batch, not once per request (same result, less work).
        group_by_suffix: In the v* optimisation, run together the prompts (of any requests) that
            have the same number of tokens from the subject's last one on, so no step computes
            padding (same result, less work). Off: whole requests per forward pass, as in ROME.
        v_early_stop: When a request's v* optimisation stops before ``v_num_steps``: ``loss``
            once its loss is below ``v_loss_threshold`` (ROME/MEMIT); ``most_probable`` also as
            soon as ``target_new`` is the most probable continuation at every target token of
            every prompt (teacher-forced), ENCORE's most-probable early stopping.
        v_precision: ``float32``, or ``bf16``: the v* forward/backward passes through the
            blocks above the edit point run under bfloat16 autocast on the model's device
            type; δ, the lm head, log-softmax, KL, the loss and Adam stay float32.
        num_context_templates: Generated prefixes the prompts are wrapped in (plus the bare one).
        context_template_length: Length in tokens of each generated prefix.
        stats_corpus: Text for the key second moments: ``generated`` (the model's own samples,
            works offline), a ``.txt`` file, or a hub dataset ``<id>[:<config>][@<split>]``
            whose ``text`` column is streamed (e.g. ``wikitext:wikitext-103-raw-v1``).
        stats_num_samples: Number of texts for the second moments. 128 generated texts of 64
            tokens edit SmolLM2 as well as 512 of 128 (and as WikiText) at a fifth of the cost;
            more generated text barely brings the moments closer to real text's
            (``benchmarks/stats_corpus.py``).
        stats_max_length: Tokens per text.
        stats_batch_size: Texts per forward pass when collecting statistics.
        seed: Seed for generated templates and generated text.
        cache_dir: Where statistics are cached; default ``$SPHERE_LIGHTNING_CACHE/stats``.
        key_batch_size: Prompts per forward pass when reading keys.
        nas: Norm-Anchor Scaling (arXiv 2602.02543; :mod:`~sphere_lightning.editors.nas`): the
            MLP value m + δ of every v* is rescaled to ν, its mean norm on the unedited model,
            before the solve (δ dropped above ``nas_skip_factor`` · ν).
        nas_requests: Edit requests ν is measured on (anything ``--data.dataset`` accepts).
        nas_num_requests: How many of them (sampled with ``seed``) [the reference's
            ``nas_restart``].
        nas_skip_factor: A request whose ‖m + δ‖ exceeds this times ν keeps m.
        nas_upper_quantile: Norms above this quantile are dropped before ν is averaged.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 5, 6, 7),
        target_layer: int | None = None,
        v_num_steps: int = 25,
        v_lr: float = 0.5,
        v_loss_threshold: float = 5e-2,
        clamp_norm_factor: float = 0.75,
        kl_factor: float = 0.0625,
        v_weight_decay: float = 0.5,
        v_batch_size: int = 25,
        skip_lower_layers: bool = True,
        reuse_prefix: bool = True,
        share_template_prefix: bool = True,
        group_by_suffix: bool = True,
        v_early_stop: str = "loss",
        v_precision: str = "float32",
        num_context_templates: int = 5,
        context_template_length: int = 10,
        stats_corpus: str = GENERATED,
        stats_num_samples: int = 128,
        stats_max_length: int = 64,
        stats_batch_size: int = 16,
        seed: int = 0,
        cache_dir: str | None = None,
        key_batch_size: int = 64,
        nas: bool = False,
        nas_requests: str = "builtin",
        nas_num_requests: int = 1000,
        nas_skip_factor: float = 2.0,
        nas_upper_quantile: float = 0.95,
    ) -> None:
        super().__init__(layers)
        for name, value in [
            ("v_num_steps", v_num_steps),
            ("v_batch_size", v_batch_size),
            ("stats_num_samples", stats_num_samples),
            ("stats_max_length", stats_max_length),
            ("stats_batch_size", stats_batch_size),
            ("key_batch_size", key_batch_size),
            ("context_template_length", context_template_length),
        ]:
            if value < 1:
                raise ConfigError(f"`editor.init_args.{name}` must be ≥ 1, got {value}")
        if v_early_stop not in EARLY_STOPS:
            raise ConfigError(
                f"`editor.init_args.v_early_stop` should be one of {', '.join(EARLY_STOPS)}, "
                f"got {v_early_stop!r}"
            )
        if v_precision not in PRECISIONS:
            raise ConfigError(
                f"`editor.init_args.v_precision` should be one of {', '.join(PRECISIONS)}, "
                f"got {v_precision!r}"
            )
        if num_context_templates < 0:
            raise ConfigError("`editor.init_args.num_context_templates` must be ≥ 0")
        self.target_layer = self.layers[-1] if target_layer is None else int(target_layer)
        if self.target_layer < self.layers[-1]:
            raise ConfigError(
                f"`editor.init_args.target_layer` ({self.target_layer}) must not be below the "
                f"last edited layer ({self.layers[-1]})"
            )
        self.target_options = TargetOptions(
            num_steps=v_num_steps,
            lr=v_lr,
            loss_threshold=v_loss_threshold,
            clamp_norm_factor=clamp_norm_factor,
            kl_factor=kl_factor,
            weight_decay=v_weight_decay,
            batch_size=v_batch_size,
            skip_lower_layers=skip_lower_layers,
            reuse_prefix=reuse_prefix,
            share_template_prefix=share_template_prefix,
            group_by_suffix=group_by_suffix,
            early_stop=v_early_stop,
            precision=v_precision,
        )
        self.num_context_templates = num_context_templates
        self.context_template_length = context_template_length
        self.stats_options = {
            "corpus": stats_corpus,
            "num_samples": stats_num_samples,
            "max_length": stats_max_length,
            "batch_size": stats_batch_size,
            "seed": seed,
            "cache_dir": cache_dir,
        }
        self.seed = seed
        self.key_batch_size = key_batch_size
        self.context_templates: list[str] | None = None
        self.nas = nas
        self.nas_options = NASOptions(
            nas_requests, nas_num_requests, nas_skip_factor, nas_upper_quantile
        )
        #: ν, NAS's anchor: measured on the model before the first edit, then sequential state.
        self.nas_anchor: float | None = None

    # -- setup -------------------------------------------------------------------------------

    def setup(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Check layers; generate context templates once."""
        spec = architecture_of(model)
        spec.check_layers(model, self.layers, flag="editor.init_args.layers")
        spec.check_layers(model, [self.target_layer], flag="editor.init_args.target_layer")
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
            model, tokenizer, self.num_context_templates, self.context_template_length, self.seed
        )

    def second_moments(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> dict[int, torch.Tensor]:
        """``E[k kᵀ]`` per edited layer (cached on disk), float32 on that layer's device."""
        spec = architecture_of(model)
        moments = second_moments(model, tokenizer, spec, self.layers, **self.stats_options)
        return {
            layer: moment.to(linear_weight(model.get_submodule(spec.mlp_out_name(layer))).device)
            for layer, moment in moments.items()
        }

    # -- the layer loop ----------------------------------------------------------------------

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
        reference does (:func:`average_over_templates`). Each process reads its share of the
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
        if self.nas:
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
                self.target_options,
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
        """ν: the upper-trimmed mean of ‖m + δ‖ over the ``nas_requests`` sample, with δ
        optimised by this editor's v* options on the bare prompt only (the reference's
        ``get_or_compute_mean_vstar_norm``). Each process optimises its share."""
        requests = anchor_requests(self.nas_options, self.seed)

        def norms(share: Sequence[EditRequest]) -> torch.Tensor:
            target = compute_target_values(
                model,
                tokenizer,
                architecture_of(model),
                share,
                self.target_layer,
                ["{}"],
                self.target_options,
                progress=self.progress,
            )
            m = mlp_outputs(model, tokenizer, share, self.target_layer, self.key_batch_size)
            return (target.values - target.initial + m.to(target.values)).norm(dim=-1)

        anchor = upper_trimmed_mean(
            self.collective.map(norms, requests), self.nas_options.upper_quantile
        )
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
            target.values, target.initial, m, self.nas_anchor, self.nas_options.skip_factor
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
        state: dict[str, Any] = {"context_templates": self.context_templates}
        if self.nas_anchor is not None:
            state["nas_anchor"] = self.nas_anchor
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.context_templates = state.get("context_templates")
        self.nas_anchor = state.get("nas_anchor")
        if self.nas and self.nas_anchor is None:
            log.warning(
                "NAS: the restored editor state holds no anchor ν; it is measured at the next "
                "batch, on the model as it then is (edited), not on the unedited model"
            )
