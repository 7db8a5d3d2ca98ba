"""Reading a run's results, all from its ``summary.json``: the scalars it logged
(:class:`RunLog`, every evaluation) and its values after the last edit
(:func:`summary_values`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sphere_lightning.data.formats import KNOWEDIT_FAMILIES, knowedit_metric_name
from sphere_lightning.experiments.config import RUNS, Run
from sphere_lightning.horizon import (
    DRIFT_KL_THRESHOLD,
    EFFICACY_THRESHOLD,
    Evaluation,
    UsableHorizon,
    edits_after,
    usable_horizon,
)
from sphere_lightning.tags import (
    DIAG,
    DRIFT_KL,
    EDIT,
    EFFICACY,
    ENERGY_CHANGE,
    ENERGY_CHANGE_MEAN,
    FLUENCY,
    GENERAL_CHANGE,
    GENERALIZATION,
    NUM_EDITED,
    SPECIFICITY,
)

#: KnowEdit's metrics (``edit.final`` keys of runs on KnowEdit data) with their labels; a report
#: shows them only where some run has them.
KNOWEDIT_COLUMNS = {
    "edit_success": "edit success",
    "portability": "portability",
    **{
        knowedit_metric_name("portability", f): f"portability {f}"
        for f in KNOWEDIT_FAMILIES["portability"]
    },
    "locality": "locality",
    **{knowedit_metric_name("locality", f): f"locality {f}" for f in KNOWEDIT_FAMILIES["locality"]},
}


@dataclass(frozen=True)
class Metric:
    """A column of the comparison: where its value comes from, its label and number format."""

    key: str
    label: str
    fmt: str


#: Metrics read as logged, under their tags (``summary.json``'s ``scalars``).
LOGGED_METRICS = (
    Metric(EFFICACY, "efficacy", ".3f"),
    Metric(GENERALIZATION, "generalization", ".3f"),
    Metric(SPECIFICITY, "specificity", ".3f"),
    Metric(FLUENCY, "fluency", ".1f"),  # ×100 n-gram entropy, as in the papers
    Metric(f"{GENERAL_CHANGE}sst2/accuracy", "SST-2 accuracy change", "+.3f"),
    Metric(f"{GENERAL_CHANGE}nli/accuracy", "NLI accuracy change", "+.3f"),
    Metric(DRIFT_KL, "drift KL", ".4f"),
)
#: Mean of ``energy_change/<layer>`` over the edited layers.
HE_CHANGE = Metric(ENERGY_CHANGE_MEAN, "HE change", ".4g")
#: Seconds from the run's start to the last scalars it logged at the step.
WALL_TIME = Metric("wall_seconds", "wall time [s]", ".0f")
METRICS = (*LOGGED_METRICS, HE_CHANGE, WALL_TIME)


def _mean(values: Iterable[float | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


@dataclass
class RunLog:
    """What one run logged, from its ``summary.json``: scalars by tag and step, the time each
    step's were logged, the summary and the run's config.

    ``summary.json`` is rewritten after every evaluation while the run goes on (``finished:
    false``), so a run that is still going, or was stopped, shows what it logged up to its last
    evaluation.
    """

    directory: Path
    scalars: dict[str, dict[int, float]] = field(default_factory=dict)
    step_wall_time: dict[int, float] = field(default_factory=dict)
    first_wall_time: float | None = None
    summary: dict[str, Any] | None = None
    config: dict[str, Any] | None = None

    @classmethod
    def read(cls, directory: Path) -> RunLog:
        """Read ``directory/summary.json`` (absent: the run has not evaluated yet, nothing is
        known)."""
        log = cls(directory=directory)
        path = directory / "summary.json"
        if not path.is_file():
            return log
        log.summary = summary = json.loads(path.read_text(encoding="utf-8"))
        log.scalars = {
            tag: {int(step): value for step, value in values.items()}
            for tag, values in (summary.get("scalars") or {}).items()
        }
        log.step_wall_time = {
            int(step): time for step, time in (summary.get("step_wall_time") or {}).items()
        }
        log.first_wall_time = _number(summary.get("start_wall_time"))
        log.config = summary.get("config")
        return log

    @property
    def finished(self) -> bool:
        """Whether the run has ended: its ``summary.json`` says ``finished`` (one without the
        key, from before it was written during the run, counts as finished)."""
        return self.summary is not None and self.summary.get("finished", True) is not False

    def value(self, tag: str, step: int) -> float | None:
        """The scalar ``tag`` at ``step``, or ``None``."""
        return self.scalars.get(tag, {}).get(step)

    def energy_change(self, step: int) -> dict[str, float]:
        """``{layer: HE − HE before editing}`` at ``step``."""
        return {
            tag.removeprefix(ENERGY_CHANGE): values[step]
            for tag, values in sorted(self.scalars.items())
            if tag.startswith(ENERGY_CHANGE) and step in values
        }

    def he_change(self, step: int) -> float | None:
        """Mean HE change over the edited layers at ``step``."""
        layers = self.energy_change(step)
        return sum(layers.values()) / len(layers) if layers else None

    def wall_seconds(self, step: int) -> float | None:
        """Seconds from the run's start to the last scalars it logged at ``step``."""
        if self.first_wall_time is None or step not in self.step_wall_time:
            return None
        return self.step_wall_time[step] - self.first_wall_time

    def edits(self, step: int) -> int | None:
        """Facts written after ``step`` batches: logged ``edit/num_edited``, else from the
        config's ``edits_per_step`` (and ``num_edits``)."""
        if step == 0:
            return 0
        logged = self.value(NUM_EDITED, step)
        if logged is not None:
            return int(logged)
        data = (self.config or {}).get("data") or {}
        if "edits_per_step" not in data:
            return None
        num_edits = int(data["num_edits"]) if "num_edits" in data else None
        return edits_after(step, int(data["edits_per_step"]), num_edits)

    @property
    def evaluation_steps(self) -> set[int]:
        """Steps at which any logged metric of the table was written."""
        tags = [*(m.key for m in LOGGED_METRICS), *(EDIT + key for key in KNOWEDIT_COLUMNS)]
        return {step for tag in tags for step in self.scalars.get(tag, {})}

    @property
    def energy_steps(self) -> set[int]:
        """Steps at which HE was written (every batch, usually)."""
        return {
            step
            for tag, values in self.scalars.items()
            if tag.startswith(ENERGY_CHANGE)
            for step in values
        }

    def horizon(
        self,
        efficacy_threshold: float = EFFICACY_THRESHOLD,
        drift_kl_threshold: float = DRIFT_KL_THRESHOLD,
    ) -> UsableHorizon:
        """The usable horizon (:func:`~sphere_lightning.horizon.usable_horizon`) over every
        logged ``edit/efficacy`` and ``drift/kl``; N of "beyond N" is ``summary.json``'s
        ``num_edited``, else the edits at the last step logged."""
        efficacy = self.scalars.get(EFFICACY, {})
        drift = self.scalars.get(DRIFT_KL, {})
        evaluations = [
            Evaluation(edits, efficacy.get(step), drift.get(step))
            for step in sorted(set(efficacy) | set(drift))
            if (edits := self.edits(step)) is not None
        ]
        num_edited = _number((self.summary or {}).get("num_edited"))
        if num_edited is None:
            steps = {step for values in self.scalars.values() for step in values}
            num_edited = (self.edits(max(steps)) if steps else None) or 0
        return usable_horizon(evaluations, int(num_edited), efficacy_threshold, drift_kl_threshold)

    def layer_values(self, quantity: str, step: int) -> dict[str, float]:
        """``{layer: diag/<quantity>/<layer> at step}`` over the layers that logged it."""
        prefix = f"{DIAG}{quantity}/"
        return {
            tag.removeprefix(prefix): values[step]
            for tag, values in sorted(self.scalars.items())
            if tag.startswith(prefix) and step in values
        }

    @property
    def diagnostic_steps(self) -> list[int]:
        """Steps at which the collapse diagnostics measured an update (every batch, usually)."""
        return sorted(
            {
                step
                for tag, values in self.scalars.items()
                if tag.startswith(f"{DIAG}delta_ratio/")
                for step in values
            }
        )

    def diagnostics(self, step: int) -> dict[str, float | None]:
        """The collapse diagnostics at ``step`` (the figure's per-batch panels), each a mean
        over the edited layers: ‖W‖/‖W₀‖ and ‖W − W₀‖/‖W₀‖ (W₀: the weight_norm logged at step
        0), the principal share of the batch's ΔW over r/d (1: as a random direction), the key
        leak, the accumulated update's principal share over r/d, and the mean ‖v*‖ (``None``
        where not logged)."""
        weights = self.layer_values("weight_norm", step)
        initial = self.layer_values("weight_norm", 0)
        updates = self.layer_values("update_norm", step)
        shares = self.layer_values("principal_share", step)
        randoms = self.layer_values("principal_share_random", step)
        leaks = self.layer_values("key_leak", step)
        random = _mean(randoms.values())
        accumulated = self.layer_values("update_principal_share", step)

        def over_random(share: float | None) -> float | None:
            return None if share is None or not random else share / random

        return {
            "weight_growth": _mean(w / initial[k] for k, w in weights.items() if initial.get(k)),
            "update_ratio": _mean(u / initial[k] for k, u in updates.items() if initial.get(k)),
            "principal_excess": over_random(_mean(shares.values())),
            "key_leak": _mean(leaks.values()),
            "update_principal_excess": over_random(_mean(accumulated.values())),
            "v_norm": self.value(f"{DIAG}v_norm_mean", step),
        }

    def row(self, step: int) -> dict[str, Any]:
        """Every metric of the table at ``step`` (``None`` where not logged)."""
        values: dict[str, Any] = {m.key: self.value(m.key, step) for m in LOGGED_METRICS}
        values[HE_CHANGE.key] = self.he_change(step)
        values[f"{ENERGY_CHANGE}per_layer"] = self.energy_change(step)
        values[WALL_TIME.key] = self.wall_seconds(step)
        return values


