"""UltraEdit (Gu et al., 2025, arXiv 2505.14679): training-free lifelong editing.

A faithful port of ``editor/ultraedit.py`` + ``nets.RunningMeanStd`` of
github.com/XiaojieGu/UltraEdit (the same algorithm as EasyEdit's ``models/ultraedit``). No v*
optimisation and no covariance statistics: one teacher-forced forward/backward pass on the new
targets gives, at every edited linear module, the keys (its inputs) and the value gradients (the
loss gradient at its outputs); a running mean/std over everything seen so far ("lifelong
normalisation") whitens them, and a ridge solve per module turns them into ΔW.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.data.requests import EditRequest
from sphere_lightning.editors.base import DeltaFn, Editor
from sphere_lightning.errors import ConfigError, editor_flag
from sphere_lightning.models.architectures import architecture_of, linear_weight
from sphere_lightning.models.batching import encode_target, model_device, pad_batch

#: The reference adds float32's machine epsilon (its features are float32) in the running std's
#: denominator and in the normalisation; the same constant is used here whatever the precision.
_EPS = torch.finfo(torch.float32).eps

#: One running mean/std: ``n`` (rows seen), ``mean``, ``var`` (the accumulated sum, not a
#: variance; see :func:`update_running_stats`) and ``std``, float64 vectors of size d_in + d_out.
RunningStats = dict[str, torch.Tensor]


def empty_running_stats(size: int, device: torch.device | str = "cpu") -> RunningStats:
    """Zero statistics of ``size`` features, as ``RunningMeanStd.__init__``."""
    zeros = torch.zeros(size, dtype=torch.float64, device=device)
    return {
        "n": torch.zeros(1, dtype=torch.float64, device=device),
        "mean": zeros.clone(),
        "var": zeros.clone(),
        "std": zeros.clone(),
    }


def update_running_stats(stats: RunningStats, x: torch.Tensor) -> RunningStats:
    """Fold the rows of ``x`` (m × size) into ``stats``, as ``RunningMeanStd.update``.

    Chan et al.'s parallel combination, with the reference's scaling of the batch term:
    var ← var + m·s² + n·m·δ²/(n + m), with s² the *unbiased* variance of the batch (so ``var``
    is m/(m−1) times a true sum of squared deviations per batch, and the result depends on how the
    rows are split into batches); std = √(var / (n + m − 1 + ε)). One row has no unbiased
    variance (the reference gets NaN there); it counts as 0 here.
    """
    x = x.to(device=stats["mean"].device, dtype=torch.float64)
    m = x.shape[0]
    n = stats["n"] + m
    delta = x.mean(0) - stats["mean"]
    batch_var = x.var(0) if m > 1 else torch.zeros_like(delta)
    var = stats["var"] + m * batch_var + stats["n"] * m * delta.pow(2) / n
    return {
        "n": n,
        "mean": stats["mean"] + m * delta / n,
        "var": var,
        "std": (var / (n - 1 + _EPS)).sqrt(),
    }


def normalise(stats: RunningStats, x: torch.Tensor) -> torch.Tensor:
    """(x − mean) / (std + ε), as ``RunningMeanStd.forward``."""
    return (x - stats["mean"].to(x)) / (stats["std"].to(x) + _EPS)


def ultraedit_update(
    keys: torch.Tensor,
    values_grad: torch.Tensor,
    stats: RunningStats,
    lr: float,
    l2: float,
) -> torch.Tensor:
    """ΔW (d_out × d_in) of one module, as ``ULTRAEDIT.predict_param_shifts`` (transposed).

    With z = normalise([k, g]) split into (k̂, ĝ), each row's pseudo-value is
    v = −lr ‖k̂‖² ĝ, and ΔW = Vᵀ K (Kᵀ K + λ I)⁻¹ with the *raw* keys K (n × d_in). Float64.
    """
    keys, values_grad = keys.double(), values_grad.double()
    z = normalise(stats, torch.cat((keys, values_grad), -1))
    keys_hat, values_hat = z.split([keys.shape[1], values_grad.shape[1]], -1)
    values = -lr * keys_hat.pow(2).sum(-1, keepdim=True) * values_hat
    eye = torch.eye(keys.shape[1], dtype=keys.dtype, device=keys.device)
    return torch.linalg.solve(keys.T @ keys + l2 * eye, keys.T @ values).T


class UltraEdit(Editor):
    """UltraEdit: closed-form updates from keys and value gradients under lifelong normalisation.

    For a batch, the requests (sorted by length, longest first, as the reference's collate) run
    in chunks of ``forward_batch_size`` through the model, teacher-forced on
    ``prompt + target_new[:-1]``; the loss is the chunk's mean cross-entropy over all its target
    tokens. At each edited layer's MLP out-projection, at every position that predicts a target
    token, the key k (the module's input) and the value gradient g = ∂loss/∂(module output) are
    read — one forward/backward for all layers at once, with no update in place. Each chunk's
    [k, g] rows update a running mean/std shared by all edited modules of one shape (the reference
    keys its ``lifelong_normalizer`` by shape); then, per layer, with the statistics including this
    batch::

        [k̂, ĝ] = ([k, g] − mean) / (std + ε)
        v_i     = −lr ‖k̂_i‖² ĝ_i
        ΔW      = Vᵀ K (Kᵀ K + λ I)⁻¹          (out × in; K the raw keys)

    The statistics are the editor's sequential state. ``compute_deltas`` updates a pending copy;
    :meth:`after_apply` commits it once the step's deltas are in the model, so a step that is
    rolled back or recomputed leaves them untouched. Everything is solved in float64 whatever the
    model's dtype. All layers are edited jointly, so ``transform`` (SPHERE and the other in-loop
    transforms) is applied by the caller afterwards (``transform_in_loop = False``).

    Args:
        layers: Blocks whose MLP out-projection is edited. The reference edits Llama-3's and
            Qwen2.5's ``gate_proj``/``up_proj`` (here only out-projections are editable), GPT-J's
            ``fc_out`` 18–26 of 28 (the default) and Mistral's ``down_proj`` 29–30 of 32.
        lr: Step size of the pseudo-values v = −lr ‖k̂‖² ĝ (the reference: 1e-6 on every model;
            SmolLM2 needs ~3e-4, see ``configs/editors/ultraedit.yaml``).
        l2: λ of the ridge solve (Kᵀ K + λ I); fixed at 1 (``torch.eye``) in the reference.
        forward_batch_size: Requests per forward/backward pass (the reference's
            ``dataset.batch_size`` / ``batch_size_once``: 10). Not only memory: the loss is the
            mean over one chunk's target tokens, and each chunk is one update of the statistics.
    """

    transform_in_loop = False

    def __init__(
        self,
        layers: Sequence[int] = (18, 19, 20, 21, 22, 23, 24, 25, 26),
        lr: float = 1e-6,
        l2: float = 1.0,
        forward_batch_size: int = 10,
    ) -> None:
        super().__init__(layers)
        if not lr > 0:
            raise ConfigError(f"{editor_flag('lr')} must be > 0, got {lr}")
        if not l2 > 0:
            raise ConfigError(
                f"{editor_flag('l2')} must be > 0 (Kᵀ K alone is singular for fewer target "
                f"tokens than key dimensions), got {l2}"
            )
        if forward_batch_size < 1:
            raise ConfigError(
                f"{editor_flag('forward_batch_size')} must be ≥ 1, got {forward_batch_size}"
            )
        self.lr = lr
        self.l2 = l2
        self.forward_batch_size = forward_batch_size
        #: Committed running statistics per module shape ``"<d_in>x<d_out>"``.
        self.normalisers: dict[str, RunningStats] = {}
        #: The statistics including the last ``compute_deltas`` batch, until ``after_apply``.
        self.pending: dict[str, RunningStats] | None = None

    # -- reading keys and value gradients -----------------------------------------------------

    def _chunks(
        self,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        device: torch.device,
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(input_ids, attention_mask, labels)`` per chunk: ``prompt + target[:-1]``,
        right-padded, labels the target token each position predicts (−100 elsewhere); longest
        first (a stable sort, as the reference's collate)."""
        sequences, labels = [], []
        for request in requests:
            prompt = list(tokenizer(request.filled_prompt)["input_ids"])
            target = encode_target(tokenizer, request.target_new)
            sequences.append(prompt + target[:-1])
            labels.append([-100] * (len(prompt) - 1) + target)
        order = sorted(range(len(requests)), key=lambda i: len(sequences[i]), reverse=True)
        chunks = []
        for start in range(0, len(order), self.forward_batch_size):
            index = order[start : start + self.forward_batch_size]
            ids, mask = pad_batch([sequences[i] for i in index], tokenizer.pad_token_id, device)
            label_ids, _ = pad_batch([labels[i] for i in index], -100, device)
            chunks.append((ids, mask, label_ids))
        return chunks

    def _keys_and_gradients(
        self,
        model: PreTrainedModel,
        module_names: Sequence[str],
        ids: torch.Tensor,
        mask: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
        """Per module, keys and value gradients (float32, rows in row-major order of the target
        positions) of one chunk, and the chunk's loss.

        No parameter is made to require a gradient: the lowest edited module's output, a leaf
        when nothing below needs a gradient, is marked as requiring one, so the graph runs from
        there to the loss and ``autograd.grad`` reads the outputs' gradients only.
        """
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}

        def make_hook(name: str):
            def hook(module, args, output):
                inputs[name] = args[0].detach()
                if not output.requires_grad:
                    output.requires_grad_(True)
                outputs[name] = output

            return hook

        handles = [
            model.get_submodule(name).register_forward_hook(make_hook(name))
            for name in module_names
        ]
        try:
            with torch.enable_grad():
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                where = labels != -100
                loss = F.cross_entropy(logits[where].float(), labels[where])
                grads = torch.autograd.grad(loss, [outputs[name] for name in module_names])
        finally:
            for handle in handles:
                handle.remove()
        result = {}
        for name, grad in zip(module_names, grads, strict=True):
            at = where.to(grad.device)
            result[name] = (inputs[name][at].float(), grad[at].float())
        return result, float(loss.detach())

    # -- the edit ------------------------------------------------------------------------------

    def compute_deltas(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        transform: DeltaFn | None = None,
    ) -> dict[str, torch.Tensor]:
        """ΔW (out × in, float32) per edited layer; the model is only read.

        ``transform`` is ignored (all layers at once: ``transform_in_loop = False``).
        """
        spec = architecture_of(model)
        module_names = [spec.mlp_out_name(layer) for layer in self.layers]
        shapes = {}
        for name in module_names:
            weight = linear_weight(model.get_submodule(name))
            shapes[name] = f"{weight.shape[1]}x{weight.shape[0]}"
        timings = {"keys_and_gradients": 0.0, "solve": 0.0}
        start = time.perf_counter()
        pending = {shape: dict(stats) for shape, stats in self.normalisers.items()}
        keys: dict[str, list[torch.Tensor]] = {name: [] for name in module_names}
        grads: dict[str, list[torch.Tensor]] = {name: [] for name in module_names}
        losses = []
        chunks = self._chunks(tokenizer, requests, model_device(model))
        for ids, mask, labels in tqdm(
            chunks, desc="Keys and gradients", leave=False, disable=not self.progress
        ):
            read, loss = self._keys_and_gradients(model, module_names, ids, mask, labels)
            losses.append(loss)
            # As the reference's ``cache``: chunk by chunk, module by module.
            for name in module_names:
                k, g = read[name]
                keys[name].append(k)
                grads[name].append(g)
                shape = shapes[name]
                if shape not in pending:
                    pending[shape] = empty_running_stats(k.shape[1] + g.shape[1], k.device)
                pending[shape] = update_running_stats(pending[shape], torch.cat((k, g), -1))
        timings["keys_and_gradients"] = time.perf_counter() - start
        start = time.perf_counter()
        deltas = {}
        for layer, name in zip(
            tqdm(self.layers, desc="Solving", leave=False, disable=not self.progress),
            module_names,
            strict=True,
        ):
            k, g = torch.cat(keys[name]), torch.cat(grads[name])
            stats = {key: t.to(k.device) for key, t in pending[shapes[name]].items()}
            deltas[spec.weight_name(layer)] = ultraedit_update(
                k, g, stats, self.lr, self.l2
            ).float()
        timings["solve"] = time.perf_counter() - start
        self.pending = pending
        self.last_timings = timings
        self.last_metrics = {
            "target_loss": sum(losses) / len(losses),
            "target_tokens": float(sum(t.shape[0] for t in keys[module_names[0]])),
        }
        return deltas

    def after_apply(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
    ) -> None:
        """Commit the statistics of the batch just applied (the reference updates them before
        it solves, so the solve already used them)."""
        if self.pending is not None:
            self.normalisers = self.pending
            self.pending = None

    def state_dict(self) -> dict[str, Any]:
        """The committed running statistics, on the CPU."""
        return {
            "normalisers": {
                shape: {key: t.cpu() for key, t in stats.items()}
                for shape, stats in self.normalisers.items()
            }
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.normalisers = {
            shape: dict(stats) for shape, stats in state.get("normalisers", {}).items()
        }
        self.pending = None
