"""Bad input ends a run with one clear paragraph, exit code 2 and no traceback; no weight and no
cache file changes; cache files are written atomically and a corrupt one is recomputed."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import sphere_lightning
from sphere_lightning import __main__ as entry
from sphere_lightning import cache
from sphere_lightning.callbacks import DeltaTransform, SphereProjectionCallback
from sphere_lightning.cli import cli_main
from sphere_lightning.deltas import DeltaPipeline, NonFiniteDeltaError
from sphere_lightning.editors import AlphaEdit, statistics
from sphere_lightning.errors import (
    ConfigError,
    DataError,
    UserInputError,
    check_writable_folder,
    exit_on_user_error,
)
from sphere_lightning.models import ARCHITECTURES, architecture_of, loading
from sphere_lightning.module import EditingModule
from tests.helpers import _fit_args

ROOT = Path(__file__).resolve().parents[1]

# The in-process runs pass their arguments explicitly; pytest's own are not meant for them.
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


# ------------------------------------------------------------------------------------ helpers


def files_in(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``folder``: relative path → (size, mtime in ns, SHA-256)."""
    if not folder.exists():
        return {}
    return {
        str(path.relative_to(folder)): (
            path.stat().st_size,
            path.stat().st_mtime_ns,
            hashlib.sha256(path.read_bytes()).hexdigest(),
        )
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same_weights(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"{name} changed"


def rome_record(index: int, **rewrite: str) -> dict:
    """A valid ROME-layout CounterFact record; ``rewrite`` overrides ``requested_rewrite``."""
    return {
        "case_id": index,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English"},
            "target_true": {"str": "French"},
            **rewrite,
        },
        "paraphrase_prompts": ["Danielle Darrieux speaks the language of"],
        "neighborhood_prompts": ["The mother tongue of Lionel Messi is"],
    }


def easyedit_record(index: int, prompt: str) -> dict:
    return {
        "case_id": index,
        "prompt": prompt,
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "ground_truth": "French",
        "rephrase_prompt": "Danielle Darrieux speaks the language of",
        "locality_prompt": "The mother tongue of Lionel Messi is",
        "locality_ground_truth": "French",
    }


def records_json(*records: dict) -> str:
    return json.dumps(list(records))


GOOD = [rome_record(i) for i in range(3)]

#: name → (file name, file text, regex the message must match). Each names the file, and where
#: there is one the record and the field.
DATA_CASES = {
    "malformed JSON": (
        "facts.json",
        '[{"case_id": 0,\n  "requested_rewrite": }]',
        r"facts\.json: not valid JSON \(line 2, column 24",
    ),
    "malformed JSONL line": (
        "facts.jsonl",
        json.dumps(GOOD[0]) + "\n" + json.dumps(GOOD[1])[:-5] + "\n",
        r"facts\.jsonl, record 1: line 2 is not valid JSON",
    ),
    "empty file": ("facts.json", "", r"facts\.json: contains no records"),
    "empty list": ("facts.json", "[]", r"facts\.json: contains no records"),
    "missing field": (
        "facts.json",
        records_json(GOOD[0], {k: v for k, v in GOOD[1].items() if k != "paraphrase_prompts"}),
        r"facts\.json, record 1, field 'paraphrase_prompts': missing",
    ),
    "subject absent from its prompt": (
        "facts.json",
        records_json(
            easyedit_record(0, "The mother tongue of Danielle Darrieux is"),
            easyedit_record(1, "The native language of Lionel Messi is"),
        ),
        r"facts\.json, record 1, field 'prompt': subject 'Danielle Darrieux' does not occur in "
        r"field 'prompt' \('The native language of Lionel Messi is'\)",
    ),
    "empty target": (
        "facts.json",
        records_json(GOOD[0], GOOD[1], rome_record(2, target_new={"str": "  "})),
        r"facts\.json, record 2, field 'requested_rewrite\.target_new\.str': empty string",
    ),
    "target_new equals target_true": (
        "facts.json",
        records_json(GOOD[0], rome_record(1, target_new={"str": "French"})),
        r"facts\.json, record 1, field 'requested_rewrite\.target_new\.str': equals "
        r"'requested_rewrite\.target_true\.str' \('French'\): the edit would change nothing",
    ),
}


def fit_args(tmp_path: Path, model_dir: str, data: Path, *extra: str) -> list[str]:
    """The end-to-end tests' fit on the tiny model, with the statistics cached under
    ``tmp_path`` and two one-fact steps (later flags override earlier ones)."""
    return [
        *_fit_args(tmp_path, model_dir, data),
        f"--model.editor.init_args.statistics.cache_dir={tmp_path / 'stats'}",
        "--data.num_edits=2",
        "--data.edits_per_step=1",
        *extra,
    ]


@pytest.fixture
def run_main(tmp_path, tiny_model_dir, capsys):
    """Run ``python -m sphere_lightning``'s ``main`` in-process; check it stops with exit code 2,
    one ``error:`` paragraph and no traceback, and that neither the model folder nor any cache
    file changed. Returns the message."""
    stats = tmp_path / "stats"
    stats.mkdir()
    (stats / "earlier-run.pt").write_bytes(b"an entry of an earlier run")
    caches = [stats, Path(os.environ["SPHERE_LIGHTNING_CACHE"]), Path(tiny_model_dir)]

    def run(*args: str, code: int = 2) -> str:
        before = [files_in(folder) for folder in caches]
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            entry.main(list(args))
        err = capsys.readouterr().err
        assert info.value.code == code
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, err
        assert [files_in(folder) for folder in caches] == before
        return lines[0].removeprefix("error: ")

    return run


# ------------------------------------------------------------- every mistake, through the CLI


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_file_is_one_paragraph(case, tmp_path, tiny_model_dir, run_main):
    name, text, expected = DATA_CASES[case]
    data = tmp_path / name
    data.write_text(text, encoding="utf-8")
    message = run_main(*fit_args(tmp_path, tiny_model_dir, data))
    assert re.search(expected, message), message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--data.num_edits=9"], r"`data\.num_edits` is 9 but .*facts\.json' has only 3 records"),
        (
            ["--data.edits_per_step=0"],
            r"`data\.edits_per_step` must be a positive integer, got 0",
        ),
        (
            ["--model.editor.init_args.layers=[1, 7]"],
            r"`model\.editor\.init_args\.layers` = \[1, 7\] names layer\(s\) \[7\], but the model "
            r"has 4 layers \(valid: 0\.\.3\)",
        ),
        (["--model.dtype=float33"], r"`model\.dtype` should be one of .*got 'float33'"),
        (
            ["--model.model=sphere-lightning-tests/no-such-model"],
            r"`model\.model` is 'sphere-lightning-tests/no-such-model', which is no local "
            r"folder or file, and it could not be loaded as a Hugging Face hub id",
        ),
        (
            ["--model.model=./no/such/model"],
            r"`model\.model` is '\./no/such/model', which does not exist",
        ),
        (
            ["--data.dataset=missing/facts.json"],
            r"edit data file not found: missing/facts\.json \(`data\.dataset`\)",
        ),
        (
            ["--model.editor.init_args.target.num_steps=0"],
            r"`model\.editor\.init_args\.target\.num_steps` must be ≥ 1, got 0",
        ),
        (
            ["--model.editor.init_args.statistics.max_length=0"],
            r"`model\.editor\.init_args\.statistics\.max_length` must be ≥ 1, got 0",
        ),
    ],
    ids=[
        "num_edits",
        "edits_per_step",
        "layers",
        "dtype",
        "hub id",
        "model path",
        "data path",
        "v* steps",
        "statistics length",
    ],
)
def test_bad_flag_is_one_paragraph(extra, expected, tmp_path, tiny_model_dir, run_main):
    data = tmp_path / "facts.json"
    data.write_text(records_json(*GOOD), encoding="utf-8")
    message = run_main(*fit_args(tmp_path, tiny_model_dir, data, *extra))
    assert re.search(expected, message), message


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("cumulative_ratio", 1.5, r"cumulative_ratio` \(β\) should be in \[0, 1\]"),
        ("suppression", -0.25, r"suppression` \(α\) should be in \[0, 1\]"),
    ],
)
def test_sphere_strength_out_of_range(flag, value, expected, tmp_path, tiny_model_dir, run_main):
    # jsonargparse wraps the callback's ConfigError in its own ValueError; the CLI unwraps it.
    data = tmp_path / "facts.json"
    data.write_text(records_json(*GOOD), encoding="utf-8")
    config = tmp_path / "sphere.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: sphere_lightning.callbacks.SphereProjectionCallback\n"
        f"      init_args: {{{flag}: {value}}}\n"
    )
    message = run_main(*fit_args(tmp_path, tiny_model_dir, data, "--config", str(config)))
    flag_path = r"`trainer\.callbacks\.SphereProjectionCallback\.init_args\."
    assert re.search(f"{flag_path}{expected}, got {value}", message), message


