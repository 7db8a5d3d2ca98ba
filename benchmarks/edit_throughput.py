"""Seconds per batch of CounterFact requests on SmolLM2, by phase, batched v* vs one at a time.

Both paths run the same pipeline as a training step of `configs/edit.yaml` (AlphaEdit + SPHERE,
the editor settings read from that file): v* optimisation, keys, solve, SPHERE projection, apply,
callbacks (HE of the edited layers) and AlphaEdit's key accumulation. They differ only in the v*
optimisation: ours optimises all requests of the batch together, runs prompts of the same suffix
length together whatever request they belong to, replays the blocks below the edit layer and
continues from the prompt prefixes' key/value cache; the reference optimises one request per
forward pass (its prompts padded together, as in ROME's ``compute_z``) through the whole model
(the straightforward implementation). Efficacy over the batch is measured after each path, then
the weights are restored.

The one-at-a-time v* optimisation costs the same for each request (one forward/backward per
request and step), so with ``--reference-requests k`` it runs on the first k requests and its v*
seconds are scaled to the batch size (the other phases are the same code on the same batch, taken
from ours); ours then also runs on those k requests so the efficacies compare the same facts.
The printed table says which numbers are scaled.

    python benchmarks/edit_throughput.py --num-requests 100 --reference-requests 10
"""

from __future__ import annotations

import argparse
import copy
import resource
import time
from pathlib import Path

import torch
from _config import editor_and_sphere, editor_arguments

from sphere_lightning.data import load_requests
from sphere_lightning.editors import AlphaEdit
from sphere_lightning.evaluation import counterfact_scores
from sphere_lightning.functional import hyperspherical_energy, project_delta
from sphere_lightning.models import linear_weight, load_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def run_batch(model, tokenizer, editor, requests, beta, alpha) -> dict[str, float]:
    """One editing step; returns seconds per phase."""
    times: dict[str, float] = {}
    deltas = editor.compute_deltas(model, tokenizer, requests)
    times.update(editor.last_timings)
    start = time.perf_counter()
    for name, delta in deltas.items():
        weight = linear_weight(model.get_submodule(name.removesuffix(".weight")))
        deltas[name], _ = project_delta(delta, weight.detach(), beta, alpha)
    times["projection"] = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        for name, delta in deltas.items():
            assert torch.isfinite(delta).all()
            linear_weight(model.get_submodule(name.removesuffix(".weight"))).add_(delta)
    times["apply"] = time.perf_counter() - start
    start = time.perf_counter()
    for name in deltas:
        hyperspherical_energy(linear_weight(model.get_submodule(name.removesuffix(".weight"))))
    editor.after_apply(model, tokenizer, requests)
    times["callbacks + key accumulation"] = time.perf_counter() - start
    times["total"] = sum(times.values())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "edit.yaml"))
    parser.add_argument("--data", default=str(SHARED / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--num-requests", type=int, default=100)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--reference-requests",
        type=int,
        default=None,
        help="run the one-at-a-time path on this many requests and scale its time",
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config, settings, beta, alpha = editor_and_sphere(args.config)
    model, tokenizer = load_model(config["model"]["model"], config["model"]["dtype"])
    requests = load_requests(args.data)[: args.num_requests]

    ours = AlphaEdit(**editor_arguments(settings))
    start = time.perf_counter()
    ours.setup(model, tokenizer)
    setup_s = time.perf_counter() - start
    state = copy.deepcopy(ours.state_dict())
    original = {n: p.detach().clone() for n, p in model.named_parameters()}

    pre = counterfact_scores(model, tokenizer, requests)["efficacy"].mean().item()

    def measure(label: str, subset: list, overrides: dict) -> None:
        editor = AlphaEdit(**editor_arguments(settings, target=overrides))
        editor.load_state_dict(copy.deepcopy(state))
        editor.setup(model, tokenizer)  # projectors from the cached statistics
        rows[label] = run_batch(model, tokenizer, editor, subset, beta, alpha)
        scores = counterfact_scores(model, tokenizer, subset)["efficacy"]
        efficacy[label] = scores.mean().item()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(original[n])

    rows: dict[str, dict[str, float]] = {}
    efficacy: dict[str, float] = {}
    reference = dict(
        batch_size=1, skip_lower_layers=False, reuse_prefix=False, group_by_suffix=False
    )
    measure(f"ours, {len(requests)} req", requests, {})
    scale = 1.0
    if not args.skip_reference:
        k = min(args.reference_requests or len(requests), len(requests))
        if k < len(requests):
            scale = len(requests) / k
            measure(f"ours, {k} req", requests[:k], {})
        measure(f"1-at-a-time, {k} req", requests[:k], reference)
        if k < len(requests):
            # Only v* differs between the paths; the other phases are the same code on the
            # same batch, so they are taken from ours at full size.
            scaled = dict(rows[f"ours, {len(requests)} req"])
            scaled["v_star"] = rows[f"1-at-a-time, {k} req"]["v_star"] * scale
            scaled["total"] = sum(v for phase, v in scaled.items() if phase != "total")
            rows[f"1-at-a-time, scaled to {len(requests)}"] = scaled
            efficacy[f"1-at-a-time, scaled to {len(requests)}"] = float("nan")

    print(
        f"AlphaEdit + SPHERE (β={beta}, α={alpha}) on {config['model']['model']}, "
        f"{len(requests)} CounterFact requests in one batch, {torch.get_num_threads()} threads"
    )
    print(f"editor setup (templates + key statistics, cached after the first run): {setup_s:.1f} s")
    labels = list(rows)
    print(f"{'phase (seconds)':<30}" + "".join(f"{label:>27}" for label in labels))
    for phase in rows[labels[0]]:
        print(f"{phase:<30}" + "".join(f"{rows[label][phase]:>27.1f}" for label in labels))
    print(f"{'efficacy':<30}" + "".join(f"{efficacy[label]:>27.3f}" for label in labels))
    print(f"pre-edit efficacy over the {len(requests)} requests: {pre:.3f}")
    if not args.skip_reference:
        ref = rows[labels[-1]]["total"]
        print(
            f"seconds per {len(requests)}-request batch: ours {rows[labels[0]]['total']:.1f}, "
            f"one at a time {ref:.1f}{' (scaled)' if scale != 1 else ''}: "
            f"{ref / rows[labels[0]]['total']:.1f}x"
        )
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
