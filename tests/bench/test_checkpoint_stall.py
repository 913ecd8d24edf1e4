"""bench/checkpoint_stall.py on CPU: both modes train, save through the FSDP2 strategy and report their timings."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PATH = Path(__file__).parents[2] / "bench" / "checkpoint_stall.py"
spec = importlib.util.spec_from_file_location("checkpoint_stall", PATH)
stall = importlib.util.module_from_spec(spec)
sys.modules["checkpoint_stall"] = stall
spec.loader.exec_module(stall)


def test_sync_and_async_saves_are_timed_and_complete(tmp_path: Path) -> None:
    for mode in stall.MODES:
        result = stall.measure(mode, "tiny_dlcm", every=2, saves=2, tokens=256, context=128, directory=tmp_path)
        assert [s["step"] for s in result["saves"]] == [2, 4]
        assert all(s["stall_seconds"] > 0 and s["write_seconds"] >= s["stall_seconds"] for s in result["saves"])
        assert result["checkpoint_bytes"] > 1_000_000  # tiny_dlcm's weights and AdamW state, fp32
        assert not list((tmp_path / mode).iterdir())  # the measured checkpoints are deleted
