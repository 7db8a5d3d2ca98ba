"""Running the experiments: a ``fit`` subprocess per run (:class:`RunProcess`), run side by side
with a status line (:func:`run_all`), and the plan of a pair: which runs are finished, to
resume from their last checkpoint, or to start (:func:`plan_pair`)."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from sphere_lightning.checkpoints import last_checkpoint
from sphere_lightning.experiments.config import (
    RUNS,
    WITHOUT_SPHERE,
    Pair,
    Run,
    run_config,
    without_sphere,
    write_run_config,
)
from sphere_lightning.experiments.results import RunLog


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
    """What a run is doing, from the end of its log: the count of finished batches on
    Lightning's progress bar (``7/20 batches done``: the eighth is running) and the last line
    (up to ``width`` characters), if that is something else (e.g. validation)."""
    tail = _log_tail(log)
    batches = _TRAIN_PROGRESS.findall(tail)
    lines = [s.strip() for s in re.split(r"[\r\n]", tail) if s.strip()]
    last = lines[-1] if lines else ""
    parts = []
    if batches:
        parts.append(f"{batches[-1][0]}/{batches[-1][1]} batches done")
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

    A run whose ``summary.json`` says it finished (:attr:`~.results.RunLog.finished`) is
    skipped; one with a ``last.ckpt`` is resumed from it; one with a folder but neither is set
    aside (``<run>.incomplete-<n>``) and started again.
    """
    pair.directory.mkdir(parents=True, exist_ok=True)
    processes = []
    for run in runs:
        run_dir = pair.directory / run.name
        name = f"{pair.name} {run.label}"
        if RunLog.read(run_dir).finished:  # its run config stays as it ran
            report(f"skipping '{name}': finished ({run_dir / 'summary.json'})")
            continue
        derived = run_config(config, dataset, pair.directory, run, num_edits)
        note = "the config as given"
        if run is WITHOUT_SPHERE:
            derived, note = without_sphere(derived), "every SphereProjectionCallback removed"
        path = pair.directory / f"{run.name}.yaml"
        write_run_config(derived, path, pair.describe(), note)
        checkpoint = last_checkpoint(run_dir, folder="checkpoints")
        if checkpoint is None and run_dir.exists():
            report(f"'{name}' stopped before its first checkpoint: {run_dir} moved to "
                   f"{_set_aside(run_dir)}")  # fmt: skip
        processes.append(RunProcess(run, path, run_dir / "fit.log", checkpoint, name))
    return processes


# ------------------------------------------------------------------------------- command


def prepare_model(config: dict[str, Any]) -> None:
    """Convert an embedded or GGUF model once, before two runs would convert it at once."""
    from sphere_lightning.models.loading import resolve_model_path

    resolve_model_path(str((config.get("model") or {}).get("model", "smollm2-135m")))
