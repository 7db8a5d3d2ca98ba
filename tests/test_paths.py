"""One rule tells a missing local path from a hub id, for models, edit data, general-ability
data and the statistics corpus."""

from __future__ import annotations

import pytest

from sphere_lightning.data.readers import load_raw_records
from sphere_lightning.editors.statistics import read_corpus
from sphere_lightning.errors import MissingFileError
from sphere_lightning.models.loading import resolve_model_path
from sphere_lightning.paths import FILE_SUFFIXES, looks_like_path


@pytest.mark.parametrize(
    "text",
    [
        "/abs/file",
        "./here",
        "../up",
        ".hidden",
        "~/home",
        "C:\\data\\facts",
        "a/b/c",
        "facts.json",
        "facts.JSONL",
        "corpus.txt",
        "owner/model.gguf",
        "model.safetensors",
        "pytorch_model.bin",
    ],
)
def test_paths(text):
    assert looks_like_path(text)


@pytest.mark.parametrize(
    "text", ["gpt2", "openai-community/gpt2", "wikitext:wikitext-103-raw-v1", "cais/mmlu:all@test"]
)
def test_hub_ids(text):
    assert not looks_like_path(text)


def test_every_suffix_counts():
    assert all(looks_like_path(f"name{suffix}") for suffix in FILE_SUFFIXES)


@pytest.mark.parametrize(
    "read",
    [
        resolve_model_path,
        load_raw_records,
        lambda source: read_corpus(source, 1),
    ],
)
def test_a_missing_path_is_reported_not_looked_up(tmp_path, read):
    with pytest.raises(MissingFileError, match="missing"):
        read(str(tmp_path / "missing" / "file.json"))
