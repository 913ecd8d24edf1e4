"""bench/prefill.py on the CPU with the tiny pair: the code path the GPU run takes, its JSON and its table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.bench.test_bench_decode import load


def test_prefill_bench_smoke(tmp_path: Path, monkeypatch, capsys) -> None:
    prefill, table = load("prefill"), load("table")
    out = tmp_path / "prefill.json"
    argv = ["--device", "cpu", "--pairs", "tiny", "--dtype", "float32", "--prompt-len", "16", "40", "--batch", "1", "3"]
    monkeypatch.setattr(sys, "argv", ["prefill.py", *argv, "--warmup", "0", "--iters", "1", "--out", str(out)])
    assert prefill.main() == 0
    data = json.loads(out.read_text())
    assert data["meta"]["benchmark"] == "prefill" and data["meta"]["commit"]
    records = {(r["family"], r["prompt_len"], r["batch"]): r for r in data["records"]}
    assert set(records) == {(f, p, b) for f in ("baseline", "dlcm") for p in (16, 40) for b in (1, 3)}
    assert all(r["prefill_ms"] > 0 and r["host_syncs"] is None for r in records.values())
    # Boundaries drawn at 1/R: 3 prompts of 40 tokens start about 30 concepts.
    assert 2.0 < records[("dlcm", 40, 3)]["realised_ratio"] < 8.0
    capsys.readouterr()
    assert table.main(str(out)) == 0
    rendered = capsys.readouterr().out
    assert rendered.count("| tiny |") == 4 and "| tiny | 40 | 3 |" in rendered
