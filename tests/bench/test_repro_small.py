"""bench/repro_small.py's arithmetic: step planning from probe rates, bits per byte at matched FLOPs, and the
verdicts it writes (the driver itself runs with --smoke, by hand: it takes minutes)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).parents[2] / "bench" / "repro_small.py"
spec = importlib.util.spec_from_file_location("repro_small", PATH)
repro = importlib.util.module_from_spec(spec)
sys.modules["repro_small"] = repro
spec.loader.exec_module(repro)


def test_plan_steps_fits_the_slowest_run_of_each_group() -> None:
    mode = repro.MODES["h200"]
    rates = {
        "mup/w128_tok0.003_cpt0.003": 0.05,
        "mup/w512_tok0.003_cpt0.003": 0.20,  # slowest μP run: sets the μP steps
        "scope/scope-global": 0.25,
        "scope/scope-sequence": 0.24,
        "baseline/base": 0.10,
    }
    steps, slowest = repro.plan_steps(mode, rates, seconds_left=200.0)
    assert slowest == {"mup": 0.20, "main": 0.25}
    # 200 s × SAFETY / s-per-step, rounded down to a multiple of the validation points.
    mup, main = int(200 * repro.SAFETY / 0.20), int(200 * repro.SAFETY / 0.25)
    assert steps == {"mup": mup - mup % mode.val_points, "main": main - main % mode.val_points}
    capped, _ = repro.plan_steps(mode, rates, seconds_left=1e6)
    assert capped == mode.max_steps
    with pytest.raises(RuntimeError, match="no step time for group 'main'"):
        repro.plan_steps(mode, {"mup/w128": 0.1, "baseline/base": None}, 100.0)


def test_value_at_flops_interpolates_in_log_flops() -> None:
    flops, bpb = [1e12, 1e13, 1e14], [3.0, 2.0, 1.5]
    assert repro.value_at_flops(flops, bpb, 1e13) == pytest.approx(2.0)
    assert repro.value_at_flops(flops, bpb, math.sqrt(1e12 * 1e13)) == pytest.approx(2.5)
    assert repro.value_at_flops(flops, bpb, 1e14) == pytest.approx(1.5)
    assert repro.value_at_flops(flops, bpb, 2e14) is None and repro.value_at_flops(flops, bpb, 1e11) is None


def run(val_ratio: float, bpb: float, flops: float, domains: dict | None = None) -> dict:
    return {
        "status": "ok",
        "val_ratio": val_ratio,
        "val_bpb": bpb,
        "target_ratio": 4.0,
        "train_flops": flops,
        "val_flops": [flops / 2, flops],
        "curves": {"val/bpb": {"step": [1, 3], "value": [bpb + 0.5, bpb]}},
        "tokens_per_concept": domains or {},
    }


def test_verdicts() -> None:
    runs = {
        repro.MAIN_RUN: run(3.9, 1.40, 2e15, {"prose": 3.5, "code": 4.2}),
        repro.SEQUENCE_RUN: run(3.1, 1.45, 2e15),
        repro.BASELINE_RUN: run(math.nan, 1.50, 1e15),
    }
    scope = repro.ratio_scope(runs)
    assert scope["global_closer_to_target"] and scope["abs_error"]["global"] == pytest.approx(0.1)
    assert repro.tokens_per_concept(runs)["global"]["code_over_prose"] == pytest.approx(1.2)
    specs = repro.load_specs(repro.MODES["smoke"])
    versus = repro.dlcm_vs_baseline(runs, specs)
    assert versus["goal_dlcm_bpb_le_baseline"] and versus["bpb_dlcm_minus_baseline"] == pytest.approx(-0.1)
    assert versus["train_flops_dlcm_over_baseline"] == pytest.approx(2.0)
    # At the baseline's 1e15 FLOPs the DLCM is at the first point of its curve.
    assert versus["bpb_at_matched_flops"] == {"train_flops": 1e15, "dlcm": pytest.approx(1.9), "baseline": 1.5}
    assert versus["dlcm"]["params_without_embedding_head"] > versus["baseline"]["params_without_embedding_head"]


def test_training_overrides_validate_the_last_step_and_cap_the_time() -> None:
    got = repro.training_overrides(850, 5, keep_checkpoint=False, max_seconds=3725.5)
    assert got["trainer.max_steps"] == 850 and got["trainer.val_check_interval"] == 170
    assert got["trainer.check_val_every_n_epoch"] is None and got["checkpoint.save_last"] is False
    assert got["trainer.max_time"] == "00:01:02:05"
    assert "trainer.max_time" not in repro.training_overrides(850, 5, keep_checkpoint=True)
