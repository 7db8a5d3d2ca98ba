"""Pure-torch maths of SPHERE: hyperspherical energy and sparse-space projection."""

from sphere_lightning.functional.diagnostics import (
    key_energy,
    key_leak,
    principal_share,
    share_in,
    subspace_overlap,
)
from sphere_lightning.functional.energy import hyperspherical_energy
from sphere_lightning.functional.projection import (
    normalize_rows,
    principal_directions,
    project_delta,
    sparse_space_projector,
)

__all__ = [
    "hyperspherical_energy",
    "key_energy",
    "key_leak",
    "normalize_rows",
    "principal_directions",
    "principal_share",
    "project_delta",
    "share_in",
    "sparse_space_projector",
    "subspace_overlap",
]
