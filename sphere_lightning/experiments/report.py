"""The experiment reports: a pair's comparison at every evaluation step (``table.md``,
``table.json``, ``figure.png``) and a suite's combined table of every editor without and with
SPHERE."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sphere_lightning.experiments.config import RUNS, WITH_SPHERE, Pair, Run
from sphere_lightning.experiments.results import (
    EDIT_PHASES,
    HE_CHANGE,
    KNOWEDIT_COLUMNS,
    LOGGED_METRICS,
    METRICS,
    SUITE_TASKS,
    RunLog,
    present_runs,
    summary_values,
)
from sphere_lightning.horizon import DRIFT_KL_THRESHOLD, EFFICACY_THRESHOLD
from sphere_lightning.tags import DRIFT_KL, EDIT, EFFICACY, GENERALIZATION, SPECIFICITY

MISSING = "—"

#: KnowEdit's metrics the suite report follows at every evaluation (when a run logged them).
KNOWEDIT_TRAJECTORIES = ("edit_success", "portability", "locality")


def build_table(
    out: Path,
    efficacy_threshold: float = EFFICACY_THRESHOLD,
    drift_kl_threshold: float = DRIFT_KL_THRESHOLD,
) -> dict[str, Any]:
    """The comparison of the runs under ``out`` (the content of ``table.json``).

    Rows are the evaluation steps of either run (steps at which an edit, general-ability or drift
    metric was logged; HE steps if there are none). A run that has no folder (``--runs`` left it
    out) has no columns. Each run's ``usable_horizon`` uses the two thresholds
    (:meth:`RunLog.horizon`).
    """
    runs = present_runs(out)
    logs = {run.name: RunLog.read(out / run.name) for run in runs}
    steps = set().union(*(log.evaluation_steps for log in logs.values()))
    if not steps:
        steps = set().union(*(log.energy_steps for log in logs.values()))
    rows = []
    for step in sorted(steps):
        edits = next((e for log in logs.values() if (e := log.edits(step)) is not None), None)
        row: dict[str, Any] = {"step": step, "edits": edits}
        row.update({name: log.row(step) for name, log in logs.items()})
        rows.append(row)
    infos = {}
    for run in runs:
        log = logs[run.name]
        summary = log.summary or {}
        infos[run.name] = {
            "label": run.label,
            "log_dir": str(log.directory),
            "finished": log.finished,
            "wall_seconds": summary.get("wall_seconds"),
            "num_edited": summary.get("num_edited"),
            "global_step": summary.get("global_step"),
            "usable_horizon": log.horizon(efficacy_threshold, drift_kl_threshold).as_dict(),
        }
    return {
        "runs": infos,
        "metrics": [{"key": m.key, "label": m.label} for m in METRICS],
        "rows": rows,
        "energy_change": {  # every logged step, for the figure
            name: [
                {"step": s, "edits": log.edits(s), HE_CHANGE.key: log.he_change(s)}
                for s in sorted(log.energy_steps)
            ]
            for name, log in logs.items()
        },
    }


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return format(value, fmt)


def horizon_text(horizon: dict[str, Any]) -> str:
    """A usable horizon of ``table.json`` in words: ``3000 edits (efficacy < 0.8)``, ``beyond
    10000 edits`` or ``—`` (no evaluation after the first edit)."""
    if not horizon.get("evaluated"):
        return MISSING
    if horizon["edits"] is None:
        return f"{horizon['label']} edits"
    limits = {
        "efficacy": f"efficacy < {horizon['efficacy_threshold']:g}",
        "drift_kl": f"drift KL > {horizon['drift_kl_threshold']:g}",
    }
    reasons = " and ".join(limits[reason] for reason in horizon["crossed_by"])
    return f"{horizon['edits']} edits ({reasons})"


def _table_runs(table: dict[str, Any]) -> tuple[Run, ...]:
    return tuple(run for run in RUNS if run.name in table["runs"])


def format_markdown(table: dict[str, Any]) -> str:
    """``table.md``: one row per number of edits, a column per run (without / with SPHERE) and
    metric."""
    runs = _table_runs(table)
    header = ["edits"]
    for metric in METRICS:
        header += [f"{metric.label} ({run.label.split()[0]})" for run in runs]
    lines = [
        "# SPHERE vs the base editor",
        "",
        "Each metric has a column per run: without SPHERE (every SphereProjectionCallback "
        "removed) and with SPHERE (the config as given); a run left out (`--runs`) has none.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---:|" * len(header),
    ]
    for row in table["rows"]:
        cells = [MISSING if row["edits"] is None else str(row["edits"])]
        for metric in METRICS:
            cells += [_cell(row[run.name][metric.key], metric.fmt) for run in runs]
        lines.append("| " + " | ".join(cells) + " |")
    if not table["rows"]:
        lines.append("| " + " | ".join(["(nothing logged yet)"] + [""] * (len(header) - 1)) + " |")
    lines += [
        "",
        "- efficacy, generalization, specificity, fluency: `edit/*`, after all edits so far, over "
        "all facts edited so far;",
        "- SST-2 / NLI accuracy change: `general_change/<task>/accuracy`, accuracy minus its value "
        "before the first edit;",
        "- drift KL: `drift/kl`, KL(original ‖ current) of next-token distributions on held-out "
        "text;",
        "- HE change: mean over the edited layers of `energy_change/<layer>` (HE minus HE before "
        "editing), per layer in `table.json`;",
        "- wall time: seconds from the run's start to the last scalars it logged at that step;",
        f"- {MISSING}: not logged at that step (or not yet).",
        "",
        "Runs:",
        "",
    ]
    for run in runs:
        info = table["runs"][run.name]
        if info["finished"]:
            state = (
                f"finished: {info['num_edited']} edits in {_cell(info['wall_seconds'], '.0f')} s "
                "(`summary.json`)"
            )
        else:
            state = (
                "not finished (no `summary.json`, or `finished: false`): still running, failed "
                "or stopped"
            )
        lines.append(f"- {run.label}: `{info['log_dir']}` — {state}")
    horizons = {run: table["runs"][run.name].get("usable_horizon") for run in runs}
    if any(horizons.values()):
        first = next(h for h in horizons.values() if h)
        lines += [
            "",
            "Usable horizon: edits at the first evaluation where efficacy < "
            f"{first['efficacy_threshold']:g} or drift KL > {first['drift_kl_threshold']:g} "
            '("beyond N": none did, in the N edits made):',
            "",
        ]
        lines += [f"- {run.label}: {horizon_text(h)}" for run, h in horizons.items() if h]
    return "\n".join(lines) + "\n"


def plot_comparison(table: dict[str, Any], path: Path) -> None:
    """``figure.png``: one panel per metric against the number of edits, both runs on each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 3
    rows = math.ceil(len(METRICS) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, METRICS, strict=False):
        plotted = False
        for index, run in enumerate(_table_runs(table)):
            if metric is HE_CHANGE:  # logged every batch: the whole curve
                points = [(p["edits"], p[HE_CHANGE.key]) for p in table["energy_change"][run.name]]
            else:
                points = [(r["edits"], r[run.name][metric.key]) for r in table["rows"]]
            points = [(x, y) for x, y in points if x is not None and y is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, color=f"C{index}", label=run.label)
                plotted = True
        ax.set_title(metric.label)
        ax.set_xlabel("edits")
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(METRICS) :]:
        ax.axis("off")
    fig.suptitle("SPHERE vs the base editor")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    out: Path,
    efficacy_threshold: float = EFFICACY_THRESHOLD,
    drift_kl_threshold: float = DRIFT_KL_THRESHOLD,
) -> tuple[Path, Path, Path]:
    """Write ``table.md``, ``table.json`` and ``figure.png`` into ``out``; returns their paths
    (the thresholds: of the usable horizon)."""
    table = build_table(out, efficacy_threshold, drift_kl_threshold)
    return _write_outputs(out, table, format_markdown, plot_comparison)


