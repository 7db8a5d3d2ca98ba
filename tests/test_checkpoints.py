"""The one rule for "the last checkpoint" of a run (``fit``/``export --ckpt_path last`` and the
experiment runner's resume)."""

from __future__ import annotations

import os
from pathlib import Path

from sphere_lightning.checkpoints import last_checkpoint


def _write(path: Path, age_ns: int) -> Path:
    """An empty file written ``age_ns`` nanoseconds before an arbitrary fixed time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    time_ns = 1_700_000_000_000_000_000 - age_ns
    os.utime(path, ns=(time_ns, time_ns))
    return path


def test_the_newest_last_checkpoint_wins(tmp_path):
    old = _write(tmp_path / "version_0" / "checkpoints" / "last.ckpt", age_ns=3_000)
    newer = _write(tmp_path / "version_1" / "checkpoints" / "last-v1.ckpt", age_ns=2_000)
    _write(tmp_path / "version_1" / "checkpoints" / "epoch=0-step=4.ckpt", age_ns=0)  # not last

    assert last_checkpoint(tmp_path) == newer
    assert last_checkpoint(tmp_path, folder="*/checkpoints") == newer
    assert last_checkpoint(tmp_path / "version_0", folder="checkpoints") == old
    os.utime(old)  # written now: the newest
    assert last_checkpoint(tmp_path) == old


def test_the_folder_pattern_limits_where_it_looks(tmp_path):
    loose = _write(tmp_path / "old" / "last.ckpt", age_ns=0)
    run = _write(tmp_path / "edit" / "version_0" / "checkpoints" / "last.ckpt", age_ns=10)

    assert last_checkpoint(tmp_path) == loose  # anywhere below, as `export --ckpt_path last`
    assert last_checkpoint(tmp_path / "edit", folder="*/checkpoints") == run
    assert last_checkpoint(tmp_path, folder="*/checkpoints") is None
    assert last_checkpoint(tmp_path / "edit" / "version_0") == run


def test_none_without_a_last_checkpoint(tmp_path):
    assert last_checkpoint(tmp_path / "missing") is None
    (tmp_path / "checkpoints" / "last.ckpt").mkdir(parents=True)  # a folder, not a file
    assert last_checkpoint(tmp_path, folder="checkpoints") is None
