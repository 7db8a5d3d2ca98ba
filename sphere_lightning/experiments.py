"""SPHERE against the base editors: one command runs configs with and without SPHERE and compares.

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

Several configs (``--config a.yaml b.yaml`` or ``--suite configs/experiments/suite.yaml``) run
every pair, ``--parallel`` processes at a time; each pair's output goes to
``<out>/<config name>/`` as above, and ``<out>/table.md`` and ``<out>/table.json`` hold one
combined table, a row per editor and SPHERE setting, from the runs' ``summary.json``.

A run with a ``summary.json`` is not run again; a run with a ``last.ckpt`` and no summary is
resumed from it (``fit --ckpt_path``). The runner only launches and reads runs; everything a run
does is in its config.
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

from sphere_lightning.horizon import (
    DRIFT_KL_THRESHOLD,
    EFFICACY_THRESHOLD,
    Evaluation,
    UsableHorizon,
    check_thresholds,
    usable_horizon,
)

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
#: Values of ``--runs`` and of a suite's ``runs``.
RUN_CHOICES = ("both", *(run.name for run in RUNS))


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
_DIAGNOSTICS = "diag/"


def _mean(values: Iterable[float | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


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


def write_run_config(config: dict[str, Any], path: Path, source: Path | str, note: str) -> None:
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
    """A ``fit`` subprocess of one run, its log file and its outcome.

    With ``ckpt_path`` the run continues from that checkpoint (``fit --ckpt_path``) and its log
    is appended to; otherwise the log is started afresh. ``name`` is how the status line and the
    messages call the run (default: the run's label).
    """

    run: Run
    config: Path
    log: Path
    ckpt_path: Path | None = None
    name: str = ""
    process: subprocess.Popen | None = None
    log_handle: TextIO | None = None
    started: float = 0.0
    finished: float | None = None
    returncode: int | None = None

    def __post_init__(self) -> None:
        self.name = self.name or self.run.label

    def command(self) -> list[str]:
        """``python -m sphere_lightning fit --config <config> [--ckpt_path <checkpoint>]``."""
        command = [sys.executable, "-m", "sphere_lightning", "fit", "--config", str(self.config)]
        if self.ckpt_path is not None:
            command += ["--ckpt_path", str(self.ckpt_path)]
        return command

    def start(self, threads: int) -> None:
        """Start :meth:`command`, output to the log."""
        env = dict(os.environ)
        env.update(
            OMP_NUM_THREADS=str(threads),
            MKL_NUM_THREADS=str(threads),
            PYTHONUNBUFFERED="1",
            TOKENIZERS_PARALLELISM="false",
        )
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log_handle = self.log.open("w" if self.ckpt_path is None else "a")
        if self.ckpt_path is not None:
            self.log_handle.write(f"\n=== resumed from {self.ckpt_path} ===\n")
            self.log_handle.flush()
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            self.command(),
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
            return f"{self.name}: waiting"
        end = self.finished if self.finished is not None else time.monotonic()
        elapsed = _clock(end - self.started)
        if self.returncode is None:
            return f"{self.name}: {elapsed} {log_progress(self.log)}".rstrip()
        state = "done" if self.returncode == 0 else f"FAILED (exit {self.returncode})"
        return f"{self.name}: {state} after {elapsed}"

    def failure_message(self, lines: int = 15) -> str:
        """Which run failed, where its log is, and the log's last lines."""
        tail = _log_tail(self.log).splitlines()[-lines:]
        return (
            f"run '{self.name}' failed (exit code {self.returncode}); its log: {self.log}\n"
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


def run_all(processes: Sequence[RunProcess], threads: int, parallel: int = 2) -> None:
    """Run the processes, at most ``parallel`` at a time in list order, with a status line; a
    failed run is reported at once and the others carry on."""
    if parallel < 1:
        raise ValueError(f"`parallel` should be ≥ 1, got {parallel}")
    status = StatusLine()
    pending = list(processes)
    running: list[RunProcess] = []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                process = pending.pop(0)
                process.start(threads)
                running.append(process)
                how = f"resumed from {process.ckpt_path}" if process.ckpt_path else "started"
                status.message(f"{how} '{process.name}': log {process.log}")
            for process in list(running):
                if process.poll() is not None:
                    running.remove(process)
                    if process.failed:
                        status.message(process.failure_message())
                    else:
                        status.message(f"finished '{process.name}'")
            status.show(_status_text(processes, running), force=False)
            time.sleep(0.5)
    except KeyboardInterrupt:
        status.message("interrupted: stopping the runs")
        for process in processes:
            process.stop()
        raise
    finally:
        status.end()


def _status_text(processes: Sequence[RunProcess], running: Sequence[RunProcess]) -> str:
    """Every run's status for a pair; for more runs, the counts and the running ones."""
    if len(processes) <= 2:
        return "  |  ".join(p.status() for p in processes)
    done = sum(p.returncode is not None for p in processes)
    waiting = len(processes) - done - len(running)
    counts = f"{done}/{len(processes)} ended, {waiting} waiting"
    return "  |  ".join([counts, *(p.status() for p in running)])


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

    def horizon(
        self,
        efficacy_threshold: float = EFFICACY_THRESHOLD,
        drift_kl_threshold: float = DRIFT_KL_THRESHOLD,
    ) -> UsableHorizon:
        """The usable horizon (:func:`~sphere_lightning.horizon.usable_horizon`) over every
        logged ``edit/efficacy`` and ``drift/kl``; N of "beyond N" is ``summary.json``'s
        ``num_edited``, else the edits at the last step logged."""
        efficacy = self.scalars.get("edit/efficacy", {})
        drift = self.scalars.get("drift/kl", {})
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
        prefix = f"{_DIAGNOSTICS}{quantity}/"
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
                if tag.startswith(f"{_DIAGNOSTICS}delta_ratio/")
                for step in values
            }
        )

    def diagnostics(self, step: int) -> dict[str, float | None]:
        """The collapse diagnostics of :data:`DIAGNOSTIC_TRAJECTORIES` at ``step``, each a mean
        over the edited layers: ‖W‖/‖W₀‖ and ‖W − W₀‖/‖W₀‖ (W₀: the weight_norm logged at step
        0), the principal share of the batch's ΔW over r/d (1: as a random direction), the key
        leak and the mean ‖v*‖ (``None`` where not logged)."""
        weights = self.layer_values("weight_norm", step)
        initial = self.layer_values("weight_norm", 0)
        updates = self.layer_values("update_norm", step)
        shares = self.layer_values("principal_share", step)
        randoms = self.layer_values("principal_share_random", step)
        leaks = self.layer_values("key_leak", step)
        share, random = _mean(shares.values()), _mean(randoms.values())
        return {
            "weight_growth": _mean(w / initial[k] for k, w in weights.items() if initial.get(k)),
            "update_ratio": _mean(u / initial[k] for k, u in updates.items() if initial.get(k)),
            "principal_excess": None if share is None or not random else share / random,
            "key_leak": _mean(leaks.values()),
            "v_norm": self.value(f"{_DIAGNOSTICS}v_norm_mean", step),
        }

    def row(self, step: int) -> dict[str, Any]:
        """Every metric of the table at ``step`` (``None`` where not logged)."""
        values: dict[str, Any] = {m.key: self.value(m.key, step) for m in LOGGED_METRICS}
        values[HE_CHANGE.key] = self.he_change(step)
        values["energy_change/per_layer"] = self.energy_change(step)
        values[WALL_TIME.key] = self.wall_seconds(step)
        return values


