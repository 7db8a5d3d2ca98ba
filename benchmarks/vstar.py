"""CPU-seconds of AlphaEdit's v* optimisation per batch of CounterFact requests on SmolLM2: the
float32 path with ROME's loss early stop vs most-probable early stopping (ENCORE) and bf16
autocast, each alone and together, with the edit metrics after applying each path's deltas.

Every path runs AlphaEdit + SPHERE as configured in ``configs/edit.yaml`` (the editor settings
and SPHERE's β/α read from that file, SPHERE applied inside the layer loop as in a training step)
on one batch of ``--num-requests`` requests, in this one process. The paths differ only in
``target.early_stop`` and ``target.precision`` (and the ``old`` path in running every prefix whole):

- ``old``: ``loss`` + ``float32``, ``share_template_prefix`` off (the code before these options
  existed);
- ``most-probable``: ``most_probable`` + ``float32``;
- ``bf16``: ``loss`` + ``bf16``;
- ``both``: ``most_probable`` + ``bf16``;
- ``new``: the values ``configs/edit.yaml`` sets (``--new-early-stop``/``--new-precision``
  override them).

For each path: CPU-seconds (``time.process_time``, all threads) and wall seconds of v*, the mean
number of steps and final loss, the v* phase profile (prepare, pass without δ, forward through the
blocks above the edit point, lm head + log-softmax, NLL/KL terms, backward, Adam + clamp) and the
forward/backward seconds of each block above the edit point (timed by hooks, which every path
carries alike). The deltas are then applied to the unedited model (the same editor state: templates,
null-space projectors, K Kᵀ) and efficacy, generalization and specificity measured with
:func:`~sphere_lightning.evaluation.counterfact_scores`; the weights are restored before the next
path.

    python benchmarks/vstar.py --num-requests 100 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import defaultdict
from pathlib import Path

import torch
from _config import editor_and_sphere, editor_arguments

from sphere_lightning.data import load_requests
from sphere_lightning.editors import AlphaEdit
from sphere_lightning.editors.targets import TargetOptimisation, TargetResult
from sphere_lightning.evaluation import counterfact_scores
from sphere_lightning.functional import project_delta
from sphere_lightning.models import architecture_of, linear_weight, load_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


class LayerClock:
    """Forward and backward CPU-seconds of each block above the edit point, from hooks.

    A block's backward runs from the moment the gradient of its output is complete to the moment
    the gradient of its input is: tensor hooks on both mark those moments.
    """

    def __init__(self, blocks: torch.nn.ModuleList, first: int) -> None:
        self.forward: dict[int, float] = defaultdict(float)
        self.backward: dict[int, float] = defaultdict(float)
        self.on = False
        self._start: dict[int, float] = {}
        self._grad_out: dict[int, float] = {}
        self.handles = []
        for index in range(first, len(blocks)):
            self.handles.append(
                blocks[index].register_forward_pre_hook(self._pre(index), with_kwargs=True)
            )
            self.handles.append(blocks[index].register_forward_hook(self._post(index)))

    def _pre(self, index: int):
        def hook(module, args, kwargs):
            if not self.on:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.requires_grad:
                hidden.register_hook(lambda grad: self._grad_in(index))
            self._start[index] = time.process_time()

        return hook

    def _post(self, index: int):
        def hook(module, args, output):
            if not self.on:
                return
            self.forward[index] += time.process_time() - self._start.pop(index)
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.requires_grad:
                hidden.register_hook(
                    lambda grad: self._grad_out.__setitem__(index, time.process_time())
                )

        return hook

    def _grad_in(self, index: int) -> None:
        self.backward[index] += time.process_time() - self._grad_out.pop(index)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class ProfiledAlphaEdit(AlphaEdit):
    """AlphaEdit whose v* runs in this process with its phase and per-block profile kept."""

    def target_values(self, model, tokenizer, requests) -> TargetResult:
        run = TargetOptimisation(
            model,
            tokenizer,
            architecture_of(model),
            requests,
            self.target_layer,
            self.context_templates,
            self.target,
        )
        clock = LayerClock(architecture_of(model).blocks(model), self.target_layer + 1)
        optimise = run.optimise

        def timed_optimise(progress: bool = True) -> None:
            clock.on = True
            try:
                optimise(progress)
            finally:
                clock.on = False

        run.optimise = timed_optimise
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            result = run.run(progress=False)
        finally:
            clock.remove()
        self.profile = {
            "cpu": time.process_time() - cpu,
            "wall": time.perf_counter() - wall,
            "phases": dict(run.timings),
            "layer_forward": dict(clock.forward),
            "layer_backward": dict(clock.backward),
        }
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "edit.yaml"))
    parser.add_argument("--data", default=str(SHARED / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--num-requests", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--paths",
        default="old,most-probable,bf16,both,new",
        help="comma-separated subset of old, most-probable, bf16, both, new",
    )
    parser.add_argument("--new-early-stop", default=None, help="default: the config's")
    parser.add_argument("--new-precision", default=None, help="default: the config's")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config, settings, beta, alpha = editor_and_sphere(args.config)
    new = {
        "early_stop": args.new_early_stop or settings.get("target", {}).get("early_stop", "loss"),
        "precision": args.new_precision or settings.get("target", {}).get("precision", "float32"),
    }
    all_paths = {
        "old": {"early_stop": "loss", "precision": "float32", "share_template_prefix": False},
        "most-probable": {"early_stop": "most_probable", "precision": "float32"},
        "bf16": {"early_stop": "loss", "precision": "bf16"},
        "both": {"early_stop": "most_probable", "precision": "bf16"},
        "new": new,
    }
    paths = {name: all_paths[name] for name in args.paths.split(",")}

    model, tokenizer = load_model(config["model"]["model"], config["model"]["dtype"])
    requests = load_requests(args.data)[: args.num_requests]
    base = AlphaEdit(**editor_arguments(settings))
    base.progress = False
    base.setup(model, tokenizer)
    state = copy.deepcopy(base.state_dict())
    original = {n: p.detach().clone() for n, p in model.named_parameters()}

    def metrics() -> dict[str, float]:
        scores = counterfact_scores(model, tokenizer, requests)
        return {k: scores[k].mean().item() for k in ("efficacy", "generalization", "specificity")}

    def sphere_transform(name: str, delta: torch.Tensor) -> torch.Tensor:
        weight = linear_weight(model.get_submodule(name.removesuffix(".weight")))
        return project_delta(delta, weight.detach(), beta, alpha)[0]

    pre = metrics()
    results = {}
    for label, overrides in paths.items():
        editor = ProfiledAlphaEdit(**editor_arguments(settings, target=overrides))
        editor.progress = False
        editor.load_state_dict(copy.deepcopy(state))
        editor.setup(model, tokenizer)  # projectors from the cached statistics
        deltas = editor.compute_deltas(model, tokenizer, requests, sphere_transform)
        with torch.no_grad():
            for name, delta in deltas.items():
                assert torch.isfinite(delta).all(), name
                linear_weight(model.get_submodule(name.removesuffix(".weight"))).add_(delta)
        results[label] = {
            **editor.profile,
            "settings": {
                "early_stop": editor.target.early_stop,
                "precision": editor.target.precision,
            },
            "steps": editor.last_metrics["v_steps"],
            "loss": editor.last_metrics["v_loss"],
            "metrics": metrics(),
        }
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(original[n])
        print(f"{label}: {results[label]['cpu']:.1f} CPU-s", flush=True)

    opts = base.target
    print(
        f"\nAlphaEdit + SPHERE (β={beta}, α={alpha}) v* on {config['model']['model']}: "
        f"{len(requests)} CounterFact requests in one batch, v* at layer {base.target_layer}, "
        f"{opts.num_steps} steps, lr {opts.lr}, {len(base.context_templates)} templates "
        f"(bare + {len(base.context_templates) - 1}), loss threshold {opts.loss_threshold}, "
        f"{torch.get_num_threads()} threads"
    )
    labels = list(results)
    width = 16
    head = f"{'':<46}" + "".join(f"{label:>{width}}" for label in labels)

    def row(name: str, values, fmt: str) -> None:
        print(f"{name:<46}" + "".join(f"{v:>{width}{fmt}}" for v in values))

    print(head)
    print(
        f"{'early stop':<46}"
        + "".join(f"{results[k]['settings']['early_stop']:>{width}}" for k in labels)
    )
    print(
        f"{'precision':<46}"
        + "".join(f"{results[k]['settings']['precision']:>{width}}" for k in labels)
    )
    first = labels[0]
    row("v* CPU-seconds", [results[k]["cpu"] for k in labels], ".1f")
    row("v* wall seconds", [results[k]["wall"] for k in labels], ".1f")
    row(
        f"CPU-s ratio vs {first}",
        [results[first]["cpu"] / results[k]["cpu"] for k in labels],
        ".2f",
    )
    row("mean steps", [results[k]["steps"] for k in labels], ".2f")
    row("mean final v* loss", [results[k]["loss"] for k in labels], ".3f")
    for metric in ("efficacy", "generalization", "specificity"):
        row(
            f"{metric} (pre-edit {pre[metric]:.3f})",
            [results[k]["metrics"][metric] for k in labels],
            ".3f",
        )
    print("v* phases, CPU-seconds:")
    phases = list(dict.fromkeys(p for k in labels for p in results[k]["phases"]))
    for phase in phases:
        row(f"  {phase}", [results[k]["phases"].get(phase, (0.0, 0.0))[1] for k in labels], ".1f")
    row(
        "  backward through the blocks (hooks)",
        [sum(results[k]["layer_backward"].values()) for k in labels],
        ".1f",
    )
    print("per block above the edit point, forward / backward CPU-seconds:")
    for index in sorted(results[first]["layer_forward"]):
        cells = "".join(
            f"{results[k]['layer_forward'].get(index, 0.0):>{width // 2}.2f}"
            f"{results[k]['layer_backward'].get(index, 0.0):>{width // 2}.2f}"
            for k in labels
        )
        print(f"{'  block ' + str(index):<46}" + cells)


if __name__ == "__main__":
    main()
