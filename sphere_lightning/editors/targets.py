"""The target value v* of each request: what the edited layer's output should become.

This is ROME/MEMIT's ``compute_z`` written once for every locate-then-edit editor. A vector δ_j
added to the residual stream after block ``layer`` at the subject's last token is optimised so the
model predicts ``target_new`` after every context-prefixed prompt, with a KL term that keeps the
subject's "{} is a" distribution, KL(current ‖ initial), and a weight decay ‖δ‖ / ‖h‖²; the
loss of each request is exactly the one of ROME/MEMIT's reference code. v*_j = h_j + δ_j.

All requests of a batch are optimised together. Their losses are independent sums, and Adam acts
element-wise, so this is the same optimisation as one request at a time; a request that reaches
the loss threshold is frozen (ROME's early stop) and leaves the forward passes.

Two options trade exactness for speed; both are off by default, and with both off the arithmetic
is exactly the one above. ``early_stop="most_probable"`` also freezes a request as soon as
``target_new`` is the most probable token at every target position of every one of its prompts
(teacher-forced), ENCORE's most-probable early stopping (Gupta et al. 2025, arXiv 2502.01636).
``precision="bf16"`` runs the blocks above the edit point under bfloat16 autocast, in the pass
without δ (so the initial KL distribution is the one the steps start from) and in the Adam steps,
and the lm head's matmul in bf16 (its weight cast once); h and everything below the edit point,
δ, log-softmax, the NLL and KL terms and Adam stay float32.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.data.requests import EditRequest
from sphere_lightning.editors.hooks import encode_with_subject
from sphere_lightning.errors import ConfigError, editor_flag
from sphere_lightning.models.architectures import ArchitectureSpec
from sphere_lightning.models.batching import encode_target, model_device

KL_PROMPT = "{} is a"

#: Values of :attr:`TargetOptions.early_stop`.
EARLY_STOPS = ("loss", "most_probable")
#: Values of :attr:`TargetOptions.precision`.
PRECISIONS = ("float32", "bf16", "auto")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively: a CUDA device that supports bf16,
    or a CPU with AVX512-BF16 or AMX. Elsewhere (an AVX2-only CPU, say) bf16 matmuls are
    emulated and run about 20x slower than float32 ones."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision v* runs in: ``auto`` is ``bf16`` where :func:`native_bf16`, else
    ``float32``. An explicit ``bf16`` without native support runs as asked, with a warning."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "float32"
    if precision == "bf16" and not native_bf16(device):
        warnings.warn(
            f"{editor_flag('target.precision')} is bf16, but this {device.type} has no native "
            "bfloat16 matmuls (no AVX512-BF16 or AMX on a CPU): they are emulated and v* runs "
            "many times slower than in float32; `auto` picks float32 here",
            stacklevel=2,
        )
    return precision


@dataclass(frozen=True)
class TargetOptions:
    """How v* is optimised: the editor's ``target`` options (ROME/MEMIT names in brackets).

    In a config: ``model.editor.init_args.target.<field>``.

    Attributes:
        num_steps: Adam steps per request [v_num_grad_steps].
        lr: Adam learning rate [v_lr].
        loss_threshold: A request stops once its loss falls below this.
        clamp_norm_factor: ‖δ‖ is clamped to this times ‖h‖ [clamp_norm_factor].
        kl_factor: Weight of the KL term on "{subject} is a" [kl_factor].
        weight_decay: Weight of ‖δ‖ / ‖h‖², as in ROME/MEMIT's code [v_weight_decay].
        batch_size: Requests per forward pass; bounds memory, not the result.
        skip_lower_layers: Run the blocks up to ``layer`` once and replay their output, instead of
            recomputing them on every step (they do not depend on δ; same result, less work).
        reuse_prefix: Compute the key/value cache of the tokens before the subject's last token
            once; by causality they do not depend on δ, so each step runs only the suffix.
        share_template_prefix: With ``reuse_prefix``, run the tokens a context template puts in
            front of every prompt (the longest token prefix its sequences share) once, and every
            sequence's prefix on from there; off, each sequence's whole prefix is run.
        group_by_suffix: Put sequences of the same suffix length (from the subject's last token
            on) in one forward pass, whichever request they belong to, so no step computes
            padding. Off: each forward pass holds ``batch_size`` whole requests (ROME's layout).
        early_stop: When a request stops before ``num_steps``: ``loss`` once its loss is below
            ``loss_threshold`` (ROME); ``most_probable`` also as soon as ``target_new`` is the
            argmax at every target token of every prompt, teacher-forced (ENCORE).
        precision: ``float32``; ``bf16``: the blocks above the edit point under bfloat16
            autocast (on the model's device type), in the pass without δ and in the forward and
            backward passes of the Adam steps, and the lm head's matmul in bf16 on the positions
            the loss reads; h (block ``layer``'s output, v*'s origin) and every block up to
            ``layer``, δ, log-softmax (of the upcast logits), KL, the loss and Adam stay float32;
            ``auto``: ``bf16`` where the device computes bf16 natively (:func:`native_bf16`),
            else ``float32``.
    """

    num_steps: int = 25
    lr: float = 0.5
    loss_threshold: float = 5e-2
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    batch_size: int = 25
    skip_lower_layers: bool = True
    reuse_prefix: bool = True
    share_template_prefix: bool = True
    group_by_suffix: bool = True
    early_stop: str = "loss"
    precision: str = "float32"

    def __post_init__(self) -> None:
        for name in ("num_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"{editor_flag('target', name)} must be ≥ 1, got {getattr(self, name)}"
                )
        if not self.clamp_norm_factor > 0:
            raise ConfigError(
                f"{editor_flag('target.clamp_norm_factor')} must be > 0, "
                f"got {self.clamp_norm_factor}"
            )
        if self.weight_decay < 0:
            raise ConfigError(
                f"{editor_flag('target.weight_decay')} must be ≥ 0, got {self.weight_decay}"
            )
        if self.early_stop not in EARLY_STOPS:
            raise ConfigError(
                f"{editor_flag('target.early_stop')} should be one of {', '.join(EARLY_STOPS)}, "
                f"got {self.early_stop!r}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"{editor_flag('target.precision')} should be one of {', '.join(PRECISIONS)}, "
                f"got {self.precision!r}"
            )


@dataclass
class TargetResult:
    """v* for each request, and how the optimisation went."""

    values: torch.Tensor
    initial: torch.Tensor
    losses: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


@dataclass
class _Sequence:
    """One prompt of one request: its tokens, the subject's last token and its target tokens."""

    request: int  # global request index
    ids: list[int]
    lookup: int  # index of the subject's last token
    role: str  # "first" (the bare prompt, whose h is v*'s origin), "context" or "kl"
    targets: list[tuple[int, int, float]]  # (position predicting it, token, weight)
    template: int = -1  # index of its context template (-1: the KL prompt)

    @property
    def suffix(self) -> int:
        """Tokens from the subject's last one to the end: what every step has to run."""
        return len(self.ids) - self.lookup


@dataclass
class _Chunk:
    """Sequences run in one forward pass, aligned so every subject-last token is in ``split``.

    Sequences are left-padded to the alignment column and right-padded after it; position ids
    follow the attention mask, so the padding changes nothing. A chunk holds sequences, not
    requests: a request's prompts may sit in different chunks (its loss is a sum over them).
    """

    seq_request: torch.Tensor  # (S,) global request index of each sequence
    ids: torch.Tensor  # (S, T)
    mask: torch.Tensor  # (S, T)
    positions: torch.Tensor  # (S, T)
    split: int  # column of every sequence's subject-last token
    ends: torch.Tensor  # (S,) one past each sequence's last column
    h_rows: torch.Tensor  # (H,) rows of "first" sequences (where h is read)
    kl_rows: torch.Tensor  # (K,) rows of KL sequences
    tgt_row: torch.Tensor  # (P,) row of each target token
    tgt_col: torch.Tensor  # (P,) column predicting it
    tgt_tok: torch.Tensor  # (P,) the token
    tgt_weight: torch.Tensor  # (P,) 1 / (#tokens of its target × #templates)
    start: int = 0  # first column each step runs (``split`` when the prefix is cached)
    replay_out: torch.Tensor | None = None  # block output at columns ≥ start
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    kl_init: torch.Tensor | None = None  # (K, V) log-probabilities before the edit


def _sequences(
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
) -> list[_Sequence]:
    seqs = []
    for index, request in enumerate(requests):
        target = encode_target(tokenizer, request.target_new)
        weight = 1.0 / (len(target) * len(templates))
        for t, template in enumerate(templates):
            enc = encode_with_subject(tokenizer, template.format(request.prompt), request.subject)
            targets = [(len(enc.ids) - 1 + k, tok, weight) for k, tok in enumerate(target)]
            role = "first" if t == 0 else "context"
            seqs.append(_Sequence(index, enc.ids + target[:-1], enc.subject_last, role, targets, t))
        # The KL term reads the subject's last token, so by causality the tokens after it
        # (" is a") change nothing and are not run.
        enc = encode_with_subject(tokenizer, KL_PROMPT, request.subject)
        seqs.append(_Sequence(index, enc.ids[: enc.subject_last + 1], enc.subject_last, "kl", []))
    return seqs


def _build_chunk(
    tokenizer: PreTrainedTokenizerBase, seqs: Sequence[_Sequence], device: torch.device
) -> _Chunk:
    split = max(seq.lookup for seq in seqs)
    shifts = [split - seq.lookup for seq in seqs]
    width = split + max(seq.suffix for seq in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (shift, seq) in enumerate(zip(shifts, seqs, strict=True)):
        ids[row, shift : shift + len(seq.ids)] = torch.as_tensor(seq.ids, dtype=torch.long)
        mask[row, shift : shift + len(seq.ids)] = 1
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    targets = [
        (row, pos + shifts[row], tok, weight)
        for row, seq in enumerate(seqs)
        for pos, tok, weight in seq.targets
    ]

    def long(values) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.long, device=device)

    return _Chunk(
        seq_request=long([seq.request for seq in seqs]),
        ids=ids.to(device),
        mask=mask.to(device),
        positions=positions.to(device),
        split=split,
        ends=long([split + seq.suffix for seq in seqs]),
        h_rows=long([row for row, seq in enumerate(seqs) if seq.role == "first"]),
        kl_rows=long([row for row, seq in enumerate(seqs) if seq.role == "kl"]),
        tgt_row=long([t[0] for t in targets]),
        tgt_col=long([t[1] for t in targets]),
        tgt_tok=long([t[2] for t in targets]),
        tgt_weight=torch.tensor([t[3] for t in targets], device=device),
    )


class _ReplayBelow:
    """Skip blocks ``0..layer`` and replay block ``layer``'s cached output instead.

    The blocks below the edit point do not depend on δ, so their output is computed once. Their
    ``forward`` is shadowed on the instance (hooks still run) and restored on exit.
    """

    def __init__(self, blocks: torch.nn.ModuleList, layer: int, output: torch.Tensor) -> None:
        self.blocks = blocks
        self.layer = layer
        self.output = output

    def __enter__(self) -> _ReplayBelow:
        for i in range(self.layer):
            self.blocks[i].forward = lambda hidden_states, *args, **kwargs: hidden_states
        self.blocks[self.layer].forward = lambda *args, **kwargs: self.output
        return self

    def __exit__(self, *exc) -> None:
        for i in range(self.layer + 1):
            del self.blocks[i].forward


class _StopForward(Exception):
    """Raised by a forward hook to end a pass whose remaining blocks' output is not needed."""


class _LowPrecisionAbove:
    """Run blocks ``layer + 1`` on in bfloat16: their matrices cast once, their forward under
    bfloat16 autocast (so the residual stream, the norms and everything below stay float32).

    Autocast alone would cast every weight on every forward pass (it caches casts only of
    weights that require a gradient), which costs as much as the bf16 matmuls save; the casts
    are made once here and the float32 tensors put back on exit. On CPU attention uses the math
    kernel: the flash kernel's bf16 backward is ~5x slower than its float32 one on short
    sequences, the math kernel's bf16 matmuls are not.
    """

    def __init__(self, blocks: torch.nn.ModuleList, layer: int, device: torch.device) -> None:
        self.blocks = [blocks[i] for i in range(layer + 1, len(blocks))]
        self.device_type = device.type
        self.originals: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def _wrap(self, forward):
        def low_precision(*args, **kwargs):
            with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16):
                if self.device_type != "cpu":
                    return forward(*args, **kwargs)
                with sdpa_kernel(SDPBackend.MATH):
                    return forward(*args, **kwargs)

        return low_precision

    def __enter__(self) -> _LowPrecisionAbove:
        for block in self.blocks:
            for param in block.parameters():
                if param.dim() >= 2 and param.dtype == torch.float32:
                    self.originals.append((param, param.data))
                    param.data = param.data.to(torch.bfloat16)
            block.forward = self._wrap(block.forward)
        return self

    def __exit__(self, *exc) -> None:
        for param, data in self.originals:
            param.data = data
        self.originals.clear()
        for block in self.blocks:
            del block.forward


def _cache_from(
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor | None = None
):
    """A fresh cache holding the prefix keys/values of the selected rows (default: all, uncopied;
    a cache's update concatenates into new tensors, so ``prefix_kv`` is never written)."""
    cache = DynamicCache()
    for index, (keys, values) in enumerate(prefix_kv):
        if rows is None:
            cache.update(keys, values, index)
        else:
            cache.update(keys[rows], values[rows], index)
    return cache


def _shared_prefix(seqs: Sequence[_Sequence]) -> int:
    """The number of leading prefix tokens all ``seqs`` share, leaving each at least one own."""
    limit = min(seq.lookup for seq in seqs) - 1
    first = seqs[0].ids
    shared = 0
    while shared < limit and all(seq.ids[shared] == first[shared] for seq in seqs):
        shared += 1
    return shared


def _prefix_caches(
    base: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    seqs: Sequence[_Sequence],
    batch_rows: int,
    device: torch.device,
    cache_arg: str = "past_key_values",
    share_template_prefix: bool = False,
) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Keys/values of every sequence's prefix (the tokens before its subject's last one).

    The forward pass gets a plain :class:`DynamicCache` (passed as ``cache_arg``), which keeps
    every key of every layer: the model's own cache would trim sliding-window layers (Gemma's)
    to the window, and a prefix longer than the window would lose keys the suffix is masked
    from anyway but that the assembled cache expects.

    Prefixes of similar length share a forward pass (left-padded, with mask-derived positions,
    so each sequence's keys/values are those of the sequence alone). With
    ``share_template_prefix`` the sequences of one context template first run the tokens they
    all start with once; each then continues from that cache (the padding sits between the
    shared tokens and its own). Keyed by ``id(seq)``; each entry holds one ``(keys, values)``
    pair per layer, ``(heads, prefix, head_dim)``.
    """
    todo = [s for s in seqs if s.lookup > 0]
    groups: dict[int, list[_Sequence]] = {}
    for seq in todo:
        groups.setdefault(seq.template if share_template_prefix else -1, []).append(seq)
    result: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for template, members in groups.items():
        shared = _shared_prefix(members) if template >= 0 and len(members) > 1 else 0
        if shared == 0:
            members = sorted(members, key=lambda s: s.lookup)
            batches = [members[b : b + batch_rows] for b in range(0, len(members), batch_rows)]
            head = []
        else:
            # After the shared tokens, a batch holds prefixes of one length: padding between the
            # shared tokens and a row's own would break sliding-window masks, which count columns.
            by_length: dict[int, list[_Sequence]] = {}
            for seq in members:
                by_length.setdefault(seq.lookup, []).append(seq)
            batches = [
                same[b : b + batch_rows]
                for _, same in sorted(by_length.items())
                for b in range(0, len(same), batch_rows)
            ]
            head = _run_prefix(base, [members[0].ids[:shared]], None, None, [], cache_arg, device)
        for batch in batches:
            width = batch[-1].lookup - shared
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), shared + width), dtype=torch.long)
            mask[:, :shared] = 1
            for row, seq in enumerate(batch):
                own = seq.lookup - shared
                ids[row, width - own :] = torch.as_tensor(seq.ids[shared : seq.lookup])
                mask[row, shared + width - own :] = 1
            positions = (mask.cumsum(1) - 1).clamp_min(0)[:, shared:]
            layers = _run_prefix(base, ids, mask, positions, head, cache_arg, device)
            for row, seq in enumerate(batch):
                cut = shared + width - (seq.lookup - shared)

                def own(t: torch.Tensor, row=row, cut=cut, shared=shared) -> torch.Tensor:
                    """The row's keys/values: the shared columns, then its own (views if none
                    are shared)."""
                    if shared == 0:
                        return t[row, :, cut:]
                    return torch.cat([t[row, :, :shared], t[row, :, cut:]], dim=1)

                result[id(seq)] = [(own(k), own(v)) for k, v in layers]
    return result


def _run_prefix(
    base: torch.nn.Module,
    ids,
    mask: torch.Tensor | None,
    positions: torch.Tensor | None,
    head: list[tuple[torch.Tensor, torch.Tensor]],
    cache_arg: str,
    device: torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One no-grad pass over ``ids`` continuing from ``head`` (keys/values of tokens every row
    shares, batch 1); the keys/values of every layer, ``head``'s columns first."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    cache = DynamicCache()
    for index, (keys, values) in enumerate(head):
        cache.update(keys.expand(len(ids), -1, -1, -1), values.expand(len(ids), -1, -1, -1), index)
    inputs = {"input_ids": ids.to(device), "use_cache": True, cache_arg: cache}
    if mask is not None:
        inputs.update(attention_mask=mask.to(device), position_ids=positions.to(device))
    with torch.no_grad():
        output = base(**inputs)
    cache = getattr(output, "cache", None) or output.past_key_values
    return [(lay.keys, lay.values) for lay in cache.layers]


def _assemble_cache(
    group: Sequence[_Sequence],
    prefix_kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
    split: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The prefix cache of a chunk: each row's prefix right-aligned to column ``split``."""
    first = next(prefix_kv[id(seq)] for seq in group if seq.lookup > 0)
    layers = []
    for index, (k0, v0) in enumerate(first):
        keys = k0.new_zeros(len(group), k0.shape[0], split, k0.shape[-1])
        values = v0.new_zeros(len(group), v0.shape[0], split, v0.shape[-1])
        for row, seq in enumerate(group):
            if seq.lookup > 0:
                k, v = prefix_kv[id(seq)][index]
                keys[row, :, split - seq.lookup :] = k
                values[row, :, split - seq.lookup :] = v
        layers.append((keys, values))
    return layers


