"""Small-scale reproduction of five DLCM findings on one H200, as concurrent ``dlcm fit`` subprocesses.

    python bench/repro_small.py --runs-dir /tmp/repro          # H200, ≈ 8 min: bench/results/repro_small_h200.json
    python bench/repro_small.py --smoke --runs-dir /tmp/smoke  # CPU, tiny shapes, a few minutes (checks the driver)
    python bench/repro_small.py plot --results bench/results/repro_small_h200.json    # figures → docs/figures/

Every run uses the embedded default corpus (KJV prose + Python standard-library code), its 4,096-id BPE and the
same data order (``data.seed`` 0, same batch size); run shapes and sweeps are the files in
``recipes/sweeps/repro_small_h200/`` (``repro_small_cpu_smoke/`` with ``--smoke``):

1. μP transfer (``sweep_mup_transfer.yaml``): final validation loss against the base rate at d_token 128 and 512.
2. DLCM (R = 4, ``sweep_ratio_scope.yaml``, scope ``global``) against the FLOPs-matched dense baseline
   (``sweep_baseline.yaml``): held-out bits per byte, training FLOPs from the FLOPs callback, and bits per byte
   interpolated at equal training FLOPs.
3. Global vs per-sequence ratio loss (scope ``global`` vs ``sequence``): realised tokens per concept against R.
4. Tokens per concept of prose and code (``val/segmentation/tokens_per_concept/*``) at the same target.
5. Synthetic phrase language: boundary precision/recall of ``router_grad: aux`` vs ``ste``
   (``bench/synthetic_boundaries.py``).

Plus the paper's Figure 7 analysis (``dlcm analyze``: loss by position in concept, DLCM vs baseline).

Time budget. All runs start together (``--parallel``, one CPU thread each). On the H200 the step counts are not
guessed: a probe first runs every training configuration concurrently for ``probe_steps`` steps, measures seconds
per step under that load, and the driver then gives each group the largest step count that fits the remaining
budget (the two μP widths share one count; DLCM and baseline share one, so their tokens are equal), capped so
nobody trains more than ≈ 4 epochs of the corpus. ``--steps-mup`` / ``--steps-main`` pin the counts instead.

Figures: drawn at the end when matplotlib is importable, else (and at any time, from the JSON alone) with the
``plot`` subcommand. The JSON holds every run's curves, so plotting needs no event files or checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import source_commit  # bench/report.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
SWEEP_FILES = {"mup": "sweep_mup_transfer.yaml", "scope": "sweep_ratio_scope.yaml", "baseline": "sweep_baseline.yaml"}
GROUP_OF_SWEEP = {"mup": "mup", "scope": "main", "baseline": "main"}  # runs of a group train the same steps
MAIN_RUN, SEQUENCE_RUN, BASELINE_RUN = "scope/scope-global", "scope/scope-sequence", "baseline/base"
SAFETY = 0.85  # share of the measured-rate budget actually planned (the probe runs under full load, but noisy)


@dataclass(frozen=True)
class Mode:
    """Sizes and budgets of one way to run the driver."""

    name: str
    spec_dir: str
    parallel: int  # dlcm fit processes at a time (all of them, so everything shares the device)
    probe_steps: int  # 0: no probe, train max_steps
    max_steps: dict[str, int]  # per group; also the count without a probe
    min_steps: int  # below this the budget is too small to say anything: stop
    val_points: int  # validations per run (loss-vs-FLOPs points); steps are rounded to a multiple of it
    budget_s: float  # wall time of the whole driver, plotting excluded
    reserve_s: float  # kept for process start-up, validation, analysis and the summary
    synthetic: dict[str, Any] = field(default_factory=dict)  # bench/synthetic_boundaries.py options
    analysis_batches: int | None = None  # validation micro-batches for dlcm analyze (None: the split)


MODES = {
    "h200": Mode(
        name="h200",
        spec_dir="recipes/sweeps/repro_small_h200",
        parallel=13,
        probe_steps=40,
        # 850 steps × 16,384 tokens ≈ 14M tokens ≈ 4 epochs of the 3.5M-token corpus.
        max_steps={"mup": 850, "main": 850},
        min_steps=100,
        val_points=5,
        budget_s=450.0,  # leaves ≈ 2 minutes of a 10-minute job for installs and slack
        reserve_s=90.0,
        synthetic={"steps": 2000, "width": 128, "tokens": 2048, "doc-len": 256, "eval-batches": 32},
    ),
    "smoke": Mode(
        name="smoke",
        spec_dir="recipes/sweeps/repro_small_cpu_smoke",
        parallel=2,
        probe_steps=0,
        max_steps={"mup": 8, "main": 12},
        min_steps=4,
        val_points=2,
        budget_s=math.inf,
        reserve_s=0.0,
        synthetic={"steps": 60, "width": 32, "tokens": 512, "doc-len": 64, "eval-batches": 4, "device": "cpu"},
        analysis_batches=2,
    ),
}


def _log(message: str) -> None:
    print(f"[repro {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- runs ------------------------------------------------------------------------------------------------------


def load_specs(mode: Mode) -> dict[str, Any]:
    from dlcm.research.sweep import load_spec

    return {key: load_spec(ROOT / mode.spec_dir / name) for key, name in SWEEP_FILES.items()}


def group_runs(specs: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> list[Any]:
    """Every training run, named ``<spec key>/<run name>``, with the per-group ``overrides`` added to its spec."""
    from dlcm.research.sweep import Run, static_runs

    runs = []
    for key, spec in specs.items():
        spec = dataclasses.replace(spec, overrides={**spec.overrides, **overrides[GROUP_OF_SWEEP[key]]})
        runs += [Run(f"{key}/{r.name}", r.args, r.meta, r.sidecar) for r in static_runs(spec)]
    return runs


def training_overrides(
    steps: int, val_points: int, keep_checkpoint: bool, max_seconds: float | None = None
) -> dict[str, Any]:
    """Steps, validation cadence (by global step, so the last step is validated) and warm-up of a real run; only
    runs that are analysed afterwards keep a checkpoint (``last.ckpt``), the others write none. ``max_seconds``
    is a safety net (Lightning's ``max_time``): a run that would overrun the budget stops early and says so in its
    step count, rather than the whole driver being killed with nothing written."""
    limit = {}
    if max_seconds is not None and math.isfinite(max_seconds):
        seconds = int(max_seconds)
        limit["trainer.max_time"] = f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    return limit | {
        "trainer.max_steps": steps,
        "trainer.val_check_interval": steps // val_points,
        "trainer.check_val_every_n_epoch": None,  # count validation intervals across epochs
        "trainer.log_every_n_steps": max(1, min(10, steps // 50)),
        "model.init_args.schedule.warmup_steps": max(1, steps // 10),
        "checkpoint.save_top_k": 0,
        "checkpoint.save_last": keep_checkpoint,
    }


def probe_overrides(steps: int) -> dict[str, Any]:
    """A short run for timing only: no validation, no checkpoints."""
    return {
        "trainer.max_steps": steps,
        "trainer.limit_val_batches": 0,
        "trainer.log_every_n_steps": 5,
        "model.init_args.schedule.warmup_steps": 5,
        "checkpoint.save_top_k": 0,
        "checkpoint.save_last": False,
    }


def seconds_per_step(run_dir: Path, skip_fraction: float = 1 / 3) -> float | None:
    """Median seconds per optimizer step of a (probe) run from its ``train/perf/tokens_per_sec`` points."""
    from dlcm.research.run_metrics import read_run_config, read_scalars, tokens_per_step

    points = read_scalars(run_dir, ["train/perf/tokens_per_sec"]).get("train/perf/tokens_per_sec", {})
    config = read_run_config(run_dir)
    step_tokens = tokens_per_step(config) if config else None
    if not points or not step_tokens:
        return None
    last = max(points)
    rates = [v for s, v in points.items() if s >= last * skip_fraction and v > 0]
    return step_tokens / statistics.median(rates) if rates else None


def plan_steps(
    mode: Mode, rates: dict[str, float | None], seconds_left: float
) -> tuple[dict[str, int], dict[str, float]]:
    """Steps per group that fit ``seconds_left`` at the slowest measured rate of the group (see module docstring)."""
    steps, slowest = {}, {}
    for group in mode.max_steps:
        measured = [s for name, s in rates.items() if GROUP_OF_SWEEP[name.split("/")[0]] == group and s]
        if not measured:
            raise RuntimeError(f"the probe measured no step time for group {group!r}; see the probe's train.log files")
        slowest[group] = max(measured)
        fit = int(seconds_left * SAFETY / slowest[group])
        count = min(mode.max_steps[group], fit)
        steps[group] = count - count % mode.val_points
    return steps, slowest


# ---- results ---------------------------------------------------------------------------------------------------


def value_at_flops(flops: list[float], values: list[float], target: float) -> float | None:
    """``values`` linearly interpolated in log-FLOPs at ``target`` (``None`` outside the measured range)."""
    pairs = sorted((f, v) for f, v in zip(flops, values, strict=True) if f > 0 and math.isfinite(v))
    for (f0, v0), (f1, v1) in itertools.pairwise(pairs):
        if f0 <= target <= f1:
            w = 0.0 if f1 == f0 else (math.log(target) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return v0 + w * (v1 - v0)
    return pairs[-1][1] if pairs and math.isclose(pairs[-1][0], target, rel_tol=1e-9) else None


def _pick(run: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: run.get(k) for k in keys}


RUN_KEYS = (
    "status",
    "steps",
    "tokens",
    "val_loss",
    "val_bpb",
    "val_ratio",
    "train_ratio",
    "train_ratio_threshold",
    "target_ratio",
    "tokens_per_concept",
    "train_flops",
    "flops_per_token",
    "wall_s",
)


def dlcm_vs_baseline(runs: dict[str, dict], specs: dict[str, Any]) -> dict[str, Any]:
    """Reproduction 2: held-out bits per byte and training FLOPs of the DLCM and the baseline."""
    from dlcm.research.shape_search import matmul_parameters
    from dlcm.research.sweep import base_model

    d, b = runs.get(MAIN_RUN, {}), runs.get(BASELINE_RUN, {})
    out: dict[str, Any] = {"dlcm": _pick(d, RUN_KEYS), "baseline": _pick(b, RUN_KEYS)}
    for name, key in (("dlcm", "scope"), ("baseline", "baseline")):
        out[name]["params_without_embedding_head"] = matmul_parameters(base_model(specs[key])[0])["N"]
    if d.get("val_bpb") is None or b.get("val_bpb") is None:
        return out
    out["bpb_dlcm_minus_baseline"] = d["val_bpb"] - b["val_bpb"]
    out["goal_dlcm_bpb_le_baseline"] = d["val_bpb"] <= b["val_bpb"]
    if d.get("train_flops") and b.get("train_flops"):
        out["train_flops_dlcm_over_baseline"] = d["train_flops"] / b["train_flops"]
        matched = min(d["train_flops"], b["train_flops"])
        at = {}
        for name, run in (("dlcm", d), ("baseline", b)):
            bpb = run["curves"].get("val/bpb", {})
            at[name] = value_at_flops(run.get("val_flops") or [], bpb.get("value", []), matched)
        out["bpb_at_matched_flops"] = {"train_flops": matched, **at}
    return out


def ratio_scope(runs: dict[str, dict]) -> dict[str, Any]:
    """Reproduction 3: realised tokens per concept with the global and the per-sequence ratio loss."""
    keys = ("val_ratio", "train_ratio", "train_ratio_threshold", "val_loss", "val_bpb", "target_ratio")
    out = {"global": _pick(runs.get(MAIN_RUN, {}), keys), "sequence": _pick(runs.get(SEQUENCE_RUN, {}), keys)}
    g, s = out["global"], out["sequence"]
    target = g.get("target_ratio") or s.get("target_ratio")
    if target and g.get("val_ratio") is not None and s.get("val_ratio") is not None:
        out["target"] = target
        out["abs_error"] = {"global": abs(g["val_ratio"] - target), "sequence": abs(s["val_ratio"] - target)}
        out["global_closer_to_target"] = out["abs_error"]["global"] < out["abs_error"]["sequence"]
    return out


def tokens_per_concept(runs: dict[str, dict]) -> dict[str, Any]:
    """Reproduction 4: validation tokens per concept by domain at the same target R."""
    out = {}
    for label, name in (("global", MAIN_RUN), ("sequence", SEQUENCE_RUN)):
        per_domain = runs.get(name, {}).get("tokens_per_concept") or {}
        entry: dict[str, Any] = {"by_domain": per_domain, "target": runs.get(name, {}).get("target_ratio")}
        if {"prose", "code"} <= set(per_domain):
            entry["code_over_prose"] = per_domain["code"] / per_domain["prose"]
        out[label] = entry
    return out


def mup_tables(specs: dict[str, Any], runs: dict[str, dict]) -> dict[str, Any]:
    """Reproduction 1: the loss-vs-rate tables of the μP widths (names as the mup-transfer protocol gives them)."""
    from dlcm.research.sweep import MuPProtocol

    protocol = MuPProtocol(specs["mup"])
    losses = {}
    for name, run in runs.items():
        if name.startswith("mup/"):
            loss = run.get("val_loss")
            losses[name.removeprefix("mup/")] = loss if loss is not None and math.isfinite(loss) else math.inf
    return protocol.tables(protocol.start(), losses, [])


def environment() -> dict[str, Any]:
    import lightning
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    info["git_commit"] = source_commit()
    return info


# ---- driver ----------------------------------------------------------------------------------------------------


def run_driver(args: argparse.Namespace) -> dict[str, Any]:
    from dlcm.data.corpus import ensure_default_corpus
    from dlcm.research.sweep import Executor, write_json, write_summary

    mode = MODES["smoke" if args.smoke else "h200"]
    start = time.perf_counter()
    runs_dir = args.runs_dir.resolve()
    budget = args.budget_s if args.budget_s is not None else mode.budget_s
    _log(f"mode {mode.name}, runs in {runs_dir}, budget {budget:g} s")
    corpus = ensure_default_corpus()  # once, before any run can race to build it
    _log(f"default corpus ready: {corpus}")
    specs = load_specs(mode)
    parallel = args.parallel or mode.parallel
    timing: dict[str, float] = {}
    calibration: dict[str, Any] = {"probe_steps": 0}

    steps = dict(mode.max_steps)
    pinned = {"mup": args.steps_mup, "main": args.steps_main}
    if args.probe_steps is not None:
        mode = dataclasses.replace(mode, probe_steps=args.probe_steps)
    if mode.probe_steps and not all(pinned.values()):
        probe = group_runs(specs, {g: probe_overrides(mode.probe_steps) for g in mode.max_steps})
        _log(f"probe: {len(probe)} runs × {mode.probe_steps} steps, all at once")
        probed = Executor(runs_dir / "probe", len(probe), threads=1, log=_log)(probe)
        failed = [name for name, r in probed.items() if r.get("status") != "ok"]
        if failed:
            raise RuntimeError(f"probe runs failed: {failed}; see train.log in {runs_dir / 'probe'}/<run>/")
        rates = {r.name: seconds_per_step(runs_dir / "probe" / r.name / "tb") for r in probe}
        timing["probe_s"] = time.perf_counter() - start
        left = budget - (time.perf_counter() - start) - mode.reserve_s
        steps, slowest = plan_steps(mode, rates, left)
        calibration = {
            "probe_steps": mode.probe_steps,
            "seconds_per_step": rates,
            "slowest_seconds_per_step": slowest,
            "train_seconds_planned": left * SAFETY,
        }
        _log(f"probe: slowest s/step {slowest}; {left:.0f} s left for training → steps {steps}")
    steps = {g: pinned[g] or steps[g] for g in steps}
    calibration["steps"] = steps
    too_short = {g: s for g, s in steps.items() if s < mode.min_steps}
    if too_short:
        raise RuntimeError(f"the budget allows only {too_short} steps (< {mode.min_steps}): raise --budget-s")

    # Safety net: the whole training window, i.e. the planned time plus the slack SAFETY left.
    max_seconds = calibration.get("train_seconds_planned", math.inf) / SAFETY
    runs = group_runs(
        specs, {g: training_overrides(s, mode.val_points, g == "main", max_seconds) for g, s in steps.items()}
    )
    synthetic_dir = runs_dir / "synthetic"
    synthetic_dir.mkdir(parents=True, exist_ok=True)
    synthetic_jobs = []  # (command, results file, log file)
    for router_grad in ("aux", "ste"):
        out = synthetic_dir / f"{router_grad}.json"
        cmd = [sys.executable, str(ROOT / "bench" / "synthetic_boundaries.py"), f"--router-grad={router_grad}"]
        cmd += [f"--{k}={v}" for k, v in mode.synthetic.items()] + [f"--out={out}"]
        if math.isfinite(budget):  # never outlast the training runs: stop early and report the steps done
            cmd.append(f"--max-seconds={calibration.get('train_seconds_planned', budget / 2):.0f}")
        synthetic_jobs.append((cmd, out, synthetic_dir / f"{router_grad}.log"))
    _log(f"training {len(runs)} runs ({parallel} at a time) and 2 synthetic parsers")
    train_start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for cmd, _, log_path in synthetic_jobs:
        with open(log_path, "w") as log_file:
            procs.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env))
    executor = Executor(runs_dir, parallel, threads=1, log=_log)
    results = executor(runs)
    synthetic = []
    for (cmd, out, log_path), proc in zip(synthetic_jobs, procs, strict=True):
        if proc.wait() != 0:
            _log(f"synthetic run failed: {' '.join(cmd)} (see {log_path})")
            continue
        synthetic += json.loads(out.read_text())
    timing["train_s"] = time.perf_counter() - train_start
    write_summary(runs_dir, results)

    analysis, analysis_cmd = None, None
    if results.get(MAIN_RUN, {}).get("status") == "ok" and results.get(BASELINE_RUN, {}).get("status") == "ok":
        analysis_start = time.perf_counter()
        out = runs_dir / "analysis.json"
        analysis_cmd = [sys.executable, "-m", "dlcm", "analyze", "--run", str(runs_dir / MAIN_RUN)]
        analysis_cmd += ["--baseline-run", str(runs_dir / BASELINE_RUN), "--out", str(out)]
        if mode.analysis_batches:
            analysis_cmd += ["--batches", str(mode.analysis_batches)]
        if args.smoke:
            analysis_cmd += ["--device", "cpu"]
        _log("analysis: " + " ".join(analysis_cmd))
        if subprocess.call(analysis_cmd) == 0:
            analysis = json.loads(out.read_text())
        timing["analysis_s"] = time.perf_counter() - analysis_start
    timing["total_s"] = time.perf_counter() - start

    result = {
        "mode": mode.name,
        "note": "CPU smoke run: tiny shapes and steps, checks the driver only" if args.smoke else "H200 small scale",
        "environment": environment(),
        "commands": {
            "driver": [Path(sys.executable).name, *sys.argv],
            "runs": {name: r.get("command") for name, r in results.items()},
            "synthetic": [[Path(c[0]).name, *c[1:]] for c, _, _ in synthetic_jobs],
            "analysis": analysis_cmd,
        },
        "timing": timing,
        "calibration": calibration,
        "mup_transfer": mup_tables(specs, results),
        "dlcm_vs_baseline": dlcm_vs_baseline(results, specs),
        "ratio_scope": ratio_scope(results),
        "tokens_per_concept": tokens_per_concept(results),
        "synthetic_boundaries": synthetic,
        "position_loss": analysis,
        "failed": sorted(n for n, r in results.items() if r.get("status") != "ok"),
        "runs": results,
    }
    out_path = args.out or (
        runs_dir / "repro_small_smoke.json" if args.smoke else ROOT / "bench" / "results" / "repro_small_h200.json"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(out_path, result)
    _log(f"results: {out_path} ({timing['total_s']:.0f} s in all)")
    print(format_report(result), flush=True)
    return {"result": result, "path": out_path, "mode": mode}


def format_report(result: dict[str, Any]) -> str:
    """The five reproductions in a few lines of text."""

    def num(value: Any, fmt: str = ".4f") -> str:
        return "-" if value is None else format(value, fmt)

    from dlcm.research.sweep import format_mup_tables

    lines = [f"== repro_small ({result['mode']}): {result['note']}", format_mup_tables(result["mup_transfer"])]
    dv = result["dlcm_vs_baseline"]
    for name in ("dlcm", "baseline"):
        r = dv[name]
        lines.append(
            f"{name}: val bpb {num(r.get('val_bpb'))}, val loss {num(r.get('val_loss'))}, "
            f"training FLOPs {num(r.get('train_flops'), '.4g')}, steps {r.get('steps')}"
        )
    if "bpb_dlcm_minus_baseline" in dv:
        lines.append(
            f"DLCM − baseline: {dv['bpb_dlcm_minus_baseline']:+.4f} bits/byte "
            f"(goal DLCM ≤ baseline: {'met' if dv['goal_dlcm_bpb_le_baseline'] else 'NOT met'})"
        )
    rs = result["ratio_scope"]
    lines.append(
        f"realised ratio (validation, thresholded): global {num(rs['global'].get('val_ratio'), '.3f')}, "
        f"sequence {num(rs['sequence'].get('val_ratio'), '.3f')} (target {rs.get('target', '-')})"
    )
    for label, entry in result["tokens_per_concept"].items():
        shown = ", ".join(f"{d} {v:.3f}" for d, v in entry["by_domain"].items())
        lines.append(f"tokens per concept ({label}): {shown or '-'}")
    for s in result["synthetic_boundaries"]:
        e, t = s["scores"]["tol0"], s["scores"]["tol1"]
        c = s["chance"]["tol0"]
        lines.append(
            f"synthetic {s['router_grad']}: F1 exact {e['f1']:.3f} (chance {c['f1']:.3f}), ±1 {t['f1']:.3f}; "
            f"ratio {s['eval_ratio']:.2f} (target {s['target_ratio']:.2f})"
        )
    if result["failed"]:
        lines.append(f"FAILED runs: {', '.join(result['failed'])}")
    return "\n".join(lines)


def draw(result: dict[str, Any], figures_dir: Path, tensorboard_dir: Path | None) -> list[Path]:
    """The reproduction's figures from its results JSON alone."""
    from dlcm.research import plots

    runs = result["runs"]
    main = {
        label: runs[name]
        for label, name in (
            ("DLCM R=4, global", MAIN_RUN),
            ("DLCM R=4, per-sequence", SEQUENCE_RUN),
            ("dense baseline", BASELINE_RUN),
        )
        if name in runs and runs[name].get("status") == "ok"
    }
    dlcm_only = {k: v for k, v in main.items() if k != "dense baseline"}
    figures = {
        "loss_vs_flops": plots.loss_vs_flops(main, "val/bpb"),
        "ratio_over_training": plots.ratio_over_training(dlcm_only),
        "tokens_per_concept": plots.tokens_per_concept(dlcm_only),
        "position_loss": plots.position_loss({"R=4 DLCM vs baseline": result["position_loss"]})
        if result.get("position_loss")
        else None,
        "lr_transfer": plots.lr_transfer(result["mup_transfer"]),
        "synthetic_boundaries": plots.boundary_scores(result["synthetic_boundaries"])
        if result.get("synthetic_boundaries")
        else None,
    }
    prefixed = {f"repro_small_{result['mode']}_{k}": v for k, v in figures.items() if v is not None}
    return plots.save_figures(prefixed, figures_dir, tensorboard_dir)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "plot":
        parser = argparse.ArgumentParser(prog="repro_small.py plot", description="figures from a results JSON")
        parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "repro_small_h200.json")
        parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures", help="PNG directory")
        parser.add_argument("--tensorboard", type=Path, default=None, help="also write TensorBoard images here")
        args = parser.parse_args(argv[1:])
        for path in draw(json.loads(args.results.read_text()), args.figures, args.tensorboard):
            print(f"wrote {path}")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU version (checks the driver end to end)")
    parser.add_argument("--runs-dir", type=Path, required=True, help="run directories and their checkpoints")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: see the module docstring)")
    parser.add_argument("--figures", type=Path, default=None, help="PNG directory (default: docs/figures, smoke: runs)")
    parser.add_argument("--no-plots", action="store_true", help="skip the figures (draw them later with `plot`)")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-time budget of the driver (H200: 450)")
    parser.add_argument("--parallel", type=int, default=None, help="dlcm fit processes at a time")
    parser.add_argument("--steps-mup", type=int, default=None, help="pin the μP runs' steps (no probe if both given)")
    parser.add_argument("--steps-main", type=int, default=None, help="pin the DLCM/baseline runs' steps")
    parser.add_argument("--probe-steps", type=int, default=None, help="probe length (H200: 40; 0: no probe)")
    args = parser.parse_args(argv)
    done = run_driver(args)
    if args.no_plots:
        return 1 if done["result"]["failed"] else 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"matplotlib is not installed: draw the figures with `python {Path(__file__).name} plot --results ...`")
    else:
        figures = args.figures or (args.runs_dir / "figures" if args.smoke else ROOT / "docs" / "figures")
        for path in draw(done["result"], figures, args.runs_dir / "figures_tensorboard"):
            print(f"wrote {path}")
    return 1 if done["result"]["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
