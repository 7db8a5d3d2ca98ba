"""Fluency of generated text: ROME/MEMIT's weighted n-gram entropy of generations.

An edited model that has started to repeat itself ("Paris Paris Paris…") writes text whose
n-grams are few and frequent, so their entropy falls. ROME and MEMIT report this as "fluency"
(``compute_n_gram_entropy`` in ``experiments/py/eval_utils_counterfact.py``): per text, the
entropies (bits) of the 2-gram and 3-gram frequency distributions, weighted 2/3 and 4/3, and
averaged; then the arithmetic mean over texts. :func:`ngram_entropy` reproduces that formula
exactly; only the word tokenizer differs, because nltk is not a dependency (see
:func:`word_tokens`).

Two generation protocols (:data:`FLUENCY_PROTOCOLS`), chosen by :func:`resolve_fluency_protocol`:

- ``rome``, where the facts carry ROME's ``generation_prompts`` (its CounterFact layout): ROME's
  ``test_generation``: one top-5 sample per generation prompt, 100 tokens long with the prompt
  (``generate_fast(..., n_gen_per_prompt=1, max_out_len=100)``, top_k 5), the n-gram entropy
  averaged over a fact's texts, then over facts. Seeded here (ROME's is not), so reruns agree.
- ``greedy`` otherwise (EasyEdit layout, zsRE, the built-in facts): greedy continuations of the
  edit prompts. Not ROME's protocol: it has no generation prompts to sample from.

Either way the reported value is ×100 (:data:`REPORTED_SCALE`), the scale of ROME/MEMIT's
``summarize.py`` and of the tables of ROME, MEMIT, AlphaEdit and SPHERE (e.g. ~620 for an
unedited GPT-2 XL).
"""

from __future__ import annotations

import inspect
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.data.requests import EditRequest
from sphere_lightning.errors import ConfigError
from sphere_lightning.models.batching import model_device

#: ROME's n-gram orders and their weights (``ns = [2, 3]``, ``ws = [2/3, 4/3]``).
NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)

#: ROME's fluency generation: ``generate_fast``'s top-k, and ``test_generation``'s
#: ``max_out_len`` (tokens in all, prompt included) and ``n_gen_per_prompt``.
ROME_TOP_K = 5
ROME_MAX_OUT_LEN = 100
ROME_GEN_PER_PROMPT = 1

#: ROME/MEMIT's ``summarize.py`` multiplies the mean n-gram entropy by 100; so do their tables.
REPORTED_SCALE = 100.0

#: Values of ``--model.fluency_protocol``: ``auto`` or one of :data:`FLUENCY_PROTOCOLS`.
FluencyProtocol = Literal["auto", "rome", "greedy"]

#: What each fluency protocol is, as written into ``summary.json`` (every
#: :data:`FluencyProtocol` but ``auto``).
FLUENCY_PROTOCOLS: dict[str, str] = {
    "rome": (
        "ROME's: one top-5 sample (seeded) per generation prompt, 100 tokens with the prompt; "
        "100 x n-gram entropy, averaged over each fact's texts, then over facts"
    ),
    "greedy": (
        "greedy generations from the edit prompts (ROME samples from generation_prompts); "
        "100 x n-gram entropy, averaged over facts"
    ),
}

# An approximation of nltk's Treebank ``word_tokenize`` on ordinary prose, tried in this order:
# the word before a negative clitic ("do" of "don't"), the clitic itself ("n't"), the English
# clitics Treebank splits off ("'s 'm 'd 'll 're 've"), numbers with separators kept whole
# ("3.14", "1,000"), words with hyphenated compounds kept whole ("well-known"), runs of dots or
# dashes ("...", "--"), and any other punctuation mark on its own.
_WORD_TOKEN = re.compile(
    r"""\w+(?=n't\b)
      | n't\b
      | '(?:s|m|d|ll|re|ve)\b
      | \d+(?:[.,]\d+)+
      | \w+(?:-\w+)*
      | \.{2,} | -{2,}
      | [^\w\s]""",
    re.IGNORECASE | re.VERBOSE,
)


def word_tokens(text: str) -> list[str]:
    """Split ``text`` into words and punctuation the way nltk's ``word_tokenize`` mostly does.

    Same as nltk on plain prose: punctuation is split from words ("Paris." → "Paris", "."),
    clitics are split off ("don't" → "do", "n't"; "Messi's" → "Messi", "'s"), hyphenated words
    and numbers with separators stay whole. Known differences: nltk keeps an abbreviation's
    period ("Mr.", "U.S.") unless it ends a sentence, and rewrites double quotes as `` and '';
    here every period is its own token and ``"`` stays ``"``. Both shift a few n-gram counts,
    never the formula.
    """
    return _WORD_TOKEN.findall(text)