@dataclass(frozen=True)
class SuiteColumn:
    """A column of the combined table: its key in ``table.json``, label and number format;
    an ``optional`` one is shown only where some run has a value."""

    key: str
    label: str
    fmt: str
    optional: bool = False


SUITE_COLUMNS = (
    SuiteColumn("num_edited", "edits", "d"),
    SuiteColumn("efficacy", "efficacy", ".3f"),
    SuiteColumn("generalization", "generalization", ".3f"),
    SuiteColumn("specificity", "specificity", ".3f"),
    *(SuiteColumn(key, label, ".3f", optional=True) for key, label in KNOWEDIT_COLUMNS.items()),
    SuiteColumn("fluency", "fluency", ".1f"),
    *(
        SuiteColumn(f"{task}_accuracy_change", f"{label} Δacc", "+.3f")
        for task, label in SUITE_TASKS.items()
    ),
    SuiteColumn("drift_kl", "drift KL", ".4f"),
    SuiteColumn("usable_horizon", "usable horizon", "s"),
    SuiteColumn("he_change", "HE change", ".4g"),
    # The collapse diagnostics (CollapseDiagnosticsCallback), each a mean over the edited layers.
    SuiteColumn("weight_growth", "‖W‖/‖W₀‖", ".2f"),
    SuiteColumn("update_ratio", "‖W−W₀‖/‖W₀‖", ".2f"),
    SuiteColumn("principal_share", "principal share", ".3f"),
    SuiteColumn("principal_share_random", "r/d", ".3f"),
    SuiteColumn("key_leak", "key leak", ".3f"),
    SuiteColumn("update_principal_share", "principal share of W−W₀", ".3f", optional=True),
    SuiteColumn("original_principal_share", "W−W₀ share in W₀'s space", ".3f", optional=True),
    SuiteColumn("principal_overlap", "overlap with W₀'s space", ".3f", optional=True),
    SuiteColumn("v_norm", "‖v*‖", ".2f"),
    SuiteColumn("edit_seconds", "edit seconds", ".0f"),
    SuiteColumn("measured_seconds", "measured seconds", ".0f"),
    SuiteColumn("wall_seconds", "wall seconds", ".0f"),
)

