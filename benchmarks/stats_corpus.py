"""How the key-statistics corpus changes AlphaEdit on SmolLM2: null space, moments and edit scores.

For each setting (a corpus and a size: number of texts × tokens per text) the key second moments
E[k kᵀ] of the edited layers are collected (seconds and tokens reported; cached, so a rerun reads
them back with the seconds of the first collection), the AlphaEdit null-space dimension per layer
is counted at several thresholds, and then the same CounterFact records are edited by AlphaEdit
WITHOUT SPHERE (so only the corpus differs), with the editor settings of `configs/edit.yaml`, in
sequential batches (compute_deltas → apply → after_apply, `edit_throughput.run_batch` with
suppression 0). Efficacy, generalization and specificity are scored over all edited facts; the
weights are copied back before the next setting.

Two columns compare each setting's moments with those of the largest WikiText setting run (the
reference, closest to the ~10⁸ Wikipedia tokens of the reference code):

- ‖C − C_ref‖_F / ‖C_ref‖_F, the mean over the edited layers;
- tr(P C_ref) / tr(C_ref), the share of the reference keys' energy E‖k‖² that lies in this
  setting's null space P (the directions AlphaEdit treats as unused; an update there changes the
  outputs for real text by that much), mean over layers.

    OMP_NUM_THREADS=1 python benchmarks/stats_corpus.py --threads 1
    python benchmarks/stats_corpus.py --settings generated:128x64,wikitext:128x64 --num-edits 20
"""

from __future__ import annotations

import argparse
import copy
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import torch
import yaml
from _config import editor_arguments
from edit_throughput import run_batch

from sphere_lightning.data import load_requests
from sphere_lightning.editors import AlphaEdit
from sphere_lightning.editors.statistics import GENERATED, collect_second_moments
from sphere_lightning.evaluation import METRIC_FAMILIES
from sphere_lightning.models import architecture_of, linear_weight, load_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WIKITEXT = SHARED / "corpus" / "wikitext-2-raw-test.txt"
#: Short names accepted in ``--settings`` for a corpus.
CORPORA = {"generated": GENERATED, "wikitext": str(WIKITEXT)}
DEFAULT_SETTINGS = (
    "generated:128x64,generated:512x128,wikitext:128x64,wikitext:512x128,wikitext:2000x128"
)
#: Null-space thresholds counted besides the editor's own.
OTHER_THRESHOLDS = (1e-2, 5e-2)
METRICS = ("efficacy", "generalization", "specificity")


@dataclass(frozen=True)
class Setting:
    """One key-statistics corpus and size."""

    label: str
    corpus: str
    num_samples: int
    max_length: int

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``<corpus>:<texts>x<tokens>``; corpus ``generated``, ``wikitext`` (the shared WikiText-2
        test file), a ``.txt`` path or a hub id (``wikitext:wikitext-103-raw-v1:512x128``)."""
        corpus, sep, size = text.strip().rpartition(":")
        texts, x, tokens = size.partition("x")
        if not sep or not x or not texts.isdigit() or not tokens.isdigit():
            raise argparse.ArgumentTypeError(
                f"`--settings` entries look like `generated:128x64`, got {text!r}"
            )
        return cls(text.strip(), CORPORA.get(corpus, corpus), int(texts), int(tokens))


def null_space_share(projector: torch.Tensor, reference: torch.Tensor) -> float:
    """tr(P C_ref) / tr(C_ref): the share of the reference keys' E‖k‖² that P lets through."""
    reference = reference.double()
    return float(torch.trace(projector.double() @ reference) / torch.trace(reference))


def relative_difference(moment: torch.Tensor, reference: torch.Tensor) -> float:
    """‖C − C_ref‖_F / ‖C_ref‖_F."""
    return float(torch.linalg.norm(moment.double() - reference.double()) / reference.norm())


