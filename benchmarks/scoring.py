"""Seconds to score CounterFact edit metrics on SmolLM2: the previous scorer vs the shared one.

Both paths score the same facts in the same process: efficacy, generalization and specificity
(mean per-token log-probability of ``target_new`` vs ``target_true`` after every prompt of every
fact), as the lifelong protocol does before the first edit. The reference is the scorer this
project used before, copied below unchanged: one right-padded sequence per (prompt, target) in
file order, ``batch_size`` at a time. Ours (:func:`sphere_lightning.evaluation.counterfact_scores`
over :func:`sphere_lightning.scoring.score_token_continuations`) runs each distinct prompt once,
sorted by length, and continues multi-token targets from its key/value cache. Wall and CPU
seconds are both printed: on a machine shared with other jobs the process's CPU seconds are the
fairer comparison.

    OMP_NUM_THREADS=1 python benchmarks/scoring.py --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning import evaluation
from sphere_lightning.data import load_requests
from sphere_lightning.data.requests import EditRequest
from sphere_lightning.evaluation import _per_request_mean
from sphere_lightning.models.batching import encode_target, model_device, pad_batch
from sphere_lightning.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


# ---------------------------------------------------------------- reference (previous scorer)


@torch.no_grad()
def score_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token log-probability and teacher-forced token accuracy of each target.

    Returns two float tensors of length ``len(prompts)``.
    """
    device = model_device(model)
    head = model.get_output_embeddings()
    logprob, accuracy = [], []
    for start in range(0, len(prompts), batch_size):
        seqs, spans = [], []
        for prompt, target in zip(
            prompts[start : start + batch_size], targets[start : start + batch_size], strict=True
        ):
            p = tokenizer(prompt)["input_ids"]
            t = encode_target(tokenizer, target)
            seqs.append(p + t[:-1])
            spans.append((len(p) - 1, t))
        ids, mask = pad_batch(seqs, tokenizer.pad_token_id, device)
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        hidden = hidden.last_hidden_state
        rows = torch.cat([torch.full((len(t),), i) for i, (_, t) in enumerate(spans)]).to(device)
        cols = torch.cat([torch.arange(s, s + len(t)) for s, t in spans]).to(device)
        tokens = torch.cat([torch.tensor(t) for _, t in spans]).to(device)
        logits = head(hidden[rows, cols]).float()
        token_lp = logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        token_hit = (logits.argmax(-1) == tokens).float()
        counts = torch.tensor([len(t) for _, t in spans], device=device, dtype=torch.float)
        logprob.append(torch.zeros(len(spans), device=device).index_add(0, rows, token_lp) / counts)
        accuracy.append(
            torch.zeros(len(spans), device=device).index_add(0, rows, token_hit) / counts
        )
    return torch.cat(logprob).cpu(), torch.cat(accuracy).cpu()


