"""Preemption and interruption: SIGUSR1 (SLURM's warning before the time limit), SIGTERM (preemption,
``scancel``) and a first SIGINT (CTRL-C) only set a flag. :class:`dlcm.train.step_checkpoint.StepCheckpoint` reads
it at the next optimizer-step boundary, where every rank agrees to save, and then ends the process: with
:data:`REQUEUE_EXIT_CODE` after SIGUSR1/SIGTERM, on which the job script requeues, and with
:data:`INTERRUPT_EXIT_CODE` after CTRL-C. A second CTRL-C stops at once, without saving.

Nothing else happens inside the handler: a collective (or a checkpoint write) started from a signal handler can
interleave with the training loop's own collectives and hang every rank.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): "try again later"
INTERRUPT_EXIT_CODE = 130  # what a shell reports for a process ended by SIGINT: not to be requeued
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

_received: list[int] = []
_owner: list[int] = []  # the pid that installed the handlers (DataLoader workers inherit them by fork)


def _note(signum: int, frame: FrameType | None) -> None:
    if os.getpid() not in _owner:
        return  # a forked DataLoader worker: CTRL-C reaches the whole process group, the trainer decides
    if signum == signal.SIGINT:
        if signal.SIGINT in _received:
            _received.append(signum)
            raise KeyboardInterrupt
        print(
            "\ninterrupt: saving a checkpoint at the next optimizer step, then stopping (CTRL-C again stops at once, "
            "without saving)",
            file=sys.stderr,
            flush=True,
        )
    _received.append(signum)


def install() -> None:
    """Route SIGUSR1, SIGTERM and SIGINT to the flag (main thread only, as Python requires)."""
    _owner[:] = [os.getpid()]
    for signum in SIGNALS:
        signal.signal(signum, _note)


def requested() -> bool:
    """Whether a preemption signal arrived since the process started (or since :func:`clear`)."""
    return bool(_received)


def interrupted() -> bool:
    """Whether the user pressed CTRL-C (the run stops instead of asking to be requeued)."""
    return signal.SIGINT in _received


def stopped_at_once() -> bool:
    """Whether a second CTRL-C interrupted the run without a save."""
    return _received.count(signal.SIGINT) > 1


def received() -> list[str]:
    return list(dict.fromkeys(signal.Signals(s).name for s in _received))


def clear() -> None:
    _received.clear()


class Preempted(SystemExit):
    """Raised after the checkpoint of a preemption or an interrupt is on disk: the process exits with
    :data:`INTERRUPT_EXIT_CODE` after CTRL-C, else with :data:`REQUEUE_EXIT_CODE`."""

    def __init__(self) -> None:
        super().__init__(INTERRUPT_EXIT_CODE if interrupted() else REQUEUE_EXIT_CODE)
