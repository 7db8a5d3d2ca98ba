"""Second-moment statistics of the keys of edited layers, cached on disk.

MEMIT's ``C = E[k kᵀ]`` and AlphaEdit's null-space projector both need the second moment of the
input to each edited MLP out-projection over a text corpus. All layers are collected in one
forward pass that stops at the deepest edited layer, and the result is cached under a key of model,
layer, corpus and sample count.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.editors.hooks import capture, model_device
from sphere_lightning.models.architectures import ArchitectureSpec
from sphere_lightning.models.loading import cache_root

log = logging.getLogger(__name__)

GENERATED = "generated"
_SEED_WORDS = ["The", "In", "A", "It", "He", "She", "This", "When", "After", "Many", "I", "We"]


def generate_corpus(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    num_samples: int,
    max_length: int,
    *,
    seed: int = 0,
    batch_size: int = 128,
    desc: str = "Generating text",
) -> list[str]:
    """Sample ``num_samples`` texts of up to ``max_length`` tokens from the model itself.

    Text the model writes needs no download, so statistics can be collected offline. Sampling
    is dominated by per-token overhead on CPU, so large batches are much cheaper per text.
    """
    device = model_device(model)
    texts: list[str] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(seed)
            for start in tqdm(range(0, num_samples, batch_size), desc=desc, leave=False):
                count = min(batch_size, num_samples - start)
                seeds = [_SEED_WORDS[(start + i) % len(_SEED_WORDS)] for i in range(count)]
                enc = tokenizer(seeds, return_tensors="pt", padding=True).to(device)
                out = model.generate(
                    **enc,
                    do_sample=True,
                    top_k=50,
                    max_new_tokens=max_length,
                    pad_token_id=tokenizer.pad_token_id,
                )
                texts.extend(tokenizer.batch_decode(out, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
    return texts


def read_corpus(source: str, num_samples: int) -> list[str]:
    """Up to ``num_samples`` non-empty paragraphs from a text file or a hub dataset.

    ``source`` is a path to a ``.txt`` file (paragraphs separated by blank lines, or lines), or a
    hub dataset id with an optional config, ``"wikitext:wikitext-103-raw-v1"``, read from its
    ``train`` split's ``text`` column.
    """
    path = Path(source).expanduser()
    if path.exists():
        raw = path.read_text(encoding="utf-8")
        parts = [p.strip() for p in raw.split("\n\n")]
        if len(parts) < num_samples:
            parts = [p.strip() for p in raw.splitlines()]
        texts = [p for p in parts if len(p) > 20 and not p.startswith("=")]
    elif source.endswith(".txt") or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"Statistics corpus file not found: {source}")
    else:
        import datasets

        name, _, config = source.partition(":")
        dataset = datasets.load_dataset(name, config or None, split="train")
        texts = [t.strip() for t in dataset["text"] if len(t.strip()) > 20]
    if not texts:
        raise ValueError(f"Statistics corpus {source!r} holds no usable text")
    return texts[:num_samples]


def _fingerprint(model: PreTrainedModel, spec: ArchitectureSpec, upto: int) -> str:
    """A cheap hash of the weights that shape the keys of layers ≤ ``upto``."""
    digest = hashlib.sha256()
    prefix_blocks = {spec.layer_name(i) for i in range(upto + 1)}
    for name, param in model.named_parameters():
        in_block = any(name.startswith(b + ".") for b in prefix_blocks)
        if in_block or not name.startswith(spec.layers + "."):
            flat = param.detach().flatten()
            sample = flat[:: max(1, flat.numel() // 2048)].float().cpu()
            digest.update(name.encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def second_moments(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: ArchitectureSpec,
    layers: Sequence[int],
    *,
    corpus: str = GENERATED,
    num_samples: int = 200,
    max_length: int = 128,
    batch_size: int = 16,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> dict[int, torch.Tensor]:
    """``E[k kᵀ]`` of the key (input of the MLP out-projection) of each layer, float32.

    Args:
        corpus: ``"generated"`` (text the model samples itself), a ``.txt`` path, or a hub dataset
            id (``"name"`` or ``"name:config"``).
        num_samples: Number of texts.
        max_length: Tokens per text (truncated).
        batch_size: Texts per forward pass.
        cache_dir: Where results are cached; default ``<cache_root>/stats``.
    """
    layers = sorted(set(layers))
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "stats"
    fingerprint = _fingerprint(model, spec, max(layers))
    corpus_path = Path(corpus).expanduser()
    corpus_id = str(corpus_path.resolve()) if corpus_path.is_file() else corpus
    keys = {}
    for layer in layers:
        meta = {
            "model": getattr(model.config, "_name_or_path", ""),
            "fingerprint": fingerprint,
            "module": spec.mlp_out_name(layer),
            "corpus": corpus_id,
            "num_samples": num_samples,
            "max_length": max_length,
            "seed": seed if corpus == GENERATED else None,
        }
        keys[layer] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
    results: dict[int, torch.Tensor] = {}
    for layer in layers:
        file = cache / f"{keys[layer]}.pt"
        if file.exists():
            results[layer] = torch.load(file, map_location="cpu", weights_only=True)
    missing = [layer for layer in layers if layer not in results]
    if not missing:
        log.info("Loaded cached second moments for layers %s from %s", layers, cache)
        return results

    if corpus == GENERATED:
        texts = generate_corpus(model, tokenizer, num_samples, max_length, seed=seed)
    else:
        texts = read_corpus(corpus, num_samples)
    device = model_device(model)
    names = [spec.mlp_out_name(layer) for layer in missing]
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for start in tqdm(range(0, len(texts), batch_size), desc="Key statistics", leave=False):
        enc = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        ).to(device)
        with torch.no_grad():
            acts = capture(model, enc["input_ids"], enc["attention_mask"], names, read="input")
        mask = enc["attention_mask"].bool()
        count += int(mask.sum())
        for name in names:
            keys_ = acts[name][mask].double()
            sums[name] = sums.get(name, 0) + keys_.T @ keys_
    cache.mkdir(parents=True, exist_ok=True)
    for layer, name in zip(missing, names, strict=True):
        results[layer] = (sums[name] / count).float().cpu()
        torch.save(results[layer], cache / f"{keys[layer]}.pt")
    log.info("Collected second moments over %d tokens for layers %s", count, missing)
    return results
