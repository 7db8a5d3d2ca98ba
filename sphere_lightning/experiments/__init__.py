"""SPHERE against the base editors: one command runs configs with and without SPHERE and compares.

``sphere-lightning experiments --config configs/experiments/alphaedit.yaml --dataset
../shared/data/counterfact/counterfact-edit.json`` (or ``python -m sphere_lightning
experiments ...``) runs the config as given ("with SPHERE") and the same config with every
:class:`~sphere_lightning.callbacks.SphereProjectionCallback` removed ("without SPHERE") as two
``python -m sphere_lightning fit`` processes, side by side by default, then reads both runs'
``summary.json`` (the only file it reads: every scalar a run logged is in it) and writes the
comparison at every evaluation step. ``--out`` then holds:

- ``with_sphere.yaml``, ``without_sphere.yaml``: the two run configs (each can be rerun by hand);
- ``with_sphere/``, ``without_sphere/``: the runs' TensorBoard folders (events, ``config.yaml``,
  ``summary.json``) and ``fit.log``, the output of each run;
- ``table.md``, ``table.json``, ``figure.png``: the comparison.

Several configs (``--config a.yaml b.yaml`` or ``--suite configs/experiments/suite.yaml``) run
every pair, ``--parallel`` processes at a time; each pair's output goes to
``<out>/<config name>/`` as above, and ``<out>/table.md`` and ``<out>/table.json`` hold one
combined table, a row per editor and SPHERE setting, from the runs' ``summary.json``.

A run writes its ``summary.json`` after every evaluation with ``finished: false``, and with
``finished: true`` at its end. A finished run is not run again; an unfinished one with a
``last.ckpt`` is resumed from it (``fit --ckpt_path``). The runner only launches and reads
runs; everything a run does is in its config.

The modules, by role: :mod:`.config` (run configs, suite files), :mod:`.runner` (the ``fit``
processes), :mod:`.results` (reading a run's results), :mod:`.report` (tables and figures),
:mod:`.cli` (the command line).
"""

from sphere_lightning.experiments.cli import (
    build_parser,
    main,
)
from sphere_lightning.experiments.config import (
    RUN_CHOICES,
    RUNS,
    SPHERE_CALLBACK,
    SUITE_KEYS,
    TENSORBOARD_LOGGER,
    WITH_SPHERE,
    WITHOUT_SPHERE,
    Pair,
    Run,
    Suite,
    SuiteEntry,
    count_sphere_callbacks,
    is_sphere_callback,
    load_config,
    merge_configs,
    read_suite,
    run_config,
    set_value,
    without_sphere,
    write_run_config,
)
from sphere_lightning.experiments.report import (
    EVALUATION_TABLES,
    MISSING,
    SUITE_COLUMNS,
    SUITE_PANELS,
    SuiteColumn,
    build_suite_table,
    build_table,
    format_markdown,
    format_suite_markdown,
    format_trajectory_table,
    horizon_text,
    plot_comparison,
    plot_suite,
    run_trajectories,
    write_report,
    write_suite_report,
)
from sphere_lightning.experiments.results import (
    EDIT_PHASES,
    HE_CHANGE,
    LOGGED_METRICS,
    METRICS,
    SUITE_TASKS,
    WALL_TIME,
    Metric,
    RunLog,
    diagnostic_values,
    present_runs,
    summary_values,
)
from sphere_lightning.experiments.runner import (
    RunProcess,
    StatusLine,
    log_progress,
    plan_pair,
    prepare_model,
    run_all,
)

__all__ = [
    "EDIT_PHASES",
    "EVALUATION_TABLES",
    "HE_CHANGE",
    "LOGGED_METRICS",
    "METRICS",
    "MISSING",
    "Metric",
    "Pair",
    "RUNS",
    "RUN_CHOICES",
    "SUITE_KEYS",
    "Run",
    "RunLog",
    "RunProcess",
    "SPHERE_CALLBACK",
    "SUITE_COLUMNS",
    "SUITE_PANELS",
    "SUITE_TASKS",
    "StatusLine",
    "Suite",
    "SuiteColumn",
    "SuiteEntry",
    "TENSORBOARD_LOGGER",
    "WALL_TIME",
    "WITHOUT_SPHERE",
    "WITH_SPHERE",
    "build_parser",
    "build_suite_table",
    "build_table",
    "count_sphere_callbacks",
    "diagnostic_values",
    "format_markdown",
    "format_suite_markdown",
    "format_trajectory_table",
    "horizon_text",
    "is_sphere_callback",
    "load_config",
    "log_progress",
    "main",
    "merge_configs",
    "plan_pair",
    "plot_comparison",
    "plot_suite",
    "prepare_model",
    "present_runs",
    "read_suite",
    "run_all",
    "run_config",
    "run_trajectories",
    "set_value",
    "summary_values",
    "without_sphere",
    "write_report",
    "write_run_config",
    "write_suite_report",
]
