"""Small helpers shared by the test modules (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import PreTrainedTokenizerFast

from sphere_lightning.data.readers import write_counterfact_rome
from sphere_lightning.data.requests import EditRequest
from sphere_lightning.editors import (
    FT,
    MEMIT,
    ROME,
    AlphaEdit,
    NASOptions,
    StatisticsOptions,
    TargetOptions,
    TemplateOptions,
    UltraEdit,
    base,
    statistics,
)
from sphere_lightning.editors.rome import ROME_TARGET
from sphere_lightning.editors.targets import compute_target_values
from sphere_lightning.experiments import WITH_SPHERE, WITHOUT_SPHERE
from sphere_lightning.models import architecture_of, linear_weight

ROOT = Path(__file__).resolve().parents[1]


def quiet_trainer(callbacks: list | None = None, **overrides: Any) -> Trainer:
    """A one-epoch CPU ``Trainer`` without logger, checkpoints, progress bar, model summary or
    sanity check; ``overrides`` replace any of these."""
    options: dict[str, Any] = {
        "callbacks": callbacks or [],
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return Trainer(**{**options, **overrides})


def tiny_alphaedit_flags(num_steps: int = 6) -> list[str]:
    """Flags that shrink ``configs/edit.yaml``'s AlphaEdit to the tiny Llama: layers 1 and 2,
    one generated context template of 4 tokens, statistics from 8 texts of 12 tokens."""
    return [
        "--model.editor.init_args.layers=[1, 2]",
        f"--model.editor.init_args.target.num_steps={num_steps}",
        "--model.editor.init_args.templates.count=1",
        "--model.editor.init_args.templates.length=4",
        "--model.editor.init_args.statistics.num_samples=8",
        "--model.editor.init_args.statistics.max_length=12",
    ]


#: AlphaEdit's arguments for the tiny Llama's layers 1 and 2 (``AlphaEdit(**TINY_ALPHAEDIT)``).
TINY_ALPHAEDIT = {
    "layers": [1, 2],
    "target": TargetOptions(num_steps=5),
    "templates": TemplateOptions(count=1, length=4),
    "statistics": StatisticsOptions(num_samples=8, max_length=12),
    "nullspace_threshold": 1e9,  # every direction is "null": the tiny model edits freely
}


def run_cli(args: list[str], pythonpath: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python -m sphere_lightning *args`` in a subprocess from the repository root, with one
    thread, ``pythonpath`` (test helper modules) first on the path and ``env`` on top of ours."""
    full = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "sphere_lightning", *args],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


# ---------------------------------------------------------------------- experiment runner