#: The combined figure's panels: (key, title). Keys of :data:`LOGGED_METRICS` are read at each
#: evaluation, ``energy_change/mean`` and the diagnostics (:meth:`RunLog.diagnostics`) at every
#: batch that logged them.
SUITE_PANELS = (
    *((m.key, m.label) for m in LOGGED_METRICS),
    *((f"{EDIT}{key}", KNOWEDIT_COLUMNS[key]) for key in KNOWEDIT_TRAJECTORIES),
    (HE_CHANGE.key, HE_CHANGE.label),
    ("weight_growth", "‖W‖ / ‖W₀‖"),
    ("update_ratio", "‖W − W₀‖ / ‖W₀‖"),
    ("principal_excess", "principal share of ΔW ÷ r/d"),
    ("key_leak", "key leak ‖ΔW K₀‖ / ‖W K₀‖"),
    ("update_principal_excess", "principal share of W − W₀ ÷ r/d"),
    ("v_norm", "mean ‖v*‖"),
)
#: Panels shown only where some run logged them.
_OPTIONAL_PANELS = {f"{EDIT}{key}" for key in KNOWEDIT_TRAJECTORIES}
#: Panels whose trajectory has a point per batch (the others: per evaluation).
_PER_BATCH = {HE_CHANGE.key, "weight_growth", "update_ratio", "principal_excess", "key_leak",
              "update_principal_excess", "v_norm"}  # fmt: skip