# ------------------------------------------------------------------------------- report


def present_runs(directory: Path) -> tuple[Run, ...]:
    """The runs of :data:`RUNS` that have a folder under ``directory`` (all of them if none has:
    a report before any run started shows every column empty)."""
    present = tuple(run for run in RUNS if (directory / run.name).is_dir())
    return present or RUNS


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
            "finished": log.summary is not None,
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
        "- wall time: seconds from the run's first TensorBoard event to its last one at that step;",
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
            state = "no `summary.json`: still running, failed or stopped"
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
    markdown, data, figure = out / "table.md", out / "table.json", out / "figure.png"
    markdown.write_text(format_markdown(table))
    data.write_text(json.dumps(table, indent=2))
    plot_comparison(table, figure)
    return markdown, data, figure


# ------------------------------------------------------------------------------- suite


@dataclass(frozen=True)
class Pair:
    """One base editor's comparison: its name (the config's file name, or the suite entry's
    ``name``), config and folder. ``compose`` lists config files that come before ``config``,
    merged in order as ``fit --config a.yaml --config b.yaml`` would merge them."""

    name: str
    config: Path
    directory: Path
    compose: tuple[Path, ...] = ()
    #: ``(dotted key, value)`` set in the merged config after its files (:func:`set_value`).
    settings: tuple[tuple[str, Any], ...] = ()
    #: The runs this pair makes (``None``: the command's ``--runs``, else both).
    runs: tuple[Run, ...] | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        """Every config file of the pair, in the order they are merged."""
        return (*self.compose, self.config)

    def describe(self) -> str:
        """Its config files joined with ``+``, then its settings (``key=value``)."""
        parts = [str(path) for path in self.files]
        parts += [f"{key}={json.dumps(value)}" for key, value in self.settings]
        return " + ".join(parts)

    def load(self) -> dict[str, Any]:
        """The run config: its files merged in order (:func:`load_config`), then its settings."""
        config = load_config(self.files)
        for key, value in self.settings:
            set_value(config, key, value)
        return config


