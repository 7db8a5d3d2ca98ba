"""The command line of the experiment runner: ``sphere-lightning experiments`` (also
``python -m sphere_lightning experiments``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sphere_lightning.experiments.config import (
    RUN_CHOICES,
    RUNS,
    SPHERE_CALLBACK,
    Pair,
    Run,
    SuiteEntry,
    count_sphere_callbacks,
    read_suite,
)
from sphere_lightning.experiments.report import write_report, write_suite_report
from sphere_lightning.experiments.runner import plan_pair, prepare_model, run_all
from sphere_lightning.horizon import DRIFT_KL_THRESHOLD, EFFICACY_THRESHOLD, check_thresholds

#: The command as usage and messages name it.
PROG = "sphere-lightning experiments"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line of ``sphere-lightning experiments`` (``prog``: how usage names it)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Run each edit config with SPHERE (as given) and without it (every "
            "SphereProjectionCallback removed) as `python -m sphere_lightning fit` processes, "
            "then write table.md, table.json and figure.png comparing each pair at every "
            "evaluation step and, for several configs, one combined table of every editor "
            "without and with SPHERE, all read from each run's summary.json. Finished runs "
            "are skipped; an unfinished run with a last.ckpt is resumed from it."
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
                entry.group,
                entry.seed,
            )
        )
    return pairs


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Run the comparisons (or only their reports); returns the exit code (``prog``: how
    usage and error messages name the command)."""
    parser = build_parser(prog)
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
                prepare_model(config)
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
        if suite and not pair.directory.is_dir():  # the suite's table lists it as not run
            print(f"No runs of '{pair.name}' under {pair.directory} yet")
            continue
        markdown, data, figure = write_report(pair.directory, *thresholds)
        if not suite:
            print(markdown.read_text())
        print(f"Wrote {markdown}, {data} and {figure}")
    if suite:
        markdown, data, figure = write_suite_report(out, pairs, *thresholds)
        print(markdown.read_text())
        print(f"Wrote {markdown}, {data} and {figure}")
    return 0
