"""What every benchmark's JSON records about its run (the command, the commit, the device, torch), and how it is
written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# `git archive` writes the exported commit into this file (export-subst in .gitattributes).
ARCHIVAL_FILE = ".git_archival.txt"


def source_commit(root: Path = ROOT) -> str | None:
    """The commit the code under ``root`` comes from: ``git rev-parse HEAD`` (``-dirty`` with uncommitted changes
    to tracked files) when ``root`` is the top of a git checkout; else the hash ``git archive`` wrote into
    ``.git_archival.txt`` (an export — such as the copy run on the GPU machine, which sits inside a stale
    checkout whose HEAD is not the code's); else None."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() == root.resolve():
            dirty = git("status", "--porcelain", "--untracked-files=no")
            return git("rev-parse", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    archival = root / ARCHIVAL_FILE
    match = re.search(r"\b[0-9a-f]{40}\b", archival.read_text()) if archival.is_file() else None
    return match.group(0) if match else None


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
