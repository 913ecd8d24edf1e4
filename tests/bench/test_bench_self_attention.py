"""bench/self_attention.py on the CPU with the tiny shape: timings, the error record of a method that cannot run,
its JSON and its table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.bench.test_bench_decode import load


def test_self_attention_bench_smoke(tmp_path: Path, monkeypatch, capsys) -> None:
    bench, table = load("self_attention"), load("table")
    out = tmp_path / "self_attention.json"
    argv = ["--shapes", "tiny", "--device", "cpu", "--dtype", "float32", "--warmup", "0", "--iters", "1"]
    monkeypatch.setattr(sys, "argv", ["self_attention.py", *argv, "--out", str(out)])
    assert bench.main() == 0
    records = {r["method"]: r for r in json.loads(out.read_text())["records"]}
    assert sorted(records) == ["flex", "njt", "sdpa"]
    # torch 2.13 has no FlexAttention backward and no causal nested-tensor SDPA on CPU: recorded, not dropped
    # (or, once it has, equal to the first method's output)
    for method in ("flex", "njt"):
        assert "error" in records[method] or records[method]["max_abs_err"] < 1e-5
    assert records["sdpa"]["median_ms"] > 0 and records["sdpa"]["first_call_ms"] > 0
    capsys.readouterr()
    assert table.main(str(out)) == 0
    assert "| tiny | 4 / 2 / 16 | sdpa |" in capsys.readouterr().out
    heads, _, head_dim, lengths = bench.SHAPES["tiny"]
    assert bench.executed_flops(heads, head_dim, lengths) == 3.5 * 4 * heads * head_dim * (48 * 49 / 2 + 16 * 17 / 2)
