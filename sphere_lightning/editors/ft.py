"""FT: ROME's fine-tuning baseline, with its optional L∞ norm constraint (FT-L)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.data.requests import EditRequest
from sphere_lightning.editors.base import DeltaFn, Editor
from sphere_lightning.errors import ConfigError, editor_flag
from sphere_lightning.models.architectures import architecture_of, linear_weight
from sphere_lightning.models.batching import encode_target, model_device, pad_batch


class _Chunk(NamedTuple):
    """This process's share of one chunk of requests (``ids`` None when it is empty), and the
    number of requests in the whole chunk."""

    ids: torch.Tensor | None
    mask: torch.Tensor | None
    labels: torch.Tensor | None
    size: int


class FT(Editor):
    """Fine-tune the edited layers' MLP out-projections on the requests' new targets.

    As ROME's ``baselines/ft/ft_main.py``: Adam on the edited weights for ``num_steps`` passes
    over the requests in chunks of ``batch_size``, minimising the mean NLL of ``target_new``
    after each filled prompt; a chunk whose loss is already below ``loss_threshold`` takes no
    step, and the passes stop once a whole pass averages below it. With ``norm_constraint`` ε,
    every weight is clamped to [w₀ − ε, w₀ + ε] of its original value after every chunk (FT-L).

    The weights are tuned as float32 copies swapped into the forward pass
    (``torch.func.functional_call``), so the model itself is never written and
    ``compute_deltas`` is pure. The returned ΔW = tuned − original is in the ``nn.Linear``
    (out × in) convention (transposed for GPT-2's ``Conv1D``), as every editor's.

    Args:
        layers: Blocks whose MLP out-projection is tuned (ROME's Llama-3-8B preset: 21 of 32).
        num_steps: Passes over the requests (ROME: 25).
        lr: Adam learning rate (ROME: 5e-4).
        weight_decay: Adam's weight decay (ROME: 0).
        norm_constraint: ε of the L∞ constraint around the original weights; ``None`` (ROME's
            ``false``) tunes without it (ROME: 5e-4 on GPT-2 XL "constr", none on Llama-3-8B).
        batch_size: Requests per optimiser step (ROME: 64).
        loss_threshold: A chunk below this takes no step; a pass averaging below it ends the
            tuning (ROME: 1e-2, fixed in its code).
    """

    def __init__(
        self,
        layers: Sequence[int] = (20,),
        num_steps: int = 25,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        norm_constraint: float | None = None,
        batch_size: int = 64,
        loss_threshold: float = 1e-2,
    ) -> None:
        super().__init__(layers)
        for name, value in [("num_steps", num_steps), ("batch_size", batch_size)]:
            if value < 1:
                raise ConfigError(f"{editor_flag(name)} must be ≥ 1, got {value}")
        if lr <= 0:
            raise ConfigError(f"{editor_flag('lr')} must be > 0, got {lr}")
        if weight_decay < 0:
            raise ConfigError(f"{editor_flag('weight_decay')} must be ≥ 0, got {weight_decay}")
        if norm_constraint is not None and norm_constraint <= 0:
            raise ConfigError(
                f"{editor_flag('norm_constraint')} must be > 0 or null, got {norm_constraint}"
            )
        self.num_steps = num_steps
        self.lr = lr
        self.weight_decay = weight_decay
        self.norm_constraint = norm_constraint
        self.batch_size = batch_size
        self.loss_threshold = loss_threshold

    def _chunk_inputs(
        self,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        device: torch.device,
    ) -> list[_Chunk]:
        """Per chunk of ``batch_size`` requests, this process's share of it (all of it with one
        process): ids and mask of ``prompt + target[:-1]`` (right-padded), and the target token
        each position predicts (−100 where none)."""
        chunks = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            first, stop = self.collective.bounds(len(chunk))
            if first == stop:  # an empty share: this process only joins the gradient sum
                chunks.append(_Chunk(None, None, None, len(chunk)))
                continue
            sequences, labels = [], []
            for request in chunk[first:stop]:
                prompt = tokenizer(request.filled_prompt)["input_ids"]
                target = encode_target(tokenizer, request.target_new)
                sequences.append(list(prompt) + target[:-1])
                labels.append([-100] * (len(prompt) - 1) + target)
            ids, mask = pad_batch(sequences, tokenizer.pad_token_id, device)
            label_ids, _ = pad_batch(labels, -100, device)
            chunks.append(_Chunk(ids, mask, label_ids, len(chunk)))
        return chunks

    def _chunk_loss(
        self,
        model: PreTrainedModel,
        tuned: dict[str, torch.Tensor],
        originals: dict[str, torch.Tensor],
        chunk: _Chunk,
    ) -> torch.Tensor:
        """This process's part of the chunk's mean NLL: the sum of its requests' mean target
        NLL over the whole chunk's size (0 for an empty share)."""
        if chunk.ids is None:
            return torch.zeros((), device=next(iter(tuned.values())).device)
        weights = {name: t.to(originals[name].dtype) for name, t in tuned.items()}
        logits = functional_call(
            model, weights, args=(), kwargs={"input_ids": chunk.ids, "attention_mask": chunk.mask}
        ).logits
        token_nll = F.cross_entropy(
            logits.float().transpose(1, 2), chunk.labels, ignore_index=-100, reduction="none"
        )
        counts = (chunk.labels != -100).sum(1)
        return (token_nll.sum(1) / counts).sum() / chunk.size

    def compute_deltas(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        transform: DeltaFn | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tune copies of the edited weights; ΔW = tuned − original (out × in) per layer.

        FT has no layer loop (all layers are tuned at once), so ``transform`` is ignored and the
        caller applies the in-loop transforms to the result (``transform_in_loop = False``).
        """
        spec = architecture_of(model)
        device = model_device(model)
        started = time.perf_counter()
        names = [spec.weight_name(layer) for layer in self.layers]
        originals = {name: model.get_parameter(name).detach() for name in names}
        tuned = {
            name: weight.float().clone().requires_grad_(True) for name, weight in originals.items()
        }
        optimizer = torch.optim.Adam(
            list(tuned.values()), lr=self.lr, weight_decay=self.weight_decay
        )
        chunks = self._chunk_inputs(tokenizer, requests, device)
        eps = self.norm_constraint
        passes, mean_loss = 0, float("nan")
        steps = range(self.num_steps)
        bar = tqdm(steps, desc="Fine-tuning", leave=False, disable=not self.progress)
        for _ in bar:
            passes += 1
            total = 0.0
            for chunk in chunks:
                optimizer.zero_grad()
                loss = self._chunk_loss(model, tuned, originals, chunk)
                # The chunk's mean NLL: the sum over the processes' shares.
                chunk_loss = float(self.collective.all_reduce_(loss.detach().clone()))
                total += chunk_loss * chunk.size
                if chunk_loss >= self.loss_threshold:
                    if loss.requires_grad:
                        loss.backward()
                    for t in tuned.values():  # every process steps with the whole gradient
                        if t.grad is None:
                            t.grad = torch.zeros_like(t)
                        self.collective.all_reduce_(t.grad)
                    optimizer.step()
                if eps is not None:
                    with torch.no_grad():
                        for name, t in tuned.items():
                            original = originals[name].float()
                            torch.clamp(t, original - eps, original + eps, out=t)
            mean_loss = total / len(requests)
            bar.set_postfix(loss=f"{mean_loss:.3f}")
            if mean_loss < self.loss_threshold:
                break
        deltas = {}
        for layer, name in zip(self.layers, names, strict=True):
            delta = (tuned[name].detach() - originals[name].float()).float()
            module = model.get_submodule(spec.mlp_out_name(layer))
            # ``linear_weight`` is the parameter itself when it is stored out × in (nn.Linear)
            # and a transposed view otherwise (GPT-2's Conv1D stores in × out).
            deltas[name] = delta if linear_weight(module) is module.weight else delta.T
        self.last_metrics = {"ft_loss": mean_loss, "ft_passes": float(passes)}
        self.last_timings = {"fine_tune": time.perf_counter() - started}
        return deltas

    def state_dict(self) -> dict[str, Any]:
        """FT keeps no sequential state: every batch starts from the weights as they are."""
        return {}
