"""ROME (Meng et al., 2022): rank-one model editing, one request after another."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.data.requests import EditRequest
from sphere_lightning.editors.base import DeltaFn, KeyValueEditor, value_norm_metrics
from sphere_lightning.editors.hooks import WeightSnapshot, encode_with_subject, gather_at_subject
from sphere_lightning.editors.targets import TargetOptions, compute_target_values
from sphere_lightning.models.architectures import architecture_of


def rank_one_update(
    key: torch.Tensor,
    current_key: torch.Tensor,
    residual: torch.Tensor,
    covariance: torch.Tensor | None = None,
) -> torch.Tensor:
    """ROME's ΔW = v uᵀ (out × in), with u = C⁻¹k / ‖C⁻¹k‖ and v = r / (k_cur · u).

    ``key`` (``k``, averaged over context templates) gives the direction u (``compute_u``;
    without ``covariance`` u = k / ‖k‖, ROME's ``mom2_adjustment: false``), ``current_key``
    (``k_cur``, the bare prompt's) and ``residual`` (``r = v* − W k_cur``) the right vector
    (``compute_v``), so ΔW k_cur = r. With ``k = k_cur`` this is the paper's closed form
    ``r (C⁻¹k)ᵀ / (kᵀ C⁻¹ k)``. Computed in float64.
    """
    u = key.double()
    if covariance is not None:
        u = torch.linalg.solve(covariance.double(), u)
    u = u / u.norm()
    v = residual.double() / torch.dot(current_key.double(), u)
    return torch.outer(v, u)


#: ROME's v* options: ‖v* − m‖ clamped at 4 ‖m‖ (``compute_v``), weight decay 0.5 (GPT-2 XL).
ROME_TARGET = TargetOptions(clamp_norm_factor=4.0, weight_decay=0.5)


class ROME(KeyValueEditor):
    """ROME: a rank-one update of each edited layer per request, requests one after another.

    For each request (in batch order) and each layer in ``layers`` (bottom to top, as
    ``rome_main.execute_rome``): v* is optimised at that layer's MLP output, k is read, and
    :func:`rank_one_update` gives ΔW, which goes through ``transform`` (the in-loop transforms,
    e.g. SPHERE, projected against the weight as it then is, as the official ROME + SPHERE code
    does per request) and stays in place for everything computed after it. The returned ΔW of a
    layer is the sum over the batch's requests; the model is restored before returning.

    As in ROME's ``compute_v``, v*'s norms are relative to the MLP output m at the subject's last
    token: ‖δ‖ ≤ ``target.clamp_norm_factor`` ‖m‖ and the weight decay is ``target.weight_decay``
    ‖δ‖ / ‖m‖².
    Keys are a flat mean over the context templates (ROME's ``compute_u``, not MEMIT's two-level
    mean).

    Args:
        layers: Blocks whose MLP out-projection is edited (ROME edits one: GPT-2 XL 17,
            Llama-3-8B 5).
        mom2_adjustment: u = C⁻¹k with C = E[k kᵀ] (ROME's ``mom2_adjustment``; its GPT-2 and
            GPT-J presets turn it on, its Llama-3 and Qwen presets off); off: u = k.
        target: How v* is optimised (:class:`~sphere_lightning.editors.targets.TargetOptions`),
            by default :data:`ROME_TARGET`: ``clamp_norm_factor`` 4 (‖v* − m‖ is clamped to this
            times ‖m‖) and ``weight_decay`` 0.5, the weight of ‖v* − m‖ / ‖m‖² (ROME: 0.5 on
            GPT-2 XL, 1e-3 on Llama-3-8B). In a config, the fields given replace those of
            ROME's default; in Python, start from ``dataclasses.replace(ROME_TARGET, ...)``.
        **kwargs: The other shared key/v* options (templates, statistics, seed); see
            :class:`~sphere_lightning.editors.base.KeyValueEditor`. ROME has no
            ``target_layer`` and no ``nas``: it optimises v* at each edited layer itself.
    """

    def __init__(
        self,
        layers: Sequence[int] = (5,),
        mom2_adjustment: bool = True,
        target: TargetOptions = ROME_TARGET,
        **kwargs: Any,
    ) -> None:
        super().__init__(layers=layers, target=target, **kwargs)
        self.mom2_adjustment = mom2_adjustment
        self.covariances: dict[int, torch.Tensor] | None = None

    def setup(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Check layers, generate templates, and load C when ``mom2_adjustment`` is on."""
        super().setup(model, tokenizer)
        if self.mom2_adjustment and self.covariances is None:
            self.covariances = self.second_moments(model, tokenizer)

    def average_templates(self, keys: torch.Tensor) -> torch.Tensor:
        """ROME's ``compute_u`` averages the keys of all templates with equal weight."""
        return keys.mean(1)

    def _rome_options(self, mlp_norm: float, block_norm: float) -> TargetOptions:
        """The v* options with ROME's MLP-output-relative norms expressed against the block
        output h, which :func:`compute_target_values` measures them by: a clamp at c‖m‖ is one at
        (c‖m‖/‖h‖)‖h‖, and λ‖δ‖/‖m‖² is (λ‖h‖²/‖m‖²)‖δ‖/‖h‖²."""
        opts = self.target
        ratio = mlp_norm / block_norm
        return dataclasses.replace(
            opts,
            clamp_norm_factor=opts.clamp_norm_factor * ratio,
            weight_decay=opts.weight_decay / ratio**2,
        )

    def compute_deltas(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        transform: DeltaFn | None = None,
    ) -> dict[str, torch.Tensor]:
        """Sequential ROME over ``requests``; ΔW per layer summed over them (model restored)."""
        if self.context_templates is None:
            self.setup(model, tokenizer)
        spec = architecture_of(model)
        timings = {"v_star": 0.0, "keys": 0.0, "solve": 0.0, "transform": 0.0}
        losses, steps, values = [], [], []
        deltas: dict[str, torch.Tensor] = {}
        with WeightSnapshot(model, spec) as snapshot:
            for request in tqdm(requests, desc="ROME", leave=False, disable=not self.progress):
                bare = [encode_with_subject(tokenizer, request.prompt, request.subject)]
                for layer in self.layers:
                    out_proj, block = spec.mlp_out_name(layer), spec.layer_name(layer)
                    start = time.perf_counter()
                    # One module per read: the forward stops at the first-registered module of
                    # a read, and a block is registered before its out-projection.
                    current_key, mlp_output, block_output = (
                        gather_at_subject(model, tokenizer, bare, [module], read=read)[module][0]
                        for module, read in [
                            (out_proj, "input"),
                            (out_proj, "output"),
                            (block, "output"),
                        ]
                    )
                    timings["keys"] += time.perf_counter() - start
                    start = time.perf_counter()
                    options = self._rome_options(
                        mlp_output.norm().item(), block_output.norm().item()
                    )
                    target = compute_target_values(
                        model,
                        tokenizer,
                        spec,
                        [request],
                        layer,
                        self.context_templates,
                        options,
                        progress=False,
                    )
                    losses += target.losses
                    values.append(target.values[0].detach().cpu())
                    steps += target.steps
                    timings["v_star"] += time.perf_counter() - start
                    start = time.perf_counter()
                    key = self.compute_keys(model, tokenizer, [request], [layer])[layer]
                    timings["keys"] += time.perf_counter() - start
                    start = time.perf_counter()
                    # The block output and the out-projection's differ by the residual stream
                    # entering the MLP, which ΔW does not change: r is v* − W k_cur either way.
                    residual = target.values[0] - block_output
                    covariance = self.covariances[layer] if self.mom2_adjustment else None
                    delta = rank_one_update(key[0], current_key, residual, covariance).float()
                    timings["solve"] += time.perf_counter() - start
                    name = spec.weight_name(layer)
                    if transform is not None:
                        start = time.perf_counter()
                        delta = transform(name, delta)
                        timings["transform"] += time.perf_counter() - start
                    snapshot.add(layer, delta)
                    deltas[name] = deltas[name] + delta if name in deltas else delta
        self.last_metrics = {
            "v_loss": float(torch.tensor(losses).mean()),
            "v_steps": float(torch.tensor(steps, dtype=torch.float).mean()),
            # Over every (request, layer) v* of the batch.
            **value_norm_metrics(torch.stack(values)),
        }
        self.last_timings = timings
        return deltas

    # ROME's only sequential state is the templates (the base class's state_dict); C is rebuilt
    # from the (cached) statistics by setup.
