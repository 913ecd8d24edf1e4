"""The calibrated inference threshold on the synthetic phrase language: after a short training run the
inference-mode ratio on held-out batches is within ±5 % of R (the language's mean phrase length)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).parents[2] / "bench" / "synthetic_boundaries.py"
spec = importlib.util.spec_from_file_location("synthetic_boundaries", PATH)
synthetic = importlib.util.module_from_spec(spec)
sys.modules["synthetic_boundaries"] = synthetic
spec.loader.exec_module(synthetic)

SMALL = {"steps": 60, "width": 32, "tokens": 1024, "doc_len": 64, "eval_batches": 16, "device": "cpu"}


@pytest.mark.parametrize(
    "parser",
    [
        {"threshold_mode": "calibrated"},
        {"threshold_mode": "calibrated", "alpha_final": 0.0},
    ],
    ids=["calibrated", "calibrated+annealed"],
)
def test_inference_ratio_lands_within_5_percent_of_r(parser: dict) -> None:
    result = synthetic.train_and_score("aux", parser=parser, **SMALL)
    target = result["target_ratio"]
    assert result["parser"]["threshold_mode"] == "calibrated"
    assert abs(result["eval_ratio"] / target - 1) <= 0.05, (result["eval_ratio"], target, result["threshold"])


def test_parser_overrides_from_the_command_line() -> None:
    assert synthetic.parse_overrides(["threshold_mode=fixed", "alpha_final=0", "d_scan=null"]) == {
        "threshold_mode": "fixed",
        "alpha_final": 0,
        "d_scan": None,
    }
    with pytest.raises(SystemExit, match="--parser 'alpha=1'"):
        synthetic.parse_overrides(["alpha=1"])