# ------------------------------------------------------------------------------- report


def present_runs(directory: Path) -> tuple[Run, ...]:
    """The runs of :data:`RUNS` that have a folder under ``directory`` (all of them if none has:
    a report before any run started shows every column empty)."""
    present = tuple(run for run in RUNS if (directory / run.name).is_dir())
    return present or RUNS


#: General-ability tasks whose accuracy change has a column, with their labels.
SUITE_TASKS = {"sst2": "SST-2", "nli": "NLI", "boolq": "BoolQ"}

#: The phases of ``summary.json``'s ``phase_seconds`` that write edits into the model.
EDIT_PHASES = ("compute_deltas", "transform_and_apply", "after_apply")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def summary_values(summary: dict[str, Any]) -> dict[str, float | int | None]:
    """The combined table's values of one run, all read from its ``summary.json``.

    Edit metrics (KnowEdit's too, :data:`KNOWEDIT_COLUMNS`) are ``edit.final``; an accuracy
    change is ``general.<task>.final.accuracy`` minus its ``baseline``; drift KL is ``drift.kl``;
    HE change is the mean over the edited layers of ``energy.<layer>.final − baseline``; edit
    seconds are the sum of ``phase_seconds`` over :data:`EDIT_PHASES` (kept across resumes by
    the checkpoints), measured seconds the sum over every phase (edits, evaluations, HE: the
    run's whole measured work, across resumes), wall seconds ``wall_seconds``. A value the run
    did not record is ``None``.
    """
    values: dict[str, float | int | None] = {}
    num_edited = summary.get("num_edited")
    values["num_edited"] = int(num_edited) if _number(num_edited) is not None else None
    final = (summary.get("edit") or {}).get("final") or {}
    for key in ("efficacy", "generalization", "specificity", "fluency", *KNOWEDIT_COLUMNS):
        values[key] = _number(final.get(key))
    general = summary.get("general") or {}
    for task in SUITE_TASKS:
        entry = general.get(task) or {}
        after = _number((entry.get("final") or {}).get("accuracy"))
        before = _number((entry.get("baseline") or {}).get("accuracy"))
        change = None if after is None or before is None else after - before
        values[f"{task}_accuracy_change"] = change
    values["drift_kl"] = _number((summary.get("drift") or {}).get("kl"))
    changes = [
        final_value - base
        for layer in (summary.get("energy") or {}).values()
        if isinstance(layer, dict)
        and (base := _number(layer.get("baseline"))) is not None
        and (final_value := _number(layer.get("final"))) is not None
    ]
    values["he_change"] = sum(changes) / len(changes) if changes else None
    values.update(diagnostic_values(summary))
    phases = summary.get("phase_seconds") or {}
    edit_seconds = [_number(phases.get(phase)) for phase in EDIT_PHASES]
    values["edit_seconds"] = None if None in edit_seconds else sum(edit_seconds)
    measured = [_number(seconds) for seconds in phases.values()]
    values["measured_seconds"] = sum(measured) if measured and None not in measured else None
    values["wall_seconds"] = _number(summary.get("wall_seconds"))
    return values


