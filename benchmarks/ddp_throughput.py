"""Seconds per batch of 100 CounterFact requests on SmolLM2: one process with P threads against P
processes with one thread each (``--trainer.strategy edit_ddp``), in one invocation.

Both runs are the same ``python -m sphere_lightning fit --config configs/edit.yaml`` (AlphaEdit +
SPHERE, HE after every batch, a checkpoint every batch) on the same requests; they differ only in
``OMP_NUM_THREADS`` and the strategy. The per-batch seconds are read from each run's TensorBoard
scalars (``time/compute_deltas``: v*, keys and solve; ``time/batch_evaluation``: the batch's edit
metrics), the efficacy from ``edit_batch/efficacy`` and the final ``summary.json``. With P
processes every request's v* is optimised by one process and the edit metrics are split; the
solve, SPHERE and HE run on every process.

The statistics are computed (or read from the cache) by the first run; they are not part of the
per-batch seconds.

    python benchmarks/ddp_throughput.py --processes 2 --batches 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PHASES = ("time/compute_deltas", "time/v_star", "time/keys", "time/solve", "time/batch_evaluation")


def fit(label: str, out: Path, args: argparse.Namespace, threads: int, extra: list[str]) -> dict:
    """One editing run; returns its per-step scalars, summary and wall seconds."""
    logs = out / label
    command = [
        sys.executable,
        "-m",
        "sphere_lightning",
        "fit",
        "--config",
        str(ROOT / "configs" / "edit.yaml"),
        f"--data.dataset={args.data}",
        f"--data.num_edits={args.batches * args.batch_size}",
        f"--data.edits_per_step={args.batch_size}",
        f"--trainer.val_check_interval={args.batches}",
        f"--trainer.logger.init_args.save_dir={logs}",
        f"--trainer.default_root_dir={logs}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print(f"[{label}] OMP_NUM_THREADS={threads} {' '.join(command[2:])}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"[{label}] failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    (run_dir,) = {p.parent for p in logs.rglob("summary.json")}
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"[{label}] done in {wall:.0f} s ({run_dir})", flush=True)
    return {"scalars": scalars, "summary": summary, "wall": wall}


def per_batch(run: dict, tag: str) -> list[float]:
    values = run["scalars"].get(tag, {})
    return [values[step] for step in sorted(values) if step > 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="P: processes (and threads)")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--data", default=str(SHARED / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--out", default=None, help="log folder (default: a temporary one)")
    args = parser.parse_args()
    p = args.processes
    out = Path(args.out or tempfile.mkdtemp(prefix="ddp_throughput_"))
    runs = {
        f"1 process × {p} threads": fit("single", out, args, p, []),
        f"{p} processes × 1 thread": fit(
            "ddp",
            out,
            args,
            1,
            ["--trainer.strategy=edit_ddp", f"--trainer.devices={p}", "--trainer.accelerator=cpu"],
        ),
    }
    labels = list(runs)
    print(
        f"\n{args.batches} batches of {args.batch_size} CounterFact requests, SmolLM2-135M, "
        "configs/edit.yaml (seconds per batch, mean over the batches)\n"
    )
    print(f"| | {' | '.join(labels)} | ratio |")
    print("|---|" + "---|" * (len(labels) + 1))
    for tag in PHASES:
        means = [
            sum(v) / len(v) if (v := per_batch(runs[k], tag)) else float("nan") for k in labels
        ]
        print(
            f"| {tag.removeprefix('time/')} s | {means[0]:.1f} | {means[1]:.1f} | "
            f"{means[0] / means[1]:.2f}× |"
        )
    for tag in ("edit_batch/efficacy", "edit_batch/generalization"):
        cells = [", ".join(f"{x:.2f}" for x in per_batch(runs[k], tag)) for k in labels]
        print(f"| {tag} per batch | {' | '.join(cells)} | |")
    finals = [runs[k]["summary"]["edit"]["final"] for k in labels]
    for metric in ("efficacy", "generalization", "specificity"):
        print(f"| final {metric} | {finals[0][metric]:.4f} | {finals[1][metric]:.4f} | |")
    walls = [runs[k]["wall"] for k in labels]
    print(
        f"| whole run (load, statistics, evaluation) s | {walls[0]:.0f} | {walls[1]:.0f} | "
        f"{walls[0] / walls[1]:.2f}× |"
    )
    print(f"\nLogs: {out}")


if __name__ == "__main__":
    main()
