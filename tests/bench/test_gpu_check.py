"""bench/gpu_check.py without a GPU: part selection, time-boxing of a part, and the one-screen summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.bench.test_bench_decode import load


def test_unknown_parts_are_refused_with_the_allowed_names(tmp_path: Path, monkeypatch, capsys) -> None:
    check = load("gpu_check")
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(tmp_path), "--parts", "train_4096"])
    with pytest.raises(SystemExit):
        check.main()
    err = capsys.readouterr().err
    assert "--parts train_4096 is not allowed" in err and "train_2048" in err and "tests" in err


def test_a_part_past_its_limit_is_stopped_and_recorded(tmp_path: Path) -> None:
    check = load("gpu_check")
    part = check.Part("sleepy", (sys.executable, "-c", "import time; time.sleep(30)"), seconds=1)
    result = check.run_part(part, tmp_path, scale=1.0)
    assert result["timed_out"] and result["rc"] is None and result["seconds"] < 20
    assert (tmp_path / "sleepy.log").exists()


def test_summary_reads_each_parts_json(tmp_path: Path) -> None:
    check = load("gpu_check")
    train = {"model": "dlcm_2.3b", "context": 2048, "attn_backend": "auto", "median_step_ms": 250.0}
    train |= {"tokens_per_sec": 65536.0, "mfu": 0.5, "peak_memory_gib": 60.0}
    (tmp_path / "train_2048.json").write_text(json.dumps({"records": [train]}))
    (tmp_path / "tests.log").write_text("....\n22 passed, 2 skipped in 200.0s\n")
    results = [
        {"part": "tests", "rc": 0, "timed_out": False, "limit_s": 200, "seconds": 201.0},
        {"part": "train_2048", "rc": 0, "timed_out": False, "limit_s": 90, "seconds": 80.0},
        {"part": "decode", "rc": None, "timed_out": True, "limit_s": 60, "seconds": 60.0},
    ]
    text = check.summarise(results, tmp_path)
    assert "22 passed, 2 skipped" in text and "65.5k tok/s MFU 50.0% peak 60.0 GiB" in text
    assert "decode         timed out" in text
