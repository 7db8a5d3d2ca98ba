"""GPU check: AlphaEdit + SPHERE + HE through the real Lightning path on a Llama-3-8B-shaped model
with random weights; seconds per 100 edits by phase and peak device memory.

Nothing is downloaded and nothing is written but a temporary folder (statistics cache, corpus):

- the model is a ``LlamaForCausalLM`` built from a config (hidden 4096, MLP 14336, 32 layers, 32
  heads, 8 KV heads, vocab 128,256, rope θ 500,000 at ``--shape llama3-8b``; 4 layers of 32 at
  ``tiny``) with random weights, created directly on the device in ``--dtype`` (no CPU init of
  8B parameters, no 16 GB ``save_pretrained``) and handed to the module with
  :meth:`EditingModule.attach_model`;
- the tokenizer is word-level, built here (as ``tests/conftest.py`` builds the tests' one) and
  padded with filler words to the model's vocabulary, so every id the model samples decodes;
- the requests are synthetic CounterFact-like facts (subject, relation, new and true object,
  a paraphrase and a neighborhood prompt), ``--batches`` × ``--edits-per-step`` of them;
- key statistics come from a small written corpus (``--stats-samples`` texts built from the
  requests' words, a few thousand tokens): a timing check, not an edit-quality one. E[k kᵀ] then
  has low rank, so AlphaEdit's null space is nearly the whole key space, but the work per batch
  (v*, keys, the d_in × d_in solve, SPHERE, HE) and the projectors' ``eigh`` have their real
  sizes. The paper's 100,000 WikiText paragraphs would take far longer and measure the corpus.

The run is ``Trainer.fit(EditingModule(AlphaEdit), EditDataModule)`` with
``SphereProjectionCallback`` (β 0.5, α 0.5, in the loop) and ``HyperSphericalEnergyCallback``,
as ``python -m sphere_lightning fit --config configs/paper/llama3-8b_alphaedit.yaml`` builds it
(edited layers 4–8, v* at layer 8, its v* and AlphaEdit settings), with ``--v-num-steps`` v*
steps. The per-step phase times are the ones the module and editor log (``time/*``); on CUDA a
phase ends where its code reads a value back to the host, so queued kernels are counted in the
phase that waits for them.

    python benchmarks/gpu_check.py                                  # CUDA: Llama-3-8B shape, bf16
    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --shape tiny --device cpu --batches 2 \\
        --edits-per-step 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from _memory import maxrss_bytes
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sphere_lightning.callbacks import HyperSphericalEnergyCallback, SphereProjectionCallback
from sphere_lightning.data import write_counterfact_rome
from sphere_lightning.data.datamodule import EditDataModule
from sphere_lightning.data.requests import EditRequest
from sphere_lightning.editors import AlphaEdit, StatisticsOptions, TargetOptions, TemplateOptions
from sphere_lightning.editors.statistics import collect_second_moments
from sphere_lightning.errors import ConfigError
from sphere_lightning.models.architectures import architecture_of
from sphere_lightning.models.loading import resolve_dtype
from sphere_lightning.module import EditingModule

#: Model shapes: LlamaConfig arguments, edited layers, v* layer (the paper preset's at 8B).
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "config": {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
            "max_position_embeddings": 8192,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        },
        "layers": [4, 5, 6, 7, 8],
        "target_layer": 8,
        "stats_samples": 64,
    },
    "tiny": {
        "config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 512,
            "max_position_embeddings": 256,
            "initializer_range": 0.2,
        },
        "layers": [1, 2],
        "target_layer": 2,
        # Few enough tokens that E[k kᵀ] of d_in = 64 keeps a null space to edit in.
        "stats_samples": 2,
    },
}

#: configs/paper/llama3-8b_alphaedit.yaml's AlphaEdit settings (statistics and v* steps aside).
PAPER_EDITOR = {
    "nullspace_threshold": 0.02,
    "l2": 10.0,
    "templates": TemplateOptions(count=5, length=10),
}
#: Its v* options (the steps are a flag here).
PAPER_TARGET = {
    "lr": 0.1,
    "loss_threshold": 0.05,
    "clamp_norm_factor": 0.75,
    "kl_factor": 0.0625,
    "weight_decay": 0.5,
}

PAD, EOS, UNK, BOS = "<pad>", "<eos>", "<unk>", "<bos>"

_FIRST = ["Anna", "Boris", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas"]
_LAST = ["Adler", "Berg", "Costa", "Dahl", "Eriksen", "Fischer", "Garcia", "Horvat", "Ito", "Jung"]
_FIRMS = ["Acme", "Borealis", "Cobalt", "Dynamo", "Everest", "Fjord", "Granite", "Helix", "Iris"]
#: (prompt, paraphrase, subject kind, objects)
_RELATIONS = [
    (
        "The mother tongue of {} is",
        "{} speaks the language of",
        "person",
        ["English", "French", "German", "Spanish", "Italian", "Dutch", "Polish", "Greek"],
    ),
    (
        "{} plays the sport of",
        "{} is a professional player of",
        "person",
        ["soccer", "basketball", "tennis", "hockey", "baseball", "cricket", "golf", "rugby"],
    ),
    (
        "{} was founded in the country of",
        "The company {} was established in",
        "firm",
        ["Japan", "Germany", "Canada", "Brazil", "India", "Norway", "Kenya", "Chile"],
    ),
    (
        "The headquarters of {} is located in",
        "{} has its headquarters in",
        "firm",
        ["Paris", "Rome", "Tokyo", "Berlin", "Madrid", "Oslo", "Lima", "Seoul"],
    ),
]
_TEXT_WORDS = (
    "The Therefore Because I You In A It He She This When After Many We is a the of and in . , "
    "city river company people language country team player music book history"
)


def synthetic_requests(count: int) -> list[EditRequest]:
    """``count`` CounterFact-like requests over made-up subjects (each a distinct fact)."""
    requests = []
    for i in range(count):
        prompt, paraphrase, kind, objects = _RELATIONS[i % len(_RELATIONS)]
        n = i // len(_RELATIONS)

        def subject(j: int, kind: str = kind) -> str:
            if kind == "person":
                return f"{_FIRST[j % len(_FIRST)]} {_LAST[(j // len(_FIRST)) % len(_LAST)]}{j}"
            return f"{_FIRMS[j % len(_FIRMS)]} Group{j}"

        true, new = objects[n % len(objects)], objects[(n + 1 + n // 7) % len(objects)]
        if new == true:
            new = objects[(n + 2) % len(objects)]
        requests.append(
            EditRequest(
                case_id=i,
                subject=subject(n),
                prompt=prompt,
                target_new=new,
                target_true=true,
                paraphrase_prompts=(paraphrase.format(subject(n)),),
                neighborhood_prompts=(prompt.format(subject(n + count)),),
            )
        )
    return requests


def corpus_texts(requests: list[EditRequest], count: int) -> list[str]:
    """``count`` short paragraphs (over 20 characters) from the requests' prompts and objects."""
    texts = []
    for i in range(count):
        r = requests[i % len(requests)]
        other = requests[(7 * i + 3) % len(requests)]
        texts.append(
            f"{r.filled_prompt} {r.target_true} . {other.paraphrase_prompts[0]} "
            f"{other.target_true} , and {r.neighborhood_prompts[0]} {other.target_new} ."
        )
    return texts


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of ``texts``, padded with filler words ``w<i>`` to
    ``vocab_size`` entries so that any id the model samples decodes to a word that encodes back."""
    words: list[str] = []
    seen = set()
    for text in [*texts, _TEXT_WORDS]:
        for token in pre_tokenizers.Whitespace().pre_tokenize_str(text):
            if token[0] not in seen:
                seen.add(token[0])
                words.append(token[0])
    vocab = [PAD, EOS, UNK, BOS, *words]
    if len(vocab) > vocab_size:
        raise SystemExit(
            f"The synthetic requests need {len(vocab)} tokens, more than the model's vocabulary "
            f"({vocab_size}): use fewer requests (`--batches`, `--edits-per-step`)"
        )
    vocab += [f"w{i}" for i in range(vocab_size - len(vocab))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK, bos_token=BOS
    )


def build_model(
    shape: str, tokenizer: PreTrainedTokenizerFast, device: torch.device, dtype: torch.dtype
) -> LlamaForCausalLM:
    """A Llama of ``shape`` with random (seeded) weights, created on ``device`` in ``dtype``."""
    config = LlamaConfig(
        **SHAPES[shape]["config"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are born in dtype: no float32 copy of 8B
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    # As from_pretrained(dtype=...): parameters in dtype, RoPE's inv_freq kept in float32.
    wrong = {p.dtype for p in model.parameters()} - {dtype}
    if wrong:
        raise RuntimeError(f"Parameters were created in {sorted(map(str, wrong))}, not {dtype}")
    return model


class RecordingLogger(Logger):
    """Keeps every logged scalar in memory: ``{step: {tag: value}}``."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "gpu_check"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        return None

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.steps.setdefault(int(step or 0), {}).update(metrics)

    def total(self, tag: str, first_step: int = 1) -> float:
        """Sum of ``tag`` over the steps from ``first_step`` on."""
        return sum(v[tag] for s, v in self.steps.items() if s >= first_step and tag in v)