def test_unknown_architecture(tmp_path, tiny_model_dir, run_main, monkeypatch):
    monkeypatch.delitem(ARCHITECTURES, "llama")
    data = tmp_path / "facts.json"
    data.write_text(records_json(*GOOD), encoding="utf-8")
    message = run_main(*fit_args(tmp_path, tiny_model_dir, data))
    assert "model_type='llama' (`model.model`)" in message
    assert "ARCHITECTURES['llama'] = ArchitectureSpec(" in message


@pytest.mark.parametrize(
    ("flag", "where"),
    [
        ("trainer.logger.init_args.save_dir", "logs"),
        ("model.editor.init_args.statistics.cache_dir", "cache"),
    ],
)
def test_unwritable_folder_fails_before_the_model_loads(
    flag, where, tmp_path, tiny_model_dir, run_main, monkeypatch
):
    def refuse(*args, **kwargs):
        raise AssertionError("the folder check must come before the model loads")

    monkeypatch.setattr("sphere_lightning.module.load_model", refuse)
    data = tmp_path / "facts.json"
    data.write_text(records_json(*GOOD), encoding="utf-8")
    blocker = tmp_path / "a-file"  # a file where a folder should be: unwritable even for root
    blocker.write_text("not a folder")
    message = run_main(*fit_args(tmp_path, tiny_model_dir, data, f"--{flag}={blocker / where}"))
    assert message == (
        f"`{flag}` is '{blocker / where}', but {blocker} is a file, not a folder: point "
        f"`{flag}` at a folder"
    )


