"""Second-moment statistics of the keys of edited layers, cached on disk.

MEMIT's ``C = E[k kᵀ]`` and AlphaEdit's null-space projector both need the second moment of the
input to each edited MLP out-projection over a text corpus. All layers are collected in one
forward pass that stops at the deepest edited layer, and the result is cached under a key of model,
layer, corpus and sample count. Beside each cached ``<key>.pt`` a ``<key>.json`` records what the
entry was computed from and what it cost (texts, tokens, seconds).

Cache files are written atomically (a temporary file renamed into place), so a run that stops
mid-write, or two runs sharing the cache, never leave a half-written entry. Runs that need the same
entries at once (the experiment runner's parallel runs) take turns on a lock file beside them: the
first collects, the others wait and load what it wrote. An entry that cannot be
loaded anyway (truncated, not a tensor, the wrong shape, NaN/inf) is reported, deleted and
computed again; it is never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.cache import atomic_write, stats_cache_dir
from sphere_lightning.editors.hooks import capture
from sphere_lightning.errors import ConfigError, DataError, MissingFileError, editor_flag
from sphere_lightning.models.architectures import ArchitectureSpec, linear_weight
from sphere_lightning.models.batching import model_device
from sphere_lightning.paths import looks_like_path

log = logging.getLogger(__name__)

GENERATED = "generated"
_CORPUS_FLAG = editor_flag("statistics.corpus")
_SEED_WORDS = ["The", "In", "A", "It", "He", "She", "This", "When", "After", "Many", "I", "We"]


@dataclass(frozen=True)
class StatisticsOptions:
    """Where the key second moments E[k kᵀ] come from: the editor's ``statistics`` options.

    In a config: ``model.editor.init_args.statistics.<field>``.

    Attributes:
        corpus: Text for the key second moments: ``generated`` (the model's own samples, works
            offline), a ``.txt`` file, or a hub dataset ``<id>[:<config>][@<split>]`` whose
            ``text`` column is streamed (e.g. ``wikitext:wikitext-103-raw-v1``).
        num_samples: Number of texts. 128 generated texts of 64 tokens edit SmolLM2 as well as
            512 of 128 (and as WikiText) at a fifth of the cost; more generated text barely
            brings the moments closer to real text's (``benchmarks/stats_corpus.py``).
        max_length: Tokens per text (truncated).
        batch_size: Texts per forward pass when collecting statistics.
        cache_dir: Where statistics are cached; default ``$SPHERE_LIGHTNING_CACHE/stats``.
    """

    corpus: str = GENERATED
    num_samples: int = 128
    max_length: int = 64
    batch_size: int = 16
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("num_samples", "max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"{editor_flag('statistics', name)} must be ≥ 1, got {getattr(self, name)}"
                )


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


def _usable(text: str) -> bool:
    """Whether a paragraph is kept: longer than 20 characters and not a WikiText heading."""
    return len(text) > 20 and not text.startswith("=")


def _first_usable(texts: Iterable[str], num_samples: int) -> list[str]:
    """The first ``num_samples`` usable paragraphs of ``texts``, stripped, read lazily."""
    kept: list[str] = []
    if num_samples < 1:
        return kept
    for text in texts:
        if _usable(text := text.strip()):
            kept.append(text)
            if len(kept) == num_samples:
                break
    return kept


def _read_hub_corpus(source: str, num_samples: int) -> list[str]:
    """Paragraphs of the ``text`` column of a hub dataset ``<id>[:<config>][@<split>]``.

    The dataset is streamed, so only the rows that are read are downloaded (the reference's
    Wikipedia dump is ~20 GB; a few thousand paragraphs of it are a few MB).
    """
    import datasets  # deferred: slow to import, and only hub ids need it

    rest, _, split = source.partition("@")
    name, _, config = rest.partition(":")

    def texts() -> Iterable[str]:
        rows = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        for row in rows:
            if "text" not in row:
                raise DataError(
                    f"{_CORPUS_FLAG}: corpus {source!r} has no `text` column (columns: "
                    f"{sorted(row)})"
                )
            yield row["text"] or ""

    try:
        return _first_usable(texts(), num_samples)
    except OSError as error:  # streamed rows are fetched lazily: no network, no such dataset
        raise DataError(
            f"{_CORPUS_FLAG} is {source!r}, which is no local file, and it could not be read "
            f"as a Hugging Face hub dataset ({str(error).strip() or type(error).__name__})"
        ) from error


def read_corpus(source: str, num_samples: int) -> list[str]:
    """Up to ``num_samples`` paragraphs (over 20 characters, not a heading) of a file or dataset.

    ``source`` is a path to a ``.txt`` file (paragraphs separated by blank lines, or lines if there
    are too few of those), or a hub dataset id ``<id>[:<config>][@<split>]`` whose ``text``
    column is read (default split ``train``), e.g. ``"wikitext:wikitext-103-raw-v1"``.
    """
    path = Path(source).expanduser()
    if path.exists():
        raw = path.read_text(encoding="utf-8")
        texts = _first_usable(raw.split("\n\n"), num_samples)
        if len(texts) < num_samples:
            texts = _first_usable(raw.splitlines(), num_samples)
    elif looks_like_path(source):
        raise MissingFileError(f"Statistics corpus file not found: {source} ({_CORPUS_FLAG})")
    else:
        texts = _read_hub_corpus(source, num_samples)
    if not texts:
        raise DataError(
            f"Statistics corpus {source!r} holds no usable text (paragraphs over 20 characters "
            f"that are not headings; {_CORPUS_FLAG})"
        )
    return texts


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


@dataclass(frozen=True)
class CollectionRecord:
    """What a collection of second moments read and cost; stored beside each cached entry.

    Attributes:
        num_texts: Texts read (or generated).
        num_tokens: Tokens the moments average over (padding excluded).
        text_seconds: Seconds spent generating or reading the texts.
        forward_seconds: Seconds spent in the forward passes and the sums.
    """

    num_texts: int
    num_tokens: int
    text_seconds: float
    forward_seconds: float


@dataclass(frozen=True)
class SecondMoments:
    """Per-layer ``E[k kᵀ]`` and how they were obtained.

    Attributes:
        moments: ``{layer: E[k kᵀ]}``, float32, on the CPU.
        record: The collection that produced them (the one of the first layer when every layer
            came from the cache); ``None`` for cache entries written without a record.
        from_cache: Whether every layer was loaded from the cache.
    """

    moments: dict[int, torch.Tensor]
    record: CollectionRecord | None
    from_cache: bool


def _read_record(file: Path) -> CollectionRecord | None:
    """The record stored in ``file``; ``None`` if there is none or it cannot be read."""
    if not file.exists():
        return None
    try:
        stored = json.loads(file.read_text(encoding="utf-8")).get("record")
        return CollectionRecord(**stored) if stored else None
    except (ValueError, TypeError, AttributeError, OSError) as error:
        log.warning("Ignoring the unreadable statistics record %s (%s)", file, error)
        return None


def _load_cached(file: Path, dim: int) -> torch.Tensor | None:
    """The cached ``dim × dim`` moment in ``file``, or ``None`` if there is none. A file that
    fails to load or holds anything else is reported and deleted (with its record), so it is
    computed again and never used."""
    if not file.exists():
        return None
    try:
        moment = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(moment, torch.Tensor) or not moment.is_floating_point():
            raise ValueError(f"holds {type(moment).__name__}, not a floating-point tensor")
        if tuple(moment.shape) != (dim, dim):
            raise ValueError(f"has shape {tuple(moment.shape)}, expected {(dim, dim)}")
        if not bool(torch.isfinite(moment).all()):
            raise ValueError("holds NaN or inf")
    except Exception as error:  # a cache entry must never stop a run: recompute it
        log.warning(
            "Statistics cache file %s is corrupt (%s); deleting it and computing it again",
            file,
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__,
        )
        file.unlink(missing_ok=True)
        file.with_suffix(".json").unlink(missing_ok=True)
        return None
    return moment.float()


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold the inter-process lock ``lock_file`` (waiting, with a message, while another process
    holds it). Where no lock file can be made (a read-only cache), go on without one."""
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_file)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info(
                "Waiting for another run collecting the same key statistics (lock %s)", lock_file
            )
            lock.acquire()
    except OSError as error:
        log.warning("No lock on the statistics cache (%s); collecting without one", error)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def collect_second_moments(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: ArchitectureSpec,
    layers: Sequence[int],
    *,
    corpus: str = GENERATED,
    num_samples: int = 128,
    max_length: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> SecondMoments:
    """``E[k kᵀ]`` (float32) of the key (input of the MLP out-projection) of each layer.

    Layers found in the cache are loaded; the others are collected together in one forward pass
    per batch of texts that stops after the deepest of them, and cached.

    Args:
        corpus: ``"generated"`` (text the model samples itself), a ``.txt`` path, or a hub dataset
            ``"<id>[:<config>][@<split>]"`` whose ``text`` column is read (see
            :func:`read_corpus`).
        num_samples: Number of texts.
        max_length: Tokens per text (truncated).
        batch_size: Texts per forward pass.
        seed: Sampling seed of generated text (ignored for other corpora).
        cache_dir: Where results are cached; default ``<cache_root>/stats``.
    """
    layers = sorted(set(layers))
    cache = stats_cache_dir(cache_dir)
    fingerprint = _fingerprint(model, spec, max(layers))
    corpus_path = Path(corpus).expanduser()
    corpus_id = str(corpus_path.resolve()) if corpus_path.is_file() else corpus
    metas, keys = {}, {}
    for layer in layers:
        metas[layer] = {
            "model": getattr(model.config, "_name_or_path", ""),
            "fingerprint": fingerprint,
            "module": spec.mlp_out_name(layer),
            "corpus": corpus_id,
            "num_samples": num_samples,
            "max_length": max_length,
            "seed": seed if corpus == GENERATED else None,
        }
        digest = hashlib.sha256(json.dumps(metas[layer], sort_keys=True).encode())
        keys[layer] = digest.hexdigest()[:24]
    # Runs started together (the experiment runner's parallel runs) would each collect the
    # same moments; the first collects them, the others wait for it and load its cache entries.
    lock = cache / f".{hashlib.sha256(' '.join(keys.values()).encode()).hexdigest()[:24]}.lock"
    with _exclusive(lock):
        results: dict[int, torch.Tensor] = {}
        for layer in layers:
            dim = linear_weight(model.get_submodule(spec.mlp_out_name(layer))).shape[1]
            moment = _load_cached(cache / f"{keys[layer]}.pt", dim)
            if moment is not None:
                results[layer] = moment
        missing = [layer for layer in layers if layer not in results]
        if not missing:
            log.info("Loaded cached second moments for layers %s from %s", layers, cache)
            record = _read_record(cache / f"{keys[layers[0]]}.json")
            return SecondMoments(results, record, from_cache=True)

        collected, record = _collect(
            model, tokenizer, spec, missing, corpus, num_samples, max_length, batch_size, seed
        )
        for layer, moment in collected.items():
            results[layer] = moment
            # The record first: the tensor's file is what makes an entry a cache hit.
            entry = json.dumps({"meta": metas[layer], "record": asdict(record)}, indent=1)
            write = partial(Path.write_text, data=entry, encoding="utf-8")
            atomic_write(cache / f"{keys[layer]}.json", write)
            atomic_write(cache / f"{keys[layer]}.pt", partial(torch.save, moment))
        log.info(
            "Collected second moments over %d tokens for layers %s", record.num_tokens, missing
        )
        return SecondMoments(results, record, from_cache=False)


def _collect(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: ArchitectureSpec,
    layers: Sequence[int],
    corpus: str,
    num_samples: int,
    max_length: int,
    batch_size: int,
    seed: int,
) -> tuple[dict[int, torch.Tensor], CollectionRecord]:
    """``{layer: E[k kᵀ]}`` of ``layers`` over the corpus (arguments of
    :func:`collect_second_moments`), in one forward pass per batch of texts, and its record."""
    start = time.perf_counter()
    if corpus == GENERATED:
        texts = generate_corpus(model, tokenizer, num_samples, max_length, seed=seed)
    else:
        texts = read_corpus(corpus, num_samples)
    text_seconds = time.perf_counter() - start
    start = time.perf_counter()
    device = model_device(model)
    names = [spec.mlp_out_name(layer) for layer in layers]
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for begin in tqdm(range(0, len(texts), batch_size), desc="Key statistics", leave=False):
        enc = tokenizer(
            texts[begin : begin + batch_size],
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
    record = CollectionRecord(len(texts), count, text_seconds, time.perf_counter() - start)
    moments = {
        layer: (sums[name] / count).float().cpu() for layer, name in zip(layers, names, strict=True)
    }
    return moments, record


def second_moments(*args: Any, **kwargs: Any) -> dict[int, torch.Tensor]:
    """``{layer: E[k kᵀ]}``: :func:`collect_second_moments` (same arguments) without the record."""
    return collect_second_moments(*args, **kwargs).moments
