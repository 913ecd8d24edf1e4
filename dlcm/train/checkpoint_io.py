"""Checkpoints that are either complete or absent: single files and sharded (FSDP2) checkpoint directories.

Lightning's default writer streams straight into the final path, so a crash or kill while ``last.ckpt`` is being
written leaves a truncated file where the last good checkpoint used to be. ``os.replace`` is atomic on POSIX
filesystems: readers see the old file or the new one, never a mix.

``ModelParallelStrategy`` writes a sharded checkpoint (one ``.distcp`` file per rank, the ``.metadata`` index of
``torch.distributed.checkpoint`` and Lightning's ``meta.pt`` with loops, schedulers, data position and callback
states) into the final directory as well, overwriting the previous shards file by file.
:class:`AtomicModelParallelStrategy` writes into ``.<name>.partial`` and swaps it in once every rank is done;
with ``async_save`` the training loop waits only for the copy of the shards to host memory, and the swap happens
once the background write is complete.

Every rename is followed by an fsync of the directory, so a power loss cannot undo it. A killed save leaves only
dot-named temporaries (``.<name>.tmp-<pid>``, ``.<name>.partial``), never a file under a checkpoint's name;
:func:`remove_stale_temporaries` deletes them at the next start.
"""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.constants import default_pg_timeout

SHARD_INDEX = ".metadata"  # torch.distributed.checkpoint's index of every rank's tensors
# What a failed read raises: truncated zip/pickle files (a zip cut mid-record reads as OSError "Invalid argument"),
# and torch.distributed.checkpoint's per-rank failures. Paths are checked before reading, so an OSError is the file.
UNREADABLE = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, CheckpointException)


def unreadable(path: Path, err: BaseException) -> ValueError:
    return ValueError(
        f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); it is truncated or not a Lightning "
        "checkpoint. Resume from another one (e.g. the best checkpoint next to it)."
    )


def replaced_name(path: Path) -> Path:
    """Where the previous checkpoint sits while a new one is swapped in."""
    return path.with_name(f".{path.name}.old")