def test_unwritable_folder_names_the_folder_and_the_flag(tmp_path, monkeypatch):
    check_writable_folder(tmp_path / "new" / "deeper", "flag")  # creatable: fine
    assert not (tmp_path / "new").exists()  # and nothing was created

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.TemporaryFile", refuse)
    with pytest.raises(ConfigError) as info:
        check_writable_folder(tmp_path / "logs", "trainer.logger.init_args.save_dir")
    assert str(info.value) == (
        f"`trainer.logger.init_args.save_dir` is '{tmp_path / 'logs'}', but its parent "
        f"{tmp_path} is not writable (Permission denied): point "
        "`trainer.logger.init_args.save_dir` at a folder you can write to"
    )


# ------------------------------------------------------------------ the entry point itself


def test_a_bug_keeps_its_traceback(monkeypatch):
    def bug(args=None, prog=None):
        raise KeyError("a real bug")

    monkeypatch.setattr("sphere_lightning.cli.cli_main", bug)
    with pytest.raises(KeyError, match="a real bug"):
        entry.main(["fit"])


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (DataError("facts.json, record 3, field 'subject': missing"), 2),
        (NonFiniteDeltaError("Step 4: SphereProjectionCallback returned ΔW for w with NaN"), 1),
    ],
)
def test_reported_errors_and_exit_codes(error, code, capsys):
    with pytest.raises(SystemExit) as info, exit_on_user_error(NonFiniteDeltaError):
        try:
            raise error
        except type(error) as inner:
            raise ValueError("Does not validate against any of the Union subtypes") from inner
    assert info.value.code == code
    assert capsys.readouterr().err == f"error: {error}\n"