def mean_scores(model, tokenizer, requests) -> dict[str, float]:
    """CounterFact efficacy / generalization / specificity, averaged over the requests."""
    scores = METRIC_FAMILIES["counterfact"](model, tokenizer, requests)
    return {k: float(scores[k].nanmean()) for k in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "edit.yaml"))
    parser.add_argument("--data", default=str(SHARED / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--num-edits", type=int, default=100, help="first N records are edited")
    parser.add_argument("--edits-per-step", type=int, default=50, help="requests per batch")
    parser.add_argument(
        "--settings",
        default=DEFAULT_SETTINGS,
        help="comma-separated `<corpus>:<texts>x<tokens>`; corpus `generated`, `wikitext`, a "
        f"`.txt` path or a hub id (default: {DEFAULT_SETTINGS})",
    )
    parser.add_argument(
        "--cache-dir", default=None, help="statistics cache (default: the editor's)"
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    for flag in ("num_edits", "edits_per_step"):
        if getattr(args, flag) < 1:
            parser.error(f"`--{flag.replace('_', '-')}` must be ≥ 1, got {getattr(args, flag)}")
    settings = [Setting.parse(s) for s in args.settings.split(",") if s.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    config = yaml.safe_load(Path(args.config).read_text())
    editor_args = dict(config["model"]["editor"]["init_args"])
    model, tokenizer = load_model(config["model"]["model"], config["model"]["dtype"])
    spec = architecture_of(model)
    layers = sorted(editor_args["layers"])
    threshold = float(editor_args.get("nullspace_threshold", 2e-2))
    thresholds = sorted({*OTHER_THRESHOLDS, threshold})
    requests = load_requests(args.data)[: args.num_edits]
    batches = [
        requests[i : i + args.edits_per_step] for i in range(0, len(requests), args.edits_per_step)
    ]
    # Only the out-projections of the edited layers change; they are copied back after each run.
    weights = [linear_weight(model.get_submodule(spec.mlp_out_name(layer))) for layer in layers]
    original = [weight.detach().clone() for weight in weights]
    pre = mean_scores(model, tokenizer, requests)

    rows: list[dict] = []
    moments: dict[str, dict[int, torch.Tensor]] = {}
    projectors: dict[str, dict[int, torch.Tensor]] = {}
    for setting in settings:
        print(f"[{time.perf_counter() - started:6.0f} s] {setting.label}", flush=True)
        stats_args = dict(
            corpus=setting.corpus,
            num_samples=setting.num_samples,
            max_length=setting.max_length,
            batch_size=editor_args.get("statistics", {}).get("batch_size", 16),
            seed=editor_args.get("seed", 0),
            cache_dir=args.cache_dir,
        )
        start = time.perf_counter()
        stats = collect_second_moments(model, tokenizer, spec, layers, **stats_args)
        load_s = time.perf_counter() - start
        moments[setting.label] = stats.moments
        eigenvalues = {
            layer: torch.linalg.eigvalsh(c.double()) for layer, c in stats.moments.items()
        }
        dims = {t: [int((eigenvalues[layer] < t).sum()) for layer in layers] for t in thresholds}

        statistics = {
            "corpus": setting.corpus,
            "num_samples": setting.num_samples,
            "max_length": setting.max_length,
            "cache_dir": args.cache_dir,
        }
        editor = AlphaEdit(**editor_arguments(editor_args, statistics=statistics))
        editor.progress = False
        editor.setup(model, tokenizer)  # reads the statistics just collected from the cache
        # The editor's own count at its threshold (the others are counted here the same way).
        dims[threshold] = [editor.nullspace_dims[layer] for layer in layers]
        projectors[setting.label] = copy.deepcopy(editor.projectors)
        edit_s = 0.0
        for batch in batches:
            # Suppression 0: SPHERE's projection is the identity, only the corpus differs.
            edit_s += run_batch(model, tokenizer, editor, batch, 0.5, 0.0)["total"]
        rows.append(
            {
                "setting": setting,
                "record": stats.record,
                "from_cache": stats.from_cache,
                "load_s": load_s,
                "dims": dims,
                "edit_s": edit_s,
                **mean_scores(model, tokenizer, requests),
            }
        )
        with torch.no_grad():
            for weight, saved in zip(weights, original, strict=True):
                weight.copy_(saved)
        scores = ", ".join(f"{k} {rows[-1][k]:.3f}" for k in METRICS)
        print(f"[{time.perf_counter() - started:6.0f} s] {setting.label}: {scores}", flush=True)

    wiki = [r["setting"] for r in rows if r["setting"].corpus == CORPORA["wikitext"]]
    largest = max(wiki, key=lambda s: (s.num_samples * s.max_length, s.num_samples), default=None)
    reference = largest.label if largest else None
    for row in rows:
        label = row["setting"].label
        if reference is not None:
            ref = moments[reference]
            row["difference"] = mean(relative_difference(moments[label][i], ref[i]) for i in layers)
            row["share"] = mean(null_space_share(projectors[label][i], ref[i]) for i in layers)
    print(
        f"\nAlphaEdit without SPHERE on {config['model']['model']}, {len(requests)} CounterFact "
        f"edits in {len(batches)} sequential batches, layers {layers[0]}–{layers[-1]}; "
        f"reference moments: {reference or 'none (no WikiText setting run)'}\n"
    )
    print_table(rows, pre, layers, thresholds, threshold)
    print(
        f"\nwall time {time.perf_counter() - started:.0f} s, {torch.get_num_threads()} threads, "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )


def print_table(
    rows: list[dict],
    pre: dict[str, float],
    layers: list[int],
    thresholds: list[float],
    threshold: float,
) -> None:
    """One markdown table: statistics, null space, difference to the reference, edit scores."""
    header = [
        "setting (texts×tokens)",
        "tokens",
        "stats s (text + forward)",
        f"null dim @{threshold:g}, L{layers[0]}–L{layers[-1]}",
        "mean null dim @" + " / ".join(f"{t:g}" for t in thresholds),
        "‖C−C_ref‖/‖C_ref‖",
        "tr(P C_ref)/tr(C_ref)",
        "edit s",
        *METRICS,
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    blank = ["–"] * (len(header) - len(METRICS) - 1)
    print("| " + " | ".join(["pre-edit", *blank, *(f"{pre[k]:.3f}" for k in METRICS)]) + " |")
    for row in rows:
        record = row["record"]
        if record is None:  # a cache entry written without its record
            tokens, seconds = "?", f"{row['load_s']:.1f} (cached)"
        else:
            tokens = f"{record.num_tokens:,}"
            seconds = (
                f"{record.text_seconds + record.forward_seconds:.0f} "
                f"({record.text_seconds:.0f} + {record.forward_seconds:.0f})"
            ) + (" cached" if row["from_cache"] else "")
        cells = [
            row["setting"].label,
            tokens,
            seconds,
            "/".join(str(d) for d in row["dims"][threshold]),
            " / ".join(f"{mean(row['dims'][t]):.0f}" for t in thresholds),
            f"{row['difference']:.3f}" if "difference" in row else "–",
            f"{row['share']:.2e}" if "share" in row else "–",
            f"{row['edit_s']:.0f}",
            *(f"{row[k]:.3f}" for k in METRICS),
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
