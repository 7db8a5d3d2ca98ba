"""Seconds per example of general-ability option scoring on SmolLM2: straightforward vs ours.

Three ways to score the same examples of each task (SST-2, NLI, BoolQ from
``../shared/data/general``) in one process:

- ``naive``: the straightforward computation, one full forward pass (all logits) of
  ``prompt + option`` per example and option, summing the option tokens' log-probabilities;
- ``previous``: :func:`sphere_lightning.general.score_options` as it was before prefix sharing
  and padding-aware batches (each prompt once for all its options, ``batch_size`` prompts
  sorted by length per pass, whole prompts);
- ``ours``: :func:`~sphere_lightning.general.score_options` now: batches closed before they
  would be more than 1/8 padding, and the tokens every prompt of a batch starts with (BoolQ's
  24-token instruction) run once, the rest from their key/value cache.

Prints wall and CPU seconds per example of each, the ratios to ``naive``, and the largest
difference of any option log-likelihood from ``naive`` (and whether the predictions agree). On a
machine shared with other jobs the CPU seconds are the fairer comparison.

    OMP_NUM_THREADS=1 python benchmarks/general_ability.py --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning import scoring
from sphere_lightning.general import score_options
from sphere_lightning.general.tasks import get_task
from sphere_lightning.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "general"

#: Task, examples scored and batch size: the general tasks of configs/experiments/*.yaml.
TASKS = (("sst2", 200, 16), ("nli", 200, 16), ("boolq", 100, 8))


@torch.no_grad()
def naive_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    options: Sequence[str],
) -> torch.Tensor:
    """One full forward of ``prompt + option`` per pair; ``(len(prompts), len(options))``."""
    scores = torch.zeros(len(prompts), len(options))
    for i, prompt in enumerate(prompts):
        prompt_len = len(tokenizer(prompt)["input_ids"])
        for k, option in enumerate(options):
            ids = torch.tensor([tokenizer(prompt + option)["input_ids"]])
            logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
            for position in range(prompt_len, ids.shape[1]):
                scores[i, k] += logprobs[position - 1, ids[0, position]]
    return scores


@contextlib.contextmanager
def previous_scorer() -> Iterator[None]:
    """The shared scorer without padding-aware batches and without prefix sharing."""
    saved = scoring.MAX_PADDING, scoring.MIN_SHARED_PREFIX
    scoring.MAX_PADDING, scoring.MIN_SHARED_PREFIX = float("inf"), 1 << 62
    try:
        yield
    finally:
        scoring.MAX_PADDING, scoring.MIN_SHARED_PREFIX = saved


def timed(run: Callable[..., torch.Tensor], *args: Any) -> tuple[torch.Tensor, float, float]:
    """``(run(*args), wall seconds, process CPU seconds)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--tasks", nargs="+", default=[name for name, _, _ in TASKS])
    parser.add_argument(
        "--limit", type=int, default=None, help="examples per task (default: 200/200/100)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    print(f"{args.model}, {torch.get_num_threads()} thread(s), float32, CPU")
    print(
        "| task | examples | tokens/prompt | naive s/ex (CPU) | previous s/ex (CPU) "
        "| ours s/ex (CPU) | naive/ours (CPU) | previous/ours (CPU) | max abs Δ log-lik "
        "| same predictions |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    totals = torch.zeros(3)
    for name, default_limit, batch_size in TASKS:
        if name not in args.tasks:
            continue
        task = get_task(name)
        examples = task.read(args.data_dir / f"{name}.jsonl", limit=args.limit or default_limit)
        prompts = [e.prompt for e in examples]
        tokens = sum(len(ids) for ids in tokenizer(prompts)["input_ids"]) / len(prompts)
        common = (model, tokenizer, prompts, task.options)
        naive, naive_wall, naive_cpu = timed(naive_scores, *common)
        with previous_scorer():
            prev, prev_wall, prev_cpu = timed(score_options, *common, batch_size)
        ours, ours_wall, ours_cpu = timed(score_options, *common, batch_size)
        n = len(prompts)
        totals += torch.tensor([naive_cpu, prev_cpu, ours_cpu])
        diff = max(float((s - naive).abs().max()) for s in (prev, ours))
        same = bool((ours.argmax(-1) == naive.argmax(-1)).all())
        print(
            f"| {name} | {n} | {tokens:.0f} | {naive_wall / n:.3f} ({naive_cpu / n:.3f}) "
            f"| {prev_wall / n:.3f} ({prev_cpu / n:.3f}) | {ours_wall / n:.3f} "
            f"({ours_cpu / n:.3f}) | {naive_cpu / ours_cpu:.2f}× | {prev_cpu / ours_cpu:.2f}× "
            f"| {diff:.1e} | {same} |",
            flush=True,
        )
    naive_total, prev_total, ours_total = totals.tolist()
    print(
        f"\nCPU seconds for all tasks: naive {naive_total:.1f}, previous {prev_total:.1f}, "
        f"ours {ours_total:.1f}"
    )


if __name__ == "__main__":
    main()