def diagnostic_values(summary: dict[str, Any]) -> dict[str, float | None]:
    """The diagnostics columns of one run, from ``summary.json``'s ``diagnostics.history``
    (lists per ``diag/<quantity>/<layer>`` tag, step 0 first), each a mean over the edited layers:

    - ``weight_growth``: last ‖W‖ over the first (the unedited weight's);
    - ``update_ratio``: last ‖W − W₀‖ over the unedited ‖W₀‖;
    - ``principal_share`` and ``principal_share_random`` (r/d): mean over every measured batch
      too, the share of the editor's ΔW in the principal space against a random direction's;
    - ``key_leak``: its last value;
    - ``update_principal_share``: the last share of the accumulated update W − W₀ in the
      principal space; ``original_principal_share``: its last share in the unedited weight's
      principal space; ``principal_overlap``: the last overlap of the two spaces;
    - ``v_norm``: the last batch's mean ‖v*‖.

    ``None`` for what the run did not measure (no CollapseDiagnosticsCallback: all).
    """
    history = ((summary.get("diagnostics") or {}).get("history")) or {}

    def series(tag: str) -> list[float]:
        return [float(v) for v in history.get(tag) or [] if _number(v) is not None]

    def per_layer(quantity: str) -> dict[str, list[float]]:
        prefix = f"{DIAG}{quantity}/"
        return {tag.removeprefix(prefix): series(tag) for tag in history if tag.startswith(prefix)}

    weights, updates = per_layer("weight_norm"), per_layer("update_norm")
    first = {layer: values[0] for layer, values in weights.items() if values and values[0]}
    shares = [v for values in per_layer("principal_share").values() for v in values]
    randoms = [v for values in per_layer("principal_share_random").values() for v in values]
    v_norms = series(f"{DIAG}v_norm_mean")
    return {
        "weight_growth": _mean(v[-1] / first[k] for k, v in weights.items() if k in first),
        "update_ratio": _mean(v[-1] / first[k] for k, v in updates.items() if v and k in first),
        "principal_share": _mean(shares),
        "principal_share_random": _mean(randoms),
        **{  # each layer's last measured value
            quantity: _mean(v[-1] for v in per_layer(quantity).values() if v)
            for quantity in (
                "key_leak",
                "update_principal_share",
                "original_principal_share",
                "principal_overlap",
            )
        },
        "v_norm": v_norms[-1] if v_norms else None,
    }
