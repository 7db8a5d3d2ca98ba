"""Finding "the last checkpoint" of a run: one rule for ``fit --ckpt_path last``, ``export
--ckpt_path last`` and the experiment runner's resume.

Imports nothing from the package, so the command line, the export and the runner all use it
without an import cycle.
"""

from __future__ import annotations

from pathlib import Path

#: ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt``, or ``last-v<n>.ckpt`` beside one
#: it did not write itself (e.g. a run resumed from a copied checkpoint).
LAST_CHECKPOINT = "last*.ckpt"


def last_checkpoint(root: str | Path, folder: str = "**") -> Path | None:
    """The most recently written ``last.ckpt`` (or ``last-v<n>.ckpt``) under ``root``, or
    ``None`` if there is none.

    Args:
        root: Where to look.
        folder: Glob pattern of the folders under ``root`` that hold the checkpoints:
            ``"**"`` any folder (``root`` included), ``"*/checkpoints"`` the runs of a logger's
            ``save_dir/name`` (``<version>/checkpoints/``), ``"checkpoints"`` one run's folder.
    """
    found = [path for path in Path(root).glob(f"{folder}/{LAST_CHECKPOINT}") if path.is_file()]
    return max(found, key=lambda path: path.stat().st_mtime_ns) if found else None
