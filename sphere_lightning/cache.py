"""The on-disk cache: where it lives and how files are written into it.

Converted models, joined GGUF files and layer statistics are cached under one root,
``$SPHERE_LIGHTNING_CACHE`` (default ``$XDG_CACHE_HOME/sphere_lightning``, else
``~/.cache/sphere_lightning``). Several runs may share it, so every entry is written to a
temporary sibling first and renamed into place (:func:`atomic_write`). This module imports nothing
from the rest of the package, so any layer may use it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

#: Environment variable that moves the cache of converted models and statistics.
CACHE_ENV = "SPHERE_LIGHTNING_CACHE"


def cache_root() -> Path:
    """Where converted models and statistics are cached (``$SPHERE_LIGHTNING_CACHE``)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sphere_lightning"
    return Path(os.environ.get(CACHE_ENV, default))


def stats_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where statistics are cached: ``cache_dir``, else ``$SPHERE_LIGHTNING_CACHE/stats``."""
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "stats"


def models_cache_dir() -> Path:
    """Where GGUF models are converted to Hugging Face folders:
    ``$SPHERE_LIGHTNING_CACHE/models``."""
    return cache_root() / "models"


def gguf_cache_dir() -> Path:
    """Where GGUF files shipped in parts are joined: ``$SPHERE_LIGHTNING_CACHE/gguf``."""
    return cache_root() / "gguf"


def temporary_sibling(path: Path) -> Path:
    """A fresh name beside ``path`` for writing it before it is renamed into place: hidden,
    unique per process and call, ending in ``.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Create or replace the file ``path`` atomically: ``write(tmp)`` writes a temporary file
    beside it, which is then renamed over ``path`` (``os.replace``). Readers, and runs sharing
    the cache, see the old file or the complete new one, never a half-written one; if ``write``
    fails, the temporary file is removed and ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
