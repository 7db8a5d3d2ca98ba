"""Data-parallel editing on Lightning's DDP strategy.

Every rank holds the same model and receives the same batch of requests. The per-request work is
split across the ranks: the v* optimisation and the keys of a locate-then-edit editor, the edit
metrics and the general-ability examples. Each rank computes its contiguous share of the rows and
the shares are gathered in rank order (torchmetrics' ``gather_all_tensors``), so every rank ends up
with the same full tensors in the request order of a one-process run. Every rank then solves for
the same ΔW, and the module broadcasts each ΔW from rank 0 before applying it, so the weights are
bit-identical on every rank by construction. Only rank 0 writes logs, figures, ``summary.json``
and statistics caches (the others read the cache once rank 0 has written it).

:class:`EditDDPStrategy` is Lightning's :class:`~lightning.pytorch.strategies.DDPStrategy` with two
differences: the module is not wrapped in ``DistributedDataParallel`` (an edit computes ΔW itself;
there are no gradients to average, and DDP refuses a module without trainable parameters), and
the data loaders are not given a ``DistributedSampler`` (every rank must see the same batch).
It is registered as ``edit_ddp`` (``--trainer.strategy edit_ddp --trainer.devices N``); gloo on
CPU, NCCL on GPU, as Lightning chooses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torchmetrics.utilities.distributed import gather_all_tensors
from typing_extensions import override

T = TypeVar("T")
Rows = torch.Tensor | dict[str, torch.Tensor]


class Collective:
    """The ranks of a run, and the few collective operations editing needs.

    With one process (the default) every operation is the identity, so code written against a
    ``Collective`` runs unchanged without ``torch.distributed``.
    """

    def __init__(
        self, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world size {world_size}")
        if world_size > 1 and not dist.is_initialized():
            raise RuntimeError(
                f"A collective of {world_size} ranks needs torch.distributed initialised"
            )
        self.rank = rank
        self.world_size = world_size
        #: Where tensors travel (NCCL moves CUDA tensors only; gloo CPU tensors).
        self.device = torch.device(device)

    @classmethod
    def of(cls, trainer: Trainer | None) -> Collective:
        """The trainer's ranks (one process when there is no trainer or it is not distributed)."""
        if getattr(trainer, "world_size", 1) == 1 or not dist.is_initialized():
            return cls()
        device = "cpu" if dist.get_backend() == "gloo" else trainer.strategy.root_device
        return cls(trainer.global_rank, trainer.world_size, device)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def bounds(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share ``[start, stop)`` of ``n`` rows (sizes differ by ≤ 1)."""
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size

    def map(self, fn: Callable[[Sequence[T]], Rows], items: Sequence[T]) -> Rows:
        """``fn(items)`` computed in shares: each rank applies ``fn`` to its share of ``items``
        and the rows (dim 0) of the results are gathered in rank order, so every rank returns what
        one process would. ``fn`` returns a tensor, or a dict of tensors with the same keys on
        every rank, with one row per item. With fewer items than ranks every rank computes all.
        """
        if not self.distributed or len(items) < self.world_size:
            return fn(items)
        start, stop = self.bounds(len(items))
        result = fn(items[start:stop])
        if isinstance(result, torch.Tensor):
            return self.gather(result)
        return {key: self.gather(result[key]) for key in sorted(result)}

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``rows`` (dim 0, any length) in rank order."""
        if not self.distributed:
            return rows
        parts = gather_all_tensors(rows.to(self.device).contiguous())
        return torch.cat(parts, dim=0).to(rows.device)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with rank ``src``'s (in place); returns it."""
        return self._in_place(tensor, lambda t: dist.broadcast(t, src))

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with the sum over the ranks (in place)."""
        return self._in_place(tensor, dist.all_reduce)

    def _in_place(self, tensor: torch.Tensor, op: Callable[[torch.Tensor], Any]) -> torch.Tensor:
        """Run the in-place collective ``op`` on ``tensor`` (moved to :attr:`device` to travel)."""
        if self.distributed:
            travelling = tensor.to(self.device).contiguous()
            op(travelling)
            if travelling.data_ptr() != tensor.data_ptr():
                tensor.copy_(travelling)
        return tensor

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """Rank ``src``'s picklable ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def run_first_on_rank_zero(self, fn: Callable[[], Any]) -> None:
        """Call ``fn`` on rank 0, then (after a barrier) on the other ranks: what rank 0 writes
        to a shared cache, the others read instead of computing."""
        if self.rank == 0:
            fn()
        self.barrier()
        if self.rank != 0:
            fn()


#: One process.
SINGLE = Collective()


class EditDDPStrategy(DDPStrategy):
    """Lightning's DDP for editing: processes, process group, barriers and broadcasts as
    :class:`~lightning.pytorch.strategies.DDPStrategy`, without the ``DistributedDataParallel``
    wrapper and without a ``DistributedSampler`` (every rank receives the whole batch and the
    :class:`~sphere_lightning.module.EditingModule` splits its requests)."""

    strategy_name = "edit_ddp"

    @override
    def setup(self, trainer: Trainer) -> None:
        # Every rank must receive the same batch of requests: the module splits them itself.
        trainer._accelerator_connector.use_distributed_sampler = False
        super().setup(trainer)

    @override
    def configure_ddp(self) -> None:
        # No DistributedDataParallel wrapper and no gradient averaging: the module broadcasts
        # each ΔW from rank 0 before applying it.
        return None

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name,
            cls,
            description="DDP for knowledge editing: requests split across ranks, ΔW from rank 0",
            override=True,
        )


EditDDPStrategy.register_strategies(StrategyRegistry)


def run_log_dir(trainer: Trainer) -> str | None:
    """``trainer.log_dir`` read on this process alone.

    Lightning's property broadcasts rank 0's value, a collective every process must join; code
    that runs on rank 0 only (figures, ``summary.json``, export) reads it here instead.
    """
    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    return logger.log_dir if isinstance(logger, TensorBoardLogger | CSVLogger) else logger.save_dir
