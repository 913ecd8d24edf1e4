"""What every benchmark's JSON records about its run (the command, the commit, the device, torch), and how it is
written."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

# The commit lookup lives with the other provenance helpers; re-exported here for the benchmark scripts.
from dlcm.eval.provenance import ARCHIVAL_FILE, source_commit

__all__ = ["ARCHIVAL_FILE", "run_meta", "source_commit", "write_json"]


def run_meta(device: torch.device | None = None) -> dict[str, Any]:
    """The command line as typed (``python bench/<script> …``), the commit, the device's name and the torch
    version."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "command": " ".join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "commit": source_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }


def write_json(out: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``out`` (parents created), rewritten whole: benchmarks call it after every configuration
    so that a later failure keeps what was measured."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(data, indent=2) + "\n")
