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


def test_make_venv_takes_the_cpu_torch_build_from_pytorchs_index_without_a_local_wheel(tmp_path: Path) -> None:
    """`make venv` on a machine whose pip has no local torch wheel: the --no-index try fails, and torch then comes
    from PyTorch's CPU index, before anything could pull PyPI's CUDA build. A stand-in python records each call."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls"
    fake = venv / "bin" / "python"
    # fails like pip without a cached wheel: `--no-index` cannot find torch
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\ncase "$*" in *--no-index*torch*) exit 1;; esac\n')
    fake.chmod(0o755)
    subprocess.run(["make", "-s", "-C", str(ROOT), "venv", f"VENV={venv}"], check=True, capture_output=True)
    calls = log.read_text().splitlines()
    torch_calls = [c for c in calls if "torch==" in c]
    assert torch_calls[0] == "-m pip install -q --no-deps --no-index torch==2.13.0"
    assert (
        torch_calls[1] == "-m pip install -q --no-deps torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    )
    # only then torch's own dependencies (torch itself already satisfied) and the package
    assert calls.index(torch_calls[1]) < calls.index("-m pip install -qq -e .[dev]")
