"""Which layers to edit: ROME's causal trace of the subject's last token, per layer.

For ~20 facts the model knows (its top-1 next token is the first token of ``target_true``), the
subject's token embeddings are corrupted with Gaussian noise (3 × the standard deviation of the
subject embeddings, as in ROME), which lowers P(true answer). Then, one layer (or window of
layers) at a time, the clean activation at the subject's LAST token is put back and the recovered
probability is measured. The indirect effect of a site is

    IE = P(answer | corrupted, site restored) − P(answer | corrupted)

averaged over facts and noise samples. Two sites per layer:

- ``state``: the block's output (the residual stream) at that layer;
- ``mlp``: the MLP out-projection's output (the edited module) at a window of ``--window`` layers
  centred on that layer (ROME's "MLP restored" curve; a single MLP's effect is small).

MEMIT edits a run of consecutive layers where the MLP effect is high, ending before it fades; the
script prints the ``--num-layers`` consecutive layers with the highest mean MLP effect as a
suggestion. All conditions of a fact share one batched forward pass, with logits kept only at the
last position, so 20 facts take a few minutes on one CPU thread for a 270M model.

    OMP_NUM_THREADS=1 python benchmarks/choose_layers.py --model gemma3-270m
    python benchmarks/choose_layers.py --model smollm2-135m --num-facts 40 --samples 5
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sphere_lightning.data import EditRequest, load_requests
from sphere_lightning.models import architecture_of, load_model
from sphere_lightning.models.batching import encode_target


@dataclass(frozen=True)
class Fact:
    """One fact the model knows, tokenised: the prompt, the subject's token span and the
    answer's first token."""

    request: EditRequest
    ids: list[int]
    subject_start: int
    subject_last: int
    answer: int


def _encode(tokenizer, request: EditRequest) -> Fact:
    prefix = request.prompt[: request.prompt.index("{}")]
    ids = tokenizer(request.prompt.format(request.subject))["input_ids"]
    start = len(tokenizer(prefix)["input_ids"])
    last = len(tokenizer(prefix + request.subject)["input_ids"]) - 1
    answer = encode_target(tokenizer, request.target_true)[0]
    return Fact(request, list(ids), min(start, last), min(last, len(ids) - 1), answer)


def _interleave_relations(requests: Sequence[EditRequest]) -> list[EditRequest]:
    """The requests in round-robin order over their relations (prompt templates), so the first
    facts cover every relation."""
    groups: dict[str, list[EditRequest]] = defaultdict(list)
    for request in requests:
        groups[request.prompt].append(request)
    order, queues = [], [list(g) for g in groups.values()]
    while any(queues):
        for queue in queues:
            if queue:
                order.append(queue.pop(0))
    return order


@torch.no_grad()
def known_facts(model, tokenizer, requests: Sequence[EditRequest], count: int) -> list[Fact]:
    """The first ``count`` requests (round-robin over relations) whose true answer's first token
    is the model's greedy next token."""
    facts = []
    for request in _interleave_relations([r for r in requests if r.target_true]):
        fact = _encode(tokenizer, request)
        logits = model(torch.tensor([fact.ids]), logits_to_keep=1).logits[0, -1]
        if int(logits.argmax()) == fact.answer:
            facts.append(fact)
            if len(facts) == count:
                break
    return facts


def _output(output):
    return output[0] if isinstance(output, tuple) else output


def _replace(output, value):
    return (value, *output[1:]) if isinstance(output, tuple) else value


@torch.no_grad()
def subject_noise_scale(model, facts: Sequence[Fact]) -> float:
    """Standard deviation of the input embeddings over the facts' subject tokens (as the model
    uses them, e.g. after Gemma's √d scaling)."""
    embed = model.get_input_embeddings()
    values = [embed(torch.tensor(f.ids[f.subject_start : f.subject_last + 1])) for f in facts]
    return float(torch.cat(values).float().std())