def fsync_directory(path: Path) -> None:
    """Make the renames inside ``path`` durable (POSIX: a rename is on disk once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_temporary(path: Path) -> bool:
    """A killed save's leftover: a partial file or directory, never a complete checkpoint."""
    name = path.name
    return name.startswith(".") and (".tmp-" in name or name.endswith(".partial"))


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete what killed saves left in ``directory``; return what was removed.

    ``.<name>.old`` is removed only where ``<name>`` exists: otherwise it is the last complete copy of that
    checkpoint (a kill between the two renames of :func:`replace_directory`) and the load error points to it.
    """
    removed = []
    if not directory.is_dir():
        return removed
    for path in sorted(directory.iterdir()):
        stale_old = path.name.startswith(".") and path.name.endswith(".old") and (directory / path.name[1:-4]).exists()
        if is_temporary(path) or stale_old:
            remove_path(path)
            removed.append(path)
    return removed


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def replace_directory(new: Path, path: Path) -> None:
    """Move the complete checkpoint ``new`` to ``path``, replacing what is there.

    A directory cannot be swapped in one atomic step: the old one is renamed aside first. A crash between the two
    renames leaves the previous checkpoint complete at ``.<name>.old`` (the load error points there).
    """
    old = replaced_name(path)
    remove_path(old)
    if path.exists() or path.is_symlink():
        os.replace(path, old)
    os.replace(new, path)
    fsync_directory(path.parent)
    remove_path(old)


def swap_in(partial: Path, path: Path) -> None:
    """Make the sharded checkpoint written to ``partial`` durable and move it to ``path``."""
    with open(partial / _METADATA_FILENAME, "rb+") as f:
        os.fsync(f.fileno())
    replace_directory(partial, path)


def require_sharded_checkpoint(path: Path) -> None:
    """Raise a clear error unless ``path`` is a complete sharded checkpoint directory."""
    if not path.exists():
        hint = ""
        if replaced_name(path).is_dir():
            hint = f"; a save was interrupted while replacing it: the previous checkpoint is {replaced_name(path)}"
        raise FileNotFoundError(f"checkpoint {path} does not exist{hint}")
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} is a single file, not a sharded checkpoint directory")
    missing = [name for name in (SHARD_INDEX, _METADATA_FILENAME) if not (path / name).is_file()]
    if missing:
        raise ValueError(
            f"checkpoint directory {path} is not a complete sharded checkpoint: {', '.join(missing)} missing "
            f"(expected the files ModelParallelStrategy writes: {SHARD_INDEX}, {_METADATA_FILENAME}, *.distcp)"
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic saves and load errors that name the file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_directory(path.parent)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist: pass the path of a .ckpt written by `dlcm fit`")
        try:
            location = {} if map_location is None else {"map_location": map_location}
            return super().load_checkpoint(path, weights_only=weights_only, **location)
        except UNREADABLE as err:
            raise unreadable(path, err) from err


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2; dlcm applies it in ``configure_model``) whose sharded
    checkpoints are complete or absent, optionally written in the background, and whose load errors name the
    checkpoint.

    ``async_save=True``: ``torch.distributed.checkpoint.async_save`` copies the shards to host memory (the only
    stall of the training loop) and writes them from a background thread, synchronising the ranks over a separate
    gloo group so that it never interleaves with the training loop's NCCL collectives. The finished directory is
    swapped in by :meth:`commit_finished_save` (polled after every step), before the next save starts, and at
    teardown. Host memory holds one extra copy of this rank's shards while a save is in flight.

    ``data_parallel_size: auto`` means every process (dlcm is data-parallel only; Lightning's ``auto`` would make
    the processes of a node tensor-parallel), so recipes leave the world size to the launcher.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        async_save: bool = False,
    ) -> None:
        super().__init__(
            data_parallel_size, tensor_parallel_size, save_distributed_checkpoint, process_group_backend, timeout
        )
        self.async_save = async_save
        self._async_group: Any = None
        # (future, partial directory, final path) of the save in flight
        self._pending: tuple[Future, Path, Path] | None = None

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            if self._tensor_parallel_size == "auto":
                self._tensor_parallel_size = 1
            self._data_parallel_size = max(self.num_nodes * self.num_processes // self._tensor_parallel_size, 1)
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not self._save_distributed_checkpoint:  # one consolidated file, written by the checkpoint IO plugin
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        self.wait_for_pending_save()
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f".{path.name}.partial")
        if self.is_global_zero:
            remove_path(partial)  # left behind by a crash during an earlier save
        self.barrier()
        if not self.async_save:
            super().save_checkpoint(checkpoint, partial, storage_options)
            self.barrier()  # every rank's shards are on disk (torch.distributed.checkpoint fsyncs them)
            if self.is_global_zero:
                swap_in(partial, path)
            self.barrier()
            return
        partial.mkdir(parents=True, exist_ok=True)
        # The split Lightning's ModelParallelStrategy makes: tensors as shards, everything else in meta.pt.
        shards = {"state_dict": checkpoint.pop("state_dict")}
        shards.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        if self._async_group is None and dist.is_initialized():
            self._async_group = dist.new_group(backend="gloo")
        future = dcp.async_save(shards, checkpoint_id=partial, process_group=self._async_group)
        if self.is_global_zero:
            torch.save(checkpoint, partial / _METADATA_FILENAME)
        self._pending = (future, partial, path)

    def commit_finished_save(self) -> bool:
        """Swap in the background save if it has finished (no collective: any rank may call it at any time).
        Returns whether a save is still in flight."""
        if self._pending is None:
            return False
        if not self._pending[0].done():
            return True
        future, partial, path = self._pending
        self._pending = None
        future.result()  # raises what the background write raised
        # The coordinator's future completes after every rank's shards and the .metadata index are written.
        if self.is_global_zero:
            swap_in(partial, path)
        return False

    def wait_for_pending_save(self) -> None:
        """Block until the save in flight is written and swapped in (every rank calls it; then barrier)."""
        if self._pending is not None:
            self._pending[0].result()
            self.commit_finished_save()
            self.barrier()

    def teardown(self) -> None:
        self.wait_for_pending_save()
        super().teardown()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(checkpoint_path)
        if not path.is_file():  # a single consolidated file loads too
            require_sharded_checkpoint(path)
        try:
            return super().load_checkpoint(path, weights_only=weights_only)
        except UNREADABLE as err:
            raise unreadable(path, err) from err
