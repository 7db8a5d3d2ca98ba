"""Model loading and the architecture table."""

from sphere_lightning.models.architectures import (
    ARCHITECTURES,
    ArchitectureSpec,
    UnknownArchitectureError,
    architecture_of,
    linear_weight,
    stores_transposed,
)
from sphere_lightning.models.loading import EMBEDDED_MODELS, load_model, prepare

__all__ = [
    "ARCHITECTURES",
    "EMBEDDED_MODELS",
    "ArchitectureSpec",
    "UnknownArchitectureError",
    "architecture_of",
    "linear_weight",
    "load_model",
    "prepare",
    "stores_transposed",
]
