"""Telling a local path from a hub id when neither a file nor a folder is there."""

from __future__ import annotations

#: File endings that only a local file has: data (JSON, JSON lines), a text corpus, model
#: weights (GGUF, safetensors, PyTorch ``.bin``). Hub ids never end in one of them.
FILE_SUFFIXES = (".json", ".jsonl", ".txt", ".gguf", ".safetensors", ".bin")


def looks_like_path(text: str) -> bool:
    """Whether ``text``, which names no existing file or folder, was meant as a local path rather
    than a Hugging Face hub id (``name`` or ``owner/name``, perhaps followed by ``:<config>`` and
    ``@<split>``), so that a missing file is reported as such instead of being looked up on the
    hub.

    It is a path when it starts with ``/``, ``.`` (``./``, ``../``, a hidden file) or ``~``;
    holds a backslash; has more than one ``/``; or ends (in any case) in one of
    :data:`FILE_SUFFIXES`.
    """
    return (
        text.startswith(("/", ".", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.lower().endswith(FILE_SUFFIXES)
    )
