"""Every third-party package the installed code imports is declared in pyproject.toml (a fresh install has it)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).parents[1]
SOURCES = [ROOT / "dlcm", ROOT / "data", ROOT / "callbacks"]
OWN = {"dlcm"}


def imported_top_level_modules() -> set[str]:
    found = set()
    for directory in SOURCES:
        for path in directory.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module.split(".")[0])
                elif isinstance(node, ast.Import):
                    found.update(alias.name.split(".")[0] for alias in node.names)
    return found - OWN - set(sys.stdlib_module_names)


def declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_imported_package_is_declared() -> None:
    providers = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    missing = []
    for module in sorted(imported_top_level_modules()):
        # A module no installed distribution provides is an optional one absent here (flash_attn without CUDA).
        names = {d.lower().replace("_", "-") for d in providers.get(module, [module])}
        if not names & declared:
            missing.append(f"{module} (from {', '.join(sorted(names))})")
    assert missing == []
