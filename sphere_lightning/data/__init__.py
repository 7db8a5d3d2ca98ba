"""Edit requests, the registry of record layouts, data set readers, the built-in fact set and
the edit data module.

The data module (and with it Lightning) is imported lazily, so reading data sets does not pay
for importing Lightning.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from sphere_lightning.data.builtin import builtin_relations, load_builtin_facts
from sphere_lightning.data.formats import FORMAT_REGISTRY, RecordFormat
from sphere_lightning.data.readers import (
    FORMATS,
    MalformedRecordError,
    load_raw_records,
    load_requests,
    load_requests_with_format,
    parse_records,
    read_builtin_format,
    read_counterfact_easyedit,
    read_counterfact_rome,
    read_zsre_easyedit,
    read_zsre_mend,
    sniff_format,
    write_counterfact_rome,
)
from sphere_lightning.data.requests import EditBatch, EditRequest, Probe

if TYPE_CHECKING:
    from sphere_lightning.data.datamodule import (
        EditDataModule,
        EditRequestDataset,
        collate_edit_batch,
    )

_LAZY = {"EditDataModule", "EditRequestDataset", "collate_edit_batch"}

__all__ = [
    "FORMATS",
    "FORMAT_REGISTRY",
    "EditBatch",
    "EditDataModule",
    "EditRequest",
    "Probe",
    "EditRequestDataset",
    "MalformedRecordError",
    "RecordFormat",
    "builtin_relations",
    "collate_edit_batch",
    "load_builtin_facts",
    "load_raw_records",
    "load_requests",
    "load_requests_with_format",
    "parse_records",
    "read_builtin_format",
    "read_counterfact_easyedit",
    "read_counterfact_rome",
    "read_zsre_easyedit",
    "read_zsre_mend",
    "write_counterfact_rome",
    "sniff_format",
]


def __getattr__(name: str) -> Any:
    """Import the data module's names on first use."""
    if name in _LAZY:
        return getattr(import_module("sphere_lightning.data.datamodule"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