class TargetOptimisation:
    """The v* optimisation of one batch of requests, one method per phase.

    :meth:`prepare` tokenises the prompts and targets into chunks, :meth:`measure_initial` runs
    them once without δ, :meth:`install_hook` adds δ to block ``layer``'s output, :meth:`optimise`
    runs the Adam steps and :meth:`finish` reads v*. :meth:`run` does all of it in order; most
    callers want :func:`compute_target_values`.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        spec: ArchitectureSpec,
        requests: Sequence[EditRequest],
        layer: int,
        context_templates: Sequence[str],
        options: TargetOptions | None = None,
    ) -> None:
        """Set up the optimisation (nothing runs yet).

        Args:
            model: The model, its weights as they are now.
            tokenizer: Its tokenizer.
            spec: Its architecture spec (where the blocks are).
            requests: The requests; all are optimised together.
            layer: The block at whose output v* is read and δ added.
            context_templates: Templates, the first ``"{}"`` (the bare prompt).
            options: Hyper-parameters (defaults: :class:`TargetOptions`).
        """
        if context_templates[0] != "{}":
            raise ValueError("The first context template must be '{}' (the bare prompt)")
        self.opts = options or TargetOptions()
        self.model = model
        self.tokenizer = tokenizer
        self.requests = requests
        self.layer = layer
        self.context_templates = context_templates
        self.device = model_device(model)
        #: ``float32`` or ``bf16``: :attr:`TargetOptions.precision` with ``auto`` resolved.
        self.precision = resolve_precision(self.opts.precision, self.device)
        self.blocks = spec.blocks(model)
        self.block = self.blocks[layer]
        self.lm_head = model.get_output_embeddings()
        self.base = model.base_model
        self.n = len(requests)
        # transformers renamed `past_key_values` to `cache` during 5.x.
        self.cache_arg = (
            "cache"
            if "cache" in inspect.signature(self.base.forward).parameters
            else "past_key_values"
        )
        self.seqs: list[_Sequence] = []
        self.groups: list[list[_Sequence]] = []
        self.chunks: list[_Chunk] = []
        self.initial = torch.zeros(0)
        self.delta = torch.zeros(0)
        self.losses = torch.zeros(0)
        self.steps = torch.zeros(0, dtype=torch.long)
        # What the δ hook adds, and at which column, in the forward pass now running.
        self._add: torch.Tensor | None = None
        self._col: int | None = None
        # The lm head's (weight, bias) in bf16 while ``precision="bf16"`` is in effect.
        self._head_bf16: tuple[torch.Tensor, torch.Tensor | None] | None = None
        #: ``(wall seconds, CPU seconds of this process)`` per phase, accumulated over the run.
        #: Host-side clocks: on an accelerator they time the dispatch unless it synchronises.
        self.timings: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            entry = self.timings.setdefault(phase, [0.0, 0.0])
            entry[0] += time.perf_counter() - wall
            entry[1] += time.process_time() - cpu

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        """With ``precision="bf16"``: the blocks above the edit point in bf16 and a bf16 copy of
        the lm head's matrix for :meth:`_log_probs` (a copy: the head may share its weight with
        the input embedding, which the float32 part of the model reads). Else nothing."""
        if self.precision != "bf16":
            yield
            return
        head = self.lm_head
        if type(head) is torch.nn.Linear and head.weight.dtype == torch.float32:
            bias = None if head.bias is None else head.bias.detach().to(torch.bfloat16)
            self._head_bf16 = (head.weight.detach().to(torch.bfloat16), bias)
        try:
            with _LowPrecisionAbove(self.blocks, self.layer, self.device):
                yield
        finally:
            self._head_bf16 = None

    def _log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 log-probabilities of the final hidden states ``hidden`` (picked rows): the
        head's matmul in bf16 under ``precision="bf16"``, upcast before the log-softmax."""
        if self._head_bf16 is not None:
            logits = F.linear(hidden.to(torch.bfloat16), *self._head_bf16)
        else:
            logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))
        return F.log_softmax(logits.float(), -1)

    @property
    def rows_per_chunk(self) -> int:
        """Sequences per forward pass: ``batch_size`` requests' worth."""
        return self.opts.batch_size * (len(self.context_templates) + 1)

    def prepare(self) -> None:
        """Tokenise every prompt with its target and group the sequences into chunks."""
        self.seqs = _sequences(self.tokenizer, self.requests, self.context_templates)
        rows_per_chunk = self.rows_per_chunk
        groups: list[list[_Sequence]] = []
        if self.opts.group_by_suffix:
            # Every step runs each sequence from its subject's last token on, so a chunk holds
            # sequences of one suffix length (sorted by prefix length): no step computes padding.
            # Each request's optimisation is independent of which chunks its prompts are in.
            for seq in sorted(self.seqs, key=lambda s: (s.suffix, s.lookup)):
                full = groups and len(groups[-1]) == rows_per_chunk
                if not groups or groups[-1][0].suffix != seq.suffix or full:
                    groups.append([])
                groups[-1].append(seq)
        else:
            groups = [
                self.seqs[s : s + rows_per_chunk] for s in range(0, len(self.seqs), rows_per_chunk)
            ]
        self.groups = groups
        self.chunks = [_build_chunk(self.tokenizer, group, self.device) for group in groups]

    def measure_initial(self) -> None:
        """Pass 0, without δ: the residual stream h at the edit point, the initial KL
        distribution, the block output to replay and the prefix keys/values.

        With the prefix reused, the prefixes run once, in batches of similar length, and each
        chunk's suffix continues from their cache, so every token is computed once.
        """
        opts = self.opts
        if opts.reuse_prefix:
            prefix_kv = _prefix_caches(
                self.base,
                self.tokenizer,
                self.seqs,
                self.rows_per_chunk,
                self.device,
                self.cache_arg,
                opts.share_template_prefix,
            )
        captured: dict[str, object] = {}
        stop = False

        def keep(module, args, output):
            captured["out"] = output
            if stop:
                raise _StopForward

        self.initial = torch.zeros(self.n, self.model.config.hidden_size, device=self.device)
        replay = opts.skip_lower_layers
        for chunk, group in zip(self.chunks, self.groups, strict=True):
            inputs = {"attention_mask": chunk.mask}
            if opts.reuse_prefix and chunk.split > 0:
                chunk.start = chunk.split
                chunk.prefix_kv = _assemble_cache(group, prefix_kv, chunk.split)
                inputs.update({self.cache_arg: _cache_from(chunk.prefix_kv), "use_cache": True})
            else:
                inputs["use_cache"] = False
            start = chunk.start
            # Only the KL rows need the blocks above the edit point here (the prefix pass has
            # their keys/values): a chunk without any stops after block ``layer``.
            stop = len(chunk.kl_rows) == 0
            hidden = None
            handle = self.block.register_forward_hook(keep)
            try:
                with torch.no_grad():
                    hidden = self.base(
                        input_ids=chunk.ids[:, start:],
                        position_ids=chunk.positions[:, start:],
                        **inputs,
                    ).last_hidden_state
            except _StopForward:
                pass
            finally:
                handle.remove()
            out = captured.pop("out")
            if isinstance(out, tuple):  # a block type that returns more than the hidden state
                replay, out = False, out[0]
            self.initial[chunk.seq_request[chunk.h_rows]] = out[
                chunk.h_rows, chunk.split - start
            ].float()
            if hidden is None:
                chunk.kl_init = torch.zeros(0, self.lm_head.weight.shape[0], device=self.device)
            elif self._head_bf16 is not None:
                # The head of the steps, so that KL starts at ~0.
                chunk.kl_init = self._log_probs(hidden[chunk.kl_rows, chunk.split - start])
            else:
                chunk.kl_init = F.log_softmax(
                    self.lm_head(hidden[chunk.kl_rows, chunk.split - start]).float(), dim=-1
                )
            chunk.replay_out = out.detach() if replay else None

    def _inject(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, self._col] += self._add.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def install_hook(self) -> RemovableHandle:
        """Add δ to block ``layer``'s output at the subject's last token of every forward pass
        that :meth:`chunk_loss` runs; the caller removes the returned handle."""
        return self.block.register_forward_hook(self._inject)

    def chunk_loss(
        self, chunk: _Chunk, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The chunk's contribution (NLL and KL terms) to every request's loss, for ``rows``,
        and, with ``early_stop="most_probable"``, each request's number of target tokens in the
        chunk that are not the argmax (``None`` otherwise)."""
        device, opts = self.device, self.opts
        remap = torch.full((len(chunk.ids),), -1, dtype=torch.long, device=device)
        remap[rows] = torch.arange(len(rows), device=device)
        start = chunk.start
        end = int(chunk.ends[rows].max())  # right padding past every row's end is not run
        self._add = self.delta[chunk.seq_request[rows]]
        self._col = chunk.split - start
        kwargs = {
            "input_ids": chunk.ids[rows, start:end],
            "attention_mask": chunk.mask[rows, :end],
            "position_ids": chunk.positions[rows, start:end],
        }
        if chunk.prefix_kv is not None:
            # Every row active (rows is then 0..S-1): the prefix cache as it is, uncopied.
            cache_rows = None if len(rows) == len(chunk.ids) else rows
            kwargs.update(
                {self.cache_arg: _cache_from(chunk.prefix_kv, cache_rows), "use_cache": True}
            )
        else:
            kwargs.update(use_cache=False)
        replay = contextlib.nullcontext()
        if chunk.replay_out is not None:
            replay = _ReplayBelow(self.blocks, self.layer, chunk.replay_out[rows, : end - start])
        with self._timed("forward (blocks)"), replay:
            hidden = self.base(**kwargs).last_hidden_state

        kl_keep = remap[chunk.kl_rows] >= 0
        tgt_keep = remap[chunk.tgt_row] >= 0
        kl_rows = chunk.kl_rows[kl_keep]
        tgt_rows = chunk.tgt_row[tgt_keep]
        with self._timed("lm_head + log_softmax"):
            picked = torch.cat(
                [
                    hidden[remap[kl_rows], chunk.split - start],
                    hidden[remap[tgt_rows], chunk.tgt_col[tgt_keep] - start],
                ]
            )
            # Under bf16 only the head's matmul is: its logits are upcast, so the log-softmax,
            # the NLL and the KL are float32.
            logp = self._log_probs(picked)
        with self._timed("loss terms (NLL + KL)"):
            kl_logp, tgt_logp = logp[: len(kl_rows)], logp[len(kl_rows) :]
            tokens = chunk.tgt_tok[tgt_keep]
            # NLL: mean over target tokens, then over templates, per request.
            token_nll = -tgt_logp.gather(1, tokens[:, None]).squeeze(1)
            # KL(current ‖ initial), the argument order of ROME/MEMIT's ``kl_div(init, current)``.
            kl = F.kl_div(chunk.kl_init[kl_keep], kl_logp, log_target=True, reduction="none")
            terms = torch.zeros(self.n, device=device)
            terms = terms.index_add(
                0, chunk.seq_request[tgt_rows], token_nll * chunk.tgt_weight[tgt_keep]
            )
            terms = terms.index_add(0, chunk.seq_request[kl_rows], opts.kl_factor * kl.sum(-1))
            misses = None
            if opts.early_stop == "most_probable":
                # A tie with another token counts as a miss: the target must be the argmax.
                wrong = (tgt_logp.detach().argmax(-1) != tokens).long()
                misses = torch.zeros(self.n, dtype=torch.long, device=device)
                misses = misses.index_add(0, chunk.seq_request[tgt_rows], wrong)
        return terms, misses

    def optimise(self, progress: bool = True) -> None:
        """Run the Adam steps on δ (with the hook installed), freezing each request whose loss
        falls below the threshold (or, with ``early_stop="most_probable"``, whose target is
        already the most probable continuation) and clamping ‖δ‖ after every step.

        Only δ needs a gradient: parameters that require one are frozen for the duration (their
        flags restored afterwards), so the backward pass never computes weight gradients."""
        with self._frozen():
            self._optimise(progress)

    @contextlib.contextmanager
    def _frozen(self) -> Iterator[None]:
        """The model's parameters without ``requires_grad`` (restored on exit)."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        for param in trainable:
            param.requires_grad_(False)
        try:
            yield
        finally:
            for param in trainable:
                param.requires_grad_(True)

    def _optimise(self, progress: bool) -> None:
        n, device, opts = self.n, self.device, self.opts
        self.delta = torch.zeros_like(self.initial, requires_grad=True)
        delta = self.delta
        optimizer = torch.optim.Adam([delta], lr=opts.lr)
        active = torch.ones(n, dtype=torch.bool, device=device)
        self.losses = losses = torch.full((n,), math.inf, device=device)
        self.steps = steps = torch.zeros(n, dtype=torch.long, device=device)
        init_norm = self.initial.norm(dim=-1)
        bar = tqdm(range(opts.num_steps), desc="Optimising v*", leave=False, disable=not progress)
        try:
            for step in bar:
                optimizer.zero_grad(set_to_none=False)
                total = torch.zeros(n, device=device)
                misses = torch.zeros(n, dtype=torch.long, device=device)
                # As in ROME, the last step only measures the loss: no gradient is needed.
                last = step == opts.num_steps - 1
                with torch.set_grad_enabled(not last):
                    for chunk in self.chunks:
                        rows = torch.nonzero(active[chunk.seq_request]).squeeze(1)
                        if len(rows) == 0:
                            continue
                        terms, chunk_misses = self.chunk_loss(chunk, rows)
                        total += terms.detach()
                        if chunk_misses is not None:
                            misses += chunk_misses
                        if not last:
                            with self._timed("backward"):
                                terms.sum().backward()
                    # ROME/MEMIT's weight decay, ‖δ‖ / ‖h‖² (the norm itself, not its square).
                    decay = opts.weight_decay * delta.norm(dim=-1) / init_norm**2
                    if not last:
                        decay[active].sum().backward()
                total += decay.detach()
                losses[active] = total[active]
                steps[active] = step
                # ROME's early stop: a request whose loss is below the threshold keeps its δ.
                keep = losses >= opts.loss_threshold
                if opts.early_stop == "most_probable":
                    # ENCORE's: also one whose target is the argmax at every target token.
                    keep &= misses > 0
                active &= keep
                bar.set_postfix(loss=f"{losses.mean().item():.3f}", active=int(active.sum()))
                if last or not active.any():
                    break
                with self._timed("adam + clamp"):
                    frozen = delta.detach().clone()
                    optimizer.step()
                    with torch.no_grad():
                        delta[~active] = frozen[~active]
                        max_norm = opts.clamp_norm_factor * init_norm
                        norm = delta.norm(dim=-1)
                        scale = torch.where(norm > max_norm, max_norm / norm.clamp_min(1e-12), 1.0)
                        delta.mul_(scale[:, None])
        finally:
            bar.close()

    def finish(self) -> TargetResult:
        """v* = h + δ for every request, with each request's last loss and step count."""
        values = (self.initial + self.delta.detach()).float()
        return TargetResult(values, self.initial, self.losses.tolist(), (self.steps + 1).tolist())

    def run(self, progress: bool = True) -> TargetResult:
        """All phases in order; the model is left as it was."""
        with self._timed("prepare"):
            self.prepare()
        with self._frozen(), self._precision():
            with self._timed("measure_initial (pass without δ, prefix cache)"):
                self.measure_initial()
            handle = self.install_hook()
            try:
                self.optimise(progress)
            finally:
                handle.remove()
        return self.finish()


def compute_target_values(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: ArchitectureSpec,
    requests: Sequence[EditRequest],
    layer: int,
    context_templates: Sequence[str],
    options: TargetOptions | None = None,
    *,
    progress: bool = True,
) -> TargetResult:
    """Optimise v* at the output of block ``layer`` for every request.

    ``context_templates`` must start with ``"{}"`` (the bare prompt); v* is read relative to the
    residual stream of that first template. See :class:`TargetOptimisation` for the phases.
    """
    return TargetOptimisation(
        model, tokenizer, spec, requests, layer, context_templates, options
    ).run(progress)
