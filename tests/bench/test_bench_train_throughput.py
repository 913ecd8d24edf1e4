"""bench/train_throughput.py on the CPU with the tiny pair: both contexts in one JSON, rendered side by side."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.bench.test_bench_decode import load


def test_train_throughput_records_every_context_in_one_json(tmp_path: Path, monkeypatch, capsys) -> None:
    throughput, table = load("train_throughput"), load("table")
    out = tmp_path / "train.json"
    argv = ["--device", "cpu", "--pairs", "tiny", "--compile", "off", "--context", "32", "64", "--tokens-per-step"]
    argv += ["128", "--warmup", "1", "--steps", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", *argv])
    assert throughput.main() == 0
    data = json.loads(out.read_text())
    assert data["commit"] and data["device"] == "cpu"
    rows = {(r["kind"], r["context"]): r for r in data["records"]}
    assert set(rows) == {(k, c) for k in ("baseline", "dlcm") for c in (32, 64)}
    assert [rows[("dlcm", c)]["docs"] for c in (32, 64)] == [4, 2]
    assert all(r["tokens_per_step"] == 128 and r["median_step_ms"] > 0 for r in rows.values())
    for r in rows.values():  # the optimizer's share at 32 micro-batches per step, and its time after every one
        assert r["median_step_ms"] < r["step_ms_optimizer_every_micro_batch"] and r["loss"] == "fused"
    capsys.readouterr()
    assert table.main(str(out)) == 0
    rendered = capsys.readouterr().out
    assert "| tiny_dlcm | 64 | bf16-mixed | off | 128 |" in rendered
    assert "| 32 | bf16-mixed | off |" in rendered and "| 64 | bf16-mixed | off |" in rendered  # DLCM / baseline


def test_train_throughput_unfused_loss_runs(tmp_path: Path, monkeypatch) -> None:
    throughput = load("train_throughput")
    out = tmp_path / "train.json"
    argv = ["--device", "cpu", "--pairs", "tiny", "--compile", "off", "--context", "32", "--tokens-per-step", "64"]
    argv += ["--warmup", "1", "--steps", "1", "--loss", "logits", "--accumulate", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", *argv])
    assert throughput.main() == 0
    records = json.loads(out.read_text())["records"]
    assert {r["loss"] for r in records} == {"logits"} and all(r["accumulate"] == 1 for r in records)


def test_train_throughput_rejects_a_context_that_does_not_divide_the_step(monkeypatch, capsys) -> None:
    throughput = load("train_throughput")
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--device", "cpu", "--context", "3000"])
    with pytest.raises(SystemExit):
        throughput.main()
    assert "--context 3000 is not allowed" in capsys.readouterr().err