#: The experiment suite and the configs it lists (one per base editor).
EXPERIMENT_SUITE = ROOT / "configs" / "experiments" / "suite.yaml"
EXPERIMENT_CONFIGS = sorted(
    p for p in EXPERIMENT_SUITE.parent.glob("*.yaml") if p != EXPERIMENT_SUITE
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: The order of a pair's runs in tables and figures.
RUNS_ORDER = (WITHOUT_SPHERE, WITH_SPHERE)


def markdown_rows(text: str, table: int = 0, header: bool = False) -> list[list[str]]:
    """The body rows of the ``table``-th markdown table of ``text`` (its header row first with
    ``header``)."""
    tables: list[list[str]] = []
    previous = ""
    for line in text.splitlines():
        if line.startswith("| "):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append(line)
        previous = line
    rows = tables[table] if table < len(tables) else []
    return [
        [cell.strip() for cell in row.strip("|").split("|")] for row in rows[0 if header else 1 :]
    ]


# ---------------------------------------------------------------------- the callbacks' view


class ContextStub:
    """A stand-in for :class:`~sphere_lightning.context.EditingContext` (what callbacks see of
    the module): over a model's edited layers (``model``, ``layers``, or ``editor.layers``), or
    over plain tensors (``weights``: ``{name: W}``, returned as they are by ``edited_weight``,
    so a test may change them in place or replace them). ``log_now`` records
    ``(global_step, metrics)`` in :attr:`logged`.
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        layers: tuple[int, ...] = (1, 2),
        *,
        editor: Any = None,
        weights: dict[str, Any] | None = None,
        original_weights: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.tokenizer, self.editor = model, tokenizer, editor
        self.weights = weights
        if weights is not None:
            names = list(weights)
        elif model is not None:
            spec = architecture_of(model)
            names = [spec.weight_name(i) for i in (editor.layers if editor else layers)]
        else:
            names = []
        self.edited_parameter_names = names
        if original_weights is None:
            original_weights = {n: self.edited_weight(n).detach().clone() for n in names}
        self.original_weights = original_weights
        self.global_step = 0
        self.record_step_deltas = False
        self.editor_deltas: dict[str, Any] = {}
        self.applied_deltas: dict[str, Any] = {}
        self.suppression_increase = 0.0
        self.phase_seconds: dict[str, float] = {}
        self.pre_edit_metrics: dict[str, float] = {}
        self.final_edit_metrics: dict[str, float] = {}
        self.sampled_edit_metrics: list[dict[str, float]] = []
        self.evaluated_at_current_step = False
        self.model_name, self.dtype_name = "stub", "float32"
        self.trainer: Any = None
        self.logged: list[tuple[int, dict[str, float]]] = []

    @property
    def editor_class_path(self) -> str:
        return f"{type(self.editor).__module__}.{type(self.editor).__name__}"

    def edited_weight(self, name: str) -> torch.Tensor:
        if self.weights is not None:
            return self.weights[name]
        return linear_weight(self.model.get_submodule(name.removesuffix(".weight")))

    def evaluated_weights(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def num_edited(self) -> int:
        return 0

    def log_now(self, metrics: dict[str, float]) -> None:
        self.logged.append((self.global_step, dict(metrics)))

    @property
    def last_logged(self) -> dict[str, float]:
        """The metrics of the last ``log_now`` call."""
        return self.logged[-1][1]

    def perturb(self, scale: float = 0.5, seed: int = 1) -> None:
        """An "edit": add noise to the last edited weight."""
        g = torch.Generator().manual_seed(seed)
        weight = self.edited_weight(self.edited_parameter_names[-1])
        with torch.no_grad():
            weight.add_(scale * torch.randn(weight.shape, generator=g))


def tensorboard_scalars(log_root: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of the one TensorBoard event file under ``log_root``."""

    (event_file,) = list(Path(log_root).rglob("events.out.tfevents*"))
    accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: {e.step: e.value for e in accumulator.Scalars(tag)}
        for tag in accumulator.Tags()["scalars"]
    }


def write_run_summary(
    directory: Path,
    scalars: dict[int, dict[str, float]],
    times: dict[int, float] | None = None,
    start: float = 0.0,
    finished: bool = True,
    **entries: Any,
) -> Path:
    """Write ``directory/summary.json`` as a run writes it, holding ``scalars`` (given as
    ``{step: {tag: value}}``), their step times (``times``: seconds after ``start``), whether
    the run ``finished``, and any other ``entries`` (``num_edited``, ``config``...)."""

    by_tag: dict[str, dict[str, float]] = {}
    for step in sorted(scalars):
        for tag, value in scalars[step].items():
            by_tag.setdefault(tag, {})[str(step)] = value
    summary = {
        "scalars": by_tag,
        "step_wall_time": {str(step): start + t for step, t in (times or {}).items()},
        "start_wall_time": start,
        "finished": finished,
        **entries,
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "summary.json"
    path.write_text(json.dumps(summary))
    return path


def _recorder(store: dict, key: str, read: str = "input"):
    """A forward hook that stores the module's first input (or its output) under ``key``."""

    def hook(module, args, output):
        store[key] = args[0] if read == "input" else output

    return hook


LAYERS = [1, 2]


def target_logprob(model, tokenizer, request) -> float:
    """Mean log-probability of ``target_new``'s tokens after the filled prompt (plain forward)."""
    prompt = tokenizer(request.filled_prompt)["input_ids"]
    target = tokenizer(" " + request.target_new, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(target)) / len(target)


def _block_output_at_subject(model, tokenizer, requests, layer: int) -> torch.Tensor:
    """Output of block ``layer`` at the subject's last token of each bare prompt: one unpadded
    forward per prompt."""
    spec = architecture_of(model)
    block = model.get_submodule(spec.layer_name(layer))
    rows = []
    for r in requests:
        encoded = base.encode_with_subject(tokenizer, r.prompt, r.subject)
        store = {}
        handle = block.register_forward_hook(_recorder(store, "out", read="output"))
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([encoded.ids]))
        finally:
            handle.remove()
        out = store["out"][0] if isinstance(store["out"], tuple) else store["out"]
        rows.append(out[0, encoded.subject_last])
    return torch.stack(rows)


