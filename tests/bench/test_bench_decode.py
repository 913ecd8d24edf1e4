"""bench/decode.py on the CPU with the tiny pair: the code path the H200 run takes, its JSON and its table."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench"


def load(name: str):
    """A bench script as a module, imported as when it runs (its folder on sys.path, for bench/report.py)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_decode_bench_smoke(tmp_path: Path, monkeypatch, capsys) -> None:
    decode, table = load("decode"), load("table")
    out = tmp_path / "decode.json"
    argv = ["--device", "cpu", "--pairs", "tiny", "--dtype", "float32", "--prompt-len", "48", "--new-tokens", "8"]
    monkeypatch.setattr(
        sys, "argv", ["decode.py", *argv, "--batch", "1", "6", "--warmup", "0", "--iters", "1", "--out", str(out)]
    )
    assert decode.main() == 0
    data = json.loads(out.read_text())
    assert data["meta"]["benchmark"] == "decode" and data["meta"]["new_tokens"] == 8
    records = {(r["family"], r["batch"]): r for r in data["records"]}
    assert set(records) == {(f, b) for f in ("baseline", "dlcm") for b in (1, 6)}
    for r in records.values():
        assert r["decode_tokens_per_s"] > 0 and r["flops_per_token"] > 0 and r["host_syncs_per_step"] is None
    # Boundaries drawn at 1/R: the realised ratio of the prompts (6·48 tokens) and of the decoded tokens is near R.
    dlcm = records[("dlcm", 6)]
    assert 3.0 < dlcm["realised_ratio_prompt"] < 5.5 and math.isfinite(dlcm["realised_ratio_decode"])
    capsys.readouterr()
    assert table.main(str(out)) == 0
    rendered = capsys.readouterr().out
    assert "| tiny | 6 | tiny_dlcm |" in rendered and "(R = 4)" in rendered