def _entropy_bits(counts: Counter) -> float:
    """Shannon entropy (bits) of a frequency distribution; 0 for an empty one, as in ROME."""
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def text_ngram_entropy(text: str) -> float:
    """ROME's ``compute_n_gram_entropy`` of one text: ``mean(H₂·2/3, H₃·4/3)`` in bits."""
    tokens = word_tokens(text)
    weighted = []
    for n, weight in zip(NGRAM_ORDERS, NGRAM_WEIGHTS, strict=True):
        ngrams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        weighted.append(_entropy_bits(ngrams) * weight)
    return sum(weighted) / len(weighted)


def ngram_entropy(texts: Sequence[str]) -> float:
    """ROME/MEMIT's fluency score: the mean over ``texts`` of :func:`text_ngram_entropy`.

    Per text this is ``(2/3·H₂ + 4/3·H₃) / 2`` where Hₙ is the entropy (bits) of the frequency
    distribution of the text's word n-grams. A text too short to hold an n-gram contributes 0
    for that order, as ROME's code does.
    """
    if not texts:
        raise ValueError("`texts` is empty: n-gram entropy needs at least one text")
    return sum(text_ngram_entropy(t) for t in texts) / len(texts)


@torch.no_grad()
def greedy_generations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 100,
    batch_size: int = 16,
    *,
    include_prompt: bool = True,
) -> list[str]:
    """Greedy (no sampling) continuations of ``prompts``, generated in left-padded batches.

    Args:
        max_new_tokens: Tokens generated per prompt (fewer if the model writes its EOS token).
        batch_size: Prompts per ``generate`` call.
        include_prompt: Return prompt + continuation (what ROME scores for fluency) or only the
            continuation.
    """
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` should be ≥ 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"`batch_size` should be ≥ 1, got {batch_size}")
    device = model_device(model)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts must end there
    texts: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(
                list(prompts[start : start + batch_size]), return_tensors="pt", padding=True
            ).to(device)
            out = model.generate(
                **enc,
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
            if not include_prompt:
                out = out[:, enc["input_ids"].shape[1] :]
            texts.extend(tokenizer.batch_decode(out, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
    return texts


def _rome_cleanup(text: str) -> str:
    """ROME's ``generate_fast`` post-processing (its ``<|endoftext|>`` removal is done by
    decoding without special tokens)."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


@torch.no_grad()
def top_k_generations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    top_k: int = ROME_TOP_K,
    max_out_len: int = ROME_MAX_OUT_LEN,
    n_gen_per_prompt: int = ROME_GEN_PER_PROMPT,
    seed: int = 0,
    batch_size: int = 16,
) -> list[str]:
    """ROME's ``generate_fast``: top-k sampled texts, ``max_out_len`` tokens with the prompt.

    Each step samples the next token from the softmax renormalised over the ``top_k`` most
    likely tokens (temperature 1), as ROME does; like ROME, generation does not stop at the EOS
    token, and every text is grown to ``max_out_len`` tokens counting the prompt's (a prompt
    already that long is returned as it is). Texts are decoded without special tokens, NFKD-
    normalised and have ``"\\n\\n"`` replaced by a space, as in ROME.

    Reproducible: text ``i`` (prompt ``i // n_gen_per_prompt``) draws its ``j``-th token by
    inverse-CDF sampling with the ``j``-th number of row ``i`` of a uniform matrix made by a
    ``torch.Generator`` seeded with ``seed``, so the texts depend on the seed, the model and the
    prompts, but not on ``batch_size`` or the device's random state. ROME's draws are unseeded.

    Args:
        prompts: Prompts (subject written in).
        top_k: Tokens sampled from at each step (ROME: 5).
        max_out_len: Length of each text in tokens, prompt included (ROME: 100).
        n_gen_per_prompt: Texts per prompt (ROME: 1); a prompt's texts are adjacent.
        seed: Seed of the sampling.
        batch_size: Texts generated together (left-padded; memory only).

    Returns:
        ``len(prompts) * n_gen_per_prompt`` texts (prompt + continuation).
    """
    for name, value in (
        ("top_k", top_k),
        ("max_out_len", max_out_len),
        ("n_gen_per_prompt", n_gen_per_prompt),
        ("batch_size", batch_size),
    ):
        if value < 1:
            raise ValueError(f"`{name}` should be ≥ 1, got {value}")
    rows = [prompt for prompt in prompts for _ in range(n_gen_per_prompt)]
    uniforms = torch.rand(
        (len(rows), max_out_len), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    device = model_device(model)
    # transformers renamed `past_key_values` to `cache` during 5.x; only the last position's
    # logits are needed (`logits_to_keep`, where the model has it).
    parameters = inspect.signature(model.forward).parameters
    extra: dict = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    cache_arg = "cache" if "cache" in parameters else "past_key_values"
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens go on the right, so every prompt must end there
    texts: list[str] = []
    try:
        for start in range(0, len(rows), batch_size):
            enc = tokenizer(rows[start : start + batch_size], return_tensors="pt", padding=True)
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            num_new = (max_out_len - enc["attention_mask"].sum(1)).clamp_min(0)
            new = torch.zeros((len(ids), int(num_new.max())), dtype=torch.long)
            step_ids, positions, past = ids, (mask.cumsum(1) - 1).clamp_min(0), None
            for step in range(new.shape[1]):
                out = model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    **{cache_arg: past},
                    **extra,
                )
                past = getattr(out, "cache", None)
                past = out.past_key_values if past is None else past
                top = out.logits[:, -1].float().softmax(-1).topk(top_k, dim=-1)
                cdf = (top.values / top.values.sum(-1, keepdim=True)).cumsum(-1).double().cpu()
                draw = uniforms[start : start + len(ids), step, None]
                choice = (cdf < draw).sum(-1).clamp_max(top_k - 1)  # first index with cdf ≥ u
                new[:, step] = top.indices.cpu().gather(1, choice[:, None]).squeeze(1)
                step_ids = new[:, step, None].to(device)
                positions = positions[:, -1:] + 1
                mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
            for row in range(len(ids)):
                prompt_ids = enc["input_ids"][row][enc["attention_mask"][row].bool()]
                full = torch.cat([prompt_ids, new[row, : int(num_new[row])]])
                texts.append(_rome_cleanup(tokenizer.decode(full, skip_special_tokens=True)))
    finally:
        tokenizer.padding_side = padding_side
    return texts


def check_fluency_protocol(protocol: str) -> None:
    """Raise a :class:`~sphere_lightning.errors.ConfigError` naming ``model.fluency_protocol``
    unless ``protocol`` is one of
    :data:`FluencyProtocol` (``auto``, ``rome`` or ``greedy``)."""
    names = get_args(FluencyProtocol)
    if protocol not in names:
        raise ConfigError(
            f"`model.fluency_protocol` should be {', '.join(names[:-1])} or {names[-1]}, "
            f"got {protocol!r}"
        )


def resolve_fluency_protocol(protocol: str, requests: Sequence[EditRequest]) -> str:
    """``"rome"`` or ``"greedy"``: ``auto`` is ``rome`` when every request carries
    ``generation_prompts`` (ROME's CounterFact layout), else ``greedy``.

    Raises:
        ConfigError: ``protocol`` is unknown, or ``rome`` for requests without generation
            prompts.
    """
    check_fluency_protocol(protocol)
    sampled = bool(requests) and all(r.generation_prompts for r in requests)
    if protocol == "rome" and not sampled:
        missing = next((r.case_id for r in requests if not r.generation_prompts), None)
        raise ConfigError(
            "`model.fluency_protocol` is 'rome' but request "
            f"{missing!r} has no generation_prompts (only ROME's CounterFact layout has them); "
            "use 'auto' or 'greedy'"
        )
    if protocol == "auto":
        return "rome" if sampled else "greedy"
    return protocol


def measure_fluency(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    protocol: str = "auto",
    *,
    seed: int = 0,
    greedy_max_new_tokens: int = 50,
    batch_size: int = 16,
) -> tuple[float, str]:
    """Fluency of the model on ``requests``, ×100 as ROME/MEMIT report it.

    ``rome``: :func:`top_k_generations` of each request's ``generation_prompts``; the mean
    n-gram entropy of a request's texts, averaged over requests (ROME's ``test_generation``
    per record, then ``summarize.py``'s mean). ``greedy``: :func:`greedy_generations` of
    ``greedy_max_new_tokens`` tokens from each request's edit prompt, averaged over requests.

    Args:
        requests: The facts whose prompts are used (at least one).
        protocol: ``auto``, ``rome`` or ``greedy`` (see :func:`resolve_fluency_protocol`).
        seed: Seed of the ``rome`` sampling.
        greedy_max_new_tokens: Tokens generated per prompt by ``greedy``.
        batch_size: Texts generated together.

    Returns:
        ``(fluency, protocol)``: ``REPORTED_SCALE`` × mean n-gram entropy, and the protocol used.
    """
    if not requests:
        raise ValueError("`requests` is empty: fluency needs at least one fact")
    protocol = resolve_fluency_protocol(protocol, requests)
    if protocol == "rome":
        prompts = [p for r in requests for p in r.generation_prompts]
        texts = iter(top_k_generations(model, tokenizer, prompts, seed=seed, batch_size=batch_size))
        groups = [[next(texts) for _ in r.generation_prompts] for r in requests]
    else:
        texts = greedy_generations(
            model,
            tokenizer,
            [r.filled_prompt for r in requests],
            max_new_tokens=greedy_max_new_tokens,
            batch_size=batch_size,
        )
        groups = [[text] for text in texts]
    score = sum(ngram_entropy(group) for group in groups) / len(groups)
    return REPORTED_SCALE * score, protocol
