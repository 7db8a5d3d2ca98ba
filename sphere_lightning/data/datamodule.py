"""LightningDataModule that serves edit requests in a seeded, reproducible edit order."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Sampler

from sphere_lightning.data.formats import FORMATS, DataFormat
from sphere_lightning.data.readers import load_requests_with_format
from sphere_lightning.data.requests import EditBatch, EditRequest
from sphere_lightning.errors import ConfigError

#: Values of ``--data.metric_family``: ``auto`` (from the data format) or a key of
#: :data:`sphere_lightning.evaluation.METRIC_FAMILIES`.
MetricFamily = Literal["auto", "counterfact", "zsre", "knowedit"]


class EditRequestDataset(Dataset):
    """A map-style dataset over requests in edit order; item ``i`` is ``(i, requests[i])``."""

    def __init__(self, requests: list[EditRequest]) -> None:
        self.requests = requests

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, index: int) -> tuple[int, EditRequest]:
        return index, self.requests[index]


def collate_edit_batch(items: list[tuple[int, EditRequest]]) -> EditBatch:
    """Collate ``(position, request)`` pairs into an :class:`EditBatch`."""
    return EditBatch(
        requests=[request for _, request in items],
        positions=[position for position, _ in items],
    )


def order_digest(requests: list[EditRequest]) -> str:
    """SHA-256 of the edit order: two runs share it only if they edit the same requests in the
    same order."""
    digest = hashlib.sha256()
    for request in requests:
        digest.update(repr(request).encode())
    return digest.hexdigest()


class _BatchesFrom(Sampler[list[int]]):
    """Consecutive batches of ``range(length)``, the next iteration starting at batch
    ``start()`` (``len`` stays the whole epoch's, as Lightning counts it)."""

    def __init__(self, length: int, batch_size: int, start: Callable[[], int]) -> None:
        self.length, self.batch_size, self.start = length, batch_size, start

    def __len__(self) -> int:
        return math.ceil(self.length / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for first in range(self.start() * self.batch_size, self.length, self.batch_size):
            yield list(range(first, min(first + self.batch_size, self.length)))


class ResumableEditLoader(DataLoader):
    """The edit-batch loader Lightning can resume in the middle of the epoch.

    Lightning saves :meth:`state_dict` in checkpoints and calls :meth:`load_state_dict` on
    ``fit --ckpt_path``. The position saved is the number of batches the model has applied
    (``applied()``, the trainer's ``global_step``), not how far the loader has read ahead, so a
    resumed run starts with the first request not yet written into the model. The state also
    names the edit order, and a checkpoint of another order, batch size or data set is refused.
    """

    def __init__(
        self,
        requests: list[EditRequest],
        batch_size: int,
        applied: Callable[[], int],
    ) -> None:
        self._resume_at = 0
        self._applied = applied
        self._digest = order_digest(requests)
        self._shape = {"num_edits": len(requests), "edits_per_step": batch_size}
        super().__init__(
            EditRequestDataset(requests),
            batch_sampler=_BatchesFrom(len(requests), batch_size, self._take_start),
            num_workers=0,
            collate_fn=collate_edit_batch,
        )

    def _take_start(self) -> int:
        start, self._resume_at = self._resume_at, 0  # only the first iteration resumes
        return start

    def state_dict(self) -> dict[str, Any]:
        """Batches applied so far, with the edit order they index into."""
        return {"batches_applied": self._applied(), "order": self._digest, **self._shape}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start the next iteration after the batches the checkpoint had applied."""
        shape = {key: state.get(key) for key in self._shape}
        if shape != self._shape or state.get("order") != self._digest:
            raise ValueError(
                f"The checkpoint was written for another edit order ({shape}, order "
                f"{str(state.get('order'))[:12]}…) than this run's ({self._shape}, order "
                f"{self._digest[:12]}…): resume with the same `data` settings (dataset, "
                "format, num_edits, edits_per_step, seed, shuffle)"
            )
        self._resume_at = int(state["batches_applied"])


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"`data.{name}` must be a positive integer, got {value!r}")


class EditDataModule(LightningDataModule):
    """Serves a fixed, seeded sequence of edit requests.

    The edit order is a pure function of the data set and ``seed``: the loaded records are
    permuted with a seeded ``torch.Generator`` (or kept in file order with ``shuffle=False``)
    and the first ``num_edits`` are kept. ``train_dataloader`` yields them in that order in
    batches of ``edits_per_step`` (one batch per editing step); ``val_dataloader`` and
    ``test_dataloader`` yield all ``num_edits`` requests in the same order in batches of
    ``eval_batch_size``. Every batch is an :class:`EditBatch` whose ``positions`` index into the
    edit order.
    """

    def __init__(
        self,
        dataset: str = "builtin",
        format: DataFormat = "auto",
        split: str = "train",
        num_edits: int = 100,
        edits_per_step: int = 50,
        seed: int = 0,
        shuffle: bool = True,
        eval_batch_size: int = 32,
        metric_family: MetricFamily = "auto",
        skip_malformed: bool = False,
    ) -> None:
        """Create the data module (loading happens in ``setup``).

        Args:
            dataset: Where the edits come from: ``builtin`` (the packaged set of 343
                counterfactual facts), a path to a JSON (list) or JSONL file, a local dataset
                folder, or a Hugging Face hub dataset id.
            format: Record layout: ``auto`` (detect from the first record), ``builtin``,
                ``counterfact_rome``, ``counterfact_easyedit``, ``zsre_mend`` (as the reference
                reads zsRE), ``zsre_easyedit`` (as EasyEdit reads it) or ``knowedit``
                (KnowEdit's WikiData_recent / WikiData_counterfact files).
            split: Split to load for hub datasets and dataset folders.
            num_edits: How many requests the run edits (the first ``num_edits`` of the seeded
                order); must not exceed the number of records.
            edits_per_step: Requests per editing step (training batch size); the run takes
                ``ceil(num_edits / edits_per_step)`` steps.
            seed: Seed of the ``torch.Generator`` permutation that orders the records.
            shuffle: Permute the records with ``seed``; ``false`` keeps file order.
            eval_batch_size: Batch size of the validation and test loaders.
            metric_family: Evaluation metrics: ``counterfact``, ``zsre``, ``knowedit`` (edit
                success, portability and locality as EasyEdit scores KnowEdit), or ``auto``
                (``zsre`` for data read as zsRE, ``knowedit`` for KnowEdit's layout, else
                ``counterfact``).
            skip_malformed: Drop malformed records (with a warning) instead of failing.
        """
        super().__init__()
        if not isinstance(dataset, str) or not dataset.strip():
            raise ConfigError("`data.dataset` must be 'builtin', a file path or a hub dataset id")
        if format not in FORMATS:
            raise ConfigError(f"`data.format` must be one of {', '.join(FORMATS)}, got {format!r}")
        if metric_family not in get_args(MetricFamily):
            raise ConfigError(
                f"`data.metric_family` must be one of {', '.join(get_args(MetricFamily))}, "
                f"got {metric_family!r}"
            )
        _check_positive("num_edits", num_edits)
        _check_positive("edits_per_step", edits_per_step)
        _check_positive("eval_batch_size", eval_batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"`data.seed` must be a non-negative integer, got {seed!r}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.format = format
        self.split = split
        self.num_edits = num_edits
        self.edits_per_step = edits_per_step
        self.seed = seed
        self.shuffle = shuffle
        self.eval_batch_size = eval_batch_size
        self.skip_malformed = skip_malformed
        self._metric_family_arg = metric_family
        self._requests: list[EditRequest] | None = None
        self._loaded_format: str | None = None
        self._num_records: int | None = None

    # ------------------------------------------------------------------ loading and ordering

    def setup(self, stage: str | None = None) -> None:
        """Load and order the requests (only once, whatever the stage)."""
        self._ensure_loaded()

    def _ensure_loaded(self) -> list[EditRequest]:
        if self._requests is None:
            records, layout = load_requests_with_format(
                self.dataset, self.format, self.split, skip_malformed=self.skip_malformed
            )
            if self.num_edits > len(records):
                raise ConfigError(
                    f"`data.num_edits` is {self.num_edits} but {self.dataset!r} has only "
                    f"{len(records)} records"
                )
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed)
                order = torch.randperm(len(records), generator=generator)[: self.num_edits]
                self._requests = [records[i] for i in order.tolist()]
            else:
                self._requests = list(records[: self.num_edits])
            self._loaded_format = layout
            self._num_records = len(records)
            rank_zero_info(
                f"Edit data: {self.num_edits} of {len(records)} {layout} records from "
                f"{self.dataset!r} ({'seed ' + str(self.seed) if self.shuffle else 'file order'}), "
                f"{self.num_steps} step(s) of up to {self.edits_per_step} edits"
            )
        return self._requests

    @property
    def requests(self) -> list[EditRequest]:
        """The requests the run edits, in edit order (loads the data if needed; do not mutate)."""
        return self._ensure_loaded()

    @property
    def num_records(self) -> int:
        """How many records the data set has (before taking ``num_edits``)."""
        self._ensure_loaded()
        assert self._num_records is not None
        return self._num_records

    @property
    def num_steps(self) -> int:
        """Number of editing steps: ``ceil(num_edits / edits_per_step)``."""
        return math.ceil(self.num_edits / self.edits_per_step)

    @property
    def data_format(self) -> str:
        """The concrete record layout (``format`` with ``auto`` resolved; may load the data)."""
        if self.format != "auto":
            return self.format
        if self.dataset == "builtin":
            return "builtin"
        self._ensure_loaded()
        assert self._loaded_format is not None
        return self._loaded_format

    @property
    def metric_family(self) -> str:
        """``"counterfact"``, ``"zsre"`` or ``"knowedit"`` (``auto`` resolved; may load the
        data)."""
        if self._metric_family_arg != "auto":
            return self._metric_family_arg
        if self.data_format == "knowedit":
            return "knowedit"
        return "zsre" if self.data_format.startswith("zsre_") else "counterfact"

    # ------------------------------------------------------------------ loaders

    def _loader(self, batch_size: int) -> DataLoader:
        return DataLoader(
            EditRequestDataset(self.requests),
            batch_size=batch_size,
            shuffle=False,
            num_workers=0,
            collate_fn=collate_edit_batch,
        )

    def train_dataloader(self) -> ResumableEditLoader:
        """Edit batches of ``edits_per_step`` requests, in edit order (resumable mid-run)."""
        return ResumableEditLoader(self.requests, self.edits_per_step, self._batches_applied)

    def _batches_applied(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    def val_dataloader(self) -> DataLoader:
        """All ``num_edits`` requests in edit order, in batches of ``eval_batch_size``."""
        return self._loader(self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """All ``num_edits`` requests in edit order, in batches of ``eval_batch_size``."""
        return self._loader(self.eval_batch_size)

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """Leave :class:`EditBatch` as it is: it holds no tensors, and Lightning's default
        transfer cannot rebuild the frozen :class:`EditRequest` dataclasses inside it."""
        if isinstance(batch, EditBatch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
