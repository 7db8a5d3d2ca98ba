"""SPHERE against the base editor: one command runs a config with and without SPHERE and compares.

``python -m sphere_lightning.experiments --config configs/experiments/alphaedit.yaml
--dataset ../shared/data/counterfact/counterfact-edit.json`` runs the config as given ("with
SPHERE") and the same config with every
:class:`~sphere_lightning.callbacks.SphereProjectionCallback` removed ("without SPHERE") as two
``python -m sphere_lightning fit`` processes, side by side by default, then reads both runs'
TensorBoard event files and ``summary.json`` and writes the comparison at every evaluation step.
``--out`` then holds:

- ``with_sphere.yaml``, ``without_sphere.yaml``: the two run configs (each can be rerun by hand);
- ``with_sphere/``, ``without_sphere/``: the runs' TensorBoard folders (events, ``config.yaml``,
  ``summary.json``) and ``fit.log``, the output of each run;
- ``table.md``, ``table.json``, ``figure.png``: the comparison.

The runner only launches and reads runs; everything a run does is in its config.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

#: The callback the "without SPHERE" run drops.
SPHERE_CALLBACK = "sphere_lightning.callbacks.SphereProjectionCallback"
TENSORBOARD_LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"


@dataclass(frozen=True)
class Run:
    """One of the two runs of a comparison: its folder name under ``--out`` and its label."""

    name: str
    label: str


WITHOUT_SPHERE = Run("without_sphere", "without SPHERE")
WITH_SPHERE = Run("with_sphere", "with SPHERE")
#: Table columns and figure legends follow this order.
RUNS = (WITHOUT_SPHERE, WITH_SPHERE)


@dataclass(frozen=True)
class Metric:
    """A column of the comparison: where its value comes from, its label and number format."""

    key: str
    label: str
    fmt: str


#: Metrics read as logged, under their TensorBoard tags.
LOGGED_METRICS = (
    Metric("edit/efficacy", "efficacy", ".3f"),
    Metric("edit/generalization", "generalization", ".3f"),
    Metric("edit/specificity", "specificity", ".3f"),
    Metric("edit/fluency", "fluency", ".1f"),  # ×100 n-gram entropy, as in the papers
    Metric("general_change/sst2/accuracy", "SST-2 accuracy change", "+.3f"),
    Metric("general_change/nli/accuracy", "NLI accuracy change", "+.3f"),
    Metric("drift/kl", "drift KL", ".4f"),
)
#: Mean of ``energy_change/<layer>`` over the edited layers.
HE_CHANGE = Metric("energy_change/mean", "HE change", ".4g")
#: Seconds from the run's first event to its last event at the step.
WALL_TIME = Metric("wall_seconds", "wall time [s]", ".0f")
METRICS = (*LOGGED_METRICS, HE_CHANGE, WALL_TIME)

MISSING = "—"
_ENERGY_CHANGE = "energy_change/"


# ------------------------------------------------------------------------------- configs


def is_sphere_callback(entry: Any) -> bool:
    """Whether a ``trainer.callbacks`` entry (``class_path`` mapping or string) is SPHERE's
    projection or a subclass of it."""
    class_path = entry.get("class_path") if isinstance(entry, dict) else entry
    if not isinstance(class_path, str):
        return False
    if class_path == SPHERE_CALLBACK or class_path.rsplit(".", 1)[-1] == "SphereProjectionCallback":
        return True
    if "." not in class_path:
        return False
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return False  # fit reports the unknown class; here it is simply not SPHERE
    from sphere_lightning.callbacks import SphereProjectionCallback

    return isinstance(cls, type) and issubclass(cls, SphereProjectionCallback)


def _callback_lists(config: dict[str, Any]) -> Iterable[tuple[str, Any]]:
    trainer = config.get("trainer") or {}
    for key in ("callbacks", "callbacks+"):
        if trainer.get(key) is not None:
            yield key, trainer[key]


def count_sphere_callbacks(config: dict[str, Any]) -> int:
    """How many SPHERE callbacks a run config lists."""
    total = 0
    for _, entries in _callback_lists(config):
        entries = entries if isinstance(entries, list) else [entries]
        total += sum(is_sphere_callback(entry) for entry in entries)
    return total


def without_sphere(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a run config with every SPHERE callback removed and nothing else changed."""
    derived = copy.deepcopy(config)
    trainer = derived.get("trainer") or {}
    for key, entries in list(_callback_lists(derived)):
        if isinstance(entries, list):
            trainer[key] = [entry for entry in entries if not is_sphere_callback(entry)]
        elif is_sphere_callback(entries):
            trainer[key] = []
    return derived


