"""Boundary fidelity on one GPU: does the inference-mode compression ratio hit the target R, at what cost in bits
per byte, over seeds — and the DLCM vs FLOPs-matched baseline gap over seeds, at two scales.

    python bench/boundary_fidelity.py --runs-dir /tmp/bf --out bf_scale1.json                  # H200, ≈ 9 min
    python bench/boundary_fidelity.py --scale 2 --runs-dir /tmp/bf2 --out bf_scale2.json \\
        --match-steps bf_scale1.json                                                          # H200, ≈ 9 min
    python bench/boundary_fidelity.py --mode cpu --runs-dir /tmp/bfc1 --out bf_cpu_scale1.json   # 2 cores, ≈ 13 min
    python bench/boundary_fidelity.py --mode cpu --scale 2 --runs-dir /tmp/bfc2 --out bf_cpu_scale2.json  # ≈ 35 min
    python bench/boundary_fidelity.py --mode smoke --runs-dir /tmp/bf-smoke                     # CPU, checks the driver

``--lr`` sets every run's peak learning rate (a second scale may need a lower one than the recipes').

Every run is a ``dlcm fit`` of the small-scale reproduction's recipes (``recipes/sweeps/repro_small_h200/``:
the R = 4 DLCM and its FLOPs-matched dense baseline on the embedded default corpus), all started at once on one
GPU like ``bench/repro_small.py`` (one CPU thread each), with the step count set by a short probe of the same
runs so that the whole driver fits ``--budget-s``. Scale 1 trains 14 runs:

- the boundary mechanisms at R = 4, seed 0 (``MECHANISMS``: parser overrides; ``fixed`` is the old default,
  τ = 0.5 and α = 0.1);
- the default mechanism (``calibrated``) on seeds 1 and 2 (with seed 0 above: 3 seeds), and at R = 2 and R = 8;
- the dense baseline on seeds 0, 1, 2.

``--mode cpu`` runs the same study on the CPU demo's recipes (``recipes/*_tiny_defaultcorpus_cpu.yaml``, 300 steps,
two runs at a time): only the seed groups (the default DLCM and the baseline on seeds 0, 1, 2), since the
mechanisms were compared on the CPU before (docs/RESULTS.md).

Scale 2 (``--scale 2``) doubles every width and head count of the DLCM (167M instead of 47M inference FLOPs per
token at 1,024 tokens, 3.5×), gives the baseline the shape ``shape_search.matched_baseline`` matches to it, and
trains both on seeds 0, 1, 2; ``--match-steps`` caps the steps at those of a scale-1
results file (the probe may allow fewer: the JSON's ``train_flops`` say what was reached; ≥ 3× scale 1's needs
≥ 75% of its steps). A seed sets the initialisation, the boundary-sampling
generator and the data order (``seed_everything``, ``model.init_args.seed``, ``data.seed``): DLCM and baseline
runs of one seed see the same batches, so their bits-per-byte gap is paired.

Reported per run (``runs``) and per group (``groups``: mean ± sample std over seeds): the realised tokens per
concept with inference-mode boundaries on the validation split (``val_ratio``, all documents; ``ratio_prose``,
``ratio_code``: per domain), its relative error to R, the parser's final τ, validation bits per byte and training
FLOPs; ``gap``: DLCM − baseline bits per byte per seed, mean ± std. ``format_report`` prints the same as a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repro_small import environment, probe_overrides, seconds_per_step, training_overrides  # beside this script

ROOT = Path(__file__).resolve().parents[1]
PARSER = "model.init_args.config.parser"
SAFETY = 0.85  # share of the probe-measured time actually planned
DEFAULT = "calibrated"  # the parser's default mechanism (ParserConfig)
VOCAB = 4096  # the embedded default corpus's BPE (both modes train on it)
STACK_FIELDS = ("width", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden")
SEEDS = (0, 1, 2)

# Parser overrides of each mechanism compared at R = 4 (every key is a ParserConfig field).
MECHANISMS: dict[str, dict[str, Any]] = {
    "fixed": {"threshold_mode": "fixed"},  # τ = 0.5, α = 0.1: the previous default
    "calibrated": {"threshold_mode": "calibrated"},  # τ calibrated on training batches (the default)
    "anneal": {"threshold_mode": "fixed", "alpha_final": 0.0},  # α 0.1 → 0 over training, τ = 0.5
    "calibrated-anneal": {"threshold_mode": "calibrated", "alpha_final": 0.0},  # both
    # penalty mean 4p(1 − p) on p near 0.5; 0.1 collapsed the ratio on the CPU phrase language (docs/RESULTS.md)
    "midpoint": {"threshold_mode": "fixed", "midpoint_weight": 0.01},
    "ste": {"threshold_mode": "fixed", "router_grad": "ste"},  # H-Net straight-through, τ = 0.5
    "rule": {"predictor": "rule", "threshold_mode": "fixed"},  # §8.1: cosine of encoder states ≥ 0.5, no router
}


@dataclass(frozen=True)
class Mode:
    """Recipes and budgets of one way to run the driver."""

    name: str
    dlcm_recipe: str
    baseline_recipe: str
    probe_steps: int  # 0: no probe, train max_steps
    max_steps: int
    min_steps: int
    val_points: int
    budget_s: float
    reserve_s: float  # start-up, validations and the summary
    note: str  # what the results JSON and the report say about the setting
    parallel: int | None = None  # dlcm fit processes at a time (None: all, so everything shares the device)
    mechanisms: bool = True  # scale 1 also compares MECHANISMS and R = 2, 8 (else only the seed groups)


MODES = {
    "gpu": Mode(
        name="gpu",
        dlcm_recipe="recipes/sweeps/repro_small_h200/recipe_dlcm_r4.yaml",
        baseline_recipe="recipes/sweeps/repro_small_h200/recipe_baseline.yaml",
        probe_steps=30,
        max_steps=850,  # the reproduction's count: ≈ 4 epochs of the 3.5M-token corpus
        min_steps=100,
        val_points=5,
        budget_s=480.0,  # a 10-minute call leaves ≈ 2 minutes for installs and slack
        reserve_s=80.0,
        note="one GPU, all runs concurrent",
    ),
    "cpu": Mode(
        name="cpu",
        dlcm_recipe="recipes/dlcm_tiny_r4_defaultcorpus_cpu.yaml",
        baseline_recipe="recipes/baseline_tiny_defaultcorpus_cpu.yaml",
        probe_steps=0,
        max_steps=300,  # the demo's count
        min_steps=50,
        val_points=3,
        budget_s=math.inf,
        reserve_s=0.0,
        note="CPU demo recipes, two runs at a time",
        parallel=2,  # one thread each on a 2-core machine
        mechanisms=False,
    ),
    "smoke": Mode(
        name="smoke",
        dlcm_recipe="recipes/sweeps/repro_small_cpu_smoke/recipe_dlcm_r4.yaml",
        baseline_recipe="recipes/sweeps/repro_small_cpu_smoke/recipe_baseline.yaml",
        probe_steps=0,
        max_steps=6,
        min_steps=2,
        val_points=2,
        budget_s=math.inf,
        reserve_s=0.0,
        note="CPU smoke run: tiny shapes and steps, checks the driver only",
        parallel=2,
    ),
}


def _log(message: str) -> None:
    print(f"[boundary_fidelity {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- runs ------------------------------------------------------------------------------------------------------


def seed_overrides(seed: int) -> dict[str, Any]:
    """Initialisation, boundary sampling and data order of one seed."""
    return {"seed_everything": seed, "model.init_args.seed": seed, "data.seed": seed}


def matched_baseline_overrides(dlcm_recipe: Path, dlcm_size: dict[str, Any], base_recipe: Path) -> dict[str, Any]:
    """Overrides giving the baseline recipe the shape whose inference FLOPs per token match the DLCM's after
    ``dlcm_size`` (``dlcm.research.shape_search.matched_baseline``: doubling both widths alone leaves the DLCM 10 %
    above, since attention FLOPs grow 2× and matmul FLOPs 4×)."""
    from dlcm.infer.recipe import load_recipe
    from dlcm.research.shape_search import matched_baseline

    dlcm = load_recipe(dlcm_recipe, vocab_size=VOCAB)
    config = dlcm.config
    sections: dict[str, dict[str, Any]] = {}
    for key, value in dlcm_size.items():
        section, field = key.split(".")[-2:]
        sections.setdefault(section, {})[field] = value
    changes = {name: dataclasses.replace(getattr(config, name), **fields) for name, fields in sections.items()}
    config = dataclasses.replace(config, **changes)
    base = load_recipe(base_recipe, vocab_size=VOCAB)
    stack = matched_baseline(config, base.config, dlcm.context_length).stack
    return {f"model.init_args.config.stack.{k}": getattr(stack, k) for k in STACK_FIELDS}


def doubled_widths(recipe: Path) -> dict[str, Any]:
    """Overrides that double every width, head count and FFN width of a recipe's model (head dims unchanged):
    ≈ 4× the matmul FLOPs per token, DLCM and baseline alike, so a FLOPs-matched pair stays matched."""
    model = yaml.safe_load(recipe.read_text())["model"]["init_args"]["config"]
    out = {}
    for name in ("encoder", "backbone", "decoder", "stack", "cross"):
        if name in model:
            stack = model[name]
            doubled = {k: 2 * stack[k] for k in ("width", "n_heads", "n_kv_heads", "ffn_hidden") if k in stack}
            out.update({f"model.init_args.config.{name}.{k}": v for k, v in doubled.items()})
    return out


@dataclass(frozen=True)
class Job:
    """One training run of the study: its group (what is compared), seed and overrides."""

    name: str
    group: str
    kind: str  # dlcm | baseline
    seed: int
    target_ratio: float | None
    overrides: dict[str, Any]


def study_jobs(mode: Mode, scale: int) -> list[Job]:
    """The runs of one scale (see the module docstring)."""
    dlcm_recipe, base_recipe = ROOT / mode.dlcm_recipe, ROOT / mode.baseline_recipe
    dlcm_size = doubled_widths(dlcm_recipe) if scale == 2 else {}
    base_size = matched_baseline_overrides(dlcm_recipe, dlcm_size, base_recipe) if scale == 2 else {}

    def dlcm(group: str, seed: int, ratio: float, parser: dict[str, Any]) -> Job:
        sets = {f"{PARSER}.{k}": v for k, v in {"target_ratio": ratio, **parser}.items()}
        return Job(f"{group}-s{seed}", group, "dlcm", seed, ratio, {**dlcm_size, **sets, **seed_overrides(seed)})

    jobs = []
    if scale == 1 and mode.mechanisms:
        jobs += [dlcm(f"r4-{name}", 0, 4.0, parser) for name, parser in MECHANISMS.items()]
        jobs += [dlcm(f"r4-{DEFAULT}", seed, 4.0, MECHANISMS[DEFAULT]) for seed in SEEDS[1:]]
        jobs += [dlcm(f"r{r}-{DEFAULT}", 0, float(r), MECHANISMS[DEFAULT]) for r in (2, 8)]
    else:
        jobs += [dlcm(f"r4-{DEFAULT}", seed, 4.0, MECHANISMS[DEFAULT]) for seed in SEEDS]
    jobs += [Job(f"baseline-s{s}", "baseline", "baseline", s, None, {**base_size, **seed_overrides(s)}) for s in SEEDS]
    return jobs


def as_runs(mode: Mode, jobs: list[Job], extra: dict[str, Any]) -> list[Any]:
    from dlcm.research.sweep import Run, cli_args

    runs = []
    for job in jobs:
        recipe = ROOT / (mode.dlcm_recipe if job.kind == "dlcm" else mode.baseline_recipe)
        meta = {"group": job.group, "kind": job.kind, "seed": job.seed, "target": job.target_ratio}
        runs.append(Run(job.name, cli_args([recipe], job.overrides, extra), meta))
    return runs


def plan_steps(
    mode: Mode, rates: dict[str, float | None], seconds_left: float, cap: int | None = None
) -> tuple[int, float]:
    """One step count for every run (equal tokens): the most that fits ``seconds_left`` at the slowest rate, at most
    ``cap`` (default: the mode's maximum)."""
    measured = [s for s in rates.values() if s]
    if not measured:
        raise RuntimeError("the probe measured no step time; see the probe's train.log files")
    slowest = max(measured)
    steps = min(cap or mode.max_steps, int(seconds_left * SAFETY / slowest))
    return steps - steps % mode.val_points, slowest


# ---- results ---------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one value) and the values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def run_row(job: Job, result: dict[str, Any]) -> dict[str, Any]:
    """What the study reads from one run's summary (``dlcm.research.run_metrics.summarize_run``)."""
    per_domain = result.get("tokens_per_concept") or {}
    row = {
        "group": job.group,
        "kind": job.kind,
        "seed": job.seed,
        "status": result.get("status"),
        "steps": result.get("steps"),
        "target_ratio": job.target_ratio,
        "val_bpb": result.get("val_bpb"),
        "val_loss": result.get("val_loss"),
        "train_flops": result.get("train_flops"),
        "val_ratio": result.get("val_ratio"),
        "ratio_prose": per_domain.get("prose"),
        "ratio_code": per_domain.get("code"),
        "train_ratio": result.get("train_ratio"),
        "threshold": result.get("threshold"),
    }
    for key in ("val_ratio", "ratio_prose", "ratio_code"):
        if job.target_ratio and row[key] is not None:
            row[f"{key}_error"] = row[key] / job.target_ratio - 1.0
    return row


def summarize(jobs: list[Job], results: dict[str, dict]) -> dict[str, Any]:
    """Per-run rows, per-group mean ± std over seeds, and the paired DLCM − baseline gap per seed."""
    rows = {job.name: run_row(job, results.get(job.name, {})) for job in jobs}
    groups: dict[str, dict[str, Any]] = {}
    for group in dict.fromkeys(job.group for job in jobs):
        members = [r for r in rows.values() if r["group"] == group and r["status"] == "ok"]
        keys = ["val_bpb", "train_flops"]
        if group != "baseline":
            keys += ["val_ratio", "val_ratio_error", "ratio_prose", "ratio_prose_error", "ratio_code"]
            keys += ["ratio_code_error", "threshold"]
        groups[group] = {k: mean_std([m.get(k) for m in members]) for k in keys}
        groups[group]["seeds"] = [m["seed"] for m in members]
        within = [abs(m["val_ratio_error"]) <= 0.05 for m in members if m.get("val_ratio_error") is not None]
        if within:
            groups[group]["val_ratio_within_5pct"] = all(within)
    gap = {}
    default = f"r4-{DEFAULT}"
    for job in jobs:
        if job.group == default and rows[job.name]["val_bpb"] is not None:
            base = rows.get(f"baseline-s{job.seed}", {})
            if base.get("val_bpb") is not None:
                gap[job.seed] = rows[job.name]["val_bpb"] - base["val_bpb"]
    return {
        "runs": rows,
        "groups": groups,
        "gap_dlcm_minus_baseline_bpb": {"per_seed": gap, **mean_std(list(gap.values()))},
    }


def format_report(result: dict[str, Any]) -> str:
    """The groups as an aligned table, then the DLCM − baseline gap."""

    def cell(stat: dict[str, Any], fmt: str, scale: float = 1.0) -> str:
        if stat["mean"] is None:
            return "-"
        text = format(stat["mean"] * scale, fmt)
        if stat["std"] is None:  # a group of one seed
            return text
        return f"{text} ± {format(stat['std'] * scale, fmt.lstrip('+'))}"

    header = ["group", "seeds", "val ratio", "err %", "prose", "code", "τ", "val bpb", "train FLOPs"]
    table = [header]
    for name, g in result["groups"].items():
        ratio = g.get("val_ratio")
        table.append(
            [
                name,
                ",".join(map(str, g["seeds"])) or "-",
                cell(ratio, ".3f") if ratio else "-",
                cell(g["val_ratio_error"], "+.1f", 100) if ratio else "-",
                cell(g["ratio_prose"], ".2f") if ratio else "-",
                cell(g["ratio_code"], ".2f") if ratio else "-",
                cell(g["threshold"], ".3f") if ratio else "-",
                cell(g["val_bpb"], ".4f"),
                cell(g["train_flops"], ".3g"),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [f"== boundary_fidelity ({result['mode']}, scale {result['scale']}): {result['note']}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    gap = result["gap_dlcm_minus_baseline_bpb"]
    if gap["mean"] is not None:
        spread = f" ± {gap['std']:.4f}" if gap["std"] is not None else ""
        lines.append(f"DLCM ({DEFAULT}) − baseline, bits per byte, paired by seed: {gap['mean']:+.4f}{spread}")
    if result["failed"]:
        lines.append(f"FAILED runs: {', '.join(result['failed'])}")
    return "\n".join(lines)


# ---- driver ----------------------------------------------------------------------------------------------------


def run_driver(args: argparse.Namespace) -> dict[str, Any]:
    import json

    from dlcm.data.corpus import ensure_default_corpus
    from dlcm.research.sweep import Executor, write_json, write_summary

    mode = MODES[args.mode]
    start = time.perf_counter()
    runs_dir = args.runs_dir.resolve()
    budget = args.budget_s if args.budget_s is not None else mode.budget_s
    _log(f"mode {mode.name}, scale {args.scale}, runs in {runs_dir}, budget {budget:g} s")
    _log(f"default corpus ready: {ensure_default_corpus()}")  # once, before any run can race to build it
    jobs = study_jobs(mode, args.scale)
    timing: dict[str, float] = {}
    calibration: dict[str, Any] = {"probe_steps": 0}
    cap = None
    if args.match_steps is not None:
        cap = json.loads(args.match_steps.read_text())["calibration"]["steps"]
        _log(f"at most {cap} steps, as {args.match_steps}")
    steps = args.steps
    probe_steps = mode.probe_steps if args.probe_steps is None else args.probe_steps
    if steps is None and probe_steps:
        probe = as_runs(mode, jobs, probe_overrides(probe_steps))
        _log(f"probe: {len(probe)} runs × {probe_steps} steps, all at once")
        probed = Executor(runs_dir / "probe", len(probe), threads=1, log=_log)(probe)
        failed = [name for name, r in probed.items() if r.get("status") != "ok"]
        if failed:
            raise RuntimeError(f"probe runs failed: {failed}; see train.log in {runs_dir / 'probe'}/<run>/")
        rates = {r.name: seconds_per_step(runs_dir / "probe" / r.name / "tb") for r in probe}
        timing["probe_s"] = time.perf_counter() - start
        left = budget - timing["probe_s"] - mode.reserve_s
        steps, slowest = plan_steps(mode, rates, left, cap)
        calibration.update(
            probe_steps=probe_steps,
            seconds_per_step=rates,
            slowest_seconds_per_step=slowest,
            train_seconds_planned=left * SAFETY,
        )
        _log(f"probe: slowest {slowest:.3f} s/step; {left:.0f} s left for training → {steps} steps")
    steps = steps or cap or mode.max_steps
    calibration["steps"] = steps
    if steps < mode.min_steps:
        raise RuntimeError(f"the budget allows only {steps} steps (< {mode.min_steps}): raise --budget-s")

    max_seconds = calibration.get("train_seconds_planned", math.inf) / SAFETY  # safety net: the training window
    extra = training_overrides(steps, mode.val_points, False, max_seconds)
    if args.lr is not None:
        extra["model.init_args.optimizer.lr"] = args.lr
        calibration["lr"] = args.lr
    runs = as_runs(mode, jobs, extra)
    parallel = mode.parallel or len(runs)
    _log(f"training {len(runs)} runs, {parallel} at a time, {steps} steps each")
    train_start = time.perf_counter()
    results = Executor(runs_dir, parallel, threads=1, log=_log)(runs)
    timing["train_s"] = time.perf_counter() - train_start
    write_summary(runs_dir, results)
    timing["total_s"] = time.perf_counter() - start

    result = {
        "mode": mode.name,
        "scale": args.scale,
        "note": mode.note,
        "what": (
            "val_ratio: validation tokens per concept with inference-mode boundaries (p >= the parser's tau), all "
            "documents; ratio_prose / ratio_code: the same per domain; *_error: ratio / R - 1; threshold: the "
            "parser's final tau; val_bpb: validation bits per byte; groups: mean and sample std over seeds; "
            "gap_dlcm_minus_baseline_bpb: the default DLCM minus the baseline of the same seed (same data order)"
        ),
        "mechanisms": MECHANISMS,
        "default_mechanism": DEFAULT,
        "environment": environment(),
        "commands": {
            "driver": [Path(sys.executable).name, *sys.argv],
            "runs": {name: r.get("command") for name, r in results.items()},
        },
        "timing": timing,
        "calibration": calibration,
        **summarize(jobs, results),
        "failed": sorted(n for n, r in results.items() if r.get("status") != "ok"),
        "run_summaries": results,
    }
    out_path = args.out or runs_dir / f"boundary_fidelity_{mode.name}_scale{args.scale}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(out_path, result)
    _log(f"results: {out_path} ({timing['total_s']:.0f} s in all)")
    print(format_report(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mode", choices=sorted(MODES), default="gpu", help="gpu: the study; cpu: on the demo recipes; smoke: checks"
    )
    parser.add_argument("--scale", type=int, choices=(1, 2), default=1, help="2: doubled widths (≈ 4× FLOPs)")
    parser.add_argument("--runs-dir", type=Path, required=True, help="run directories (keep off the results dir)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: in --runs-dir)")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-time budget of the driver (GPU: 480)")
    parser.add_argument("--probe-steps", type=int, default=None, help="probe length (GPU: 30; 0: no probe)")
    parser.add_argument("--steps", type=int, default=None, help="pin every run's steps (no probe)")
    parser.add_argument("--match-steps", type=Path, default=None, help="at most the steps of this results JSON")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of every run (default: recipes')")
    args = parser.parse_args(argv)
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr {args.lr} is not allowed: a positive learning rate")
    result = run_driver(args)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
