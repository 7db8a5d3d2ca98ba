"""Callbacks: delta transforms (SPHERE) and observers (hyperspherical energy)."""

from sphere_lightning.callbacks.energy import HyperSphericalEnergyCallback
from sphere_lightning.callbacks.sphere import SphereProjectionCallback

__all__ = ["HyperSphericalEnergyCallback", "SphereProjectionCallback"]