#: (row label, logged tag) of the per-batch phases, in the order a step runs them.
PER_BATCH = [
    ("v* (target values)", "time/v_star"),
    ("keys (and current outputs)", "time/keys"),
    ("solve (AlphaEdit, float64)", "time/solve"),
    ("transform (SPHERE, in the loop)", "time/transform"),
    ("apply ΔW (after-loop transforms + add)", "time/transform_and_apply"),
    ("AlphaEdit K Kᵀ update (after apply)", "time/after_apply"),
    ("HE of the edited weights", "time/energy"),
    ("batch edit metrics", "time/batch_evaluation"),
]


def check_setup(args: argparse.Namespace, device: torch.device) -> None:
    """Fail with a clear message on setups that cannot work or cannot mean anything."""
    try:
        dtype = resolve_dtype(args.dtype, "--dtype")
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"`--device {args.device}`: CUDA is not available here (torch "
            f"{torch.__version__}, built with CUDA {torch.version.cuda}); use `--device cpu "
            "--shape tiny`"
        )
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise SystemExit(
                f"`--device {args.device}`: only {torch.cuda.device_count()} CUDA device(s)"
            )
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"`--device` should be cpu or cuda[:N], got {args.device!r}")
    for flag, value in (
        ("--batches", args.batches),
        ("--edits-per-step", args.edits_per_step),
        ("--v-num-steps", args.v_num_steps),
        ("--stats-samples", args.stats_samples),
    ):
        if value < 1:
            raise SystemExit(f"`{flag}` should be ≥ 1, got {value}")
    if args.shape == "llama3-8b" and device.type == "cpu" and not args.allow_slow:
        raise SystemExit(
            "`--shape llama3-8b` on the CPU needs ~16 GB (bf16) to ~32 GB of memory and hours; "
            "use `--shape tiny`, a CUDA device, or pass `--allow-slow`"
        )
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise SystemExit(f"`--dtype {args.dtype}`: this GPU has no bfloat16; use float16")
        if args.shape == "llama3-8b":
            index = torch.cuda.current_device() if device.index is None else device.index
            free, total = torch.cuda.mem_get_info(index)
            need = 8.03e9 * dtype.itemsize + 12e9  # weights + projectors, K Kᵀ, solve, v*
            if free < need:
                raise SystemExit(
                    f"`--shape llama3-8b` in {args.dtype} needs about {need / 2**30:.0f} GiB of "
                    f"device memory, {args.device} has {free / 2**30:.0f} GiB free of "
                    f"{total / 2**30:.0f}; use `--dtype bfloat16` or `--shape tiny`"
                )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default=None,
        help="model shape (default: llama3-8b on cuda, tiny otherwise)",
    )
    parser.add_argument("--batches", type=int, default=3, help="edit batches (training steps)")
    parser.add_argument("--edits-per-step", type=int, default=100, help="requests per batch")
    parser.add_argument("--v-num-steps", type=int, default=25, help="v* steps (paper: 25)")
    parser.add_argument(
        "--dtype",
        default=None,
        help="weight dtype (default: bfloat16 on cuda, float32 on cpu)",
    )
    parser.add_argument(
        "--stats-samples",
        type=int,
        default=None,
        help="texts of the key-statistics corpus (default: 64 at llama3-8b, 2 at tiny)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--allow-slow", action="store_true", help="allow --shape llama3-8b on the CPU"
    )
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    args.shape = args.shape or ("llama3-8b" if on_cuda else "tiny")
    args.dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    args.stats_samples = args.stats_samples or SHAPES[args.shape]["stats_samples"]
    return args


