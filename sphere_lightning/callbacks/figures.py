"""Figures of an editing run: neuron cosine heatmaps, and HE beside the editing metrics.

Figures are drawn with matplotlib's object-oriented API on an Agg canvas (pyplot is never
imported, so no GUI backend is chosen and no global figure state is touched). Each figure is
written as a PNG under ``<log dir>/figures/`` and sent as an image to every TensorBoard logger.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_debug
from typing_extensions import override

from sphere_lightning.callbacks.observer import EditObserver
from sphere_lightning.callbacks.sphere import short_name
from sphere_lightning.context import EditingContext
from sphere_lightning.distributed import run_log_dir
from sphere_lightning.errors import ConfigError, callback_flag
from sphere_lightning.horizon import edits_after
from sphere_lightning.tags import EDIT, ENERGY, NUM_EDITED, NUM_EVALUATED

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Counters the module logs under ``edit/`` that are not editing metrics.
_EDIT_COUNTERS = (NUM_EDITED, NUM_EVALUATED)


# -- shared helpers ----------------------------------------------------------------------------


def _is_edit_metric(tag: str) -> bool:
    """An ``edit/*`` editing metric: not a counter, nor the confidence interval of a sampled
    evaluation (``edit/<metric>_ci95``)."""
    return tag.startswith(EDIT) and tag not in _EDIT_COUNTERS and not tag.endswith("_ci95")


def figures_dir(trainer: Trainer, dirpath: str | Path | None = None) -> Path:
    """Where figures go: ``dirpath`` if given, else ``<trainer.log_dir>/figures``.

    ``trainer.log_dir`` is the TensorBoard logger's version folder, or ``default_root_dir``
    without a logger.
    """
    if dirpath is not None:
        return Path(dirpath)
    root = run_log_dir(trainer) or trainer.default_root_dir
    return Path(root) / "figures"


def edits_per_step(trainer: Trainer) -> int | None:
    """``trainer.datamodule.edits_per_step`` if the datamodule has it."""
    per_step = getattr(getattr(trainer, "datamodule", None), "edits_per_step", None)
    return per_step if isinstance(per_step, int) else None


def edits_at(trainer: Trainer, step: int) -> int:
    """Number of edits after ``step`` batches: ``step × edits_per_step`` (at most the
    datamodule's ``num_edits``), or ``step`` if the datamodule does not say how many edits a
    step holds."""
    per_step = edits_per_step(trainer)
    if per_step is None:
        return step
    total = getattr(trainer.datamodule, "num_edits", None)
    return edits_after(step, per_step, total if isinstance(total, int) else None)


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Fixed margins instead of a layout engine: constrained layout doubles the drawing time.
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def save_figure(trainer: Trainer, figure: Figure, path: Path, tag: str, step: int) -> None:
    """Write ``figure`` to ``path`` (PNG) and add it as image ``tag`` to each TensorBoard logger.

    The figure is rendered once; the PNG and the TensorBoard image are the same pixels.
    """
    from PIL import Image

    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    for logger in getattr(trainer, "loggers", []):
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")


def cosine_similarity_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of the rows of ``weight`` (``n × d`` → ``n × n``), float32."""
    rows = weight.detach().float()
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.T


def spearman_correlation(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation of two equally long series: the Pearson correlation of their
    ranks, ties getting their mean rank, in float64 (torchmetrics' version adds an ε that
    shifts the result by ~1e-6).

    None when it is undefined: fewer than 3 points, or a constant series.
    """
    if len(x) != len(y):
        raise ValueError(f"Series differ in length: {len(x)} and {len(y)}")
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    rx = _mean_ranks(torch.tensor(list(x), dtype=torch.float64))
    ry = _mean_ranks(torch.tensor(list(y), dtype=torch.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float(((rx * ry).sum() / (rx.norm() * ry.norm())).clamp(-1.0, 1.0))


def _mean_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks, tied values sharing the mean of their ranks (scipy's ``rankdata``)."""
    less = (values[None, :] < values[:, None]).sum(1, dtype=values.dtype)
    equal = (values[None, :] == values[:, None]).sum(1, dtype=values.dtype)
    return less + (equal + 1) / 2


# -- cosine heatmap ----------------------------------------------------------------------------


class CosineHeatmapCallback(EditObserver):
    """Heatmap of the pairwise cosine similarity of one edited weight's neurons.

    Neurons are the rows of the weight in the nn.Linear (out × in) convention that
    ``pl_module.edited_weight`` returns (GPT-2's Conv1D included): one per output unit, each a
    direction in the layer's input space. These are the vectors whose hyperspherical energy is
    logged and whose principal directions SPHERE protects (the rows of W_out in the paper). A
    fixed random subset of ``max_neurons`` of them, chosen once (seeded) and kept in the
    checkpoint, is drawn at step 0 and after every ``every_n_steps``-th step as
    ``figures/cosine_<layer>_step<k>.png`` and TensorBoard image ``figures/cosine/<layer>``.
    The latest matrix is kept as :attr:`latest_similarity`, its PNG as :attr:`latest_figure`
    (``summary.json``: ``cosine_heatmap.<layer>.{final_step,figure}``). List it once per layer
    to draw several layers: each keeps its own neurons in the checkpoint.

    Args:
        layer: The edited parameter (``model.layers.7.mlp.down_proj.weight``) or its module path;
            default the last edited one.
        every_n_steps: Draw after every n-th step.
        max_neurons: Largest number of neurons drawn (an n × n image).
        seed: Seed of the neuron subset.
        dirpath: Folder for the PNG files; default ``<log dir>/figures``.
    """

    summary_key = "cosine_heatmap"
    state_key_arguments = ("layer",)

    def __init__(
        self,
        layer: str | None = None,
        every_n_steps: int = 1,
        max_neurons: int = 256,
        seed: int = 0,
        dirpath: str | None = None,
    ) -> None:
        super().__init__(every_n_steps)
        if max_neurons < 2:
            raise ConfigError(
                f"{callback_flag(type(self).__name__, 'max_neurons')} should be ≥ 2, "
                f"got {max_neurons}"
            )
        self.layer = layer
        self.max_neurons = max_neurons
        self.seed = seed
        self.dirpath = dirpath
        self.indices: torch.Tensor | None = None
        self.latest_similarity: torch.Tensor | None = None
        self.latest_figure: str | None = None

    def parameter_name(self, pl_module: EditingContext) -> str:
        """The edited parameter drawn."""
        names = list(pl_module.edited_parameter_names)
        if self.layer is None:
            return names[-1]
        for name in names:
            if self.layer in (name, short_name(name)):
                return name
        raise ConfigError(
            f"{callback_flag(type(self).__name__, 'layer')} should be one of the edited "
            f"parameters {names} (or their module paths), got {self.layer!r}"
        )

    def neuron_indices(self, num_neurons: int) -> torch.Tensor:
        """The sorted subset of neurons drawn, chosen on first use and kept."""
        if self.indices is None:
            if num_neurons <= self.max_neurons:
                self.indices = torch.arange(num_neurons)
            else:
                generator = torch.Generator().manual_seed(self.seed)
                chosen = torch.randperm(num_neurons, generator=generator)[: self.max_neurons]
                self.indices = chosen.sort().values
        return self.indices

    def similarity(self, pl_module: EditingContext) -> torch.Tensor:
        """Cosine similarity matrix of the chosen neurons of the current weight, on CPU."""
        weight = pl_module.edited_weight(self.parameter_name(pl_module))
        rows = weight.detach()[self.neuron_indices(weight.shape[0]).to(weight.device)]
        return cosine_similarity_matrix(rows).cpu()

    def draw(self, trainer: Trainer, pl_module: EditingContext) -> Path:
        """Compute the matrix at the current step, write its PNG and TensorBoard image."""
        step = trainer.global_step
        layer = short_name(self.parameter_name(pl_module))
        self.latest_similarity = similarity = self.similarity(pl_module)
        figure = _new_figure(6.0, 5.0)
        figure.subplots_adjust(left=0.1, right=0.98, bottom=0.1, top=0.88)
        ax = figure.add_subplot()
        image = ax.imshow(
            similarity.numpy(), cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest"
        )
        figure.colorbar(image, ax=ax, label="cosine similarity")
        edits = edits_at(trainer, step)
        ax.set_title(f"{layer}\nstep {step} ({edits} edit{'' if edits == 1 else 's'})", fontsize=9)
        ax.set_xlabel(f"neuron (row of W, {len(similarity)} sampled)")
        ax.set_ylabel("neuron")
        path = figures_dir(trainer, self.dirpath) / f"cosine_{layer}_step{step}.png"
        save_figure(trainer, figure, path, f"figures/cosine/{layer}", step)
        return path

    @override
    def measure(self, trainer: Trainer, pl_module: EditingContext) -> dict[str, float]:
        """Draw the heatmap (rank zero only); no scalars, only its time
        ``time/figures/cosine/<layer>``."""
        if trainer.is_global_zero:
            with self.timed(f"figures/cosine/{short_name(self.parameter_name(pl_module))}"):
                self.latest_figure = str(self.draw(trainer, pl_module))
        return {}

    @override
    def summary(self, trainer: Trainer, pl_module: EditingContext) -> dict[str, Any]:
        layer = short_name(self.parameter_name(pl_module))
        return {layer: {"final_step": self.latest_step, "figure": self.latest_figure}}

    @override
    def state_dict(self) -> dict[str, Any]:
        indices = None if self.indices is None else self.indices.tolist()
        return {**super().state_dict(), "indices": indices, "latest_figure": self.latest_figure}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        indices = state_dict.get("indices")
        self.indices = None if indices is None else torch.tensor(indices, dtype=torch.long)
        self.latest_figure = state_dict.get("latest_figure")


# -- HE and editing metrics over the run -------------------------------------------------------


class MetricTrendsCallback(EditObserver):
    """HE and editing metrics against the number of edits, and their Spearman correlation.

    Records the HE and editing-metric scalars that the module and the other callbacks log
    through ``pl_module.log_now`` (which it wraps in :meth:`setup`, calling through, and unwraps
    in :meth:`teardown`) as :attr:`history` ``{tag: {step: value}}``. After each validation that
    follows an edit and at the end of training (not after each step, and with no baseline: see
    :class:`~sphere_lightning.callbacks.EditObserver`) it draws ``figures/trends.png``
    (TensorBoard image ``figures/trends``): HE of every edited layer (top) and each editing
    metric (bottom) against the number of edits, as in the paper's Fig. 2. It logs
    ``correlation/spearman/<metric>``, the Spearman correlation between each metric and the HE
    averaged over the edited layers, over the steps where both were logged (step 0 included).
    With fewer than 3 such steps, or a constant series, the correlation is undefined and nothing
    is logged for it. ``summary.json``: ``spearman_with_energy.<metric tag>``.

    Args:
        metrics: Tags of the editing metrics; default every ``edit/*`` scalar except the counters
            ``edit/num_edited`` and ``edit/num_evaluated``.
        energy_prefix: Prefix of the HE tags (``energy/<layer>``, logged by
            :class:`~sphere_lightning.callbacks.HyperSphericalEnergyCallback`).
        dirpath: Folder for ``trends.png``; default ``<log dir>/figures``.
    """

    summary_key = "spearman_with_energy"
    phase = "figures/trends"
    measures_baseline = False
    evaluates_model = False  # draws from logged scalars only

    def __init__(
        self,
        metrics: list[str] | None = None,
        energy_prefix: str = ENERGY,
        dirpath: str | None = None,
    ) -> None:
        super().__init__()
        if not energy_prefix:
            raise ConfigError(
                f"{callback_flag(type(self).__name__, 'energy_prefix')} should be a non-empty "
                "tag prefix such as 'energy/'"
            )
        self.metrics = list(metrics) if metrics is not None else None
        self.energy_prefix = energy_prefix
        self.dirpath = dirpath
        self.history: dict[str, dict[int, float]] = {}
        self.correlations: dict[str, float] = {}
        self._wrapped: tuple[LightningModule, Callable[..., None], Callable[..., None]] | None = (
            None
        )
        self._records = 0
        self._reported: tuple[int, int] | None = None

    # -- recording ---------------------------------------------------------------------------

    def is_series(self, tag: str) -> bool:
        """Whether ``tag`` is drawn: an HE tag or an editing metric."""
        if tag.startswith(self.energy_prefix):
            return True
        if self.metrics is not None:
            return tag in self.metrics
        return _is_edit_metric(tag)

    def record(self, metrics: dict[str, Any], step: int) -> None:
        """Keep the HE and editing-metric scalars logged at ``step``."""
        for tag, value in metrics.items():
            if self.is_series(tag):
                self.history.setdefault(tag, {})[int(step)] = float(value)
                self._records += 1

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._wrapped is not None:
            return
        log_now = pl_module.log_now

        def recording_log_now(metrics: dict[str, float]) -> None:
            self.record(metrics, pl_module.global_step)
            log_now(metrics)

        # An instance attribute shadows the method; teardown deletes it again.
        pl_module.log_now = recording_log_now
        self._wrapped = (pl_module, log_now, recording_log_now)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._wrapped is None:
            return
        module, log_now, wrapper = self._wrapped
        if module.__dict__.get("log_now") is wrapper:
            del module.log_now
            if module.log_now != log_now:  # the module had its own instance attribute
                module.log_now = log_now
        self._wrapped = None

    # -- series ------------------------------------------------------------------------------

    def energy_tags(self) -> list[str]:
        """Recorded HE tags, one per edited layer."""
        return sorted(t for t in self.history if t.startswith(self.energy_prefix))

    def metric_tags(self) -> list[str]:
        """Recorded editing metric tags."""
        if self.metrics is not None:
            return [t for t in self.metrics if t in self.history]
        return sorted(t for t in self.history if _is_edit_metric(t))

    def mean_energy(self) -> dict[int, float]:
        """HE averaged over the layers logged at each step."""
        values: dict[int, list[float]] = {}
        for tag in self.energy_tags():
            for step, value in self.history[tag].items():
                values.setdefault(step, []).append(value)
        return {step: sum(v) / len(v) for step, v in sorted(values.items())}

    def compute_correlations(self) -> dict[str, float]:
        """Spearman correlation of the mean HE with each editing metric, where defined."""
        energy = self.mean_energy()
        correlations = {}
        for tag in self.metric_tags():
            steps = sorted(set(energy) & set(self.history[tag]))
            rho = spearman_correlation(
                [energy[s] for s in steps], [self.history[tag][s] for s in steps]
            )
            if rho is None:
                rank_zero_debug(
                    f"No Spearman correlation of HE with {tag}: {len(steps)} common step(s) "
                    "(needs ≥ 3, not all equal)"
                )
            else:
                correlations[tag] = rho
        return correlations

    # -- report ------------------------------------------------------------------------------

    def draw(self, trainer: Trainer) -> Path:
        """Write ``trends.png`` (and its TensorBoard image) from the recorded history."""
        step = trainer.global_step
        figure = _new_figure(7.0, 6.0)
        figure.subplots_adjust(left=0.15, right=0.97, bottom=0.08, top=0.97, hspace=0.06)
        top, bottom = figure.subplots(2, 1, sharex=True)
        for tag in self.energy_tags():
            steps = sorted(self.history[tag])
            top.plot(
                [edits_at(trainer, s) for s in steps],
                [self.history[tag][s] for s in steps],
                marker="o",
                markersize=3,
                label=tag.removeprefix(self.energy_prefix),
            )
        top.set_ylabel("hyperspherical energy")
        if self.energy_tags():
            top.legend(fontsize=7)
        for tag in self.metric_tags():
            steps = sorted(self.history[tag])
            label = tag.removeprefix(EDIT)
            if tag in self.correlations:
                label += f" (Spearman ρ with mean HE {self.correlations[tag]:+.2f})"
            bottom.plot(
                [edits_at(trainer, s) for s in steps],
                [self.history[tag][s] for s in steps],
                marker="o",
                markersize=3,
                label=label,
            )
        bottom.set_ylabel("editing metric")
        if self.metric_tags():
            bottom.legend(fontsize=7)
        bottom.set_xlabel("editing steps" if edits_per_step(trainer) is None else "number of edits")
        path = figures_dir(trainer, self.dirpath) / "trends.png"
        save_figure(trainer, figure, path, "figures/trends", step)
        return path

    @override
    def should_update(self, step: int) -> bool:
        """Never after a step: the editing metrics of a step are logged by the validation that
        follows it (see :meth:`on_validation_end`)."""
        return False

    @override
    def measure(self, trainer: Trainer, pl_module: EditingContext) -> dict[str, float]:
        """Compute the correlations and draw the figure from the recorded history."""
        self._reported = (trainer.global_step, self._records)
        if not self.history:
            return {}
        self.correlations = self.compute_correlations()
        if trainer.is_global_zero:
            self.draw(trainer)
        return {
            f"correlation/spearman/{tag.removeprefix(EDIT)}": rho
            for tag, rho in self.correlations.items()
        }

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step == 0 or trainer.sanity_checking:
            return
        if self.history and self._reported != (trainer.global_step, self._records):
            self.observe(trainer, pl_module)

    @override
    def summary(self, trainer: Trainer, pl_module: EditingContext) -> dict[str, float]:
        return dict(self.correlations)

    @override
    def state_dict(self) -> dict[str, Any]:
        history = {tag: dict(values) for tag, values in self.history.items()}
        return {**super().state_dict(), "history": history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = {
            tag: {int(s): float(v) for s, v in values.items()}
            for tag, values in state_dict.get("history", {}).items()
        }
