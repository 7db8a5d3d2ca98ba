"""Key statistics: corpus readers (text files, hub datasets without network) and the record of a
collection stored beside the cached moments."""

from __future__ import annotations

import json
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from sphere_lightning.cache import stats_cache_dir
from sphere_lightning.editors import AlphaEdit, StatisticsOptions, TemplateOptions, statistics
from sphere_lightning.models import architecture_of

#: Rows of the stand-in hub dataset, WikiText-style: headings, blank lines, one paragraph a row.
HUB_ROWS = [
    " = Valkyria Chronicles = ",
    "",
    " The city of Paris is the capital of France and it is known for the Eiffel Tower . ",
    " Short text . ",
    " = = History = = ",
    " In the morning we walked along the river and talked about music , art and history . ",
    " Many people speak English , French , German , Spanish , Italian or Japanese at home . ",
    " The company was founded in Japan and later opened offices in Germany and Canada . ",
]
#: The usable paragraphs of ``HUB_ROWS``, in order.
HUB_TEXTS = [row.strip() for row in HUB_ROWS if len(row.strip()) > 20 and "=" not in row]


@pytest.fixture
def stub_hub(monkeypatch):
    """A stand-in ``datasets`` module: records every ``load_dataset`` call and every row read."""
    hub = SimpleNamespace(calls=[], rows_read=0)

    def load_dataset(path, name=None, split=None, streaming=False):
        hub.calls.append({"path": path, "name": name, "split": split, "streaming": streaming})

        def rows():
            for text in HUB_ROWS:
                hub.rows_read += 1
                # Another string column, so a reader using the wrong one fails.
                yield {"title": "A title that is long enough to pass as text", "text": text}

        return rows()

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    return hub


def test_hub_id_with_config_reaches_load_dataset(stub_hub):
    texts = statistics.read_corpus("wikitext:wikitext-103-raw-v1", 2)

    assert stub_hub.calls == [
        {"path": "wikitext", "name": "wikitext-103-raw-v1", "split": "train", "streaming": True}
    ]
    assert texts == HUB_TEXTS[:2]
    # Streamed lazily: reading stops at the second usable paragraph (row 6 of 8).
    assert stub_hub.rows_read == 6


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("user/corpus", ("user/corpus", None, "train")),
        ("user/corpus@validation", ("user/corpus", None, "validation")),
        ("wikitext:wikitext-2-raw-v1@test", ("wikitext", "wikitext-2-raw-v1", "test")),
    ],
)
def test_hub_id_forms(stub_hub, source, expected):
    assert statistics.read_corpus(source, 100) == HUB_TEXTS
    call = stub_hub.calls[0]
    assert (call["path"], call["name"], call["split"]) == expected


def test_hub_dataset_without_text_column(monkeypatch):
    rows = [{"sentence": "A sentence that is long enough to be used .", "label": 1}]

    def load_dataset(path, name=None, split=None, streaming=False):
        return iter(rows)

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(ValueError, match=r"'nyu-mll/glue:sst2' has no `text` column.*'sentence'"):
        statistics.read_corpus("nyu-mll/glue:sst2", 4)


def test_editor_flag_reads_the_hub_corpus(stub_hub, tiny_llama, tokenizer, tmp_path):
    """`--model.editor.init_args.statistics.corpus wikitext:wikitext-103-raw-v1` is all it takes."""
    editor = AlphaEdit(
        layers=[1, 2],
        statistics=StatisticsOptions(
            corpus="wikitext:wikitext-103-raw-v1", num_samples=3, max_length=12
        ),
        templates=TemplateOptions(count=0),
    )
    editor.setup(tiny_llama, tokenizer)
    assert stub_hub.calls[0]["name"] == "wikitext-103-raw-v1"

    # The same paragraphs from a text file give the same moments (that reader is checked
    # against the definition in test_editors.py).
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(HUB_TEXTS[:3]), encoding="utf-8")
    expected = statistics.second_moments(
        tiny_llama,
        tokenizer,
        architecture_of(tiny_llama),
        [1, 2],
        corpus=str(corpus),
        num_samples=3,
        max_length=12,
    )
    for layer, moment in editor.second_moments(tiny_llama, tokenizer).items():
        torch.testing.assert_close(moment, expected[layer])
    assert len(stub_hub.calls) == 1, "the second call must come from the cache"