def peak_memory(device: torch.device) -> tuple[str, int]:
    """(what is measured, bytes): peak allocated device memory on CUDA, else peak RSS."""
    if device.type == "cuda":
        return "peak device memory (torch.cuda.max_memory_allocated)", int(
            torch.cuda.max_memory_allocated(device)
        )
    return "peak RSS (benchmarks/_memory.py)", maxrss_bytes()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build everything, edit, and return the measurements (also printed as a table)."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SystemExit(f"`--device` should be cpu or cuda[:N], got {args.device!r}") from None
    check_setup(args, device)
    if device.type == "cuda" and device.index is None:
        # torch.cuda's set_device, mem_get_info… refuse a device without an index.
        device = torch.device("cuda", torch.cuda.current_device())
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        results = edit(args, device, Path(work))
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


def edit(args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    """The run itself; ``work`` holds the corpus, the requests and the statistics cache."""
    dtype = resolve_dtype(args.dtype, "--dtype")
    shape = SHAPES[args.shape]
    num_edits = args.batches * args.edits_per_step
    requests = synthetic_requests(num_edits)
    texts = corpus_texts(requests, args.stats_samples)
    (work / "corpus.txt").write_text("\n\n".join(texts), encoding="utf-8")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)

    start = time.perf_counter()
    tokenizer = build_tokenizer(
        [r.filled_prompt for r in requests] + texts, shape["config"]["vocab_size"]
    )
    model = build_model(args.shape, tokenizer, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    build_seconds = time.perf_counter() - start

    editor = AlphaEdit(
        layers=shape["layers"],
        target_layer=shape["target_layer"],
        target=TargetOptions(num_steps=args.v_num_steps, **PAPER_TARGET),
        statistics=StatisticsOptions(
            corpus=str(work / "corpus.txt"),
            num_samples=args.stats_samples,
            max_length=64,
            batch_size=16,
            cache_dir=str(work / "stats"),
        ),
        **PAPER_EDITOR,
    )
    editor.progress = False
    module = EditingModule(
        editor, model=f"random {args.shape} Llama", dtype=args.dtype, fluency_prompts=0
    )
    module.attach_model(model, tokenizer)
    names = module.edited_parameter_names
    before = {name: module.edited_weight(name).detach().float().cpu().clone() for name in names}

    # Key statistics, timed on their own; the fit's setup then reads them from the cache.
    start = time.perf_counter()
    spec = architecture_of(model)
    record = collect_second_moments(
        model, tokenizer, spec, editor.layers, **asdict(editor.statistics), seed=editor.seed
    ).record
    stats_seconds = time.perf_counter() - start

    data = EditDataModule(
        dataset=str(write_counterfact_rome(requests, work / "counterfact.json")),
        num_edits=num_edits,
        edits_per_step=args.edits_per_step,
        shuffle=False,
    )
    logger = RecordingLogger()
    energy = HyperSphericalEnergyCallback(s=1.0)
    trainer = Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index] if device.type == "cuda" else 1,
        max_epochs=1,
        num_sanity_val_steps=0,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=work,
        callbacks=[SphereProjectionCallback(0.5, 0.5, "current", "in_loop"), energy],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - start
    memory_label, memory_bytes = peak_memory(device)

    after = {name: module.edited_weight(name).detach().float().cpu().clone() for name in names}
    changed = {
        name: float((after[name] - before[name]).abs().max()) / float(before[name].abs().max())
        for name in names
    }
    scale = 100 / num_edits
    per_100 = {label: logger.total(tag) * scale for label, tag in PER_BATCH}
    phases = module.phase_seconds
    once = {
        "build model and tokenizer": build_seconds,
        "key statistics (E[k kᵀ], written corpus)": stats_seconds,
        "setup (templates, null-space projectors' eigh)": phases.get("setup", 0.0),
        "edit metrics (pre-edit, and lifelong after the last batch)": phases.get("evaluation", 0.0),
        "HE baseline (step 0)": logger.steps.get(0, {}).get("time/energy", 0.0),
        "whole fit": fit_seconds,
    }
    results = {
        "shape": args.shape,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "batches": args.batches,
        "edits_per_step": args.edits_per_step,
        "v_num_steps": args.v_num_steps,
        "layers": editor.layers,
        "global_step": trainer.global_step,
        "seconds_per_100_edits": per_100,
        "seconds_once": once,
        "statistics_tokens": record.num_tokens if record is not None else None,
        "memory": {"what": memory_label, "bytes": memory_bytes},
        "relative_max_weight_change": changed,
        "energy_baseline": energy.baseline,
        "energy_final": energy.latest,
        "nullspace_dims": dict(editor.nullspace_dims),
        "sphere_ranks": {
            tag: v for tag, v in logger.steps.get(trainer.global_step, {}).items() if "rank" in tag
        },
        "v_loss": [
            logger.steps[s]["editor/v_loss"]
            for s in sorted(logger.steps)
            if "editor/v_loss" in logger.steps[s]
        ],
    }
    return results


