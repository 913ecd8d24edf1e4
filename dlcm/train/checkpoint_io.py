"""Checkpoints that are either complete or absent: single files and sharded (FSDP2) checkpoint directories.

Lightning's default writer streams straight into the final path, so a crash or kill while ``last.ckpt`` is being
written leaves a truncated file where the last good checkpoint used to be. ``os.replace`` is atomic on POSIX
filesystems: readers see the old file or the new one, never a mix.

``ModelParallelStrategy`` writes a sharded checkpoint (one ``.distcp`` file per rank, the ``.metadata`` index of
``torch.distributed.checkpoint`` and Lightning's ``meta.pt`` with loops, schedulers, data position and callback
states) into the final directory as well, overwriting the previous shards file by file.
:class:`AtomicModelParallelStrategy` writes into ``.<name>.partial`` and swaps it in once every rank is done.
"""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.api import CheckpointException

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
    remove_path(old)


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
    checkpoints are complete or absent, and whose load errors name the checkpoint.

    ``data_parallel_size: auto`` means every process (dlcm is data-parallel only; Lightning's ``auto`` would make
    the processes of a node tensor-parallel), so recipes leave the world size to the launcher."""

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            if self._tensor_parallel_size == "auto":
                self._tensor_parallel_size = 1
            self._data_parallel_size = max(self.num_nodes * self.num_processes // self._tensor_parallel_size, 1)
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not self._save_distributed_checkpoint:  # one consolidated file, written by the checkpoint IO plugin
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f".{path.name}.partial")
        if self.is_global_zero:
            remove_path(partial)  # left behind by a crash during an earlier save
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()  # every rank's shards are on disk (torch.distributed.checkpoint fsyncs them)
        if self.is_global_zero:
            with open(partial / _METADATA_FILENAME, "rb+") as f:
                os.fsync(f.fileno())
            replace_directory(partial, path)
        self.barrier()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(checkpoint_path)
        if not path.is_file():  # a single consolidated file loads too
            require_sharded_checkpoint(path)
        try:
            return super().load_checkpoint(path, weights_only=weights_only)
        except UNREADABLE as err:
            raise unreadable(path, err) from err