STATS = StatisticsOptions(corpus="generated", num_samples=16, max_length=16)


COMMON = {
    "layers": LAYERS,
    "target": TargetOptions(num_steps=30, lr=0.5),
    "templates": TemplateOptions(count=1, length=4),
    # The one sampled template (MEMIT's top-5 sampling) decides part of what a 32-wide random
    # model learns: with seed 0 tiny Llama's ("The Therefore Louvre small.") leaves AlphaEdit a
    # mean log-prob gain of only 0.03; seed 1's gives margins like the other seeds' (0.3-0.8).
    "seed": 1,
}


def nullspace_threshold(model, tokenizer, cache_dir=None) -> float:
    """A threshold that leaves about half of every edited layer's key space as null space.

    The key second moments are cached, so the editor built with the same statistics options
    loads them instead of recomputing.
    """
    covs = statistics.second_moments(
        model,
        tokenizer,
        architecture_of(model),
        LAYERS,
        corpus=STATS.corpus,
        num_samples=STATS.num_samples,
        max_length=STATS.max_length,
        cache_dir=cache_dir,
    )
    return max(torch.linalg.eigvalsh(c.double()).median().item() for c in covs.values())


def make_editor(kind, model, tokenizer, cache_dir=None, num_steps=None, **overrides):
    """MEMIT or AlphaEdit on :data:`COMMON`, statistics cached in ``cache_dir``; ``num_steps``
    replaces the v* steps, ``overrides`` any other argument."""
    target = COMMON["target"] if num_steps is None else TargetOptions(num_steps=num_steps, lr=0.5)
    statistics = dataclasses.replace(STATS, cache_dir=cache_dir)
    options = {**COMMON, "target": target, "statistics": statistics, **overrides}
    if kind == "memit":
        editor = MEMIT(mom2_update_weight=10.0, **options)
    else:
        threshold = nullspace_threshold(model, tokenizer, cache_dir)
        editor = AlphaEdit(nullspace_threshold=threshold, l2=1e-2, **options)
    editor.progress = False
    return editor


def apply_deltas(model, deltas) -> None:
    with torch.no_grad():
        for name, delta in deltas.items():
            module = model.get_submodule(name.removesuffix(".weight"))
            linear_weight(module).add_(delta)


def logprob_gains(model, tokenizer, requests, deltas) -> list[float]:
    """Apply ``deltas`` to ``model`` (in place) and return each request's change of
    :func:`target_logprob`."""
    before = [target_logprob(model, tokenizer, r) for r in requests]
    apply_deltas(model, deltas)
    after = [target_logprob(model, tokenizer, r) for r in requests]
    return [a - b for a, b in zip(after, before, strict=True)]


def _project_against_live_weight(model, cumulative_ratio=0.5, suppression=0.8):
    """SPHERE's projection against the weight as it is in the model at call time."""
    from sphere_lightning.functional import project_delta

    def transform(name, delta):
        weight = linear_weight(model.get_submodule(name.removesuffix(".weight"))).detach()
        return project_delta(delta, weight.clone(), cumulative_ratio, suppression)[0]

    return transform