def counterfact_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Per-request efficacy, generalization and specificity (each in [0, 1]).

    - efficacy: P(target_new) > P(target_true) on the edit prompt;
    - generalization: the fraction of paraphrase prompts where P(target_new) > P(target_true);
    - specificity: the fraction of neighborhood prompts where P(target_true) > P(target_new).

    P is the mean per-token probability in log space, as in ROME's CounterFact evaluation.
    """
    prompts, targets, owners, kinds = [], [], [], []
    for i, r in enumerate(requests):
        if r.target_true is None:
            raise ValueError(f"Request {r.case_id!r} has no target_true; CounterFact needs one")
        groups = [
            ("efficacy", [r.filled_prompt]),
            ("generalization", list(r.paraphrase_prompts)),
            ("specificity", list(r.neighborhood_prompts)),
        ]
        for kind, texts in groups:
            for text in texts:
                for target in (r.target_new, r.target_true):
                    prompts.append(text)
                    targets.append(target)
                    owners.append(i)
                    kinds.append(kind)
    logprob, _ = score_continuations(model, tokenizer, prompts, targets, batch_size)
    new_wins = (logprob[0::2] > logprob[1::2]).float()
    kinds = kinds[0::2]
    success = torch.where(torch.tensor([k == "specificity" for k in kinds]), 1 - new_wins, new_wins)
    return _per_request_mean(success, owners[0::2], kinds, len(requests))


# ------------------------------------------------------------------------------- measurement


@contextlib.contextmanager
def recording(module: ModuleType, name: str, into: list) -> Iterator[None]:
    """Replace ``module.name`` by a wrapper that appends each return value to ``into``."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        into.append(original(*args, **kwargs))
        return into[-1]

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def run(scorer, module: ModuleType, model, tokenizer, requests, batch_size: int):
    """(wall, CPU) seconds, per-request scores and per-(prompt, target) mean log-probabilities."""
    calls: list = []
    with recording(module, "score_continuations", calls):
        start, start_cpu = time.perf_counter(), time.process_time()
        scores = scorer(model, tokenizer, requests, batch_size)
        seconds = (time.perf_counter() - start, time.process_time() - start_cpu)
    (result,) = calls
    logprob = result[0] if isinstance(result, tuple) else result.mean_logprob
    return seconds, scores, logprob


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a − b|; NaN only where both are NaN (a request without prompts of a kind)."""
    if not torch.equal(a.isnan(), b.isnan()):
        return float("inf")
    keep = ~a.isnan()
    return float((a[keep] - b[keep]).abs().max()) if keep.any() else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--num-facts", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--batch-size", type=int, default=64, help="both paths' batch size")
    args = parser.parse_args()
    if args.num_facts < 1:
        parser.error(f"--num-facts should be ≥ 1, got {args.num_facts}")
    if args.batch_size < 1:
        parser.error(f"--batch-size should be ≥ 1, got {args.batch_size}")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model("smollm2-135m", "float32")
    requests = load_requests(args.data)[: args.num_facts]
    this = sys.modules[__name__]
    # Warm-up (first-call allocations and kernel selection) on a few facts, for both paths.
    run(counterfact_scores, this, model, tokenizer, requests[:4], args.batch_size)
    run(evaluation.counterfact_scores, evaluation, model, tokenizer, requests[:4], args.batch_size)
    old_s, old, old_lp = run(counterfact_scores, this, model, tokenizer, requests, args.batch_size)
    new_s, new, new_lp = run(
        evaluation.counterfact_scores, evaluation, model, tokenizer, requests, args.batch_size
    )

    print(
        f"CounterFact edit metrics on smollm2-135m (float32), {len(requests)} facts, "
        f"{len(old_lp)} (prompt, target) pairs, batch size {args.batch_size}, "
        f"{torch.get_num_threads()} threads"
    )
    # CPU seconds (all threads of this process) are what the comparison means on a shared
    # machine; wall seconds are printed beside them.
    header = ["seconds old", "seconds new", "ratio", "CPU s old", "CPU s new", "CPU ratio"]
    header += ["max |Δ| log-prob"] + [f"max |Δ| {kind}" for kind in old]
    values = [f"{old_s[0]:.1f}", f"{new_s[0]:.1f}", f"{old_s[0] / new_s[0]:.1f}x"]
    values += [f"{old_s[1]:.1f}", f"{new_s[1]:.1f}", f"{old_s[1] / new_s[1]:.1f}x"]
    values += [f"{max_difference(old_lp, new_lp):.2e}"]
    values += [f"{max_difference(old[kind], new[kind]):.2e}" for kind in old]
    widths = [max(len(h), len(v)) + 2 for h, v in zip(header, values, strict=True)]
    print("".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    print("".join(f"{v:>{w}}" for v, w in zip(values, widths, strict=True)))
    means = ", ".join(f"{kind} {float(new[kind].nanmean()):.3f}" for kind in new)
    print(f"pre-edit means (new path): {means}")


if __name__ == "__main__":
    main()
