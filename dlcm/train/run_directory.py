"""A run directory put back as it was when ``dlcm fit`` / ``dlcm validate`` fails before training changed anything.

A refused resume (another width, learning rate, ``max_steps`` or data layout) is detected only after Lightning has
opened a new TensorBoard events file and rewritten ``config.yaml`` with the refused settings; a new run that fails
at start-up has created its directory. Both would mislead whoever reads the run later: TensorBoard would show two
runs' settings in one, and resuming again would read the refused recipe.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Files Lightning rewrites in place at every start (SaveConfigCallback, the logger's hparams); everything else in a
# run directory is written once under a new name (events files, checkpoints).
REWRITTEN = ("config.yaml", "hparams.yaml")


class RunDirectoryGuard:
    """Remembers ``log_dir`` (None: no logger) before a command runs; :meth:`restore` undoes what the command did.

    Directories the command creates are removed whole; in an existing run directory, new files are removed and the
    rewritten ones get their former contents back.
    """

    def __init__(self, log_dir: str | Path | None) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.created: list[Path] = []
        self.existing: set[Path] = set()
        self.contents: dict[Path, tuple[bytes, int, int]] = {}  # data, access and modification times (ns)
        if self.log_dir is None:
            return
        self.created = [d for d in (self.log_dir, *self.log_dir.parents) if not d.exists()]
        if not self.created:
            self.existing = set(self.log_dir.rglob("*"))
            files = [p for p in (self.log_dir / name for name in REWRITTEN) if p.is_file()]
            self.contents = {p: (p.read_bytes(), p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in files}

    def restore(self) -> None:
        if self.log_dir is None:
            return
        if self.created:
            shutil.rmtree(self.created[-1], ignore_errors=True)
            return
        # Deepest first, so that a new directory is empty when its turn comes.
        for path in sorted(set(self.log_dir.rglob("*")) - self.existing, key=lambda p: len(p.parts), reverse=True):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for path, (data, accessed, modified) in self.contents.items():
            path.write_bytes(data)
            os.utime(path, ns=(accessed, modified))
