"""bench/boundary_fidelity.py: the study's runs, the scale-2 shapes, the seed statistics, the report and the figure
(bench/plot_boundary_fidelity.py); the CPU smoke run end to end is slow (minutes)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from tests.bench.test_bench_decode import load

PATH = Path(__file__).parents[2] / "bench" / "boundary_fidelity.py"
sys.path.insert(0, str(PATH.parent))
spec = importlib.util.spec_from_file_location("boundary_fidelity", PATH)
bf = importlib.util.module_from_spec(spec)
sys.modules["boundary_fidelity"] = bf
spec.loader.exec_module(bf)


def test_scale_one_runs_every_mechanism_the_default_over_seeds_and_the_baseline() -> None:
    jobs = bf.study_jobs(bf.MODES["gpu"], 1)
    assert len(jobs) == 14 and len({j.name for j in jobs}) == 14
    groups = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job.seed)
    assert groups["r4-calibrated"] == [0, 1, 2] and groups["baseline"] == [0, 1, 2]
    assert groups["r2-calibrated"] == [0] and groups["r8-calibrated"] == [0]
    assert {f"r4-{m}" for m in bf.MECHANISMS} <= set(groups)
    fixed = next(j for j in jobs if j.group == "r4-fixed")
    assert fixed.overrides[f"{bf.PARSER}.threshold_mode"] == "fixed"
    r8 = next(j for j in jobs if j.group == "r8-calibrated")
    assert r8.overrides[f"{bf.PARSER}.target_ratio"] == 8.0 and r8.target_ratio == 8.0
    seed2 = next(j for j in jobs if j.name == "baseline-s2")
    assert {seed2.overrides[k] for k in ("seed_everything", "model.init_args.seed", "data.seed")} == {2}


def test_cpu_mode_runs_the_seed_groups_on_the_demo_recipes() -> None:
    mode = bf.MODES["cpu"]
    assert mode.dlcm_recipe == "recipes/dlcm_tiny_r4_defaultcorpus_cpu.yaml" and mode.max_steps == 300
    for scale in (1, 2):
        jobs = bf.study_jobs(mode, scale)
        assert sorted((j.group, j.seed) for j in jobs) == [
            (g, s) for g in ("baseline", "r4-calibrated") for s in bf.SEEDS
        ]


# The tiny widths give the shape search coarser steps: the demo's own pair is 2.8 % apart in FLOPs per token.
@pytest.mark.parametrize(
    ("mode_name", "encoder_width", "backbone_heads", "cross_ffn", "rel"),
    [("gpu", 768, 24, 2048, 0.03), ("cpu", 256, 16, 768, 0.04)],
)
def test_scale_two_doubles_the_dlcm_and_matches_the_baseline_in_flops(
    mode_name: str, encoder_width: int, backbone_heads: int, cross_ffn: int, rel: float
) -> None:
    import dataclasses

    from dlcm.infer.recipe import load_recipe
    from dlcm.model.flops import inference_flops_per_token

    mode = bf.MODES[mode_name]
    jobs = bf.study_jobs(mode, 2)
    assert sorted(j.group for j in jobs) == ["baseline"] * 3 + ["r4-calibrated"] * 3
    dlcm = next(j for j in jobs if j.kind == "dlcm").overrides
    base = next(j for j in jobs if j.kind == "baseline").overrides
    assert dlcm["model.init_args.config.encoder.width"] == encoder_width
    assert dlcm["model.init_args.config.backbone.n_heads"] == backbone_heads
    assert dlcm["model.init_args.config.cross.ffn_hidden"] == cross_ffn

    def shaped(recipe: str, overrides: dict) -> object:
        config = load_recipe(bf.ROOT / recipe, vocab_size=bf.VOCAB).config
        sections: dict[str, dict] = {}
        for key, value in overrides.items():
            if key.startswith("model.init_args.config."):
                section, field = key.split(".")[-2:]
                sections.setdefault(section, {})[field] = value
        changes = {n: dataclasses.replace(getattr(config, n), **f) for n, f in sections.items()}
        return dataclasses.replace(config, **changes)

    context = load_recipe(bf.ROOT / mode.dlcm_recipe, vocab_size=bf.VOCAB).context_length
    flops = {
        kind: inference_flops_per_token(shaped(recipe, overrides), context).total
        for kind, recipe, overrides in (("dlcm", mode.dlcm_recipe, dlcm), ("base", mode.baseline_recipe, base))
    }
    small = inference_flops_per_token(load_recipe(bf.ROOT / mode.dlcm_recipe, vocab_size=bf.VOCAB).config, context)
    assert flops["dlcm"] >= 3 * small.total  # the second scale: ≥ 3× the FLOPs per token
    assert flops["base"] == pytest.approx(flops["dlcm"], rel=rel)


def test_plan_steps_fits_the_slowest_run_and_the_cap() -> None:
    mode = bf.MODES["gpu"]
    steps, slowest = bf.plan_steps(mode, {"a": 0.2, "b": 0.4, "c": None}, seconds_left=200.0)
    assert slowest == 0.4 and steps == 425 - 425 % mode.val_points
    assert bf.plan_steps(mode, {"a": 0.01}, 200.0)[0] == mode.max_steps
    assert bf.plan_steps(mode, {"a": 0.01}, 200.0, cap=300)[0] == 300


def fake_result(bpb: float, ratio: float | None, prose: float | None = None) -> dict:
    per_domain = {"prose": prose, "code": ratio} if prose else {}
    return {"status": "ok", "steps": 10, "val_bpb": bpb, "val_ratio": ratio, "tokens_per_concept": per_domain}


def test_summary_statistics_and_paired_gap() -> None:
    jobs = bf.study_jobs(bf.MODES["gpu"], 2)
    results = {
        "r4-calibrated-s0": fake_result(1.50, 4.0, prose=3.8),
        "r4-calibrated-s1": fake_result(1.52, 4.1, prose=3.9),
        "r4-calibrated-s2": fake_result(1.54, 4.3, prose=4.0),
        "baseline-s0": fake_result(1.60, None),
        "baseline-s1": fake_result(1.61, None),
        "baseline-s2": {"status": "failed"},
    }
    summary = bf.summarize(jobs, results)
    group = summary["groups"]["r4-calibrated"]
    assert group["val_bpb"]["mean"] == pytest.approx(1.52)
    assert group["val_bpb"]["std"] == pytest.approx(0.02)
    assert group["val_ratio_error"]["values"] == pytest.approx([0.0, 0.025, 0.075])
    assert group["val_ratio_within_5pct"] is False
    assert summary["groups"]["baseline"]["val_bpb"]["n"] == 2
    gap = summary["gap_dlcm_minus_baseline_bpb"]
    assert gap["per_seed"] == pytest.approx({0: -0.10, 1: -0.09})  # seed 2's baseline failed: no pair
    assert gap["mean"] == pytest.approx(-0.095)
    report = bf.format_report({"mode": "gpu", "scale": 2, "note": "test", "failed": ["baseline-s2"], **summary})
    assert "r4-calibrated" in report and "+3.3 ± 3.8" in report and "-0.0950" in report
    assert "FAILED runs: baseline-s2" in report


def test_report_of_a_one_seed_group_has_no_spread() -> None:
    jobs = [j for j in bf.study_jobs(bf.MODES["gpu"], 1) if j.group in ("r4-fixed", "baseline")]
    results = {j.name: fake_result(1.6, 4.2 if j.kind == "dlcm" else None, prose=4.0) for j in jobs}
    report = bf.format_report({"mode": "gpu", "scale": 1, "note": "test", "failed": [], **bf.summarize(jobs, results)})
    row = next(line for line in report.splitlines() if line.startswith("r4-fixed"))
    assert "4.200" in row and "+5.0" in row and "±" not in row


def test_mean_std_of_one_or_no_values() -> None:
    assert bf.mean_std([1.0]) == {"mean": 1.0, "std": None, "n": 1, "values": [1.0]}
    assert bf.mean_std([None, math.nan])["mean"] is None


def test_a_learning_rate_that_is_not_positive_is_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        bf.main(["--mode", "smoke", "--runs-dir", str(tmp_path), "--lr", "0"])
    assert "--lr 0.0 is not allowed" in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_smoke_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    assert bf.main(["--mode", "smoke", "--runs-dir", str(tmp_path / "runs"), "--out", str(out), "--lr", "5e-4"]) == 0
    result = json.loads(out.read_text())
    assert result["failed"] == [] and len(result["runs"]) == 14
    assert result["calibration"]["lr"] == 5e-4
    assert all("--model.init_args.optimizer.lr=0.0005" in c for c in result["commands"]["runs"].values())
    assert all(r["steps"] == bf.MODES["smoke"].max_steps for r in result["runs"].values())
    assert result["groups"]["r4-calibrated"]["val_ratio"]["n"] == 3


def test_figure_of_the_seed_groups_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = load("plot_boundary_fidelity")
    curves = {"val/bpb": {"step": [9, 19], "value": [2.5, 2.2]}, "val/ratio": {"step": [9, 19], "value": [4.3, 4.1]}}

    def run(group: str, seed: int) -> dict:
        return {
            "group": group,
            "seed": seed,
            "status": "ok",
            "val_flops": [1e9, 2e9],
            "curves": curves,
            "target_ratio": 4,
        }

    runs = {f"{g}-s{s}": run(g, s) for g in ("r4-calibrated", "baseline", "r4-fixed") for s in (0, 1)}
    results = tmp_path / "bf.json"
    study = {"scale": 1, "default_mechanism": "calibrated", "calibration": {"lr": 5e-4}, "run_summaries": runs}
    results.write_text(json.dumps(study))
    assert plot.label(json.loads(results.read_text())) == "scale 1, lr 0.0005"
    out = tmp_path / "figures" / "bf.png"
    assert plot.main([str(results), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "missing.json"), "--out", str(out)])
