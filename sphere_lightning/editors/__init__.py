"""Editors compute weight updates ΔW for batches of edit requests."""

from sphere_lightning.editors.alphaedit import AlphaEdit
from sphere_lightning.editors.base import Editor, LocateThenEditEditor
from sphere_lightning.editors.ft import FT
from sphere_lightning.editors.memit import MEMIT
from sphere_lightning.editors.rome import ROME
from sphere_lightning.editors.ultraedit import UltraEdit

__all__ = ["FT", "ROME", "AlphaEdit", "Editor", "LocateThenEditEditor", "MEMIT", "UltraEdit"]