def plain_project_and_apply_loop(editor, model, tokenizer, requests, transform, solve=None):
    """The layer loop written out: v* once, then per layer (bottom to top) ΔW from
    ``solve(layer_index, layer, keys, residual)`` (default ``editor.solve``, float64 inputs),
    ``transform(name, ΔW)``, really applied for the layers above. Returns the transformed deltas
    and leaves the model as it found it."""
    spec = architecture_of(model)
    solve = solve or (lambda i, layer, k, r: editor.solve(i, layer, k.double(), r.double()))
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    target = compute_target_values(
        model,
        tokenizer,
        spec,
        requests,
        editor.target_layer,
        editor.context_templates,
        editor.target,
        progress=False,
    )
    expected = {}
    for i, layer in enumerate(editor.layers):
        keys = editor.compute_keys(model, tokenizer, requests, [layer])[layer]
        current = _block_output_at_subject(model, tokenizer, requests, editor.target_layer)
        residual = (target.values - current) / (len(editor.layers) - i)
        name = spec.weight_name(layer)
        expected[name] = transform(name, solve(i, layer, keys, residual).float())
        apply_deltas(model, {name: expected[name]})
    model.load_state_dict(before)
    return expected


EDITORS = ["rome", "ft", "memit", "alphaedit", "alphaedit_nas", "ultraedit"]


# seed 1: the template seed of test_editors.COMMON (see there).
LOCATE = {"templates": TemplateOptions(count=1, length=4), "seed": 1}


def nas_request_file(directory: str | Path) -> str:
    """The tiny vocabulary's requests as a CounterFact file, for ``nas_requests`` (in
    ``directory``, made if it does not exist yet)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    return str(_write_rome_json(REQUESTS, Path(directory) / "nas_requests.json"))


def make_contract_editor(kind, model, tokenizer, cache_dir, num_steps=20, target=None, **overrides):
    """An editor of ``kind`` with options small enough for the tiny models; for ROME, MEMIT and
    AlphaEdit ``num_steps`` v* steps at lr 0.5 from the editor's default v* options, with the
    fields in ``target`` replaced."""
    if kind == "ft":
        editor = FT(**{"layers": [1, 2], "num_steps": 10, "lr": 1e-2, **overrides})
    elif kind == "ultraedit":
        editor = UltraEdit(**{"layers": [1, 2], "lr": 1e-2, **overrides})
        editor.progress = False
    else:
        default = ROME_TARGET if kind == "rome" else TargetOptions()
        options = {
            "layers": [1, 2],
            "target": dataclasses.replace(
                default, **{"num_steps": num_steps, "lr": 0.5, **(target or {})}
            ),
            "statistics": dataclasses.replace(STATS, cache_dir=cache_dir),
        }
        options.update(LOCATE, **overrides)
        if kind == "rome":
            editor = ROME(**{**options, "layers": [1]})
        elif kind == "memit":
            editor = MEMIT(mom2_update_weight=10.0, **options)
        else:
            if kind == "alphaedit_nas":  # ν measured on the five requests of the tiny vocabulary
                options.update(nas=NASOptions(enabled=True, requests=nas_request_file(cache_dir)))
            threshold = nullspace_threshold(model, tokenizer, cache_dir)
            editor = AlphaEdit(nullspace_threshold=threshold, l2=1e-2, **options)
        editor.progress = False
    return editor


def roundtrip(state: dict) -> dict:
    """``state`` through ``torch.save`` / ``torch.load(weights_only=True)``, as a checkpoint."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same_deltas(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


#: The requests of the ``requests`` fixture; all their words are in the vocabulary.
REQUESTS = [
    EditRequest(
        case_id=0,
        subject="Danielle Darrieux",
        prompt="The mother tongue of {} is",
        target_new="English",
        target_true="French",
        paraphrase_prompts=("Danielle Darrieux speaks the language of",),
        neighborhood_prompts=("The mother tongue of Lionel Messi is",),
    ),
    EditRequest(
        case_id=1,
        subject="Eiffel Tower",
        prompt="The {} is located in the city of",
        target_new="Rome",
        target_true="Paris",
        paraphrase_prompts=("The Eiffel Tower is in the city of",),
        neighborhood_prompts=("The Louvre is located in the city of",),
    ),
    EditRequest(
        case_id=2,
        subject="Toyota",
        prompt="{} was founded in the country of",
        target_new="Germany",
        target_true="Japan",
        paraphrase_prompts=("The company Toyota was founded in",),
        neighborhood_prompts=("Honda was founded in the country of",),
    ),
    EditRequest(
        case_id=3,
        subject="Lionel Messi",
        prompt="{} plays the sport of",
        target_new="basketball",
        target_true="soccer",
        paraphrase_prompts=("Lionel Messi is a player of",),
        neighborhood_prompts=("Michael Jordan plays the sport of",),
    ),
    EditRequest(
        case_id=4,
        subject="Nintendo",
        prompt="The headquarters of {} is located in",
        target_new="Seoul",
        target_true="Kyoto",
        paraphrase_prompts=("The company Nintendo has its headquarters in",),
        neighborhood_prompts=("The headquarters of Nokia is located in",),
    ),
]


