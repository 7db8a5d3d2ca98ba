"""Tests for EditDataModule: seeded order, batching, validation, Lightning integration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sphere_lightning.data import EditBatch, EditDataModule, load_builtin_facts
from tests.helpers import quiet_trainer

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def make(**kwargs: object) -> EditDataModule:
    dm = EditDataModule(**kwargs)  # type: ignore[arg-type]
    dm.setup("fit")
    return dm


def test_seeded_order_is_reproducible() -> None:
    a = make(num_edits=40, seed=3)
    b = make(num_edits=40, seed=3)
    c = make(num_edits=40, seed=4)
    assert [r.case_id for r in a.requests] == [r.case_id for r in b.requests]
    assert [r.case_id for r in a.requests] != [r.case_id for r in c.requests]
    facts = load_builtin_facts()
    expected = torch.randperm(len(facts), generator=torch.Generator().manual_seed(3))[:40]
    assert a.requests == [facts[i] for i in expected.tolist()]
    # num_edits takes a prefix of the same permutation
    assert make(num_edits=10, seed=3).requests == a.requests[:10]
    assert a.num_records == len(facts)


def test_no_shuffle_keeps_file_order() -> None:
    dm = make(num_edits=25, shuffle=False, seed=9)
    assert dm.requests == load_builtin_facts()[:25]


def test_train_batches() -> None:
    dm = make(num_edits=120, edits_per_step=50)
    assert dm.num_steps == 3
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    assert all(isinstance(b, EditBatch) for b in batches)
    assert [len(b) for b in batches] == [50, 50, 20]
    assert [p for b in batches for p in b.positions] == list(range(120))
    assert [r for b in batches for r in b.requests] == dm.requests
    assert list(dm.train_dataloader())[1].positions == list(range(50, 100))


@pytest.mark.parametrize("loader", ["val_dataloader", "test_dataloader"])
def test_eval_batches(loader: str) -> None:
    dm = make(num_edits=70, edits_per_step=7, eval_batch_size=32)
    batches = list(getattr(dm, loader)())
    assert [len(b) for b in batches] == [32, 32, 6]
    assert [p for b in batches for p in b.positions] == list(range(70))
    assert [r for b in batches for r in b.requests] == dm.requests


def test_num_steps_without_loading() -> None:
    dm = EditDataModule(dataset="does/not/exist.json", num_edits=101, edits_per_step=50)
    assert dm.num_steps == 3
    with pytest.raises(FileNotFoundError):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"num_edits": 0}, r"`data\.num_edits`"),
        ({"num_edits": -5}, r"`data\.num_edits`"),
        ({"edits_per_step": 0}, r"`data\.edits_per_step`"),
        ({"eval_batch_size": 0}, r"`data\.eval_batch_size`"),
        ({"seed": -1}, r"`data\.seed`"),
        ({"format": "csv"}, r"`data\.format`"),
        ({"metric_family": "squad"}, r"`data\.metric_family`"),
        ({"dataset": ""}, r"`data\.dataset`"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        EditDataModule(**kwargs)  # type: ignore[arg-type]


def test_too_many_edits() -> None:
    count = len(load_builtin_facts())
    dm = EditDataModule(num_edits=count + 1)
    with pytest.raises(ValueError, match=rf"`data.num_edits` is {count + 1}.*only {count} records"):
        dm.setup("fit")
    assert len(make(num_edits=count).requests) == count


def test_metric_family(tmp_path: Path) -> None:
    assert EditDataModule().metric_family == "counterfact"
    assert EditDataModule(metric_family="zsre").metric_family == "zsre"
    record = {
        "subject": "UniFirst",
        "src": "What is the product made by UniFirst?",
        "rephrase": "What will be the product of UniFirst?",
        "alt": "drones",
        "answers": ["uniform"],
        "loc": "nq question: who won",
        "loc_ans": "someone",
    }
    path = tmp_path / "z.json"
    path.write_text(json.dumps([record] * 3), encoding="utf-8")
    dm = EditDataModule(dataset=str(path), num_edits=2)
    assert dm.metric_family == "zsre"
    assert dm.data_format == "zsre_mend"
    assert (
        EditDataModule(dataset=str(path), format="zsre_mend", metric_family="auto").metric_family
        == "zsre"
    )
    easyedit = EditDataModule(dataset=str(path), format="zsre_easyedit", num_edits=2)
    assert (easyedit.data_format, easyedit.metric_family) == ("zsre_easyedit", "zsre")
    assert easyedit.requests[0].target_new == "drones"


def test_shared_counterfact(tmp_path: Path) -> None:
    path = SHARED_DATA / "counterfact" / "counterfact-edit-1k.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    dm = make(dataset=str(path), num_edits=100, edits_per_step=25, seed=1)
    assert dm.metric_family == "counterfact"
    assert len(dm.requests) == 100 and dm.num_records == 1000
    assert len(list(dm.train_dataloader())) == 4


def test_fit_loop_receives_edit_batches() -> None:
    from lightning.pytorch import LightningModule

    class Recorder(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[int]] = []
            self.val_seen: list[list[int]] = []

        def training_step(self, batch: EditBatch, batch_idx: int) -> torch.Tensor:
            assert isinstance(batch, EditBatch)
            self.seen.append(batch.positions)
            return (self.weight**2).sum()

        def validation_step(self, batch: EditBatch, batch_idx: int) -> None:
            assert isinstance(batch, EditBatch)
            self.val_seen.append(batch.positions)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = EditDataModule(num_edits=12, edits_per_step=5, seed=2, eval_batch_size=8)
    model = Recorder()
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=dm)
    assert model.seen == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    assert model.val_seen == [list(range(8)), [8, 9, 10, 11]]