def test_cli_main_still_raises_in_process(tmp_path, tiny_model_dir):
    data = tmp_path / "facts.json"
    data.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="contains no records") as info:
        cli_main(fit_args(tmp_path, tiny_model_dir, data))
    assert isinstance(info.value, ValueError)  # `except ValueError` callers keep working


JSONL = "".join(json.dumps(record) + "\n" for record in GOOD)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "text", "expected"),
    [
        (["--data.edits_per_step=0"], JSONL, "`data.edits_per_step` must be a positive integer"),
        (["--model.model=./missing-model"], JSONL, "`model.model` is './missing-model'"),
        ([], JSONL + "{oops\n", "facts.jsonl, record 3: line 4 is not valid JSON"),
    ],
    ids=["flag", "model", "data"],
)
def test_python_dash_m_prints_one_paragraph(extra, text, expected, tmp_path, tiny_model_dir):
    data = tmp_path / "facts.jsonl"
    data.write_text(text, encoding="utf-8")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "sphere_lightning", *fit_args(tmp_path, tiny_model_dir, data)]
        + extra,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path},
        timeout=600,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: {expected}"), line


# ------------------------------------------------------------------ weights never change


class NaNDelta(DeltaTransform):
    """A transform that breaks every ΔW."""

    def transform_delta(self, name, delta, pl_module):
        return torch.full_like(delta, float("nan"))


def test_nan_from_a_transform_names_step_layer_and_class(tiny_model_dir):
    module = EditingModule(editor=AlphaEdit(layers=[1, 2]), model=tiny_model_dir)
    module.configure_model()
    before = weights(module.model)
    module.delta_pipeline = DeltaPipeline([NaNDelta()])
    transform = module._in_loop_transform()
    name = module.edited_parameter_names[0]
    with pytest.raises(
        NonFiniteDeltaError,
        match=r"^Step 0: NaNDelta returned ΔW for model\.layers\.1\.mlp\.down_proj\.weight "
        r"with 2048 non-finite value\(s\)",
    ):
        transform(name, torch.ones_like(module.edited_weight(name)))
    assert_same_weights(module.model, before)


def test_layer_out_of_range_leaves_weights_untouched(tiny_llama, tokenizer):
    before = weights(tiny_llama)
    editor = AlphaEdit(layers=[1, 4])
    with pytest.raises(ConfigError, match=r"`model\.editor\.init_args\.layers` = \[1, 4\]"):
        editor.setup(tiny_llama, tokenizer)
    assert_same_weights(tiny_llama, before)


@pytest.mark.parametrize(("flag", "value"), [("cumulative_ratio", 2.0), ("suppression", -1.0)])
def test_sphere_strength_is_a_config_error(flag, value):
    flag_path = rf"`trainer\.callbacks\.SphereProjectionCallback\.init_args\.{flag}`"
    with pytest.raises(ConfigError, match=rf"{flag_path} .* got {value}"):
        SphereProjectionCallback(**{flag: value})


# --------------------------------------------------------------------- the statistics cache

STATS = {"corpus": "generated", "num_samples": 4, "max_length": 8, "batch_size": 2}


@pytest.fixture
def fresh_moments(tiny_gpt2, tokenizer, tmp_path):
    """The second moments of layers 0 and 1, computed in a cache of their own."""
    spec = architecture_of(tiny_gpt2)
    return statistics.second_moments(
        tiny_gpt2, tokenizer, spec, [0, 1], cache_dir=tmp_path / "reference", **STATS
    )