def test_text_file_paragraphs_lines_and_errors(tmp_path):
    paragraphs = tmp_path / "paragraphs.txt"
    paragraphs.write_text(
        "= Title =\n\nThe first paragraph has two lines\nof text in it .\n\nShort .\n\n"
        "The second paragraph is long enough to be kept .\n",
        encoding="utf-8",
    )
    assert statistics.read_corpus(str(paragraphs), 2) == [
        "The first paragraph has two lines\nof text in it .",
        "The second paragraph is long enough to be kept .",
    ]
    # Fewer usable paragraphs than asked for: one paragraph per line instead.
    assert statistics.read_corpus(str(paragraphs), 3) == [
        "The first paragraph has two lines",
        "The second paragraph is long enough to be kept .",
    ]
    with pytest.raises(FileNotFoundError, match=r"not found: .*missing\.txt"):
        statistics.read_corpus(str(tmp_path / "missing.txt"), 4)
    empty = tmp_path / "empty.txt"
    empty.write_text("= Heading =\n\nShort .\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt' holds no usable text"):
        statistics.read_corpus(str(empty), 4)


def test_collection_record_counts_texts_and_tokens(tiny_gpt2, tokenizer, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(HUB_TEXTS), encoding="utf-8")
    options = {"corpus": str(corpus), "num_samples": 3, "max_length": 10, "batch_size": 2}
    spec = architecture_of(tiny_gpt2)

    first = statistics.collect_second_moments(tiny_gpt2, tokenizer, spec, [0, 1], **options)
    lengths = [min(len(tokenizer(text)["input_ids"]), 10) for text in HUB_TEXTS[:3]]
    assert not first.from_cache
    assert first.record.num_texts == 3
    assert first.record.num_tokens == sum(lengths)
    assert first.record.text_seconds >= 0 and first.record.forward_seconds > 0

    second = statistics.collect_second_moments(tiny_gpt2, tokenizer, spec, [0, 1], **options)
    assert second.from_cache
    assert second.record == first.record
    for layer in (0, 1):
        assert torch.equal(second.moments[layer], first.moments[layer])

    entries = sorted(stats_cache_dir().glob("*.json"))
    assert len(entries) == 2
    stored = json.loads(entries[0].read_text(encoding="utf-8"))
    assert stored["meta"]["corpus"] == str(corpus.resolve())
    assert stored["record"]["num_tokens"] == sum(lengths)

    # A cache entry written without its record still loads; the record is unknown.
    for entry in entries:
        entry.unlink()
    third = statistics.collect_second_moments(tiny_gpt2, tokenizer, spec, [0, 1], **options)
    assert third.from_cache and third.record is None


def test_runs_needing_the_same_moments_at_once_collect_them_once(
    tiny_gpt2, tokenizer, tmp_path, monkeypatch
):
    """Two runs started together: one collects while the other waits on the cache's lock, then
    loads the entries the first wrote instead of collecting them a second time."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(HUB_TEXTS), encoding="utf-8")
    options = {"corpus": str(corpus), "num_samples": 3, "max_length": 10, "batch_size": 2}
    spec = architecture_of(tiny_gpt2)
    collecting = threading.Event()
    collections = []
    real_collect = statistics._collect

    def slow_collect(*args, **kwargs):
        collections.append(args[3])
        collecting.set()
        time.sleep(0.5)  # long enough for the second run to reach the cache meanwhile
        return real_collect(*args, **kwargs)

    monkeypatch.setattr(statistics, "_collect", slow_collect)
    results = {}

    def run(name):
        results[name] = statistics.collect_second_moments(
            tiny_gpt2, tokenizer, spec, [0, 1], **options
        )

    first = threading.Thread(target=run, args=("first",))
    first.start()
    assert collecting.wait(timeout=30)
    second = threading.Thread(target=run, args=("second",))
    second.start()
    first.join(timeout=60)
    second.join(timeout=60)

    assert collections == [[0, 1]]
    assert not results["first"].from_cache and results["second"].from_cache
    for layer in (0, 1):
        assert torch.equal(results["second"].moments[layer], results["first"].moments[layer])
