"""The experiment runner's runs: which to start, resume or skip, and the status line."""

from __future__ import annotations

import yaml

from sphere_lightning import experiments
from sphere_lightning.experiments import (
    WITH_SPHERE,
    WITHOUT_SPHERE,
)
from tests.helpers import (
    EXPERIMENT_CONFIGS,
    RUNS_ORDER,
    write_run_summary,
)


def test_runs_flag_plans_only_the_chosen_run(tmp_path):
    config = yaml.safe_load(EXPERIMENT_CONFIGS[0].read_text())
    pair = experiments.Pair("alphaedit", EXPERIMENT_CONFIGS[0], tmp_path / "alphaedit")
    processes = experiments.plan_pair(
        pair, config, "x.json", None, report=lambda _: None, runs=(WITH_SPHERE,)
    )
    assert [p.run for p in processes] == [WITH_SPHERE]
    assert (pair.directory / "with_sphere.yaml").is_file()
    assert not (pair.directory / "without_sphere.yaml").exists()


def test_plan_skips_finished_resumes_checkpointed_and_restarts_bare_runs(tmp_path):
    config = yaml.safe_load(EXPERIMENT_CONFIGS[0].read_text())
    pair = experiments.Pair("alphaedit", EXPERIMENT_CONFIGS[0], tmp_path / "alphaedit")
    messages: list[str] = []

    def plan():
        messages.clear()
        return experiments.plan_pair(pair, config, "x.json", None, report=messages.append)

    # Nothing there yet: both runs start from scratch.
    assert [(p.run, p.ckpt_path) for p in plan()] == [(WITHOUT_SPHERE, None), (WITH_SPHERE, None)]

    # Without SPHERE finished (a summary.json without `finished`, as older runs wrote it); with
    # SPHERE was killed after a checkpoint and an evaluation (its summary.json says so).
    without_dir, with_dir = (pair.directory / run.name for run in RUNS_ORDER)
    without_dir.mkdir()
    (without_dir / "summary.json").write_text("{}")
    (without_dir / "without_sphere_marker").write_text("")
    checkpoint = with_dir / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"ckpt")
    write_run_summary(with_dir, {1: {"edit/efficacy": 0.5}}, finished=False)
    (processes,) = [plan()]
    assert [(p.run, p.ckpt_path) for p in processes] == [(WITH_SPHERE, checkpoint)]
    assert processes[0].command()[-2:] == ["--ckpt_path", str(checkpoint)]
    assert processes[0].name == "alphaedit with SPHERE"
    assert any("skipping 'alphaedit without SPHERE'" in m for m in messages)

    # Once its summary.json says finished, it is left alone too.
    write_run_summary(with_dir, {1: {"edit/efficacy": 0.5}}, finished=True)
    assert plan() == []

    # Killed before its first checkpoint: the folder is set aside and the run starts again.
    checkpoint.unlink()
    (with_dir / "summary.json").unlink()
    (with_dir / "fit.log").write_text("old")
    (processes,) = [plan()]
    assert [(p.run, p.ckpt_path) for p in processes] == [(WITH_SPHERE, None)]
    assert not with_dir.exists()
    assert (pair.directory / "with_sphere.incomplete-1" / "fit.log").read_text() == "old"
    with_dir.mkdir()
    plan()
    assert (pair.directory / "with_sphere.incomplete-2").is_dir()
    assert (without_dir / "without_sphere_marker").exists(), "a finished run is left alone"


def test_status_shows_the_batch_count_and_what_the_run_does_now(tmp_path):
    log = tmp_path / "fit.log"
    bar = "Epoch 0:  35%|███▌      | 7/20 [12:01<22:03,  0.01it/s]"
    log.write_text(f"Loading weights\n{bar}\rValidation DataLoader 0:  50%|█████| 2/4\r")
    assert (
        experiments.log_progress(log)
        == "7/20 batches done · Validation DataLoader 0:  50%|█████| 2/4"
    )
    assert experiments.log_progress(log, width=12) == "7/20 batches done · Validation …"
    log.write_text(f"Loading weights\n{bar}")
    assert experiments.log_progress(log) == "7/20 batches done"
    log.write_text("Generating text\n")
    assert experiments.log_progress(log) == "Generating text"
    assert experiments.log_progress(tmp_path / "not-yet.log") == ""