def run_trajectories(log: RunLog) -> dict[str, list[list[float]]]:
    """``{panel key: [[edits, value], ...]}`` of one run for the combined figure and the
    per-evaluation tables (:data:`SUITE_PANELS`)."""
    trajectories: dict[str, list[list[float]]] = {key: [] for key, _ in SUITE_PANELS}
    evaluated = [*(m.key for m in LOGGED_METRICS), *_OPTIONAL_PANELS]
    for step in sorted(log.evaluation_steps):
        edits = log.edits(step)
        for key in evaluated:
            value = log.value(key, step)
            if edits is not None and value is not None:
                trajectories[key].append([edits, value])
    for step in sorted(log.energy_steps):
        edits, value = log.edits(step), log.he_change(step)
        if edits is not None and value is not None:
            trajectories[HE_CHANGE.key].append([edits, value])
    for step in log.diagnostic_steps:
        edits = log.edits(step)
        for key, value in log.diagnostics(step).items():
            if edits is not None and value is not None:
                trajectories[key].append([edits, value])
    return trajectories


def build_suite_table(
    pairs: Sequence[Pair],
    efficacy_threshold: float = EFFICACY_THRESHOLD,
    drift_kl_threshold: float = DRIFT_KL_THRESHOLD,
) -> dict[str, Any]:
    """The combined table (the content of the suite's ``table.json``): one row per editor and
    SPHERE setting, from each run's ``summary.json`` (values ``None`` until it says
    ``finished``), its usable horizon and trajectories from the scalars it holds
    (:meth:`RunLog.horizon`; the label, ``None`` without an evaluation after the first
    edit)."""
    rows = []
    for pair in pairs:
        for run in pair.runs or present_runs(pair.directory):
            directory = pair.directory / run.name
            log = RunLog.read(directory)
            values = summary_values(log.summary if log.finished else {})
            horizon = log.horizon(efficacy_threshold, drift_kl_threshold)
            values["usable_horizon"] = horizon.label if horizon.evaluated else None
            rows.append(
                {
                    "editor": pair.name,
                    "group": pair.group,
                    "seed": pair.seed,
                    "config": pair.describe(),
                    "run": run.name,
                    "label": run.label,
                    "log_dir": str(directory),
                    "finished": log.finished,
                    # A summary.json without scalars (written by a version that did not keep
                    # them) gives final values but no horizon or trajectories.
                    "without_scalars": log.summary is not None and not log.scalars,
                    "values": values,
                    "trajectories": run_trajectories(log) if log.summary is not None else {},
                }
            )
    columns = [
        c
        for c in SUITE_COLUMNS
        if not c.optional or any(row["values"].get(c.key) is not None for row in rows)
    ]
    return {
        "columns": [{"key": c.key, "label": c.label, "fmt": c.fmt} for c in columns],
        "rows": rows,
        "horizon_thresholds": {"efficacy": efficacy_threshold, "drift_kl": drift_kl_threshold},
        "seeds": seed_statistics(rows, [c.key for c in columns if c.fmt != "s"]),
    }


