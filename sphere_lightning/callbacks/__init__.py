"""Callbacks: delta transforms (SPHERE) and observers (energy, general ability, drift, figures)."""

from sphere_lightning.callbacks.alarm import HEAlarmCallback
from sphere_lightning.callbacks.diagnostics import CollapseDiagnosticsCallback
from sphere_lightning.callbacks.drift import DriftCallback
from sphere_lightning.callbacks.energy import HyperSphericalEnergyCallback
from sphere_lightning.callbacks.export import ExportCallback
from sphere_lightning.callbacks.figures import CosineHeatmapCallback, MetricTrendsCallback
from sphere_lightning.callbacks.general import GeneralAbilityCallback
from sphere_lightning.callbacks.observer import EditObserver, changes_since
from sphere_lightning.callbacks.prune import PruneCallback
from sphere_lightning.callbacks.rect import RectCallback
from sphere_lightning.callbacks.sphere import SphereProjectionCallback
from sphere_lightning.deltas import DeltaTransform

__all__ = [
    "CollapseDiagnosticsCallback",
    "CosineHeatmapCallback",
    "DeltaTransform",
    "DriftCallback",
    "EditObserver",
    "ExportCallback",
    "GeneralAbilityCallback",
    "HEAlarmCallback",
    "HyperSphericalEnergyCallback",
    "MetricTrendsCallback",
    "PruneCallback",
    "RectCallback",
    "SphereProjectionCallback",
    "changes_since",
]
