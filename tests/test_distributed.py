"""Data-parallel editing: the collective operations, and a 2-process CPU (gloo) run through
Lightning's DDP that must edit the model exactly as one process does."""

from __future__ import annotations

import dataclasses
import json
import socket
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy

from sphere_lightning.distributed import SINGLE, Collective, EditDDPStrategy
from sphere_lightning.editors import MEMIT
from sphere_lightning.errors import ConfigError
from sphere_lightning.module import EditingModule, check_strategy
from tests.helpers import ROOT, run_cli, tiny_alphaedit_flags

# -- the collective on one process -------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shares_cover_every_row_once_in_order(world_size):
    for n in range(12):
        rows = []
        for rank in range(world_size):
            start, stop = _fake(rank, world_size).bounds(n)
            rows += list(range(start, stop))
            assert stop - start in (n // world_size, n // world_size + 1)
        assert rows == list(range(n))


def _fake(rank: int, world_size: int) -> Collective:
    """A Collective's arithmetic without a process group (bounds only)."""
    fake = Collective.__new__(Collective)
    fake.rank, fake.world_size = rank, world_size
    return fake


def test_one_process_is_the_identity():
    items = list(range(5))
    assert SINGLE.map(lambda share: torch.tensor(share), items).tolist() == items
    t = torch.arange(3.0)
    assert SINGLE.gather(t) is t and SINGLE.broadcast_(t) is t
    assert SINGLE.broadcast_object({"a": 1}) == {"a": 1}
    assert SINGLE.bounds(7) == (0, 7) and not SINGLE.distributed


def test_a_collective_of_several_ranks_needs_a_process_group():
    with pytest.raises(RuntimeError, match="torch.distributed"):
        Collective(0, 2)


def test_lightning_ddp_is_refused_with_the_editing_strategy_named():
    with pytest.raises(ConfigError, match="edit_ddp"):
        check_strategy(DDPStrategy())
    check_strategy(EditDDPStrategy())  # accepted


def test_a_device_map_with_several_processes_is_refused():
    module = EditingModule(MEMIT(layers=[1]), device_map="auto")
    module._trainer = SimpleNamespace(strategy=EditDDPStrategy(), world_size=2)
    with pytest.raises(ConfigError, match="model.device_map"):
        module.setup("fit")
    module._trainer = SimpleNamespace(strategy=EditDDPStrategy(), world_size=1, callbacks=[])
    module.setup("fit")  # one process: accepted


# -- the collective on two gloo processes ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collective_worker(rank: int, world_size: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        c = Collective(rank, world_size)
        seen: list[list[int]] = []

        def rows(share):
            seen.append(list(share))
            return {
                "x": torch.tensor(share, dtype=torch.float64) * 10,
                "y": torch.ones(len(share), 2),
            }

        # Rank 0 writes a cache file; the others run after it and find it there.
        cache = Path(out, "cache.txt")
        found: list[str] = []

        def fill_or_read() -> None:
            if cache.exists():
                found.append(cache.read_text())
            else:
                cache.write_text(f"written by rank {rank}")

        c.run_first_on_rank_zero(fill_or_read)
        result = {
            "found": found,
            # 5 rows over 2 ranks: shares of 2 and 3, gathered in order
            "map": {k: v.tolist() for k, v in c.map(rows, list(range(5))).items()},
            "seen": seen,
            # fewer items than ranks: every rank computes all of them, nothing is gathered
            "small": c.map(lambda share: torch.tensor(share), [7]).tolist(),
            "gather": c.gather(torch.full((rank + 1, 2), float(rank))).tolist(),
            "broadcast": c.broadcast_(torch.full((3,), float(rank) + 1)).tolist(),
            "object": c.broadcast_object(f"from rank {rank}"),
        }
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_map_gather_and_broadcast_on_two_gloo_processes(tmp_path):
    # Forked, the workers start at once instead of importing torch and Lightning again.
    mp.start_processes(
        _collective_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="fork"
    )
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    for result in results:
        assert result["map"] == {"x": [0.0, 10.0, 20.0, 30.0, 40.0], "y": [[1.0, 1.0]] * 5}
        assert result["small"] == [7]
        assert result["gather"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        assert result["broadcast"] == [1.0, 1.0, 1.0]
        assert result["object"] == "from rank 0"
    assert results[0]["seen"] == [[0, 1]] and results[1]["seen"] == [[2, 3, 4]]
    assert results[0]["found"] == [] and results[1]["found"] == ["written by rank 0"]


# -- a whole editing run on two processes ------------------------------------------------------

# Loaded by the runs (its folder is put on PYTHONPATH): counts which requests each process
# optimises v* for (and how many FT tunes on), and saves each process's edited weights and K Kᵀ
# at the end of the fit.
HELPERS = """
import json
import os

import torch
import torch.distributed as dist
from lightning.pytorch import Callback

import sphere_lightning.editors.base as base
import sphere_lightning.editors.ft as ft

OUT = os.environ["DDP_TEST_OUT"]
_optimise = base.compute_target_values


def _counted(model, tokenizer, spec, requests, *args, **kwargs):
    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(os.path.join(OUT, f"optimised-{rank}.jsonl"), "a") as file:
        file.write(json.dumps([r.case_id for r in requests]) + "\\n")
    return _optimise(model, tokenizer, spec, requests, *args, **kwargs)


base.compute_target_values = _counted
_chunks = ft.FT._chunk_inputs


def _counted_chunks(self, tokenizer, requests, device):
    chunks = _chunks(self, tokenizer, requests, device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(os.path.join(OUT, f"tuned-{rank}.jsonl"), "a") as file:
        file.write(json.dumps([0 if c.ids is None else len(c.ids) for c in chunks]) + "\\n")
    return chunks


ft.FT._chunk_inputs = _counted_chunks


class SaveEditedState(Callback):
    def on_fit_end(self, trainer, pl_module):
        state = {n: pl_module.edited_weight(n).clone() for n in pl_module.edited_parameter_names}
        key_cache = getattr(pl_module.editor, "key_cache", {})
        state.update({f"kkt/{k}": v.clone() for k, v in key_cache.items()})
        torch.save(state, os.path.join(OUT, f"state-{trainer.global_rank}.pt"))
"""

NUM_BATCHES, PER_BATCH = 3, 3  # 3 requests a batch: shares of 1 and 2 on two processes

SST2 = [
    {"sentence": "the music was good", "label": 1},
    {"sentence": "the room was loud", "label": 0},
    {"sentence": "the food was good", "label": 1},
    {"sentence": "the service was slow", "label": 0},
    {"sentence": "the birds sang in the green trees", "label": 1},
]
NQ = [
    {"question": "The Louvre is in the city of", "answer": ["Paris"]},
    {"question": "The Colosseum is in", "answer": ["Rome"]},
    {"question": "Big Ben is in the city of", "answer": ["London"]},
]


@pytest.fixture(scope="module")
def nine_facts(tmp_path_factory, requests, write_rome_json) -> Path:
    extra = [
        dataclasses.replace(requests[i], case_id=5 + i, target_new=requests[(i + 2) % 5].target_new)
        for i in range(4)
    ]
    facts = [*requests, *extra]
    assert len(facts) == NUM_BATCHES * PER_BATCH
    assert all(f.target_new != f.target_true for f in facts)
    return write_rome_json(facts, tmp_path_factory.mktemp("data") / "facts.json")


#: The editor options of the runs: AlphaEdit (``configs/edit.yaml``'s) and FT, small enough for
#: the tiny model. v* in float32: one process and two compare to float32 tolerance, and bf16
#: rounding depends on which rows share a matrix product, which the split changes.
EDITORS = {
    "alphaedit": [
        *tiny_alphaedit_flags(num_steps=6),
        "--model.editor.init_args.target.precision=float32",
    ],
    "ft": [
        "--config",
        str(ROOT / "configs" / "editors" / "ft.yaml"),
        "--model.editor.init_args.layers=[1, 2]",
        "--model.editor.init_args.num_steps=8",
        "--model.editor.init_args.lr=1e-2",
    ],
}


#: The flags of a two-process run.
DDP = ["--trainer.strategy=edit_ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """What every run of this module shares: the helper module, the general-ability data and the
    key-statistics caches."""
    home = tmp_path_factory.mktemp("ddp")
    (home / "helpers").mkdir()
    (home / "helpers" / "ddp_helpers.py").write_text(textwrap.dedent(HELPERS))
    general = home / "general"
    general.mkdir()
    for task, records in (("sst2", SST2), ("nq_open", NQ)):
        (general / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return home


@pytest.fixture(scope="module")
def two_process_alphaedit(home, tiny_model_dir, nine_facts) -> Path:
    """The uninterrupted two-process AlphaEdit run, which two tests compare against."""
    return _run(home, "two-alphaedit", tiny_model_dir, nine_facts, "alphaedit", DDP)


def _run(
    home: Path,
    name: str,
    model_dir: str,
    data: Path,
    editor: str,
    extra: list[str],
    cache: str = "cache",
) -> Path:
    """Run ``fit`` in ``home / name``, with the key statistics cached in ``home / cache``."""
    out = home / name
    out.mkdir(exist_ok=True)  # a resumed run goes on in its folder
    general = home / "general"
    callbacks = [
        {"class_path": "ddp_helpers.SaveEditedState"},
        {
            "class_path": "sphere_lightning.callbacks.GeneralAbilityCallback",
            "init_args": {
                "tasks": {"sst2": {}, "nq_open": {"max_new_tokens": 3}},
                "data_dir": str(general),
                "every_n_steps": NUM_BATCHES,
                "batch_size": 2,
                "progress": False,
            },
        },
    ]
    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "edit.yaml"),
        f"--model.model={model_dir}",
        *EDITORS[editor],
        "--model.fluency_prompts=2",
        "--model.fluency_max_new_tokens=4",
        f"--data.dataset={data}",
        f"--data.num_edits={NUM_BATCHES * PER_BATCH}",
        f"--data.edits_per_step={PER_BATCH}",
        f"--trainer.val_check_interval={NUM_BATCHES}",
        "--trainer.check_val_every_n_epoch=null",
        f"--trainer.logger.init_args.save_dir={out / 'logs'}",
        f"--trainer.default_root_dir={out / 'logs'}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *[f"--trainer.callbacks+={json.dumps(c)}" for c in callbacks],
        *extra,
    ]
    env = {"SPHERE_LIGHTNING_CACHE": str(home / cache), "DDP_TEST_OUT": str(out)}
    done = run_cli(args, home / "helpers", env)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def _optimised(out: Path, rank: int, kind: str = "optimised") -> list[list[int]]:
    path = out / f"{kind}-{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("editor", list(EDITORS))
def test_two_gloo_processes_edit_as_one_process_does(
    request, home, tiny_model_dir, nine_facts, editor
):
    # One process caches its own statistics: the two-process runs compute theirs (rank 0 first,
    # the other rank reading its cache), and the stopped run below reads theirs.
    one = _run(home, f"one-{editor}", tiny_model_dir, nine_facts, editor, [], "cache-one")
    if editor == "alphaedit":
        two = request.getfixturevalue("two_process_alphaedit")
    else:
        two = _run(home, f"two-{editor}", tiny_model_dir, nine_facts, editor, DDP)

    if editor == "alphaedit":
        # Every request's v* is optimised exactly once, each batch split 1 + 2 between ranks.
        rank0, rank1 = _optimised(two, 0), _optimised(two, 1)
        assert [len(s) for s in rank0] == [1] * NUM_BATCHES
        assert [len(s) for s in rank1] == [2] * NUM_BATCHES
        batches = [a + b for a, b in zip(rank0, rank1, strict=True)]
        assert batches == _optimised(one, 0), "the same requests, batch by batch, in order"
        assert sorted(sum(batches, [])) == list(range(NUM_BATCHES * PER_BATCH))
    else:
        # FT tunes on each request of a batch in exactly one process (1 + 2), the gradients
        # summed across them.
        assert _optimised(two, 0, "tuned") == [[1]] * NUM_BATCHES
        assert _optimised(two, 1, "tuned") == [[2]] * NUM_BATCHES
        assert _optimised(one, 0, "tuned") == [[PER_BATCH]] * NUM_BATCHES

    # The ranks hold bit-identical weights and K Kᵀ (each ΔW is rank 0's, broadcast) ...
    state0, state1 = (torch.load(two / f"state-{r}.pt", weights_only=True) for r in (0, 1))
    assert state0.keys() == state1.keys() and len(state0) == (4 if editor == "alphaedit" else 2)
    for key, tensor in state0.items():
        assert torch.equal(tensor, state1[key]), key
    # ... equal to one process's within float32 tolerance (torch.testing's float32 defaults:
    # |a − b| ≤ 1e-5 + 1.3e-6·|b|; the shares are batched differently, so the last bits move).
    single = torch.load(one / "state-0.pt", weights_only=True)
    assert single.keys() == state0.keys()
    for key, tensor in single.items():
        torch.testing.assert_close(state0[key], tensor, msg=key)
    base = _base_weights(tiny_model_dir, [k for k in single if not k.startswith("kkt/")])
    assert all(not torch.equal(single[k], w) for k, w in base.items()), "the run edited"

    # One summary.json and one events file, from rank 0; the same metrics as one process.
    (summary_path,) = (two / "logs").rglob("summary.json")
    assert len(list((two / "logs").rglob("events.out.tfevents.*"))) == 1
    (reference_path,) = (one / "logs").rglob("summary.json")
    summary, reference = (json.loads(p.read_text()) for p in (summary_path, reference_path))
    assert summary["num_edited"] == reference["num_edited"] == NUM_BATCHES * PER_BATCH
    for section in ("pre", "final"):
        assert summary["edit"][section].keys() == reference["edit"][section].keys()
        for metric, value in reference["edit"][section].items():
            assert summary["edit"][section][metric] == pytest.approx(value, abs=1e-6), metric
    # The general-ability examples (5 and 3: shares of 2 + 3 and 1 + 2) give the same scores.
    assert summary["general"] == reference["general"]
    assert set(reference["general"]) == {"sst2", "nq_open"}
    for task in reference["general"].values():
        assert task["final_step"] == NUM_BATCHES and task["final"] and task["baseline"]


def _base_weights(model_dir: str, names: list[str]) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {name: model.get_parameter(name).detach() for name in names}


@pytest.mark.slow
def test_a_two_process_run_stopped_and_resumed_ends_as_the_uninterrupted_one(
    home, tiny_model_dir, nine_facts, two_process_alphaedit
):
    straight = two_process_alphaedit
    stop = [*DDP, "--trainer.max_steps=2"]
    stopped = _run(home, "stopped", tiny_model_dir, nine_facts, "alphaedit", stop)
    (checkpoint,) = (stopped / "logs").rglob("last.ckpt")
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 2
    _run(home, "stopped", tiny_model_dir, nine_facts, "alphaedit", [*DDP, "--ckpt_path=last"])
    assert len(list((stopped / "logs").rglob("summary.json"))) == 1, "the same run folder"

    # Each request optimised once across the stop, by the same process as without it.
    for rank in (0, 1):
        assert _optimised(stopped, rank) == _optimised(straight, rank)
    # Both processes end with the uninterrupted run's weights and K Kᵀ, bit for bit.
    expected = torch.load(straight / "state-0.pt", weights_only=True)
    for rank in (0, 1):
        state = torch.load(stopped / f"state-{rank}.pt", weights_only=True)
        assert state.keys() == expected.keys()
        for key, tensor in expected.items():
            assert torch.equal(state[key], tensor), (rank, key)
