"""bench/report.py's commit record: a checkout reports its HEAD, a `git archive` export the commit it was exported
from (also when it sits inside another checkout, as on the GPU machine), an unexported copy nothing."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.bench.test_bench_decode import load

ROOT = Path(__file__).resolve().parents[2]


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def head() -> str:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a checkout of the repository")
    return git("rev-parse", "HEAD")


def test_a_checkout_reports_its_head(head: str) -> None:
    assert load("report").source_commit(ROOT) in (head, f"{head}-dirty")


def test_an_export_inside_another_checkout_reports_the_exported_commit(head: str, tmp_path: Path) -> None:
    report = load("report")
    outer = tmp_path / "stale"
    outer.mkdir()
    git("init", "-q", cwd=outer)  # stands for the GPU machine's stale checkout around the exported copy
    export = outer / "export"
    export.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(export, filter="data")
    assert report.source_commit(export) == head
    (export / report.ARCHIVAL_FILE).write_text((ROOT / report.ARCHIVAL_FILE).read_text())  # not substituted
    assert report.source_commit(export) is None
