"""Reading a run config for the benchmarks that replay its editor outside a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


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