@dataclass(frozen=True)
class SuiteColumn:
    """A column of the combined table: its key in ``table.json``, label and number format."""

    key: str
    label: str
    fmt: str


#: General-ability tasks whose accuracy change has a column, with their labels.
SUITE_TASKS = {"sst2": "SST-2", "nli": "NLI", "boolq": "BoolQ"}
SUITE_COLUMNS = (
    SuiteColumn("num_edited", "edits", "d"),
    SuiteColumn("efficacy", "efficacy", ".3f"),
    SuiteColumn("generalization", "generalization", ".3f"),
    SuiteColumn("specificity", "specificity", ".3f"),
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
    SuiteColumn("v_norm", "‖v*‖", ".2f"),
    SuiteColumn("edit_seconds", "edit seconds", ".0f"),
    SuiteColumn("wall_seconds", "wall seconds", ".0f"),
)

#: The combined figure's panels: (key, title). Keys of :data:`LOGGED_METRICS` are read at each
#: evaluation, ``energy_change/mean`` and the diagnostics (:meth:`RunLog.diagnostics`) at every
#: batch that logged them.
SUITE_PANELS = (
    *((m.key, m.label) for m in LOGGED_METRICS),
    (HE_CHANGE.key, HE_CHANGE.label),
    ("weight_growth", "‖W‖ / ‖W₀‖"),
    ("update_ratio", "‖W − W₀‖ / ‖W₀‖"),
    ("principal_excess", "principal share of ΔW ÷ r/d"),
    ("key_leak", "key leak ‖ΔW K₀‖ / ‖W K₀‖"),
    ("v_norm", "mean ‖v*‖"),
)
#: Panels whose trajectory has a point per batch (the others: per evaluation).
_PER_BATCH = {HE_CHANGE.key, "weight_growth", "update_ratio", "principal_excess", "key_leak",
              "v_norm"}  # fmt: skip

#: The phases of ``summary.json``'s ``phase_seconds`` that write edits into the model.
EDIT_PHASES = ("compute_deltas", "transform_and_apply", "after_apply")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def summary_values(summary: dict[str, Any]) -> dict[str, float | int | None]:
    """The combined table's values of one run, all read from its ``summary.json``.

    Edit metrics are ``edit.final``; an accuracy change is ``general.<task>.final.accuracy``
    minus its ``baseline``; drift KL is ``drift.kl``; HE change is the mean over the edited
    layers of ``energy.<layer>.final − baseline``; edit seconds are the sum of
    ``phase_seconds`` over :data:`EDIT_PHASES` (kept across resumes by the checkpoints), wall
    seconds ``wall_seconds``. A value the run did not record is ``None``.
    """
    values: dict[str, float | int | None] = {}
    num_edited = summary.get("num_edited")
    values["num_edited"] = int(num_edited) if _number(num_edited) is not None else None
    final = (summary.get("edit") or {}).get("final") or {}
    for key in ("efficacy", "generalization", "specificity", "fluency"):
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
    - ``v_norm``: the last batch's mean ‖v*‖.

    ``None`` for what the run did not measure (no CollapseDiagnosticsCallback: all).
    """
    history = ((summary.get("diagnostics") or {}).get("history")) or {}

    def series(tag: str) -> list[float]:
        return [float(v) for v in history.get(tag) or [] if _number(v) is not None]

    def per_layer(quantity: str) -> dict[str, list[float]]:
        prefix = f"{_DIAGNOSTICS}{quantity}/"
        return {tag.removeprefix(prefix): series(tag) for tag in history if tag.startswith(prefix)}

    weights, updates = per_layer("weight_norm"), per_layer("update_norm")
    first = {layer: values[0] for layer, values in weights.items() if values and values[0]}
    shares = [v for values in per_layer("principal_share").values() for v in values]
    randoms = [v for values in per_layer("principal_share_random").values() for v in values]
    v_norms = series(f"{_DIAGNOSTICS}v_norm_mean")
    return {
        "weight_growth": _mean(v[-1] / first[k] for k, v in weights.items() if k in first),
        "update_ratio": _mean(v[-1] / first[k] for k, v in updates.items() if v and k in first),
        "principal_share": _mean(shares),
        "principal_share_random": _mean(randoms),
        "key_leak": _mean(v[-1] for v in per_layer("key_leak").values() if v),
        "v_norm": v_norms[-1] if v_norms else None,
    }


def run_trajectories(log: RunLog) -> dict[str, list[list[float]]]:
    """``{panel key: [[edits, value], ...]}`` of one run for the combined figure and the
    per-evaluation tables (:data:`SUITE_PANELS`)."""
    trajectories: dict[str, list[list[float]]] = {key: [] for key, _ in SUITE_PANELS}
    for step in sorted(log.evaluation_steps):
        edits = log.edits(step)
        for metric in LOGGED_METRICS:
            value = log.value(metric.key, step)
            if edits is not None and value is not None:
                trajectories[metric.key].append([edits, value])
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
    SPHERE setting, from each run's ``summary.json`` (values ``None`` where it has none), and
    its usable horizon from its TensorBoard events (:meth:`RunLog.horizon`; the label, ``None``
    without an evaluation after the first edit)."""
    rows = []
    for pair in pairs:
        for run in pair.runs or present_runs(pair.directory):
            directory = pair.directory / run.name
            summary_path = directory / "summary.json"
            summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
            values = summary_values(summary or {})
            log = RunLog.read(directory) if directory.is_dir() else None
            horizon = log.horizon(efficacy_threshold, drift_kl_threshold) if log else None
            values["usable_horizon"] = horizon.label if horizon and horizon.evaluated else None
            rows.append(
                {
                    "editor": pair.name,
                    "config": pair.describe(),
                    "run": run.name,
                    "label": run.label,
                    "log_dir": str(directory),
                    "finished": summary is not None,
                    "values": values,
                    "trajectories": run_trajectories(log) if log else {},
                }
            )
    return {
        "columns": [{"key": c.key, "label": c.label} for c in SUITE_COLUMNS],
        "rows": rows,
        "horizon_thresholds": {"efficacy": efficacy_threshold, "drift_kl": drift_kl_threshold},
    }


