"""bench/table.py on a training-throughput result: the throughput rows and, for profiled steps, the kernel-family
table side by side."""

from __future__ import annotations

import json

from tests.bench.test_bench_decode import load


def record(model: str, families: dict[str, float] | None) -> dict:
    rec = {
        "model": model,
        "precision": "bf16-mixed",
        "compile_blocks": True,
        "tokens_per_step": 16384,
        "median_step_ms": 400.0,
        "tokens_per_sec": 40960.0,
        "mfu": 0.478,
        "mfu_vs_measured_gemm": 0.596,
        "realised_ratio": None,
        "peak_memory_gib": 54.4,
    }
    if families is not None:
        rec["kernels"] = {"families_ms": families, "kernel_ms": sum(families.values()), "idle_ms": 7.0}
    return rec


def test_throughput_table_renders_rows_and_the_profile_side_by_side() -> None:
    table = load("table")
    data = {"command": "cmd", "device": "gpu", "torch": "2.11", "gemm_peak_flops": 7.9e14}
    plain = table.throughput_table({**data, "records": [record("a", None)]})
    assert "| a | – | bf16-mixed | on | 16384 | 400 | 41.0k | 47.8% | 59.6% | – | 54.4 |" in plain
    assert "kernel family" not in plain
    profiled = table.throughput_table(
        {**data, "records": [record("a", {"gemm": 140.0, "optimizer": 10.0}), record("b", {"gemm": 150.0})]}
    )
    assert "| kernel family (profiled step, ms) | a | b |" in profiled
    assert "| gemm | 140.0 | 150.0 |" in profiled
    assert "| optimizer | 10.0 | 0.0 |" in profiled  # a family one step did not run reads 0
    assert "| all kernels | 150.0 | 150.0 |" in profiled


def test_throughput_jsons_of_separate_runs_combine_into_one_table(tmp_path, capsys) -> None:
    table = load("table")
    paths = []
    for context, step_ms in ((2048, 300.0), (8192, 400.0)):
        base, dlcm = record("baseline_1.3b", None), record("dlcm_2.3b", None)
        dlcm.update(realised_ratio=4.0, mfu=0.42, tokens_per_sec=45000.0, median_step_ms=step_ms)
        run = {"command": f"cmd {context}", "device": "gpu", "torch": "2.11", "gemm_peak_flops": 7.9e14}
        paths.append(tmp_path / f"{context}.json")
        paths[-1].write_text(json.dumps({**run, "records": [{**r, "context": context} for r in (base, dlcm)]}))
    assert table.main(*map(str, paths)) == 0
    rendered = capsys.readouterr().out
    assert "`cmd 2048`" in rendered and "`cmd 8192`" in rendered
    assert "| 2048 | bf16-mixed | on | 0.88× | 1.10× |" in rendered
    assert "| 8192 | bf16-mixed | on | 0.88× | 1.10× |" in rendered
    (tmp_path / "decode.json").write_text(json.dumps({"meta": {"benchmark": "decode"}, "records": []}))
    assert table.main(str(paths[0]), str(tmp_path / "decode.json")) == 2
