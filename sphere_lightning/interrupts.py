"""Ctrl-C (SIGINT) never leaves a step half applied.

An editing step changes several tensors one after another: the edited weights (one per layer), then
the editor's state (AlphaEdit's K Kᵀ). A ``KeyboardInterrupt`` raised between two of those writes
would leave weights and state that belong to no step. :func:`sigint_deferred` wraps such a
sequence of writes: a SIGINT that arrives inside it is held back and delivered (to the handler that
was installed before, normally Python's ``KeyboardInterrupt``) as soon as the block has finished,
so the step has landed completely. A SIGINT before the block (during the v* optimisation and the
solve, which do not change the model) lands nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold back SIGINT while the block runs; deliver it afterwards. Nested blocks deliver at
    the end of the outermost one. Outside the main thread (where Python cannot install signal
    handlers) the block runs unprotected."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    received: list[tuple[int, FrameType | None]] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append((signum, frame))

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and callable(previous):
        previous(*received[0])
    elif received and previous == signal.SIG_DFL:
        signal.raise_signal(signal.SIGINT)
