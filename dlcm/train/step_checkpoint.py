"""Checkpoints on a training cadence, independent of validation: every N optimizer steps and/or every M minutes,
at the end of training, and at the first step boundary after a preemption signal or CTRL-C.

Each save is ``step<global_step>.ckpt`` (a file, or a directory of shards under FSDP2), written atomically by
dlcm's checkpoint IO / strategy; ``last.ckpt`` is a symbolic link to the newest complete one, and only the newest
``keep_last`` are kept. Best-by-metric checkpoints are Lightning's ``ModelCheckpoint`` (the CLI's ``checkpoint``
section), saved after validation into the same directory.

Whether to save is decided by every rank together: the ranks' preemption flags and rank 0's clock are combined
in one all-reduce per optimizer step, so all ranks enter the (collective) save at the same step.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from dlcm.model.config import require
from dlcm.train import preemption
from dlcm.train.checkpoint_io import fsync_directory, remove_path, remove_stale_temporaries

STEP_NAME = re.compile(r"^step(\d+)\.ckpt$")
LAST = "last.ckpt"


def step_path(directory: Path, step: int) -> Path:
    return directory / f"step{step:09d}.ckpt"


def checkpoint_dir(trainer: L.Trainer) -> Path:
    """Where Lightning's ``ModelCheckpoint`` puts checkpoints: ``<save_dir>/<name>/<version>/checkpoints`` of the
    first logger, else ``<default_root_dir>/checkpoints``."""
    if trainer.loggers:
        logger = trainer.loggers[0]
        save_dir = logger.save_dir or trainer.default_root_dir
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return Path(save_dir) / str(logger.name) / version / "checkpoints"
    return Path(trainer.default_root_dir) / "checkpoints"


class StepCheckpoint(Checkpoint):
    """Saves ``step<N>.ckpt`` every ``every_n_steps`` optimizer steps and/or when ``every_n_minutes`` have passed
    since the last save, at the end of training, and on preemption (then exits for requeue); links ``last.ckpt``
    to the newest complete save and keeps the newest ``keep_last``.

    Args:
        every_n_steps: optimizer steps between saves (None: no step cadence).
        every_n_minutes: wall-clock minutes of training between saves (None: no time cadence).
        keep_last: complete step checkpoints kept (older ones are deleted once a newer one is complete).
        dirpath: directory of the checkpoints (None: the run directory's ``checkpoints``, as ModelCheckpoint).
    """

    def __init__(
        self,
        every_n_steps: int | None = 1000,
        every_n_minutes: float | None = 30.0,
        keep_last: int = 2,
        dirpath: str | None = None,
    ) -> None:
        require(every_n_steps is None or every_n_steps >= 1, "every_n_steps", every_n_steps, "None or an integer >= 1")
        require(
            every_n_minutes is None or every_n_minutes > 0, "every_n_minutes", every_n_minutes, "None or a number > 0"
        )
        require(keep_last >= 1, "keep_last", keep_last, "an integer >= 1")
        self.every_n_steps = every_n_steps
        self.every_n_minutes = every_n_minutes
        self.keep_last = keep_last
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self._seen_step = -1
        self._saved_step = -1
        self._saved_at = time.monotonic()
        self._uncommitted: list[Path] = []
        self._stop_at: int | None = None  # the step whose preemption save is done: exit before the next batch

    @property
    def last_path(self) -> Path | None:
        return None if self.dirpath is None else self.dirpath / LAST

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.dirpath = Path(trainer.strategy.broadcast(str(self.dirpath or checkpoint_dir(trainer))))
        if trainer.is_global_zero:
            for path in remove_stale_temporaries(self.dirpath):
                rank_zero_info(f"removed {path}: left by a save that was killed")
        trainer.strategy.barrier("StepCheckpoint.setup")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's own SIGTERM handler (installed just before training) broadcasts from inside the handler.
        preemption.install()
        self._seen_step = self._saved_step = trainer.global_step  # a resumed run does not re-save its start
        self._stop_at = None
        self._saved_at = time.monotonic()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # inside a gradient-accumulation window: no step boundary
            return
        self._seen_step = step
        commit = getattr(trainer.strategy, "commit_finished_save", None)
        if commit is not None:
            commit()
        self._commit()
        preempt, time_due = self._agree(trainer)
        step_due = self.every_n_steps is not None and step % self.every_n_steps == 0
        # The last step saves here, not in on_train_end: a checkpoint from the batch-end hook resumes exactly (also
        # when the run is later extended); on_train_end covers runs that end by epochs.
        last_step = 0 < trainer.max_steps <= step
        if (preempt or time_due or step_due or last_step) and step != self._saved_step:
            self._save(trainer, step)
        if preempt:
            self._finish(trainer)
            self._stop_at = step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Here rather than right after the save: Lightning logs a step's metrics after its batch-end hooks, and the
        # resumed run logs from the step after the checkpoint on.
        if self._stop_at is not None:
            stop = preemption.Preempted()
            if preemption.interrupted():
                rank_zero_info(
                    f"interrupted: saved {self._saved_path()} at step {self._stop_at}; the same command with "
                    f"--resume=auto (or --ckpt_path {self._saved_path()}) continues the run"
                )
            else:
                rank_zero_info(
                    f"preemption signal ({', '.join(preemption.received()) or 'on another rank'}): saved "
                    f"{self._saved_path()} at step {self._stop_at}; exiting with code {stop.code} for requeue"
                )
            raise stop

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._saved_step:
            self._save(trainer, trainer.global_step)
        self._finish(trainer)

    def _saved_path(self) -> Path:
        return step_path(self.dirpath, self._saved_step)

    def _agree(self, trainer: L.Trainer) -> tuple[bool, bool]:
        """(a rank received a preemption signal, rank 0's clock says a save is due): the same on every rank."""
        minutes = (time.monotonic() - self._saved_at) / 60
        time_due = trainer.is_global_zero and self.every_n_minutes is not None and minutes >= self.every_n_minutes
        flags = torch.tensor([float(preemption.requested()), float(time_due)], device=trainer.strategy.root_device)
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0].item()), bool(flags[1].item())

    def _save(self, trainer: L.Trainer, step: int) -> None:
        path = step_path(self.dirpath, step)
        # Collective under sharded strategies; atomic (dlcm.train.checkpoint_io); the full state, to resume from.
        trainer.save_checkpoint(path, weights_only=False)
        self._saved_step = step
        self._saved_at = time.monotonic()
        if trainer.is_global_zero:
            self._uncommitted.append(path)
        self._commit()

    def _finish(self, trainer: L.Trainer) -> None:
        wait = getattr(trainer.strategy, "wait_for_pending_save", None)
        if wait is not None:
            wait()
        self._commit()

    def _commit(self) -> None:
        """Rank 0: point ``last.ckpt`` at the newest complete save and delete the ones beyond ``keep_last``."""
        done = [p for p in self._uncommitted if p.exists()]  # under its final name only once complete
        if not done:
            return
        self._uncommitted = [p for p in self._uncommitted if p not in done]
        link = self.dirpath / LAST
        tmp = self.dirpath / f".{LAST}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(done[-1].name, tmp)
        os.replace(tmp, link)
        fsync_directory(self.dirpath)
        kept = sorted((p for p in self.dirpath.iterdir() if STEP_NAME.match(p.name)), key=lambda p: p.name)
        for old in kept[: -self.keep_last]:
            remove_path(old)