def mean_sd(values: Sequence[float]) -> dict[str, float | int | None]:
    """``{"n", "mean", "sd"}`` of ``values``: ``sd`` the sample standard deviation (n − 1),
    ``None`` below two values; ``mean`` ``None`` without any."""
    n = len(values)
    mean = sum(values) / n if n else None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "sd": sd}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def seed_statistics(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """The suite's runs that are edit orders of one entry (a suite's ``seeds``), one item per
    entry × run: its seeds, which of them finished, the usable horizon of each, the
    :func:`mean_sd` of every final value in ``keys`` over the finished runs, and of every metric
    of :data:`EVALUATION_TABLES` at each number of edits over the runs that logged it there."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("group") is not None:
            groups.setdefault((row["group"], row["run"]), []).append(row)
    items = []
    for (group, run), members in groups.items():
        finished = [r for r in members if r["finished"]]
        final = {
            key: mean_sd([v for r in finished if _finite(v := r["values"].get(key))])
            for key in keys
        }
        evaluations = {}
        for key, _, _ in EVALUATION_TABLES:
            points: dict[int, list[float]] = {}
            for r in members:
                for edits, value in r["trajectories"].get(key, []):
                    points.setdefault(int(edits), []).append(value)
            if points:
                evaluations[key] = {str(e): mean_sd(points[e]) for e in sorted(points)}
        items.append(
            {
                "group": group,
                "run": run,
                "label": members[0]["label"],
                "seeds": [r["seed"] for r in members],
                "finished_seeds": [r["seed"] for r in finished],
                "usable_horizon": [r["values"].get("usable_horizon") for r in members],
                "final": final,
                "evaluations": evaluations,
            }
        )
    return items


def _mean_sd_cell(stat: dict[str, Any] | None, fmt: str, of: int | None = None) -> str:
    """``mean ± sd`` (``mean`` alone from one value, ``—`` from none), with ``(n=k)`` where
    fewer than ``of`` values went into it."""
    if not stat or stat["mean"] is None:
        return MISSING
    fmt = ".0f" if fmt == "d" else fmt  # a mean of counts is a float
    text = format(stat["mean"], fmt)
    if stat["sd"] is not None:
        text += " ± " + format(stat["sd"], fmt.lstrip("+"))
    if of is not None and stat["n"] < of:
        text += f" (n={stat['n']})"
    return text


def format_seed_tables(table: dict[str, Any]) -> list[str]:
    """Markdown lines of the suite's seed statistics (:func:`seed_statistics`); none without."""
    items = table.get("seeds") or []
    if not items:
        return []
    # The columns some finished run recorded (none until one has finished).
    columns = [
        c
        for c in table["columns"]
        if any((item["final"].get(c["key"]) or {}).get("n") for item in items)
    ]
    header = ["entry", "SPHERE", "seeds finished", *(c["label"] for c in columns)]
    lines = [
        "",
        "## Over the edit orders (seeds): mean ± standard deviation",
        "",
        "Each entry ran once per seed of the suite's `seeds` (`data.seed`, the order of the "
        "facts); ± is the sample standard deviation (n − 1) over the runs that finished, "
        "(n=k) marks a value from fewer runs than the entry's seeds.",
        "",
        "| " + " | ".join([*header, "usable horizon per seed"]) + " |",
        "|---|---|---|" + "---:|" * len(columns) + "---|",
    ]
    for item in items:
        seeds = f"{len(item['finished_seeds'])} of {len(item['seeds'])}"
        cells = [item["group"], item["label"].split()[0], seeds]
        cells += [_mean_sd_cell(item["final"].get(c["key"]), c["fmt"]) for c in columns]
        horizons = ", ".join(
            f"{seed}: {h if h is not None else MISSING}"
            for seed, h in zip(item["seeds"], item["usable_horizon"], strict=True)
        )
        lines.append("| " + " | ".join([*cells, horizons]) + " |")
    for key, title, fmt in EVALUATION_TABLES:
        edits = sorted({int(e) for item in items for e in item["evaluations"].get(key, {})})
        if not edits:
            continue
        lines += [
            "",
            f"### {title} at every evaluation, mean ± sd over the seeds",
            "",
            "| entry | SPHERE | " + " | ".join(str(e) for e in edits) + " |",
            "|---|---|" + "---:|" * len(edits),
        ]
        for item in items:
            points = item["evaluations"].get(key, {})
            cells = [item["group"], item["label"].split()[0]]
            cells += [_mean_sd_cell(points.get(str(e)), fmt, len(item["seeds"])) for e in edits]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _run_list(title: str, rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines listing ``rows`` (editor, run, folder) under ``title``; none if empty."""
    if not rows:
        return []
    return ["", title, "", *(f"- {r['editor']} {r['label']}: `{r['log_dir']}`" for r in rows)]


def format_suite_markdown(table: dict[str, Any]) -> str:
    """The suite's ``table.md``: one row per editor × {without, with SPHERE}."""
    columns = table["columns"]
    header = ["editor", "SPHERE", *(c["label"] for c in columns)]
    lines = [
        f"# Every run of the suite `{table.get('suite', '')}`",
        "",
        "| " + " | ".join(header) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for row in table["rows"]:
        cells = [row["editor"], row["label"].split()[0]]
        cells += [_cell(row["values"][c["key"]], c["fmt"]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    unfinished = [row for row in table["rows"] if not row["finished"]]
    lines += [
        "",
        "Every value is the run's `summary.json`, after its last edit (the figure and the "
        "tables below: every evaluation, from the scalars each run's `summary.json` holds):",
        "",
        "- edits: facts written; efficacy, generalization, specificity, fluency (and, on "
        "KnowEdit data, edit success, portability and locality, overall and per probe family, "
        "as EasyEdit scores them): `edit.final`, over all facts edited;",
        "- Δacc: general-ability accuracy minus its value before the first edit;",
        "- drift KL: KL(original ‖ edited) of next-token distributions on held-out text;",
        "- usable horizon: edits at the first evaluation where efficacy < "
        f"{table['horizon_thresholds']['efficacy']:g} or drift KL > "
        f'{table["horizon_thresholds"]["drift_kl"]:g}, "beyond N" if none did in the N '
        "edits made; from every evaluation the run logged (`summary.json`'s `scalars`);",
        "- HE change: mean over the edited layers of HE minus HE before editing;",
        "- collapse diagnostics (`diagnostics.history`, each a mean over the edited layers): "
        "‖W‖/‖W₀‖ and ‖W−W₀‖/‖W₀‖ after the last edit against the unedited weight; principal "
        "share: the share of the editor's ΔW (before SPHERE) in SPHERE's principal space, mean "
        "over every batch, next to r/d, a random direction's share; key leak: ‖ΔW K₀‖/‖W K₀‖ of "
        "the last batch on the preserved keys; principal share of W−W₀ (where measured): the "
        "share of the accumulated update in the same space after the last edit; W−W₀ share in "
        "W₀'s space and overlap with W₀'s space (where measured): its share in the unedited "
        "weight's principal space, and how much of that space the current one still spans (1: "
        "unchanged); ‖v*‖: the last batch's mean target-value norm;",
        "- edit seconds: time spent computing, transforming and applying the edits "
        f"(`phase_seconds` of {', '.join(EDIT_PHASES)}), summed over every batch, also across "
        "resumes;",
        "- measured seconds: every phase of `phase_seconds` summed (edits, evaluations, HE), the "
        "run's whole measured work, also across resumes (model loading and start-up excluded);",
        "- wall seconds: `wall_seconds` of the run's last `fit` process, evaluations included (a "
        "resumed run counts from its resume);",
        f"- {MISSING}: not recorded (the run logs no such metric, or has no `summary.json`).",
    ]
    lines += _run_list("Not finished (still running, failed or stopped):", unfinished)
    lines += _run_list(
        "No logged scalars in `summary.json` (written by an older version of this project), so "
        "no usable horizon and no row in the tables below; the TensorBoard event files in the "
        "folder hold every evaluation:",
        [row for row in table["rows"] if row.get("without_scalars")],
    )
    lines += format_seed_tables(table)
    for key, title, fmt in EVALUATION_TABLES:
        if key in _OPTIONAL_PANELS and not _any_logged(table, key):
            continue
        lines += ["", *format_trajectory_table(table, key, title, fmt)]
    return "\n".join(lines) + "\n"


#: The metrics the suite's ``table.md`` lists at every evaluation: (key, title, format).
EVALUATION_TABLES = (
    *((f"{EDIT}{key}", KNOWEDIT_COLUMNS[key].capitalize(), ".3f") for key in KNOWEDIT_TRAJECTORIES),
    (EFFICACY, "Efficacy", ".3f"),
    (GENERALIZATION, "Generalization", ".3f"),
    (SPECIFICITY, "Specificity", ".3f"),
    (DRIFT_KL, "Drift KL", ".3f"),
)


def format_trajectory_table(table: dict[str, Any], key: str, title: str, fmt: str) -> list[str]:
    """Lines of a markdown table of one metric: a row per run, a column per number of edits at
    which any run logged it."""
    edits = sorted({int(x) for row in table["rows"] for x, _ in row["trajectories"].get(key, [])})
    lines = [f"## {title} at every evaluation", ""]
    if not edits:
        return [*lines, "(not logged yet)"]
    lines += [
        "| editor | SPHERE | " + " | ".join(str(e) for e in edits) + " |",
        "|---|---|" + "---:|" * len(edits),
    ]
    for row in table["rows"]:
        values = {int(x): y for x, y in row["trajectories"].get(key, [])}
        cells = [row["editor"], row["label"].split()[0]]
        cells += [_cell(values.get(e), fmt) for e in edits]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _any_logged(table: dict[str, Any], key: str) -> bool:
    """Whether any run of the suite ``table`` has a trajectory of ``key``."""
    return any(row["trajectories"].get(key) for row in table["rows"])


def plot_suite(table: dict[str, Any], path: Path) -> None:
    """The suite's ``figure.png``: a panel per quantity of :data:`SUITE_PANELS` some run logged,
    against the number of edits; a colour per editor, solid with SPHERE and dashed without."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Panels no run logged are left out (all of them are drawn, marked, before anything is).
    logged = [(key, title) for key, title in SUITE_PANELS if _any_logged(table, key)]
    panels = logged or [(k, t) for k, t in SUITE_PANELS if k not in _OPTIONAL_PANELS]
    columns = 4
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.3 * rows), squeeze=False)
    editors = list(dict.fromkeys(row["editor"] for row in table["rows"]))
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        plotted = False
        for row in table["rows"]:
            points = row["trajectories"].get(key) or []
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            ax.plot(
                xs,
                ys,
                color=f"C{editors.index(row['editor']) % 10}",
                linestyle="-" if row["run"] == WITH_SPHERE.name else "--",
                marker=None if key in _PER_BATCH else "o",
                markersize=3,
                linewidth=1.2,
                label=f"{row['editor']} {row['label']}",
            )
            plotted = True
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("edits")
        ax.grid(alpha=0.3)
        if not plotted:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = next(
        (ax.get_legend_handles_labels() for ax in axes.flat if ax.get_legend_handles_labels()[0]),
        ([], []),
    )
    if handles:
        fig.legend(handles, labels, loc="lower right", fontsize="small", ncol=2)
    fig.suptitle(
        f"Every run of the suite '{table.get('suite', '')}': "
        "without SPHERE dashed, with SPHERE solid"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_suite_report(
    out: Path,
    pairs: Sequence[Pair],
    efficacy_threshold: float = EFFICACY_THRESHOLD,
    drift_kl_threshold: float = DRIFT_KL_THRESHOLD,
) -> tuple[Path, Path, Path]:
    """Write the combined ``table.md``, ``table.json`` and ``figure.png`` into ``out``, titled
    after the folder (the suite's name by default); returns their paths."""
    table = build_suite_table(pairs, efficacy_threshold, drift_kl_threshold)
    table["suite"] = out.resolve().name
    return _write_outputs(out, table, format_suite_markdown, plot_suite)


def _write_outputs(
    out: Path,
    table: dict[str, Any],
    markdown_of: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], None],
) -> tuple[Path, Path, Path]:
    """Write ``table`` into ``out`` as ``table.md`` (``markdown_of``), ``table.json`` and
    ``figure.png`` (``plot``); returns their paths."""
    markdown, data, figure = out / "table.md", out / "table.json", out / "figure.png"
    markdown.write_text(markdown_of(table))
    data.write_text(json.dumps(table, indent=2))
    plot(table, figure)
    return markdown, data, figure