#: name → what a corrupt entry holds, given the good file and the moment's size (GPT-2's
#: c_proj reads 4 × 32 = 128 features).
CORRUPTIONS = {
    "truncated": lambda good, dim: good.read_bytes()[: good.stat().st_size // 2],
    "not a torch file": lambda good, dim: b"\x00garbage",
    "wrong shape": lambda good, dim: _saved(torch.zeros(dim - 1, dim - 1)),
    "not a tensor": lambda good, dim: _saved({"moment": torch.zeros(dim, dim)}),
    "integer tensor": lambda good, dim: _saved(torch.zeros(dim, dim, dtype=torch.long)),
    "NaN": lambda good, dim: _saved(torch.full((dim, dim), float("nan"))),
}


def _saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_cache_file_is_replaced_and_recomputed(
    corruption, tiny_gpt2, tokenizer, tmp_path, fresh_moments, caplog
):
    cache = tmp_path / "cache"
    spec = architecture_of(tiny_gpt2)
    options = {**STATS, "cache_dir": cache}
    statistics.second_moments(tiny_gpt2, tokenizer, spec, [0, 1], **options)
    entries = sorted(cache.glob("*.pt"))
    assert len(entries) == 2
    bad = entries[0]
    bad.write_bytes(CORRUPTIONS[corruption](bad, 128))

    with caplog.at_level(logging.WARNING, logger="sphere_lightning.editors.statistics"):
        result = statistics.collect_second_moments(tiny_gpt2, tokenizer, spec, [0, 1], **options)

    assert f"Statistics cache file {bad} is corrupt" in caplog.text
    assert not result.from_cache  # the corrupt layer was computed again
    for layer in (0, 1):
        assert torch.equal(result.moments[layer], fresh_moments[layer])
    replaced = torch.load(bad, weights_only=True)
    assert any(torch.equal(replaced, fresh_moments[layer]) for layer in (0, 1))
    # Nothing else is left behind (no temporary file) but the collection's lock file.
    left = sorted(p.name for p in cache.iterdir() if p.suffix != ".lock")
    assert left == sorted(
        [e.name for e in entries] + [e.with_suffix(".json").name for e in entries]
    )
    assert [p.stat().st_size for p in cache.glob(".*.lock")] == [0]


def test_corrupt_record_is_ignored(tiny_gpt2, tokenizer, tmp_path, caplog):
    spec = architecture_of(tiny_gpt2)
    options = {**STATS, "cache_dir": tmp_path}
    first = statistics.collect_second_moments(tiny_gpt2, tokenizer, spec, [0], **options)
    (record,) = tmp_path.glob("*.json")
    record.write_text('{"record": {"num_texts": ')
    with caplog.at_level(logging.WARNING, logger="sphere_lightning.editors.statistics"):
        second = statistics.collect_second_moments(tiny_gpt2, tokenizer, spec, [0], **options)
    assert second.from_cache and second.record is None
    assert torch.equal(second.moments[0], first.moments[0])
    assert "unreadable statistics record" in caplog.text


def test_failed_cache_write_leaves_no_file(tiny_gpt2, tokenizer, tmp_path, monkeypatch):
    real_save = torch.save

    def save_half_then_fail(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    spec = architecture_of(tiny_gpt2)
    with pytest.raises(OSError, match="No space left"):
        statistics.second_moments(tiny_gpt2, tokenizer, spec, [0, 1], cache_dir=tmp_path, **STATS)
    assert not list(tmp_path.glob("*.pt"))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "entry.json"
    target.write_text("old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        cache.atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["entry.json"]
    cache.atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["entry.json"]


# --------------------------------------------------------------------- converting GGUF files


@pytest.fixture
def fake_gguf(tmp_path, tiny_llama, tokenizer, monkeypatch):
    """A ``.gguf`` file whose "dequantised" model is the tiny Llama (transformers' GGUF reader
    is replaced; the conversion around it is the real one)."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    class FakeAuto:
        @staticmethod
        def from_pretrained(folder, gguf_file, **kwargs):
            calls.append(gguf_file)
            return tiny_llama if kwargs else tokenizer

    monkeypatch.setattr(loading, "AutoModelForCausalLM", FakeAuto)
    monkeypatch.setattr(loading, "AutoTokenizer", FakeAuto)
    return gguf, calls


def test_gguf_conversion_writes_safetensors_and_no_temporary_folder(fake_gguf, tiny_llama):
    gguf, _ = fake_gguf
    target = loading.convert_gguf(gguf)
    assert (target / "model.safetensors").is_file() and (target / "config.json").is_file()
    assert not list(target.rglob("*.bin")) and not list(target.rglob("*.pt"))
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    from safetensors.torch import load_file

    stored = load_file(target / "model.safetensors")
    for name, tensor in tiny_llama.state_dict().items():
        assert torch.equal(stored[name], tensor)


def test_gguf_conversion_keeps_a_copy_another_run_finished_first(fake_gguf, monkeypatch):
    gguf, _ = fake_gguf
    target = loading._gguf_cache_dir(gguf)
    real_save_file = safetensors.torch.save_file

    def other_run_wins(state, path, **kwargs):
        # While this run writes its copy, another one publishes the same folder.
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"the other run's weights")
        real_save_file(state, path, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", other_run_wins)
    assert loading.convert_gguf(gguf) == target
    assert (target / "model.safetensors").read_bytes() == b"the other run's weights"
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_temporary_names_are_unique_per_call_and_process(tmp_path):
    names = {cache.temporary_sibling(tmp_path / "folder") for _ in range(20)}
    assert len(names) == 20
    assert all(f".folder.{os.getpid()}-" in n.name and n.name.endswith(".tmp") for n in names)


# ----------------------------------------------------------------------------- safe loading


def test_every_torch_load_is_weights_only():
    sources = [*Path(sphere_lightning.__file__).parent.rglob("*.py")]
    sources += (ROOT / "benchmarks").rglob("*.py")
    calls = []
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and getattr(node.func.value, "id", None) == "torch"
            ):
                keywords = {k.arg: k.value for k in node.keywords}
                safe = getattr(keywords.get("weights_only"), "value", None) is True
                calls.append((f"{source.name}:{node.lineno}", safe))
    assert calls, "the statistics cache and the benchmarks load with torch.load"
    assert [where for where, safe in calls if not safe] == []


def test_user_errors_are_value_errors():
    assert issubclass(ConfigError, UserInputError) and issubclass(DataError, UserInputError)
    assert issubclass(UserInputError, ValueError)


# ------------------------------------------------------------------ a checkpoint of another model


def test_checkpoint_of_another_base_model(tmp_path, tiny_model_dir, make_tiny_model, run_main):
    """Resuming on other base weights (the model folder was overwritten since the checkpoint)
    is one paragraph naming `--ckpt_path`, before any weight or file changes."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    data = tmp_path / "facts.json"
    data.write_text(records_json(*GOOD), encoding="utf-8")
    args = fit_args(tmp_path, str(model_dir), data)
    cli_main(args)
    (checkpoint,) = (tmp_path / "logs").rglob("last.ckpt")
    other = make_tiny_model("llama")
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    other.save_pretrained(model_dir)
    before = files_in(tmp_path / "logs")
    message = run_main(*args, f"--ckpt_path={checkpoint}")
    assert re.search(
        r"^The checkpoint \(`--ckpt_path`\) edits base model '.*model' \(float32\), but "
        r"`model\.model` is .* and its weights differ .*: resume on the base model the run "
        r"started from$",
        message,
    ), message
    assert files_in(tmp_path / "logs") == before
