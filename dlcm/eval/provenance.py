"""What a result was computed from: the code's commit, package versions, and SHA-256 of the files read.

``dlcm eval`` stores this next to its numbers, so a results file says which checkpoint, recipe, task files and code
produced it; benchmarks record the commit the same way.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# `git archive` writes the exported commit into this file (export-subst in .gitattributes).
ARCHIVAL_FILE = ".git_archival.txt"
PACKAGES = ("dlcm-recipes", "torch", "lightning", "tokenizers", "numpy")


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


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide a result (None where one is absent), and Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file, or of a directory's files (relative names and contents, in sorted order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def file_record(path: str | Path) -> dict[str, Any]:
    """``{"path", "sha256"}`` of one input file or directory (the path as given and resolved)."""
    return {"path": str(path), "resolved": str(Path(path).resolve()), "sha256": sha256_of(path)}
