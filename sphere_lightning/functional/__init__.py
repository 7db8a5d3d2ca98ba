"""Pure-torch maths of SPHERE: hyperspherical energy and sparse-space projection."""

from sphere_lightning.functional.energy import hyperspherical_energy
from sphere_lightning.functional.projection import (
    normalize_rows,
    principal_directions,
    project_delta,
    sparse_space_projector,
)

__all__ = [
    "hyperspherical_energy",
    "normalize_rows",
    "principal_directions",
    "project_delta",
    "sparse_space_projector",
]