def run_config(
    config: dict[str, Any], dataset: str, out: Path, run: Run, num_edits: int | None = None
) -> dict[str, Any]:
    """A copy of ``config`` that edits ``dataset`` and logs to TensorBoard in ``out/<run name>``.

    A TensorBoard logger in ``config`` keeps its other settings; any other logger is replaced,
    since the comparison reads TensorBoard event files.
    """
    derived = copy.deepcopy(config)
    derived.setdefault("data", {})
    derived["data"]["dataset"] = dataset
    if num_edits is not None:
        derived["data"]["num_edits"] = num_edits
    trainer = derived.setdefault("trainer", {})
    logger = trainer.get("logger")
    init_args: dict[str, Any] = {"default_hp_metric": False}
    if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
        init_args = dict(logger.get("init_args") or {})
    init_args.update(save_dir=str(out), name="", version=run.name)
    trainer["logger"] = {"class_path": TENSORBOARD_LOGGER, "init_args": init_args}
    return derived


def write_run_config(config: dict[str, Any], path: Path, source: Path, note: str) -> None:
    """Write a derived run config with a header saying where it came from and how to rerun it."""
    header = (
        f"# Derived from {source} by `python -m sphere_lightning.experiments`: {note}.\n"
        f"# Rerun by hand from {Path.cwd()} (move the run's folder away first):\n"
        f"#   python -m sphere_lightning fit --config {path}\n"
    )
    path.write_text(header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


# ------------------------------------------------------------------------------- running


@dataclass
class RunProcess:
    """A ``fit`` subprocess of one run, its log file and its outcome."""

    run: Run
    config: Path
    log: Path
    process: subprocess.Popen | None = None
    log_handle: TextIO | None = None
    started: float = 0.0
    finished: float | None = None
    returncode: int | None = None

    def start(self, threads: int) -> None:
        """Start ``python -m sphere_lightning fit --config <config>``, output to the log."""
        env = dict(os.environ)
        env.update(
            OMP_NUM_THREADS=str(threads),
            MKL_NUM_THREADS=str(threads),
            PYTHONUNBUFFERED="1",
            TOKENIZERS_PARALLELISM="false",
        )
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log_handle = self.log.open("w")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sphere_lightning", "fit", "--config", str(self.config)],
            stdout=self.log_handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    def poll(self) -> int | None:
        """The exit code once the process has ended (its log is then closed), else ``None``."""
        if self.process is None or self.returncode is not None:
            return self.returncode
        code = self.process.poll()
        if code is not None:
            self.returncode = code
            self.finished = time.monotonic()
            if self.log_handle is not None:
                self.log_handle.close()
        return code

    def stop(self) -> None:
        """Terminate the process (if it still runs) and wait for it."""
        if self.process is not None and self.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.poll()

    @property
    def failed(self) -> bool:
        """Whether the process ended with a non-zero exit code."""
        return self.returncode not in (None, 0)

    def status(self) -> str:
        """``<label>: <state> <elapsed> <progress>`` for the status line."""
        if self.process is None:
            return f"{self.run.label}: waiting"
        end = self.finished if self.finished is not None else time.monotonic()
        elapsed = _clock(end - self.started)
        if self.returncode is None:
            return f"{self.run.label}: {elapsed} {log_progress(self.log)}".rstrip()
        state = "done" if self.returncode == 0 else f"FAILED (exit {self.returncode})"
        return f"{self.run.label}: {state} after {elapsed}"

    def failure_message(self, lines: int = 15) -> str:
        """Which run failed, where its log is, and the log's last lines."""
        tail = _log_tail(self.log).splitlines()[-lines:]
        return (
            f"run '{self.run.label}' failed (exit code {self.returncode}); its log: {self.log}\n"
            + "\n".join(f"    {line}" for line in tail)
        )


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def _log_tail(log: Path, size: int = 32_768) -> str:
    if not log.is_file():
        return ""
    with log.open("rb") as handle:
        handle.seek(max(0, log.stat().st_size - size))
        return handle.read().decode("utf-8", errors="replace")


#: Lightning's training progress bar, e.g. ``Epoch 0:  35%|███▌      | 7/20 [12:01<22:03, ...]``.
_TRAIN_PROGRESS = re.compile(r"Epoch \d+:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def log_progress(log: Path, width: int = 60) -> str:
    """What a run is doing, from the end of its log: the batch count of Lightning's progress
    bar (``batch 7/20``) and the last line (up to ``width`` characters), if that is something
    else (e.g. validation)."""
    tail = _log_tail(log)
    batches = _TRAIN_PROGRESS.findall(tail)
    lines = [s.strip() for s in re.split(r"[\r\n]", tail) if s.strip()]
    last = lines[-1] if lines else ""
    parts = []
    if batches:
        parts.append(f"batch {batches[-1][0]}/{batches[-1][1]}")
    if last and not _TRAIN_PROGRESS.search(last):
        parts.append(last if len(last) <= width else last[: width - 1] + "…")
    return " · ".join(parts)


class StatusLine:
    """One live line on a terminal (rewritten in place), or a line a minute in a log file."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.interval = 2.0 if self.live else 60.0
        self._last = -math.inf
        self._shown = False

    def show(self, text: str, force: bool = False) -> None:
        """Write ``text`` if the interval has passed (or ``force``)."""
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        if self.live:
            width = shutil.get_terminal_size((120, 20)).columns - 1
            self.stream.write("\r" + text[:width].ljust(width))
            self._shown = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """Write a message on its own lines (below the live line)."""
        self.end()
        self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        """Leave the live line as it is and move below it."""
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


def run_all(processes: Sequence[RunProcess], threads: int, sequential: bool) -> None:
    """Run the processes side by side (or one after another), with a status line; a failed run
    is reported at once and the others carry on."""
    status = StatusLine()
    pending = list(processes)
    running: list[RunProcess] = []
    try:
        while pending or running:
            while pending and (not sequential or not running):
                process = pending.pop(0)
                process.start(threads)
                running.append(process)
                status.message(f"started '{process.run.label}': log {process.log}")
            for process in list(running):
                if process.poll() is not None:
                    running.remove(process)
                    if process.failed:
                        status.message(process.failure_message())
                    else:
                        status.message(f"finished '{process.run.label}'")
            status.show("  |  ".join(p.status() for p in processes), force=False)
            time.sleep(0.5)
    except KeyboardInterrupt:
        status.message("interrupted: stopping the runs")
        for process in processes:
            process.stop()
        raise
    finally:
        status.end()


# ------------------------------------------------------------------------------- reading


@dataclass
class RunLog:
    """What one run logged: scalars by tag and step, event times, summary and config.

    A tag logged twice at one step keeps its last value (by wall time).
    """

    directory: Path
    scalars: dict[str, dict[int, float]] = field(default_factory=dict)
    step_wall_time: dict[int, float] = field(default_factory=dict)
    first_wall_time: float | None = None
    summary: dict[str, Any] | None = None
    config: dict[str, Any] | None = None

    @classmethod
    def read(cls, directory: Path) -> RunLog:
        """Read every TensorBoard event file under ``directory``, its ``summary.json`` and
        ``config.yaml`` (each may be absent: the run may still be going)."""
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        log = cls(directory=directory)
        events: list[tuple[float, str, int, float]] = []
        for path in sorted(directory.rglob("events.out.tfevents*")):
            accumulator = EventAccumulator(
                str(path), size_guidance={"scalars": 0}, purge_orphaned_data=False
            )
            accumulator.Reload()
            try:
                first = accumulator.FirstEventTimestamp()
            except ValueError:  # an empty file
                continue
            if log.first_wall_time is None or first < log.first_wall_time:
                log.first_wall_time = first
            for tag in accumulator.Tags()["scalars"]:
                events += [(e.wall_time, tag, e.step, e.value) for e in accumulator.Scalars(tag)]
        for wall_time, tag, step, value in sorted(events):
            log.scalars.setdefault(tag, {})[step] = value
            log.step_wall_time[step] = max(wall_time, log.step_wall_time.get(step, wall_time))
        summary = directory / "summary.json"
        if summary.is_file():
            log.summary = json.loads(summary.read_text())
        config = directory / "config.yaml"
        if config.is_file():
            log.config = yaml.safe_load(config.read_text())
        elif log.summary is not None:
            log.config = log.summary.get("config")
        return log

    def value(self, tag: str, step: int) -> float | None:
        """The scalar ``tag`` at ``step``, or ``None``."""
        return self.scalars.get(tag, {}).get(step)

    def energy_change(self, step: int) -> dict[str, float]:
        """``{layer: HE − HE before editing}`` at ``step``."""
        return {
            tag.removeprefix(_ENERGY_CHANGE): values[step]
            for tag, values in sorted(self.scalars.items())
            if tag.startswith(_ENERGY_CHANGE) and step in values
        }

    def he_change(self, step: int) -> float | None:
        """Mean HE change over the edited layers at ``step``."""
        layers = self.energy_change(step)
        return sum(layers.values()) / len(layers) if layers else None

    def wall_seconds(self, step: int) -> float | None:
        """Seconds from the run's first event to its last event at ``step``."""
        if self.first_wall_time is None or step not in self.step_wall_time:
            return None
        return self.step_wall_time[step] - self.first_wall_time

    def edits(self, step: int) -> int | None:
        """Facts written after ``step`` batches: logged ``edit/num_edited``, else from the
        config's ``edits_per_step`` (and ``num_edits``)."""
        if step == 0:
            return 0
        logged = self.value("edit/num_edited", step)
        if logged is not None:
            return int(logged)
        data = (self.config or {}).get("data") or {}
        if "edits_per_step" not in data:
            return None
        edits = step * int(data["edits_per_step"])
        return min(edits, int(data["num_edits"])) if "num_edits" in data else edits

    @property
    def evaluation_steps(self) -> set[int]:
        """Steps at which any logged metric of the table was written."""
        return {step for m in LOGGED_METRICS for step in self.scalars.get(m.key, {})}

    @property
    def energy_steps(self) -> set[int]:
        """Steps at which HE was written (every batch, usually)."""
        return {
            step
            for tag, values in self.scalars.items()
            if tag.startswith(_ENERGY_CHANGE)
            for step in values
        }

    def row(self, step: int) -> dict[str, Any]:
        """Every metric of the table at ``step`` (``None`` where not logged)."""
        values: dict[str, Any] = {m.key: self.value(m.key, step) for m in LOGGED_METRICS}
        values[HE_CHANGE.key] = self.he_change(step)
        values["energy_change/per_layer"] = self.energy_change(step)
        values[WALL_TIME.key] = self.wall_seconds(step)
        return values


# ------------------------------------------------------------------------------- report


def build_table(out: Path) -> dict[str, Any]:
    """The comparison of the two runs under ``out`` (the content of ``table.json``).

    Rows are the evaluation steps of either run (steps at which an edit, general-ability or drift
    metric was logged; HE steps if there are none).
    """
    logs = {run.name: RunLog.read(out / run.name) for run in RUNS}
    steps = set().union(*(log.evaluation_steps for log in logs.values()))
    if not steps:
        steps = set().union(*(log.energy_steps for log in logs.values()))
    rows = []
    for step in sorted(steps):
        edits = next((e for log in logs.values() if (e := log.edits(step)) is not None), None)
        row: dict[str, Any] = {"step": step, "edits": edits}
        row.update({name: log.row(step) for name, log in logs.items()})
        rows.append(row)
    runs = {}
    for run in RUNS:
        log = logs[run.name]
        summary = log.summary or {}
        runs[run.name] = {
            "label": run.label,
            "log_dir": str(log.directory),
            "finished": log.summary is not None,
            "wall_seconds": summary.get("wall_seconds"),
            "num_edited": summary.get("num_edited"),
            "global_step": summary.get("global_step"),
        }
    return {
        "runs": runs,
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


def format_markdown(table: dict[str, Any]) -> str:
    """``table.md``: one row per number of edits, two columns (without / with SPHERE) per metric."""
    header = ["edits"]
    for metric in METRICS:
        header += [f"{metric.label} ({run.label.split()[0]})" for run in RUNS]
    lines = [
        "# SPHERE vs the base editor",
        "",
        "Each metric has two columns: the run without SPHERE (every SphereProjectionCallback "
        "removed) and the run with SPHERE (the config as given).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---:|" * len(header),
    ]
    for row in table["rows"]:
        cells = [MISSING if row["edits"] is None else str(row["edits"])]
        for metric in METRICS:
            cells += [_cell(row[run.name][metric.key], metric.fmt) for run in RUNS]
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
        "- wall time: seconds from the run's first TensorBoard event to its last one at that step;",
        f"- {MISSING}: not logged at that step (or not yet).",
        "",
        "Runs:",
        "",
    ]
    for run in RUNS:
        info = table["runs"][run.name]
        if info["finished"]:
            state = (
                f"finished: {info['num_edited']} edits in {_cell(info['wall_seconds'], '.0f')} s "
                "(`summary.json`)"
            )
        else:
            state = "no `summary.json`: still running, failed or stopped"
        lines.append(f"- {run.label}: `{info['log_dir']}` — {state}")
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
        for index, run in enumerate(RUNS):
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


def write_report(out: Path) -> tuple[Path, Path, Path]:
    """Write ``table.md``, ``table.json`` and ``figure.png`` into ``out``; returns their paths."""
    table = build_table(out)
    markdown, data, figure = out / "table.md", out / "table.json", out / "figure.png"
    markdown.write_text(format_markdown(table))
    data.write_text(json.dumps(table, indent=2))
    plot_comparison(table, figure)
    return markdown, data, figure


# ------------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m sphere_lightning.experiments``."""
    parser = argparse.ArgumentParser(
        prog="python -m sphere_lightning.experiments",
        description=(
            "Run an edit config with SPHERE (as given) and without it (every "
            "SphereProjectionCallback removed) as two `python -m sphere_lightning fit` "
            "processes, then write table.md, table.json and figure.png comparing them at every "
            "evaluation step."
        ),
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="run config with at least one SphereProjectionCallback, e.g. "
        "configs/experiments/alphaedit.yaml (required unless --report-only with --out)",
    )
    parser.add_argument(
        "--dataset",
        help="edit data for both runs (data.dataset), e.g. "
        "../shared/data/counterfact/counterfact-edit.json (required unless --report-only)",
    )
    parser.add_argument(
        "--num-edits",
        type=int,
        help="facts each run edits (data.num_edits; default: the config's)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for both runs, their configs and logs, and the report; it must not hold "
        "runs already (default: logs/experiments/<config name>)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS and MKL_NUM_THREADS of each run (default: 1)",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="run without SPHERE first, then with SPHERE (default: both at once)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only (re)write the report from the runs already under --out (finished or not)",
    )
    return parser


def _prepare_model(config: dict[str, Any]) -> None:
    """Convert an embedded or GGUF model once, before two runs would convert it at once."""
    from sphere_lightning.models.loading import resolve_model_path

    resolve_model_path(str((config.get("model") or {}).get("model", "smollm2-135m")))


def _existing_runs(out: Path) -> list[Path]:
    return [
        out / run.name
        for run in RUNS
        if (out / run.name / "summary.json").exists()
        or any((out / run.name).rglob("events.out.tfevents*"))
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison (or only its report); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None:
        if args.config is None:
            parser.error("--config or --out is required")
        args.out = Path("logs") / "experiments" / args.config.stem
    if args.report_only:
        if not any((args.out / run.name).is_dir() for run in RUNS):
            parser.error(
                f"--report-only: no runs under --out {args.out} "
                f"(expected {' and '.join(run.name + '/' for run in RUNS)})"
            )
        return _report(args.out)

    if args.config is None:
        parser.error("--config is required")
    if args.dataset is None:
        parser.error(
            "--dataset is required (e.g. ../shared/data/counterfact/counterfact-edit.json)"
        )
    if args.threads < 1:
        parser.error(f"--threads should be ≥ 1, got {args.threads}")
    if args.num_edits is not None and args.num_edits < 1:
        parser.error(f"--num-edits should be ≥ 1, got {args.num_edits}")
    if not args.config.is_file():
        parser.error(f"--config {args.config}: no such file")
    config = yaml.safe_load(args.config.read_text()) or {}
    if count_sphere_callbacks(config) == 0:
        parser.error(
            f"--config {args.config} has no {SPHERE_CALLBACK} in trainer.callbacks: "
            "nothing to compare"
        )
    existing = _existing_runs(args.out)
    if existing:
        parser.error(
            f"--out {args.out} already holds run(s) {', '.join(map(str, existing))}: choose "
            "another --out, delete them, or use --report-only"
        )

    args.out.mkdir(parents=True, exist_ok=True)
    processes = []
    for run in RUNS:
        derived = run_config(config, args.dataset, args.out, run, args.num_edits)
        note = "the config as given"
        if run is WITHOUT_SPHERE:
            derived, note = without_sphere(derived), "every SphereProjectionCallback removed"
        path = args.out / f"{run.name}.yaml"
        write_run_config(derived, path, args.config, note)
        processes.append(RunProcess(run, path, args.out / run.name / "fit.log"))
    try:
        _prepare_model(config)
    except Exception as error:  # the runs would fail the same way, twice
        print(f"error: cannot load model.model of {args.config}: {error}", file=sys.stderr)
        return 1
    try:
        run_all(processes, args.threads, args.sequential)
    except KeyboardInterrupt:
        print(f"interrupted; logs under {args.out}", file=sys.stderr)
        return 130
    code = _report(args.out)
    failed = [p for p in processes if p.failed]
    for process in failed:
        print(
            f"error: run '{process.run.label}' failed (exit code {process.returncode}); "
            f"its log: {process.log}",
            file=sys.stderr,
        )
    return 1 if failed else code


def _report(out: Path) -> int:
    markdown, data, figure = write_report(out)
    print(markdown.read_text())
    print(f"Wrote {markdown}, {data} and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
