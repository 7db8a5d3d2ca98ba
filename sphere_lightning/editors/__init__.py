"""Editors compute weight updates ΔW for batches of edit requests."""

from sphere_lightning.editors.alphaedit import AlphaEdit
from sphere_lightning.editors.base import Editor, KeyValueEditor, LocateThenEditEditor
from sphere_lightning.editors.ft import FT
from sphere_lightning.editors.memit import MEMIT
from sphere_lightning.editors.nas import NASOptions
from sphere_lightning.editors.rome import ROME
from sphere_lightning.editors.statistics import StatisticsOptions
from sphere_lightning.editors.targets import TargetOptions
from sphere_lightning.editors.templates import TemplateOptions
from sphere_lightning.editors.ultraedit import UltraEdit

__all__ = [
    "FT",
    "MEMIT",
    "ROME",
    "AlphaEdit",
    "Editor",
    "KeyValueEditor",
    "LocateThenEditEditor",
    "NASOptions",
    "StatisticsOptions",
    "TargetOptions",
    "TemplateOptions",
    "UltraEdit",
]