def format_suite_markdown(table: dict[str, Any]) -> str:
    """The suite's ``table.md``: one row per editor × {without, with SPHERE}."""
    header = ["editor", "SPHERE", *(c.label for c in SUITE_COLUMNS)]
    lines = [
        "# Every base editor without and with SPHERE",
        "",
        "| " + " | ".join(header) + " |",
        "|---|---|" + "---:|" * len(SUITE_COLUMNS),
    ]
    for row in table["rows"]:
        cells = [row["editor"], row["label"].split()[0]]
        cells += [_cell(row["values"][c.key], c.fmt) for c in SUITE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    unfinished = [row for row in table["rows"] if not row["finished"]]
    lines += [
        "",
        "Every value is the run's `summary.json`, after its last edit (the figure and the "
        "tables below: every evaluation, from the runs' TensorBoard events):",
        "",
        "- edits: facts written; efficacy, generalization, specificity, fluency: `edit.final`, "
        "over all facts edited;",
        "- Δacc: general-ability accuracy minus its value before the first edit;",
        "- drift KL: KL(original ‖ edited) of next-token distributions on held-out text;",
        "- usable horizon: edits at the first evaluation where efficacy < "
        f"{table['horizon_thresholds']['efficacy']:g} or drift KL > "
        f'{table["horizon_thresholds"]["drift_kl"]:g}, "beyond N" if none did in the N '
        "edits made; from the run's TensorBoard events (every evaluation it logged);",
        "- HE change: mean over the edited layers of HE minus HE before editing;",
        "- collapse diagnostics (`diagnostics.history`, each a mean over the edited layers): "
        "‖W‖/‖W₀‖ and ‖W−W₀‖/‖W₀‖ after the last edit against the unedited weight; principal "
        "share: the share of the editor's ΔW (before SPHERE) in SPHERE's principal space, mean "
        "over every batch, next to r/d, a random direction's share; key leak: ‖ΔW K₀‖/‖W K₀‖ of "
        "the last batch on the preserved keys; ‖v*‖: the last batch's mean target-value norm;",
        "- edit seconds: time spent computing, transforming and applying the edits "
        f"(`phase_seconds` of {', '.join(EDIT_PHASES)}), summed over every batch, also across "
        "resumes;",
        "- wall seconds: `wall_seconds` of the run's last `fit` process, evaluations included (a "
        "resumed run counts from its resume);",
        f"- {MISSING}: not recorded (the run logs no such metric, or has no `summary.json`).",
    ]
    if unfinished:
        lines += ["", "No `summary.json` (still running, failed or stopped):", ""]
        lines += [f"- {row['editor']} {row['label']}: `{row['log_dir']}`" for row in unfinished]
    for key, title, fmt in EVALUATION_TABLES:
        lines += ["", *format_trajectory_table(table, key, title, fmt)]
    return "\n".join(lines) + "\n"


#: The metrics the suite's ``table.md`` lists at every evaluation: (key, title, format).
EVALUATION_TABLES = (
    ("edit/efficacy", "Efficacy", ".3f"),
    ("edit/generalization", "Generalization", ".3f"),
    ("edit/specificity", "Specificity", ".3f"),
    ("drift/kl", "Drift KL", ".3f"),
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


def plot_suite(table: dict[str, Any], path: Path) -> None:
    """The suite's ``figure.png``: a panel per quantity of :data:`SUITE_PANELS` against the
    number of edits; a colour per editor, solid with SPHERE and dashed without."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 4
    rows = math.ceil(len(SUITE_PANELS) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.3 * rows), squeeze=False)
    editors = list(dict.fromkeys(row["editor"] for row in table["rows"]))
    for ax, (key, title) in zip(axes.flat, SUITE_PANELS, strict=False):
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
    for ax in list(axes.flat)[len(SUITE_PANELS) :]:
        ax.axis("off")
    handles, labels = next(
        (ax.get_legend_handles_labels() for ax in axes.flat if ax.get_legend_handles_labels()[0]),
        ([], []),
    )
    if handles:
        fig.legend(handles, labels, loc="lower right", fontsize="small", ncol=2)
    fig.suptitle("Every base editor without (dashed) and with (solid) SPHERE")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_suite_report(
    out: Path,
    pairs: Sequence[Pair],
    efficacy_threshold: float = EFFICACY_THRESHOLD,
    drift_kl_threshold: float = DRIFT_KL_THRESHOLD,
) -> tuple[Path, Path, Path]:
    """Write the combined ``table.md``, ``table.json`` and ``figure.png`` into ``out``; returns
    their paths."""
    table = build_suite_table(pairs, efficacy_threshold, drift_kl_threshold)
    markdown, data, figure = out / "table.md", out / "table.json", out / "figure.png"
    markdown.write_text(format_suite_markdown(table))
    data.write_text(json.dumps(table, indent=2))
    plot_suite(table, figure)
    return markdown, data, figure


def last_checkpoint(run_dir: Path) -> Path | None:
    """``<run_dir>/checkpoints/last.ckpt`` if the run wrote one (``ModelCheckpoint(save_last)``
    under the run's TensorBoard folder), else ``None``."""
    path = run_dir / "checkpoints" / "last.ckpt"
    return path if path.is_file() else None


def _set_aside(run_dir: Path) -> Path:
    """Rename an unfinished run's folder without a checkpoint, so that the run starts afresh
    without mixing two runs' events; returns the new name."""
    index = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.incomplete-{index}")).exists():
        index += 1
    run_dir.rename(aside)
    return aside


def plan_pair(
    pair: Pair,
    config: dict[str, Any],
    dataset: str,
    num_edits: int | None,
    report: Any = print,
    runs: Sequence[Run] = RUNS,
) -> list[RunProcess]:
    """Write the pair's run configs (of ``runs``, default both) and return the runs still to do.

    A run with a ``summary.json`` has finished and is skipped; one with a ``last.ckpt`` and no
    summary is resumed from it; one with a folder but neither is set aside
    (``<run>.incomplete-<n>``) and started again.
    """
    pair.directory.mkdir(parents=True, exist_ok=True)
    processes = []
    for run in runs:
        run_dir = pair.directory / run.name
        name = f"{pair.name} {run.label}"
        if (run_dir / "summary.json").is_file():  # its run config stays as it ran
            report(f"skipping '{name}': finished ({run_dir / 'summary.json'})")
            continue
        derived = run_config(config, dataset, pair.directory, run, num_edits)
        note = "the config as given"
        if run is WITHOUT_SPHERE:
            derived, note = without_sphere(derived), "every SphereProjectionCallback removed"
        path = pair.directory / f"{run.name}.yaml"
        write_run_config(derived, path, pair.describe(), note)
        checkpoint = last_checkpoint(run_dir)
        if checkpoint is None and run_dir.exists():
            report(f"'{name}' stopped before its first checkpoint: {run_dir} moved to "
                   f"{_set_aside(run_dir)}")  # fmt: skip
        processes.append(RunProcess(run, path, run_dir / "fit.log", checkpoint, name))
    return processes


# ------------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m sphere_lightning.experiments``."""
    parser = argparse.ArgumentParser(
        prog="python -m sphere_lightning.experiments",
        description=(
            "Run each edit config with SPHERE (as given) and without it (every "
            "SphereProjectionCallback removed) as `python -m sphere_lightning fit` processes, "
            "then write table.md, table.json and figure.png comparing each pair at every "
            "evaluation step and, for several configs, one combined table of every editor "
            "without and with SPHERE. Finished runs are skipped; a run with a last.ckpt and "
            "no summary.json is resumed from it."
        ),
    )
    parser.add_argument(
        "--config",
        type=Path,
        nargs="+",
        action="extend",
        help="run config(s) with at least one SphereProjectionCallback, one per base editor, "
        "e.g. configs/experiments/alphaedit.yaml (required unless --suite, or --report-only "
        "with --out)",
    )
    parser.add_argument(
        "--suite",
        type=Path,
        help="YAML file listing the configs (`configs: [...]`, relative to the file), e.g. "
        "configs/experiments/suite.yaml; runs them after any --config",
    )
    parser.add_argument(
        "--dataset",
        help="edit data for every run (data.dataset), e.g. "
        "../shared/data/counterfact/counterfact-edit.json (required unless --report-only)",
    )
    parser.add_argument(
        "--num-edits",
        type=int,
        help="facts each run edits (data.num_edits; default: the suite file's num_edits, else "
        "the config's)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for the runs, their configs and logs, and the report (default: "
        "logs/experiments/<config name> for one config, logs/experiments/<suite name> for a "
        "suite, logs/experiments/suite for several configs); with several configs each pair "
        "goes to <out>/<config name>",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=2,
        help="fit processes at a time (default: 2)",
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
        help="one process at a time, without SPHERE first (the same as --parallel 1)",
    )
    parser.add_argument(
        "--runs",
        choices=RUN_CHOICES,
        help="which run of each pair to run (default: the suite entry's or suite's `runs`, "
        "else both); e.g. with_sphere for a long horizon run of the config as given only",
    )
    parser.add_argument(
        "--horizon-efficacy",
        type=float,
        default=EFFICACY_THRESHOLD,
        help="the usable horizon ends at the first evaluation with lifelong efficacy below "
        f"this (default: {EFFICACY_THRESHOLD})",
    )
    parser.add_argument(
        "--horizon-drift-kl",
        type=float,
        default=DRIFT_KL_THRESHOLD,
        help=f"... or with drift KL above this (default: {DRIFT_KL_THRESHOLD})",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only (re)write the reports from the runs already under --out (finished or not)",
    )
    return parser


def _prepare_model(config: dict[str, Any]) -> None:
    """Convert an embedded or GGUF model once, before two runs would convert it at once."""
    from sphere_lightning.models.loading import resolve_model_path

    resolve_model_path(str((config.get("model") or {}).get("model", "smollm2-135m")))


def merge_configs(base: Any, override: Any) -> Any:
    """``override`` merged into ``base`` as jsonargparse merges a second ``--config``: mappings
    key by key, except that a mapping naming another ``class_path`` replaces the old one whole
    (its ``init_args`` belonged to the other class); lists and plain values are replaced."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return copy.deepcopy(override)
    if "class_path" in override and override["class_path"] != base.get("class_path"):
        return copy.deepcopy(override)
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = merge_configs(merged[key], value) if key in merged else copy.deepcopy(value)
    return merged


def load_config(files: Sequence[Path]) -> dict[str, Any]:
    """The run config of ``files`` merged in order (:func:`merge_configs`)."""
    config: dict[str, Any] = {}
    for path in files:
        config = merge_configs(config, yaml.safe_load(path.read_text()) or {})
    return config


def set_value(config: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` of ``config`` to ``value`` in place, as a suite entry's ``set`` does.

    ``key`` is dotted, as a ``fit`` flag: ``model.editor.init_args.l2`` or ``data.seed``. In a
    list, a segment is an index (``trainer.callbacks.2``) or the class name of the one entry
    whose ``class_path`` ends with it (``trainer.callbacks.SphereProjectionCallback.init_args.
    suppression``). Every segment but the last must exist; the last may be new. Raises
    ``ValueError`` naming the key and the segment that does not resolve.
    """
    parts = key.split(".")
    if not key or not all(parts):
        raise ValueError(f"`set` key {key!r} should be dotted names, e.g. data.seed")
    node: Any = config
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "the config"
        if isinstance(node, dict):
            if last:
                node[part] = copy.deepcopy(value)
                return
            if part not in node:
                raise ValueError(f"`set` key {key!r}: {where} has no {part!r}")
            node = node[part]
        elif isinstance(node, list):
            if part.isdigit():
                index = int(part)
                if index >= len(node):
                    raise ValueError(
                        f"`set` key {key!r}: {where} has {len(node)} entries, no index {index}"
                    )
            else:
                matches = [
                    i
                    for i, item in enumerate(node)
                    if isinstance(item, dict)
                    and str(item.get("class_path", "")).rsplit(".", 1)[-1] == part
                ]
                if len(matches) != 1:
                    found = "no entry" if not matches else f"{len(matches)} entries"
                    raise ValueError(
                        f"`set` key {key!r}: {where} has {found} of class {part!r} (use an index)"
                    )
                index = matches[0]
            if last:
                node[index] = copy.deepcopy(value)
                return
            node = node[index]
        else:
            raise ValueError(f"`set` key {key!r}: {where} is a value, not a mapping or list")


@dataclass(frozen=True)
class SuiteEntry:
    """A suite file's entry: its name, config files (merged in order), settings (``set``) and
    runs (``None``: the suite's)."""

    name: str
    files: tuple[Path, ...]
    settings: tuple[tuple[str, Any], ...] = ()
    runs: str | None = None


@dataclass(frozen=True)
class Suite:
    """A suite file: its entries, ``num_edits`` (``None``: each config's own) and ``runs``
    (``None``: both, unless the command's ``--runs`` says otherwise)."""

    entries: tuple[SuiteEntry, ...]
    num_edits: int | None = None
    runs: str | None = None


def _runs_choice(path: Path, where: str, value: Any) -> str | None:
    if value is not None and value not in RUN_CHOICES:
        raise ValueError(
            f"--suite {path}: {where}`runs` should be one of {', '.join(RUN_CHOICES)}, "
            f"got {value!r}"
        )
    return value


def read_suite(path: Path) -> Suite:
    """The pairs a suite file lists (``configs: [...]``, files relative to the file's folder),
    its ``num_edits`` and ``runs``.

    An entry is a config file (named after it) or a mapping with ``name``, ``configs`` (a list
    of files merged in order, as ``fit --config a.yaml --config b.yaml`` merges them) and
    optionally ``set`` (``{dotted key: value}`` set after the merge, :func:`set_value`) and
    ``runs`` (``both``, ``with_sphere`` or ``without_sphere``: which of the pair's runs to make;
    default the suite's ``runs``).
    """
    content = yaml.safe_load(path.read_text()) or {}
    configs = content.get("configs") if isinstance(content, dict) else None
    if not isinstance(configs, list) or not configs:
        raise ValueError(f"--suite {path}: expected `configs:` with a list of config files")
    num_edits = content.get("num_edits")
    if num_edits is not None and (
        isinstance(num_edits, bool) or not isinstance(num_edits, int) or num_edits < 1
    ):
        raise ValueError(f"--suite {path}: `num_edits` should be an integer ≥ 1, got {num_edits}")
    runs = _runs_choice(path, "", content.get("runs"))
    entries = []
    for index, entry in enumerate(configs):
        if not isinstance(entry, dict):
            entries.append(SuiteEntry(Path(str(entry)).stem, (path.parent / str(entry),)))
            continue
        name, files, settings = entry.get("name"), entry.get("configs"), entry.get("set", {})
        if not isinstance(name, str) or not name or not isinstance(files, list) or not files:
            raise ValueError(
                f"--suite {path}: configs[{index}] should be a file name or a mapping with "
                f"`name` (a string) and `configs` (a list of files), got {entry!r}"
            )
        unknown = sorted(set(entry) - {"name", "configs", "set", "runs"})
        if unknown:
            raise ValueError(
                f"--suite {path}: configs[{index}] ({name}) has unknown keys {unknown} "
                "(allowed: name, configs, set, runs)"
            )
        if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
            raise ValueError(
                f"--suite {path}: configs[{index}] ({name}): `set` should map dotted keys to "
                f"values, got {settings!r}"
            )
        entries.append(
            SuiteEntry(
                name,
                tuple(path.parent / str(f) for f in files),
                tuple(settings.items()),
                _runs_choice(path, f"configs[{index}] ({name}): ", entry.get("runs")),
            )
        )
    return Suite(tuple(entries), num_edits, runs)


def _selected_runs(choice: str | None) -> tuple[Run, ...] | None:
    return None if choice is None else tuple(r for r in RUNS if choice in ("both", r.name))


def _pairs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Pair]:
    """The pairs to run or report, and ``args.out`` filled in."""
    entries = [SuiteEntry(path.stem, (path,)) for path in args.config or []]
    suite_runs = None
    if args.suite is not None:
        if not args.suite.is_file():
            parser.error(f"--suite {args.suite}: no such file")
        try:
            suite = read_suite(args.suite)
        except ValueError as error:
            parser.error(str(error))
        entries += suite.entries
        suite_runs = suite.runs
        if args.num_edits is None:  # the command line wins over the suite file
            args.num_edits = suite.num_edits
    single = len(entries) <= 1 and args.suite is None
    if args.out is None:
        if not entries:
            parser.error("--config, --suite or --out is required")
        name = entries[0].name if single else args.suite.stem if args.suite else "suite"
        args.out = Path("logs") / "experiments" / name
    if not entries:  # --report-only on an existing --out
        if any((args.out / run.name).is_dir() for run in RUNS):
            return [Pair(args.out.name, args.out, args.out)]
        found = sorted(
            d for d in args.out.glob("*") if any((d / run.name).is_dir() for run in RUNS)
        )
        return [Pair(d.name, d, d) for d in found]
    names = [entry.name for entry in entries]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        parser.error(f"--config/--suite name {', '.join(repeated)} twice: one config per name")
    pairs = []
    for entry in entries:
        # --runs on the command line wins over the entry's, which wins over the suite's.
        runs = _selected_runs(args.runs or entry.runs or suite_runs)
        directory = args.out if single else args.out / entry.name
        pairs.append(
            Pair(
                entry.name,
                entry.files[-1],
                directory,
                entry.files[:-1],
                entry.settings,
                runs,
            )
        )
    return pairs


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparisons (or only their reports); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    pairs = _pairs(parser, args)
    suite = len(pairs) > 1 or args.suite is not None
    try:
        check_thresholds(args.horizon_efficacy, args.horizon_drift_kl)
    except ValueError as error:
        flags = {
            "efficacy_threshold": "--horizon-efficacy",
            "drift_kl_threshold": "--horizon-drift-kl",
        }
        message = str(error)
        for name, flag in flags.items():
            message = message.replace(f"`{name}`", flag)
        parser.error(message)
    thresholds = (args.horizon_efficacy, args.horizon_drift_kl)
    if args.report_only:
        if not pairs or not any((p.directory / r.name).is_dir() for p in pairs for r in RUNS):
            parser.error(
                f"--report-only: no runs under --out {args.out} "
                f"(expected {' and '.join(run.name + '/' for run in RUNS)})"
            )
        return _report(args.out, pairs, suite, thresholds)

    if args.dataset is None:
        parser.error(
            "--dataset is required (e.g. ../shared/data/counterfact/counterfact-edit.json)"
        )
    for flag, value in (("--threads", args.threads), ("--parallel", args.parallel)):
        if value < 1:
            parser.error(f"{flag} should be ≥ 1, got {value}")
    if args.num_edits is not None and args.num_edits < 1:
        parser.error(f"--num-edits should be ≥ 1, got {args.num_edits}")
    configs = {}
    for pair in pairs:
        for path in pair.files:
            if not path.is_file():
                parser.error(f"--config {path}: no such file")
        try:
            configs[pair.name] = pair.load()
        except ValueError as error:
            parser.error(f"{pair.name}: {error}")
        if count_sphere_callbacks(configs[pair.name]) == 0:
            parser.error(
                f"--config {pair.describe()} has no {SPHERE_CALLBACK} in "
                "trainer.callbacks: nothing to compare"
            )

    args.out.mkdir(parents=True, exist_ok=True)
    processes = []
    for pair in pairs:
        processes += plan_pair(
            pair, configs[pair.name], args.dataset, args.num_edits, runs=pair.runs or RUNS
        )
    models = {str((c.get("model") or {}).get("model")): c for c in configs.values()}
    try:
        for config in models.values():
            if processes:
                _prepare_model(config)
    except Exception as error:  # every run would fail the same way
        print(f"error: cannot load model.model: {error}", file=sys.stderr)
        return 1
    try:
        run_all(processes, args.threads, 1 if args.sequential else args.parallel)
    except KeyboardInterrupt:
        print(f"interrupted; logs under {args.out}", file=sys.stderr)
        return 130
    code = _report(args.out, pairs, suite, thresholds)
    failed = [p for p in processes if p.failed]
    for process in failed:
        print(
            f"error: run '{process.name}' failed (exit code {process.returncode}); "
            f"its log: {process.log}",
            file=sys.stderr,
        )
    return 1 if failed else code


def _report(
    out: Path,
    pairs: Sequence[Pair],
    suite: bool,
    thresholds: tuple[float, float] = (EFFICACY_THRESHOLD, DRIFT_KL_THRESHOLD),
) -> int:
    for pair in pairs:
        markdown, data, figure = write_report(pair.directory, *thresholds)
        if not suite:
            print(markdown.read_text())
        print(f"Wrote {markdown}, {data} and {figure}")
    if suite:
        markdown, data, figure = write_suite_report(out, pairs, *thresholds)
        print(markdown.read_text())
        print(f"Wrote {markdown}, {data} and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
