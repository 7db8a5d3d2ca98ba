"""Shared fixtures: a tiny in-process tokenizer, tiny GPT-2 / Llama models, and edit requests.

Nothing here touches the network: the tokenizer is a word-level vocabulary built from the fixed
corpus below, and the models are built from config objects with random (seeded) weights.
"""

from __future__ import annotations

import os

# No test reaches the hub either: offline, a hub id is refused at once rather than after the hub
# client's connection retries (about 45 s here). Set before transformers reads it at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from sphere_lightning.data.requests import EditRequest
from sphere_lightning.models import prepare
from tests.helpers import INIT_RANGE, REQUESTS, _special_ids, _write_rome_json

# The tests' models are tiny: intra-op threading only adds synchronisation (on 2 cores a 128×128
# eigendecomposition takes ~0.3 s with 2 threads and ~1 ms with one).
torch.set_num_threads(1)

PAD, EOS, UNK, BOS = "<pad>", "<eos>", "<unk>", "<bos>"
SPECIAL_TOKENS = [PAD, EOS, UNK, BOS]

#: A small generic corpus; every word in it (and in REQUESTS) is one token of the tokenizer.
CORPUS = """\
The city of Paris is the capital of France and it is known for the Eiffel Tower.
In the morning we walked along the river and talked about music, art and history.
Many people speak English, French, German, Spanish, Italian or Japanese at home.
He plays soccer on Sunday and she plays basketball or tennis after school.
The company was founded in Japan and later opened offices in Germany and Canada.
It was a cold day when the train arrived at the station near the old bridge.
This book tells the story of a king who lived in a castle by the sea.
After the war the family moved to London, then to Rome, Berlin and Madrid.
A small dog ran across the park while children were playing with a red ball.
I think you should read the letter before the meeting starts tomorrow.
We visited the museum, the library and the university in the north of the country.
She said that the weather would be warm and sunny for the rest of the week.
Therefore the team won the game because they trained hard every day.
Because of the rain, the market was closed and the streets were empty.
You can find water, bread, fish and fruit in the village shop.
When the music stopped, everyone looked at the door and waited in silence.
The language of the people in Brazil is Portuguese, and in Mexico it is Spanish.
The author wrote a novel about a doctor, a teacher and a farmer in the mountains.
Toyota and Honda make cars, Nokia makes phones and Microsoft makes software.
Lionel Messi and Danielle Darrieux became famous as a player and an actress.
The mother tongue of the actor was Dutch, and his native language is also Dutch.
The river flows through the valley to the ocean in the south of the island.
Scientists study the sun, the moon, the stars and the planets in the sky.
The president gave a speech to the government about the new law on Monday.
The birds sang in the green trees, and the wind was soft over the fields.
The school has two hundred students, one hundred books and three new computers.
My friend works as a nurse in the hospital and her brother is a pilot.
The food at the restaurant was good but the service was slow and the room was loud.
The headquarters of the company is located in the city of Tokyo, not Seoul.
The Colosseum is in Rome, the Louvre is in Paris, and Big Ben is in London.
The official language of Canada is English or French, who knows, what a question.
Who created Mario? Nintendo, a company from Kyoto, created the game Mario.
"""


#: Extra words the package itself prompts with (generated templates, statistics seeds, KL).
EXTRA_WORDS = (
    "The Therefore Because I You In A It He She This When After Many We is a . Michael Jordan"
)


def _vocabulary() -> list[str]:
    texts = [CORPUS, EXTRA_WORDS]
    for r in REQUESTS:
        texts += [r.filled_prompt, r.target_new, r.target_true or ""]
        texts += list(r.paraphrase_prompts) + list(r.neighborhood_prompts)
    words: list[str] = []
    for token in re.findall(r"\w+|[^\w\s]+", " ".join(texts)):
        if token not in words:
            words.append(token)
    return words


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over :data:`CORPUS` with pad/eos/unk/bos tokens."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + _vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, tidies " ."
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        bos_token=BOS,
    )
    tokenizer.padding_side = "right"
    return tokenizer


def build_tiny_gpt2(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=4,
        n_head=4,
        initializer_range=INIT_RANGE,
        **_special_ids(tokenizer),
    )
    model = GPT2LMHeadModel(config)
    prepare(model, tokenizer)
    return model


def build_tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=INIT_RANGE,
        **_special_ids(tokenizer),
    )
    model = LlamaForCausalLM(config)
    prepare(model, tokenizer)
    return model


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """The shared word-level tokenizer (do not mutate; ``prepare`` leaves it as it is)."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def _tiny_gpt2_master(tokenizer) -> GPT2LMHeadModel:
    return build_tiny_gpt2(tokenizer)


@pytest.fixture(scope="session")
def _tiny_llama_master(tokenizer) -> LlamaForCausalLM:
    return build_tiny_llama(tokenizer)


@pytest.fixture
def tiny_gpt2(_tiny_gpt2_master) -> GPT2LMHeadModel:
    """A fresh deep copy of a seeded 4-layer GPT-2 (n_embd 32), eval mode, frozen."""
    return copy.deepcopy(_tiny_gpt2_master)


@pytest.fixture
def tiny_llama(_tiny_llama_master) -> LlamaForCausalLM:
    """A fresh deep copy of a seeded 4-layer Llama (hidden 32, MLP 64), eval mode, frozen."""
    return copy.deepcopy(_tiny_llama_master)


@pytest.fixture
def tiny_model(request) -> PreTrainedModel:
    """``tiny_gpt2`` or ``tiny_llama``, chosen by indirect parametrisation (default ``"llama"``).

    Use as ``@pytest.mark.parametrize("tiny_model", ["gpt2", "llama"], indirect=True)``.
    """
    family = getattr(request, "param", "llama")
    return request.getfixturevalue({"gpt2": "tiny_gpt2", "llama": "tiny_llama"}[family])


@pytest.fixture(scope="session")
def make_tiny_model(tokenizer) -> Callable[[str], PreTrainedModel]:
    """Factory: ``make_tiny_model("gpt2" | "llama")`` builds a fresh seeded tiny model."""
    builders = {"gpt2": build_tiny_gpt2, "llama": build_tiny_llama}
    return lambda family="llama", seed=0: builders[family](tokenizer, seed)


@pytest.fixture(scope="session")
def requests() -> list[EditRequest]:
    """Five counterfactual :class:`EditRequest`s whose words are all in the vocabulary.

    Session-scoped and shared: slice or copy it, do not mutate it in place.
    """
    return list(REQUESTS)


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """``$SPHERE_LIGHTNING_CACHE`` for session/module fixtures, which run before per-test ones."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPHERE_LIGHTNING_CACHE", str(tmp_path_factory.mktemp("session-cache")))
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch) -> None:
    """Point ``$SPHERE_LIGHTNING_CACHE`` at a fresh temporary folder for every test."""
    monkeypatch.setenv("SPHERE_LIGHTNING_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A folder holding a tiny Llama and its tokenizer (``save_pretrained``), for path loading.

    The saved tokenizer has no pad token, so loading it exercises ``prepare`` setting one.
    """
    path = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_llama(tokenizer)
    model.save_pretrained(path)
    saved = copy.deepcopy(tokenizer)
    saved.pad_token = None
    saved.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def write_rome_json() -> Callable[[list[EditRequest], Path], Path]:
    """``write_rome_json(requests, path)``: the requests as a ROME-layout CounterFact file."""
    return _write_rome_json