def print_table(results: dict[str, Any]) -> None:
    """The measurements as Markdown tables."""
    print(
        f"\nAlphaEdit + SPHERE + HE, {results['shape']} Llama (random weights), "
        f"{results['dtype']} on {results['device']} ({results['device_name']}); "
        f"{results['batches']} batches of {results['edits_per_step']} requests, "
        f"{results['v_num_steps']} v* steps, layers {results['layers']}\n"
    )
    print("| phase | seconds per 100 edits |")
    print("|---|---|")
    for label, seconds in results["seconds_per_100_edits"].items():
        print(f"| {label} | {seconds:.3f} |")
    print("\n| once per run | seconds |")
    print("|---|---|")
    for label, seconds in results["seconds_once"].items():
        print(f"| {label} | {seconds:.3f} |")
    memory = results["memory"]
    print(f"\n{memory['what']}: {memory['bytes'] / 2**30:.2f} GiB")
    print(f"statistics tokens: {results['statistics_tokens']}")
    print(f"null-space dims: {results['nullspace_dims']}")
    print(f"v* loss per batch: {[round(v, 3) for v in results['v_loss']]}")
    changed = ", ".join(f"{n}: {v:.3g}" for n, v in results["relative_max_weight_change"].items())
    print(f"max |ΔW| / max |W| per edited weight: {changed}")
    baseline, final = results["energy_baseline"] or {}, results["energy_final"] or {}
    for tag in sorted(final):
        print(f"{tag}: {baseline.get(tag, float('nan')):.6g} -> {final[tag]:.6g}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the check."""
    return run(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