@torch.no_grad()
def trace_fact(
    model: nn.Module, fact: Fact, noise_std: float, samples: int, window: int, seed: int
) -> dict[str, torch.Tensor]:
    """Probabilities of the answer for one fact: ``clean`` and ``corrupted`` (scalars), and
    ``state`` / ``mlp`` (one per layer) with that site restored; each corrupted value is the mean
    over ``samples`` noise draws."""
    spec = architecture_of(model)
    num_layers = spec.num_layers(model)
    blocks = [model.get_submodule(spec.layer_name(i)) for i in range(num_layers)]
    mlps = [model.get_submodule(spec.mlp_out_name(i)) for i in range(num_layers)]
    position, span = fact.subject_last, slice(fact.subject_start, fact.subject_last + 1)
    ids = torch.tensor([fact.ids])

    clean: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for kind, modules in (("state", blocks), ("mlp", mlps)):
        for layer, module in enumerate(modules):

            def keep(module, args, output, key=(kind, layer)):
                clean[key] = _output(output)[0, position].clone()

            handles.append(module.register_forward_hook(keep))
    try:
        logits = model(ids, logits_to_keep=1).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    p_clean = logits.float().softmax(-1)[fact.answer]

    # Rows: group 0 corrupted only; group 1 + l restores the state at layer l; group
    # 1 + L + l restores the MLP outputs of the window around l. Each group has `samples` rows,
    # and row r of every group uses noise draw r.
    groups = 1 + 2 * num_layers
    generator = torch.Generator().manual_seed(seed)
    width = model.get_input_embeddings().embedding_dim
    noise = torch.randn(samples, span.stop - span.start, width, generator=generator) * noise_std

    def corrupt(module, args, output):
        value = _output(output).clone()
        value[:, span] += noise.repeat(groups, 1, 1).to(value.dtype)
        return _replace(output, value)

    def rows_of(group: int) -> slice:
        return slice(group * samples, (group + 1) * samples)

    restore_rows: dict[tuple[str, int], list[slice]] = defaultdict(list)
    for layer in range(num_layers):
        restore_rows[("state", layer)].append(rows_of(1 + layer))
        low = max(0, min(layer - window // 2, num_layers - window))
        for inner in range(low, min(num_layers, low + window)):
            restore_rows[("mlp", inner)].append(rows_of(1 + num_layers + layer))

    def restore(module, args, output, key):
        value = _output(output).clone()
        for rows in restore_rows[key]:
            value[rows, position] = clean[key].to(value.dtype)
        return _replace(output, value)

    handles = [model.get_input_embeddings().register_forward_hook(corrupt)]
    for kind, modules in (("state", blocks), ("mlp", mlps)):
        for layer, module in enumerate(modules):
            handles.append(
                module.register_forward_hook(
                    lambda m, a, o, key=(kind, layer): restore(m, a, o, key)
                )
            )
    try:
        logits = model(ids.repeat(groups * samples, 1), logits_to_keep=1).logits[:, -1]
    finally:
        for handle in handles:
            handle.remove()
    probs = logits.float().softmax(-1)[:, fact.answer].view(groups, samples).mean(1)
    return {
        "clean": p_clean,
        "corrupted": probs[0],
        "state": probs[1 : 1 + num_layers],
        "mlp": probs[1 + num_layers :],
    }


def best_run(effects: Sequence[float], length: int) -> list[int]:
    """The ``length`` consecutive layers with the highest mean effect."""
    length = min(length, len(effects))
    means = [sum(effects[i : i + length]) / length for i in range(len(effects) - length + 1)]
    start = max(range(len(means)), key=means.__getitem__)
    return list(range(start, start + length))


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the causal trace and print the per-layer table; returns the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m", help="anything load_model accepts")
    parser.add_argument("--facts", default="builtin", help="edit requests with target_true")
    parser.add_argument("--num-facts", type=int, default=20)
    parser.add_argument("--samples", type=int, default=3, help="noise draws per fact")
    parser.add_argument("--noise", type=float, default=3.0, help="noise std / subject emb std")
    parser.add_argument("--window", type=int, default=3, help="MLP layers restored together")
    parser.add_argument("--num-layers", type=int, default=5, help="layers in the suggestion")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    for flag in ("num_facts", "samples", "window", "num_layers", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} should be >= 1, got {getattr(args, flag)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    facts = known_facts(model, tokenizer, load_requests(args.facts), args.num_facts)
    if not facts:
        raise SystemExit(f"{args.model} knows none of the facts in {args.facts}")
    noise_std = args.noise * subject_noise_scale(model, facts)
    traces = [
        trace_fact(model, fact, noise_std, args.samples, args.window, seed)
        for seed, fact in enumerate(facts)
    ]

    def mean(key: str) -> torch.Tensor:
        return torch.stack([t[key] for t in traces]).mean(0)

    clean, corrupted = float(mean("clean")), float(mean("corrupted"))
    state, mlp = (mean("state") - corrupted).tolist(), (mean("mlp") - corrupted).tolist()
    gap = clean - corrupted
    suggestion = best_run(mlp, args.num_layers)
    seconds = time.perf_counter() - start

    print(
        f"{args.model}: {len(facts)} known facts, {args.samples} noise draws each, noise std "
        f"{noise_std:.3g}; P(answer) clean {clean:.3f}, corrupted {corrupted:.3f} "
        f"({seconds:.0f} s)"
    )
    print(f"| layer | IE state | IE MLP (window {args.window}) | MLP share of clean−corrupted |")
    print("|---:|---:|---:|---:|")
    for layer, (s, m) in enumerate(zip(state, mlp, strict=True)):
        share = m / gap if gap > 0 else float("nan")
        print(f"| {layer} | {s:.3f} | {m:.3f} | {share:.2f} |")
    print(
        f"suggested MEMIT layers ({args.num_layers} consecutive, highest mean MLP IE): {suggestion}"
    )
    result = {
        "model": args.model,
        "facts": [f.request.case_id for f in facts],
        "noise_std": noise_std,
        "clean": clean,
        "corrupted": corrupted,
        "ie_state": state,
        "ie_mlp": mlp,
        "window": args.window,
        "suggested_layers": suggestion,
        "seconds": seconds,
    }
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
