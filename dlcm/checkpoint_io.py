"""Checkpoint files that are either complete or absent: write to a temporary name, fsync, then rename.

Lightning's default writer streams straight into the final path, so a crash or kill while ``last.ckpt`` is being
written leaves a truncated file where the last good checkpoint used to be. ``os.replace`` is atomic on POSIX
filesystems: readers see the old file or the new one, never a mix.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


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
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            raise ValueError(
                f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); it is truncated or not a "
                "Lightning checkpoint. Resume from another file (e.g. the best checkpoint next to it)."
            ) from err
