"""Fluency of generated text: ROME/MEMIT's weighted n-gram entropy, and greedy generations.

An edited model that has started to repeat itself ("Paris Paris Paris…") writes text whose
n-grams are few and frequent, so their entropy falls. ROME and MEMIT report this as "fluency"
(``compute_n_gram_entropy`` in ``experiments/py/eval_utils_counterfact.py``): per text, the
entropies (bits) of the 2-gram and 3-gram frequency distributions, weighted 2/3 and 4/3, and
averaged; then the arithmetic mean over texts. :func:`ngram_entropy` reproduces that formula
exactly; only the word tokenizer differs, because nltk is not a dependency (see
:func:`word_tokens`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.editors.hooks import model_device

#: ROME's n-gram orders and their weights (``ns = [2, 3]``, ``ws = [2/3, 4/3]``).
NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)

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
