"""Reading a run config for the benchmarks that replay its editor outside a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sphere_lightning.editors import NASOptions, StatisticsOptions, TargetOptions, TemplateOptions

#: The editor's option groups and their dataclasses, as a config nests them.
OPTION_GROUPS = {
    "target": TargetOptions,
    "templates": TemplateOptions,
    "statistics": StatisticsOptions,
    "nas": NASOptions,
}


def editor_and_sphere(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], float, float]:
    """The config at ``path``, its editor's ``init_args`` and its SPHERE callback's β and α."""
    config = yaml.safe_load(Path(path).read_text())
    settings = dict(config["model"]["editor"]["init_args"])
    sphere = next(
        c["init_args"]
        for c in config["trainer"]["callbacks"]
        if c["class_path"].endswith("SphereProjectionCallback")
    )
    return config, settings, sphere["cumulative_ratio"], sphere["suppression"]


def editor_arguments(settings: dict[str, Any], **groups: dict[str, Any]) -> dict[str, Any]:
    """Editor keyword arguments from a config's editor ``init_args``: each option group's
    fields, with those given in ``groups`` replaced, as its dataclass."""
    merged = dict(settings)
    for name, fields in groups.items():
        merged[name] = {**merged.get(name, {}), **fields}
    return {
        key: OPTION_GROUPS[key](**value) if key in OPTION_GROUPS else value
        for key, value in merged.items()
    }
