"""Checkpoints are atomic: a crash while writing never replaces (or truncates) the previous file or sharded
checkpoint directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from lightning.fabric.utilities.load import _load_distributed_checkpoint

from dlcm.train import checkpoint_io
from dlcm.train.checkpoint_io import AtomicCheckpointIO, AtomicModelParallelStrategy, require_sharded_checkpoint


def test_crash_during_save_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    last = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, last)
    good = last.read_bytes()

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt  # e.g. the job is killed while serialising

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, last)
    assert last.read_bytes() == good
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    monkeypatch.undo()
    assert io.load_checkpoint(last)["step"] == 1


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt does not exist"):
        io.load_checkpoint(tmp_path / "missing.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    io.save_checkpoint({"w": torch.ones(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"truncated\.ckpt cannot be read .*truncated or not a Lightning checkpoint"):
        io.load_checkpoint(truncated)


def sharded_checkpoint(step: int) -> dict:
    """What Lightning hands the strategy: the state dict (saved as shards) and the rest (saved in meta.pt)."""
    return {"state_dict": {"w": torch.full((4,), float(step))}, "global_step": step}


def test_crash_during_sharded_save_keeps_the_last_good_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    strategy = AtomicModelParallelStrategy()  # one process: no collectives, rank 0 does everything
    last = tmp_path / "last.ckpt"
    strategy.save_checkpoint(sharded_checkpoint(1), last)
    require_sharded_checkpoint(last)
    original_save = dcp.save

    def crash_midway(state, checkpoint_id, **kwargs):
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial shard")
        raise KeyboardInterrupt  # e.g. the job is killed while the ranks write their shards

    monkeypatch.setattr(dcp, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        strategy.save_checkpoint(sharded_checkpoint(2), last)
    assert _load_distributed_checkpoint(last)["state_dict"]["w"].tolist() == [1.0] * 4
    monkeypatch.setattr(dcp, "save", original_save)
    strategy.save_checkpoint(sharded_checkpoint(3), last)  # clears the partial directory the crash left
    assert _load_distributed_checkpoint(last)["global_step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_crash_between_the_renames_points_to_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    strategy = AtomicModelParallelStrategy()
    last = tmp_path / "last.ckpt"
    strategy.save_checkpoint(sharded_checkpoint(1), last)
    renames = []

    def second_rename_dies(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise KeyboardInterrupt
        os.rename(src, dst)

    monkeypatch.setattr(checkpoint_io.os, "replace", second_rename_dies)
    with pytest.raises(KeyboardInterrupt):
        strategy.save_checkpoint(sharded_checkpoint(2), last)
    with pytest.raises(
        FileNotFoundError, match=r"last\.ckpt does not exist; a save was interrupted .*\.last\.ckpt\.old"
    ):
        strategy.load_checkpoint(last)
    assert _load_distributed_checkpoint(tmp_path / ".last.ckpt.old")["global_step"] == 1
