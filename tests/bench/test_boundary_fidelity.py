"""bench/boundary_fidelity.py: the study's runs, the scale-2 shapes, the seed statistics, the report and the figure
(bench/plot_boundary_fidelity.py); the CPU smoke run end to end is slow (minutes)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import ClassVar

import pytest

from dlcm.research.sweep import Executor, write_json
from tests.bench.test_bench_decode import load

PATH = Path(__file__).parents[2] / "bench" / "boundary_fidelity.py"
sys.path.insert(0, str(PATH.parent))
spec = importlib.util.spec_from_file_location("boundary_fidelity", PATH)
bf = importlib.util.module_from_spec(spec)
sys.modules["boundary_fidelity"] = bf
spec.loader.exec_module(bf)


def names_by_group(jobs: list) -> dict[str, list[tuple[float, int]]]:
    groups: dict[str, list[tuple[float, int]]] = {}
    for job in jobs:
        groups.setdefault(job.group, []).append((job.lr, job.seed))
    return groups


def test_scale_one_grid_then_best_rates_over_seeds_and_the_matched_rule() -> None:
    study = bf.Study(bf.MODES["gpu"], 1)
    assert study.lrs == [5e-4, 1e-3, 2e-3]
    first = study.first_phase()
    groups = names_by_group(first)
    assert groups[f"r4-{bf.DEFAULT}"] == [(lr, 0) for lr in study.lrs]
    assert groups["baseline"] == [(lr, 0) for lr in study.lrs]
    assert groups[f"r2-{bf.DEFAULT}"] == [(1e-3, s) for s in bf.SEEDS]
    r8 = next(j for j in first if j.group == f"r8-{bf.DEFAULT}")
    assert r8.overrides[f"{bf.PARSER}.target_ratio"] == 8.0 and r8.overrides["model.init_args.optimizer.lr"] == 1e-3
    # seed 0: the DLCM is best at 2e-3, the baseline at 5e-4; the learned run realised 3.9 tokens per concept
    results = {j.name: fake_result(1.5, 4.0) for j in first}
    results[f"r4-{bf.DEFAULT}-lr0.002-s0"] = fake_result(1.4, 3.9)
    results["baseline-lr0.0005-s0"] = fake_result(1.45, None)
    second = study.second_phase(results)
    assert study.second_phase_count() == len(second) == 10
    groups = names_by_group(second)
    assert groups[f"r4-{bf.DEFAULT}"] == [(2e-3, 1), (2e-3, 2)] and groups["baseline"] == [(5e-4, 1), (5e-4, 2)]
    assert groups[f"r4-{bf.ALTERNATIVE}"] == [(2e-3, s) for s in bf.SEEDS]
    rule = [j for j in second if j.group == "rule-matched"]
    assert [j.target_ratio for j in rule] == [3.9] * 3
    assert rule[0].overrides[f"{bf.PARSER}.predictor"] == "rule"
    assert rule[0].overrides[f"{bf.PARSER}.threshold_mode"] == "calibrated"
    seed2 = next(j for j in second if j.name == "baseline-lr0.0005-s2")
    assert {seed2.overrides[k] for k in ("seed_everything", "model.init_args.seed", "data.seed")} == {2}


def test_cpu_mode_runs_the_seed_groups_on_the_demo_recipes() -> None:
    mode = bf.MODES["cpu"]
    assert mode.dlcm_recipe == "recipes/dlcm_tiny_r4_defaultcorpus_cpu.yaml" and mode.max_steps == 300
    for scale in (1, 2):
        study = bf.Study(mode, scale)
        jobs = study.first_phase()
        assert sorted((j.group, j.seed) for j in jobs) == [
            (g, s) for g in ("baseline", f"r4-{bf.DEFAULT}") for s in bf.SEEDS
        ]
        assert study.second_phase({}) == [] and study.second_phase_count() == 0


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
    study = bf.Study(mode, 2)
    jobs = study.first_phase()
    # the CPU: one rate, three seeds; the GPU grid's first phase: three rates, seed 0
    assert sorted(j.group for j in jobs) == ["baseline"] * 3 + [f"r4-{bf.DEFAULT}"] * 3
    assert study.second_phase_count() == (0 if mode_name == "cpu" else 4)  # no extras at scale 2
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


def test_plan_steps_fits_every_round_and_the_cap() -> None:
    mode = bf.MODES["gpu"]
    # 3 rounds of 0.4 s per step in 600 s: 600·0.85 / (3·0.4) = 425 steps, rounded down to the validation points
    assert bf.plan_steps(mode, 0.4, seconds_left=600.0, waves=3) == 420
    assert bf.plan_steps(mode, 0.001, 600.0, 3) == mode.max_steps
    assert bf.plan_steps(mode, 0.001, 600.0, 3, cap=300) == 300
    assert bf.waves_of([12, 10], 7) == 4 and bf.waves_of([6, 0], 7) == 1


def test_runs_at_a_time_follow_the_free_memory() -> None:
    # 80 GiB free, 2 in reserve, 7 GiB a run: 11 fit; never fewer than 1, never more than the limit
    assert bf.runs_that_fit(7.0, 80.0, 16) == 11
    assert bf.runs_that_fit(7.0, 80.0, 8) == 8
    assert bf.runs_that_fit(90.0, 80.0, 16) == 1


def fake_result(bpb: float, ratio: float | None, prose: float | None = None, late: list | None = None) -> dict:
    per_domain = {"prose": prose, "code": ratio} if prose else {}
    curves = {"val/ratio": {"step": [4, 9], "value": late or [ratio, ratio]}} if ratio else {}
    curves["val/segmentation/near_threshold"] = {"step": [9], "value": [0.02]}
    return {
        "status": "ok",
        "steps": 10,
        "val_bpb": bpb,
        "val_ratio": ratio,
        "tokens_per_concept": per_domain,
        "curves": curves,
    }


def test_summary_statistics_and_paired_gap_at_the_best_rates() -> None:
    study = bf.Study(bf.MODES["gpu"], 2)
    jobs = study.first_phase()
    results = {j.name: fake_result(1.7, 4.0 if j.kind == "dlcm" else None) for j in jobs}
    d, b = f"r4-{bf.DEFAULT}-lr0.001", "baseline-lr0.0005"
    results[f"{d}-s0"] = fake_result(1.50, 4.0, prose=3.8)
    results[f"{b}-s0"] = fake_result(1.60, None)
    jobs += study.second_phase(results)
    results[f"{d}-s1"] = fake_result(1.52, 4.1, prose=3.9, late=[4.5, 4.1])  # +12.5 % in the second half
    results[f"{d}-s2"] = fake_result(1.54, 4.3, prose=4.0)
    results[f"{b}-s1"] = fake_result(1.61, None)
    results[f"{b}-s2"] = {"status": "failed"}
    summary = bf.summarize(study, jobs, results)
    assert summary["best_lr"]["dlcm"] == {"lr": 1e-3, "at_grid_edge": False, "grid": study.lrs}
    assert summary["best_lr"]["baseline"]["at_grid_edge"] is True
    group = summary["groups"][f"r4-{bf.DEFAULT} lr0.001"]
    assert group["val_bpb"]["mean"] == pytest.approx(1.52)
    assert group["val_bpb"]["std"] == pytest.approx(0.02)
    assert group["val_bpb"]["ci95"] == pytest.approx([1.52 - 4.303 * 0.02 / 3**0.5, 1.52 + 4.303 * 0.02 / 3**0.5])
    assert group["val_ratio_error"]["values"] == pytest.approx([0.0, 0.025, 0.075])
    assert group["final_within_5pct"] is False and group["second_half_within_10pct"] is False
    assert group["near_threshold"]["mean"] == pytest.approx(0.02)
    assert summary["groups"]["baseline lr0.0005"]["val_bpb"]["n"] == 2
    gap = summary["gap_dlcm_minus_baseline_bpb"]
    assert gap["per_seed"] == pytest.approx({0: -0.10, 1: -0.09})  # seed 2's baseline failed: no pair
    assert gap["mean"] == pytest.approx(-0.095)
    report = bf.format_report({"mode": "gpu", "scale": 2, "note": "test", "failed": [f"{b}-s2"], **summary})
    assert f"r4-{bf.DEFAULT} lr0.001" in report and "+3.3 ± 3.8" in report and "-0.0950" in report
    assert "best learning rate, baseline: 0.0005 of [0.0005, 0.001, 0.002] (at the grid's edge)" in report
    assert f"FAILED runs: {b}-s2" in report


def test_ratio_checks_of_one_run() -> None:
    run = fake_result(1.5, 4.1, prose=3.7, late=[4.3, 4.1])
    checks = bf.ratio_checks(run, 4.0)
    assert checks["second_half_max_abs_error"] == pytest.approx(0.075)
    assert checks["final_within_5pct"] and checks["second_half_within_10pct"] and checks["domains_within_10pct"]
    assert not bf.ratio_checks(fake_result(1.5, 4.1, prose=3.5), 4.0)["domains_within_10pct"]  # prose −12.5 %


def test_the_scale_trend_is_the_difference_of_the_gaps_with_a_welch_interval() -> None:
    small = {"gap_dlcm_minus_baseline_bpb": bf.mean_std([-0.10, -0.12, -0.11])}
    large = {"gap_dlcm_minus_baseline_bpb": bf.mean_std([-0.30, -0.32, -0.31])}
    trend = bf.scale_trend(small, large)
    assert trend["difference"] == pytest.approx(-0.20)
    half = 2.776 * (2 * 0.01**2 / 3) ** 0.5  # equal variances: Welch's df = 4
    assert trend["welch_df"] == pytest.approx(4.0) and trend["ci95"] == pytest.approx([-0.2 - half, -0.2 + half])
    assert trend["grows"] == "yes"
    noisy = {"gap_dlcm_minus_baseline_bpb": bf.mean_std([-0.1, -0.3, 0.1])}
    assert bf.scale_trend(small, noisy)["grows"] == "not resolved"


class FakeExecutor(Executor):
    """Trains nothing: writes the result a run would have (seed-0 bits per byte fall with the learning rate) and
    records the runs it was asked to train; after ``stop_after`` of them the driver is stopped (a time limit)."""

    trained: ClassVar[list[str]] = []
    stop_after: ClassVar[int | None] = None

    def train(self, run, resume: bool, slot: int) -> dict:
        if self.stop_after is not None and len(FakeExecutor.trained) >= self.stop_after:
            raise KeyboardInterrupt
        FakeExecutor.trained.append(run.name)
        run_dir = self.out / run.name
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "run.json", {"name": run.name, "args": list(run.args), "meta": run.meta})
        ratio = 4.0 if run.meta["kind"] == "dlcm" else None
        result = {"name": run.name, **run.meta, "command": ["fit"], **fake_result(1.5 - run.meta["lr"], ratio)}
        write_json(run_dir / "result.json", result)
        return result


def test_a_study_stopped_part_way_continues_with_only_the_missing_runs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("dlcm.data.corpus.ensure_default_corpus", lambda: tmp_path / "corpus")
    monkeypatch.setattr(bf, "environment", lambda: {"device": "test"})
    args = ["--mode", "smoke", "--runs-dir", str(tmp_path / "runs"), "--steps", "6"]
    FakeExecutor.trained, FakeExecutor.stop_after = [], 5
    with pytest.raises(KeyboardInterrupt):
        bf.run_driver(bf.parse_args(args), FakeExecutor)
    done = list(FakeExecutor.trained)
    assert len(done) == 5
    assert json.loads((tmp_path / "runs" / bf.PLAN).read_text())["steps"] == 6
    FakeExecutor.trained, FakeExecutor.stop_after = [], None
    result = bf.run_driver(bf.parse_args(args), FakeExecutor)
    assert not set(FakeExecutor.trained) & set(done)  # nothing finished is trained again
    assert sorted(done + FakeExecutor.trained) == sorted(result["runs"])
    assert len(result["runs"]) == 12 + 10 and result["failed"] == []
    assert result["best_lr"]["dlcm"]["lr"] == pytest.approx(2 * bf.recipe_lr(bf.ROOT / bf.MODES["smoke"].dlcm_recipe))
    FakeExecutor.trained = []
    bf.run_driver(bf.parse_args(args), FakeExecutor)
    assert FakeExecutor.trained == []  # a finished study trains nothing
    with pytest.raises(SystemExit):  # another step count in the same directory is refused
        bf.main([*args[:-1], "8"])


def test_on_a_gpu_the_plan_comes_from_each_models_memory_and_a_timing_probe(tmp_path: Path, monkeypatch) -> None:
    class Peak:  # each model alone: 6 GiB at its peak (the context included)
        peak_gib = 6.0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr("dlcm.data.corpus.ensure_default_corpus", lambda: tmp_path / "corpus")
    monkeypatch.setattr(bf, "environment", lambda: {"device": "test"})
    monkeypatch.setattr(bf, "PeakMemory", Peak)
    monkeypatch.setattr(bf, "device_memory_gib", lambda: (78.0, 80.0))
    monkeypatch.setattr(bf, "seconds_per_step", lambda run_dir: 0.25)
    monkeypatch.setattr(bf.os, "cpu_count", lambda: 16)
    FakeExecutor.trained, FakeExecutor.stop_after = [], None
    result = bf.run_driver(bf.parse_args(["--runs-dir", str(tmp_path / "runs"), "--budget-s", "500"]), FakeExecutor)
    plan = result["calibration"]
    # 6 GiB + 15 %: (78 − 2) // 6.9 = 11 at a time; 12 then 10 runs: 2 + 1 rounds of 0.25 s per step
    assert plan["per_run_gib"] == pytest.approx(6.9) and plan["parallel_planned"] == plan["parallel"] == 11
    assert plan["rounds"] == 3
    assert plan["steps"] == bf.plan_steps(bf.MODES["gpu"], 0.25, 500 - bf.MODES["gpu"].reserve_s, 3)
    assert len(result["runs"]) == 22 and result["failed"] == []


def test_mean_std_of_one_or_no_values() -> None:
    assert bf.mean_std([1.0]) == {"mean": 1.0, "std": None, "ci95": None, "n": 1, "values": [1.0]}
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
    assert result["failed"] == [] and len(result["runs"]) == 12 + 10
    assert result["calibration"]["lrs"] == [2.5e-4, 5e-4, 1e-3]
    assert all(r["steps"] == bf.MODES["smoke"].max_steps for r in result["runs"].values())
    best = result["best_lr"]["dlcm"]["lr"]
    assert result["groups"][f"r4-{bf.DEFAULT} {bf.lr_label(best)}"]["val_ratio"]["n"] == 3
    assert result["gap_rule_minus_learned_bpb"]["n"] == 3


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
