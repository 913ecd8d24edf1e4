"""Checkpoints are atomic: a crash while writing never replaces (or truncates) the previous file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dlcm.checkpoint_io import AtomicCheckpointIO


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
