"""The target value v* of each request: what the edited layer's output should become.

This is ROME/MEMIT's ``compute_z`` written once for every locate-then-edit editor. A vector δ_j
added to the residual stream after block ``layer`` at the subject's last token is optimised so the
model predicts ``target_new`` after every context-prefixed prompt, with a KL term that keeps the
subject's "{} is a" distribution and a weight decay on ‖δ‖; v*_j = h_j + δ_j.

All requests of a batch are optimised together. Their losses are independent sums, and Adam acts
element-wise, so this is the same optimisation as one request at a time; a request that reaches
the loss threshold is frozen (ROME's early stop) and leaves the forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.data.requests import EditRequest
from sphere_lightning.editors.hooks import (
    encode_target,
    encode_with_subject,
    model_device,
    pad_batch,
)
from sphere_lightning.models.architectures import ArchitectureSpec

KL_PROMPT = "{} is a"


@dataclass
class TargetOptions:
    """Hyper-parameters of the v* optimisation (ROME/MEMIT names in brackets).

    Attributes:
        num_steps: Optimisation steps per request [v_num_grad_steps].
        lr: Adam learning rate [v_lr].
        loss_threshold: A request stops once its loss falls below this.
        clamp_norm_factor: ‖δ‖ is clamped to this times ‖h‖ [clamp_norm_factor].
        kl_factor: Weight of the KL term on "{subject} is a" [kl_factor].
        weight_decay: Weight of ‖δ‖²/‖h‖² [v_weight_decay].
        batch_size: Requests per forward pass; bounds memory, not the result.
        skip_lower_layers: Run the blocks up to ``layer`` once and replay their output, instead of
            recomputing them on every step (they do not depend on δ).
    """

    num_steps: int = 25
    lr: float = 0.5
    loss_threshold: float = 5e-2
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    batch_size: int = 25
    skip_lower_layers: bool = True


@dataclass
class TargetResult:
    """v* for each request, and how the optimisation went."""

    values: torch.Tensor
    initial: torch.Tensor
    losses: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


@dataclass
class _Chunk:
    requests: list[int]
    ids: torch.Tensor
    mask: torch.Tensor
    seq_request: torch.Tensor  # (S,) local request index of each sequence
    lookup: torch.Tensor  # (S,) subject-last position of each sequence
    first_seq: torch.Tensor  # (R,) the "{}"-template sequence of each request
    kl_seq: torch.Tensor  # (R,) the KL sequence of each request
    tgt_seq: torch.Tensor  # (P,) sequence of each target token
    tgt_pos: torch.Tensor  # (P,) position predicting it
    tgt_tok: torch.Tensor  # (P,) the token
    tgt_weight: torch.Tensor  # (P,) 1 / (#tokens of its target × #templates)
    cached: torch.Tensor | None = None
    kl_init: torch.Tensor | None = None


def _build_chunk(
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    indices: list[int],
    templates: Sequence[str],
    device: torch.device,
) -> _Chunk:
    seqs, seq_request, lookup, first_seq, kl_seq = [], [], [], [], []
    tgt_seq, tgt_pos, tgt_tok, tgt_weight = [], [], [], []
    for local, index in enumerate(indices):
        request = requests[index]
        target = encode_target(tokenizer, request.target_new)
        for t, template in enumerate(templates):
            enc = encode_with_subject(tokenizer, template.format(request.prompt), request.subject)
            if t == 0:
                first_seq.append(len(seqs))
            for k, token in enumerate(target):
                tgt_seq.append(len(seqs))
                tgt_pos.append(len(enc.ids) - 1 + k)
                tgt_tok.append(token)
                tgt_weight.append(1.0 / (len(target) * len(templates)))
            seqs.append(enc.ids + target[:-1])
            seq_request.append(local)
            lookup.append(enc.subject_last)
        enc = encode_with_subject(tokenizer, KL_PROMPT, request.subject)
        kl_seq.append(len(seqs))
        seqs.append(enc.ids)
        seq_request.append(local)
        lookup.append(enc.subject_last)
    ids, mask = pad_batch(seqs, tokenizer.pad_token_id, device)

    def long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return _Chunk(
        requests=indices,
        ids=ids,
        mask=mask,
        seq_request=long(seq_request),
        lookup=long(lookup),
        first_seq=long(first_seq),
        kl_seq=long(kl_seq),
        tgt_seq=long(tgt_seq),
        tgt_pos=long(tgt_pos),
        tgt_tok=long(tgt_tok),
        tgt_weight=torch.tensor(tgt_weight, device=device),
    )


class _ReplayBelow:
    """Skip blocks ``0..layer`` and replay block ``layer``'s cached output instead.

    The blocks below the edit point do not depend on δ, so their output is computed once. Their
    ``forward`` is shadowed on the instance (hooks still run) and restored on exit.
    """

    def __init__(self, blocks: torch.nn.ModuleList, layer: int) -> None:
        self.blocks = blocks
        self.layer = layer
        self.output: torch.Tensor | None = None

    def __enter__(self) -> _ReplayBelow:
        for i in range(self.layer):
            self.blocks[i].forward = lambda hidden_states, *args, **kwargs: hidden_states
        self.blocks[self.layer].forward = lambda *args, **kwargs: self.output
        return self

    def __exit__(self, *exc) -> None:
        for i in range(self.layer + 1):
            del self.blocks[i].forward


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
    residual stream of that first template.
    """
    opts = options or TargetOptions()
    if context_templates[0] != "{}":
        raise ValueError("The first context template must be '{}' (the bare prompt)")
    device = model_device(model)
    blocks = spec.blocks(model)
    block = blocks[layer]
    lm_head = model.get_output_embeddings()
    base = model.base_model
    n = len(requests)
    chunks = [
        _build_chunk(
            tokenizer,
            requests,
            list(range(s, min(s + opts.batch_size, n))),
            context_templates,
            device,
        )
        for s in range(0, n, opts.batch_size)
    ]

    state: dict[str, torch.Tensor | None] = {"add": None, "rows": None, "cols": None}

    def inject(module, args, output):
        if state["add"] is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.index_put(
            (state["rows"], state["cols"]), state["add"].to(hidden.dtype), accumulate=True
        )
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def logprobs_at(chunk: _Chunk, seq_sel: torch.Tensor, ids, mask, kl_rows, tgt_rows, tgt_pos):
        hidden = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        picked = torch.cat(
            [hidden[kl_rows, chunk.lookup[seq_sel][kl_rows]], hidden[tgt_rows, tgt_pos]]
        )
        return F.log_softmax(lm_head(picked).float(), dim=-1)

    # Pass 0: the residual stream h at the edit point, the initial KL distribution, and the
    # cached output of block `layer` for replay.
    initial = torch.zeros(n, block_dim := model.config.hidden_size, device=device)
    replayable = opts.skip_lower_layers
    captured: dict[str, torch.Tensor] = {}

    def keep(module, args, output):
        captured["out"] = output

    for chunk in chunks:
        handle = block.register_forward_hook(keep)
        with torch.no_grad():
            hidden = base(
                input_ids=chunk.ids, attention_mask=chunk.mask, use_cache=False
            ).last_hidden_state
        handle.remove()
        out = captured["out"]
        if isinstance(out, tuple):
            replayable = False
            out = out[0]
        chunk.cached = out.detach()
        initial[chunk.requests] = out[chunk.first_seq, chunk.lookup[chunk.first_seq]].float()
        with torch.no_grad():
            kl_hidden = hidden[chunk.kl_seq, chunk.lookup[chunk.kl_seq]]
            chunk.kl_init = F.log_softmax(lm_head(kl_hidden).float(), dim=-1)
    if not replayable:
        for chunk in chunks:
            chunk.cached = None

    delta = torch.zeros(n, block_dim, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=opts.lr)
    active = torch.ones(n, dtype=torch.bool, device=device)
    losses = torch.full((n,), math.inf, device=device)
    steps = torch.zeros(n, dtype=torch.long)
    init_norm = initial.norm(dim=-1)
    handle = block.register_forward_hook(inject)
    bar = tqdm(range(opts.num_steps), desc="Optimising v*", leave=False, disable=not progress)
    try:
        for step in bar:
            optimizer.zero_grad(set_to_none=False)
            for chunk in chunks:
                local_active = active[chunk.requests]
                if not local_active.any():
                    continue
                seq_sel = torch.nonzero(local_active[chunk.seq_request]).squeeze(1)
                remap = torch.full((len(chunk.ids),), -1, dtype=torch.long, device=device)
                remap[seq_sel] = torch.arange(len(seq_sel), device=device)
                ids, mask = chunk.ids[seq_sel], chunk.mask[seq_sel]
                req_global = torch.tensor(chunk.requests, device=device)[chunk.seq_request[seq_sel]]
                state["rows"] = torch.arange(len(seq_sel), device=device)
                state["cols"] = chunk.lookup[seq_sel]
                state["add"] = delta[req_global]
                kl_keep = local_active.nonzero().squeeze(1)
                kl_rows = remap[chunk.kl_seq[kl_keep]]
                tgt_keep = local_active[chunk.seq_request[chunk.tgt_seq]]
                tgt_rows = remap[chunk.tgt_seq[tgt_keep]]
                tgt_pos = chunk.tgt_pos[tgt_keep]
                if chunk.cached is not None:
                    with _ReplayBelow(blocks, layer) as replay:
                        replay.output = chunk.cached[seq_sel]
                        logp = logprobs_at(chunk, seq_sel, ids, mask, kl_rows, tgt_rows, tgt_pos)
                else:
                    logp = logprobs_at(chunk, seq_sel, ids, mask, kl_rows, tgt_rows, tgt_pos)
                kl_logp, tgt_logp = logp[: len(kl_rows)], logp[len(kl_rows) :]
                global_ids = torch.tensor(chunk.requests, device=device)[kl_keep]
                # NLL: mean over target tokens, then over templates, per request.
                token_nll = -tgt_logp.gather(1, chunk.tgt_tok[tgt_keep, None]).squeeze(1)
                token_req = chunk.seq_request[chunk.tgt_seq[tgt_keep]]
                nll = torch.zeros(len(chunk.requests), device=device).index_add(
                    0, token_req, token_nll * chunk.tgt_weight[tgt_keep]
                )[kl_keep]
                kl = F.kl_div(
                    kl_logp, chunk.kl_init[kl_keep], log_target=True, reduction="none"
                ).sum(-1)
                decay = delta[global_ids].norm(dim=-1) ** 2 / init_norm[global_ids] ** 2
                loss = nll + opts.kl_factor * kl + opts.weight_decay * decay
                losses[global_ids] = loss.detach()
                steps[global_ids.cpu()] = step
                loss.sum().backward()
            state["add"] = None
            active &= losses >= opts.loss_threshold
            bar.set_postfix(loss=f"{losses.mean().item():.3f}", active=int(active.sum()))
            if step == opts.num_steps - 1 or not active.any():
                break
            frozen = delta.detach().clone()
            optimizer.step()
            with torch.no_grad():
                delta[~active] = frozen[~active]
                max_norm = opts.clamp_norm_factor * init_norm
                norm = delta.norm(dim=-1)
                scale = torch.where(norm > max_norm, max_norm / norm.clamp_min(1e-12), 1.0)
                delta.mul_(scale[:, None])
    finally:
        handle.remove()
        bar.close()
    values = (initial + delta.detach()).float()
    return TargetResult(values, initial, losses.tolist(), (steps + 1).tolist())