def _write_rome_json(requests: list[EditRequest], path: Path) -> Path:
    """Write ``requests`` as a CounterFact file in ROME's layout; returns ``path``."""
    return write_counterfact_rome(requests, path)


def _fit_args(tmp_path: Path, model_dir: str, data: Path) -> list[str]:
    return [
        "fit",
        "--config",
        str(ROOT / "configs" / "edit.yaml"),
        f"--model.model={model_dir}",
        *tiny_alphaedit_flags(num_steps=10),
        "--model.editor.init_args.nullspace_threshold=1e9",
        f"--data.dataset={data}",
        "--data.num_edits=4",
        "--data.edits_per_step=2",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


#: Larger than the default 0.02 so the tiny models' predictions are peaked enough for an edit
#: (a change of the residual stream) to move them measurably.
INIT_RANGE = 0.2


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


# ---------------------------------------------------------------------- KnowEdit records


def write_json(path: Path, records: list[Any]) -> Path:
    """Write ``records`` as a JSON array to ``path``; returns ``path``."""
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def copy_with(record: dict[str, Any], value: Any, *path: str | int) -> dict[str, Any]:
    """A deep copy of ``record`` with the field at ``path`` (keys and list indices) set to
    ``value``."""
    copy = json.loads(json.dumps(record))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return copy


def copy_without(record: dict[str, Any], *path: str | int) -> dict[str, Any]:
    """A deep copy of ``record`` with the field at ``path`` (keys and list indices) removed."""
    copy = json.loads(json.dumps(record))
    target = copy
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return copy


#: Four KnowEdit records in the vocabulary of the test tokenizer: with a ground truth or
#: without, a rephrase, every alias shape (a string, a list, a list of lists, a leading empty
#: list) and every probe family.
KNOWEDIT_RECORDS: list[dict[str, Any]] = [
    {
        "subject": "Toyota",
        "prompt": "Toyota was founded in the country of",
        "target_new": "Germany",
        "ground_truth": "Japan",
        "portability": {
            "Subject_Aliasing": [
                {
                    "prompt": "Honda was founded in the country of",
                    "ground_truth": ["Germany", "Berlin"],
                }
            ],
            "Reasoning": [
                {
                    "prompt": "The capital of the country Toyota was founded in is",
                    "ground_truth": [["Berlin"]],
                }
            ],
        },
        "locality": {
            "Relation_Specificity": [
                {"prompt": "Toyota makes", "ground_truth": [["cars and phones", "phones"]]},
                {
                    "prompt": "The headquarters of Toyota is located in the city of",
                    "ground_truth": "Tokyo",
                },
            ]
        },
    },
    {
        "subject": "Lionel Messi",
        "prompt": "Lionel Messi plays the sport of",
        "target_new": "basketball",
        "portability": {},
        "locality": {
            "Forgetfulness": [
                {
                    "prompt": "Lionel Messi became famous as a",
                    "ground_truth": [[], ["player and an actress"]],
                }
            ]
        },
    },
    {
        "subject": "Danielle Darrieux",
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "rephrase": "Danielle Darrieux speaks the language of",
        "portability": {
            "Logical_Generalization": [
                {"prompt": "Danielle Darrieux speaks", "ground_truth": "English"}
            ]
        },
        "locality": {},
    },
    {
        "subject": "Nokia",
        "prompt": "Nokia makes",
        "target_new": "cars",
        "ground_truth": "phones",
        "portability": {},
        "locality": {
            "Relation_Specificity": [
                {"prompt": "Nokia was founded in the country of", "ground_truth": "Japan"}
            ]
        },
    },
]
