"""Preemption: SIGUSR1 (SLURM's warning before the time limit) and SIGTERM (preemption, ``scancel``) only set a
flag. :class:`dlcm.train.step_checkpoint.StepCheckpoint` reads it at the next optimizer-step boundary, where every
rank agrees to save, and then ends the process with :data:`REQUEUE_EXIT_CODE`; the job script requeues on that code.

Nothing else happens inside the handler: a collective (or a checkpoint write) started from a signal handler can
interleave with the training loop's own collectives and hang every rank.
"""

from __future__ import annotations

import signal
from types import FrameType

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): "try again later"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_received: list[int] = []


def _note(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)


def install() -> None:
    """Route SIGUSR1 and SIGTERM to the flag (main thread only, as Python requires)."""
    for signum in SIGNALS:
        signal.signal(signum, _note)


def requested() -> bool:
    """Whether a preemption signal arrived since the process started (or since :func:`clear`)."""
    return bool(_received)


def received() -> list[str]:
    return [signal.Signals(s).name for s in _received]


def clear() -> None:
    _received.clear()


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is on disk: the process exits with :data:`REQUEUE_EXIT_CODE`."""

    def __init__(self) -> None:
        super().__init__(REQUEUE_EXIT_CODE)
