"""Kill-and-resume: a run SIGKILLed in the middle of a step continues from its last checkpoint
and ends with the same weights, editor state and curves as a run that was never stopped."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import textwrap
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sphere_lightning.cli import cli_main
from sphere_lightning.module import CheckpointMismatchError
from tests.helpers import ROOT, run_cli, tiny_alphaedit_flags

NUM_STEPS = 6
KILL_AT = 3  # applied batches when the kill comes: inside the layer loop of the 4th batch

# Loaded by the subprocesses (its folder is put on PYTHONPATH): an in-loop transform that
# SIGKILLs its own process while the 4th batch's lower layer updates are temporarily in place,
# and a callback that appends the positions of every batch it sees completed to a file.
HELPERS = """
import json
import os
import shutil
import signal

from lightning.pytorch import Callback

from sphere_lightning.callbacks import DeltaTransform


class KillDuringStep(DeltaTransform):
    def transform_delta(self, name, delta, pl_module):
        if str(pl_module.global_step) == os.environ.get("KILL_AT_STEP"):
            os.kill(os.getpid(), signal.SIGKILL)
        return delta


class RecordPositions(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as file:
            file.write(json.dumps(batch.positions) + "\\n")
"""


def _fit_args(model_dir: str, data: Path, logs: Path, positions: Path) -> list[str]:
    callbacks = [
        {"class_path": "resume_helpers.KillDuringStep"},
        {"class_path": "resume_helpers.RecordPositions", "init_args": {"path": str(positions)}},
    ]
    return [
        "fit",
        "--config",
        str(ROOT / "configs" / "edit.yaml"),
        f"--model.model={model_dir}",
        *tiny_alphaedit_flags(num_steps=6),
        "--model.editor.init_args.nullspace_threshold=1e9",
        "--model.fluency_prompts=2",
        "--model.fluency_max_new_tokens=4",
        f"--data.dataset={data}",
        f"--data.num_edits={NUM_STEPS}",
        "--data.edits_per_step=1",
        "--trainer.val_check_interval=2",
        "--trainer.check_val_every_n_epoch=null",
        f"--trainer.logger.init_args.save_dir={logs}",
        f"--trainer.default_root_dir={logs}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.callbacks+={json.dumps(callbacks[0])}",
        f"--trainer.callbacks+={json.dumps(callbacks[1])}",
    ]


def _run(args: list[str], helpers: Path, cache: Path, kill_at: int | None = None):
    # An empty KILL_AT_STEP matches no step: the run is not killed.
    env = {
        "SPHERE_LIGHTNING_CACHE": str(cache),
        "KILL_AT_STEP": "" if kill_at is None else str(kill_at),
    }
    return run_cli(args, helpers, env)


def _positions(path: Path) -> list[int]:
    return [p for line in path.read_text().splitlines() for p in json.loads(line)]


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def six_facts(tmp_path_factory, requests, write_rome_json) -> Path:
    facts = [*requests, dataclasses.replace(requests[0], case_id=5, target_new="Seoul")]
    assert len(facts) == NUM_STEPS
    return write_rome_json(facts, tmp_path_factory.mktemp("data") / "facts.json")


@pytest.mark.slow
def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path, tiny_model_dir, six_facts):
    helpers = tmp_path / "helpers"
    helpers.mkdir()
    (helpers / "resume_helpers.py").write_text(textwrap.dedent(HELPERS))
    cache = tmp_path / "cache"  # shared: both runs read the same statistics

    straight_logs, straight_positions = tmp_path / "straight", tmp_path / "straight.jsonl"
    straight = _run(
        _fit_args(tiny_model_dir, six_facts, straight_logs, straight_positions), helpers, cache
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    logs, positions = tmp_path / "killed", tmp_path / "killed.jsonl"
    args = _fit_args(tiny_model_dir, six_facts, logs, positions)
    killed = _run(args, helpers, cache, kill_at=KILL_AT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _positions(positions) == [0, 1, 2]
    (run_dir,) = (logs / "edit").iterdir()
    assert _load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == KILL_AT
    # Its summary.json was written at its last evaluation (step 2), saying it has not finished.
    stopped = json.loads((run_dir / "summary.json").read_text())
    assert stopped["finished"] is False and stopped["global_step"] == 2
    assert stopped["scalars"]["edit/num_edited"] == {"1": 1.0, "2": 2.0}

    resumed = _run([*args, "--ckpt_path=last"], helpers, cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [p.name for p in (logs / "edit").iterdir()] == [run_dir.name], "same run folder"

    # Every request edited exactly once, in order, across the kill.
    assert _positions(positions) == _positions(straight_positions) == list(range(NUM_STEPS))

    # Final edited weights and editor state bit-identical to the uninterrupted run.
    (straight_dir,) = (straight_logs / "edit").iterdir()
    expected = _load(straight_dir / "checkpoints" / "last.ckpt")
    final = _load(run_dir / "checkpoints" / "last.ckpt")
    assert final["global_step"] == expected["global_step"] == NUM_STEPS
    assert final["state_dict"].keys() == expected["state_dict"].keys()
    assert {k.split(".mlp.")[0] for k in final["state_dict"]} == {
        "model.model.layers.1",
        "model.model.layers.2",
    }, "only the edited layers are stored"
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(final["state_dict"][name], tensor), name
    cache_a = expected["sphere_lightning"]["editor_state"]["key_cache"]
    cache_b = final["sphere_lightning"]["editor_state"]["key_cache"]
    assert cache_a.keys() == cache_b.keys() and all(
        torch.equal(cache_a[k], cache_b[k]) for k in cache_a
    )

    # The curves go on at the right steps: each step logged once, the values the straight run
    # logged (the killed run's events after its checkpoint were dropped).
    scalars, reference = _scalars(run_dir), _scalars(straight_dir)
    assert scalars["edit/num_edited"] == reference["edit/num_edited"]
    assert [s for s, _ in scalars["edit/num_edited"]] == list(range(1, NUM_STEPS + 1))
    for tag in (
        "edit/efficacy",
        "edit_batch/efficacy",
        "energy_change/model.layers.1.mlp.down_proj",
    ):
        assert [s for s, _ in scalars[tag]] == [s for s, _ in reference[tag]], tag
        torch.testing.assert_close(
            torch.tensor([v for _, v in scalars[tag]]), torch.tensor([v for _, v in reference[tag]])
        )
    summary = json.loads((run_dir / "summary.json").read_text())
    straight_summary = json.loads((straight_dir / "summary.json").read_text())
    assert summary["num_edited"] == NUM_STEPS
    assert summary["edit"]["final"] == straight_summary["edit"]["final"]
    # The resumed run's summary.json keeps the steps logged before the kill (from its
    # checkpoint): the same tags and steps as the straight run's, and the same values.
    assert summary["finished"] is True
    assert summary["start_wall_time"] == stopped["start_wall_time"]
    assert sorted(map(int, summary["step_wall_time"])) == list(range(NUM_STEPS + 1))
    assert summary["scalars"].keys() == straight_summary["scalars"].keys()
    for tag, values in straight_summary["scalars"].items():
        assert summary["scalars"][tag].keys() == values.keys(), tag
        if not tag.startswith("time/"):
            torch.testing.assert_close(
                torch.tensor([summary["scalars"][tag][s] for s in values]),
                torch.tensor(list(values.values())),
                equal_nan=True, msg=tag,
            )  # fmt: skip


def test_a_checkpoint_of_another_base_model_is_refused(
    tmp_path, tiny_model_dir, make_tiny_model, tokenizer, six_facts
):
    """The checkpoint names its base model by a fingerprint of the weights it edits; resuming
    it on other weights (here: the model folder was overwritten since) fails before any weight
    is touched. (LightningCLI takes `model.*` from the checkpoint's hyperparameters on resume,
    so the folder is the same; its weights are not.)"""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    logs = tmp_path / "logs"
    args = _fit_args(str(model_dir), six_facts, logs, tmp_path / "positions.jsonl")
    args = [a for a in args if "resume_helpers" not in a]
    args += ["--data.num_edits=1", "--trainer.val_check_interval=1"]
    cli_main(args)
    (checkpoint,) = logs.rglob("last.ckpt")
    size = checkpoint.stat().st_size
    edited = sum(t.numel() * t.element_size() for t in _load(checkpoint)["state_dict"].values())
    assert size < 4 * edited + 2**20, "the checkpoint holds the edited layers, not the model"

    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    model.save_pretrained(model_dir)
    with pytest.raises(CheckpointMismatchError, match="base model .*weights differ"):
        cli_main([*args, f"--ckpt_path={checkpoint}"])
