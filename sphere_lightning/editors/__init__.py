"""Editors compute weight updates ΔW for batches of edit requests."""

from sphere_lightning.editors.alphaedit import AlphaEdit
from sphere_lightning.editors.base import Editor, LocateThenEditEditor
from sphere_lightning.editors.memit import MEMIT

__all__ = ["AlphaEdit", "Editor", "LocateThenEditEditor", "MEMIT"]
