"""bench/eval_throughput.py on the CPU with the tiny recipes: the code path the GPU run takes, its JSON and table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.bench.test_bench_decode import load
from tests.eval.test_eval import write_jsonl

RECIPES = ["recipes/baseline_tiny_defaultcorpus_cpu.yaml", "recipes/dlcm_tiny_r4_defaultcorpus_cpu.yaml"]


def test_eval_throughput_bench_smoke(tmp_path: Path, monkeypatch, capsys) -> None:
    bench, table = load("eval_throughput"), load("table")
    rows = [
        {"query": f"Question: item {i}\n", "choices": ["one answer", "another answer"], "gold": i % 2} for i in range(6)
    ]
    write_jsonl(tmp_path / "piqa.jsonl", rows)
    out = tmp_path / "eval.json"
    argv = ["--data-dir", str(tmp_path), "--task", "piqa", "--device", "cpu", "--limit", "5", "--warmup-items", "2"]
    monkeypatch.setattr(
        sys, "argv", ["eval_throughput.py", *argv, "--iters", "2", "--recipes", *RECIPES, "--out", str(out)]
    )
    assert bench.main() == 0
    data = json.loads(out.read_text())
    assert data["meta"]["benchmark"] == "eval_throughput" and data["meta"]["commit"]
    assert [r["family"] for r in data["records"]] == ["baseline", "dlcm"]
    assert all(r["items"] == 5 and len(r["seconds_runs"]) == 2 and r["items_per_s"] > 0 for r in data["records"])
    assert data["records"][1]["target_ratio"] == 4
    capsys.readouterr()
    assert table.main(str(out)) == 0
    rendered = capsys.readouterr().out
    assert rendered.count("| piqa | 5 |") == 2 and "×" in rendered
