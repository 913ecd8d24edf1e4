"""Boundary fidelity on one GPU: does the inference-mode compression ratio hit the target R, how decisive is the
parser, at what cost in bits per byte — and the DLCM vs FLOPs-matched baseline gap over seeds, each model at its
best learning rate, at two scales.

    python bench/boundary_fidelity.py --runs-dir /tmp/bf1 --out bf_scale1.json                  # one H100, < 10 min
    python bench/boundary_fidelity.py --scale 2 --runs-dir /tmp/bf2 --out bf_scale2.json \\
        --match-steps bf_scale1.json                                                           # one H100, < 10 min
    python bench/boundary_fidelity.py --mode cpu --runs-dir /tmp/bfc1 --out bf_cpu_scale1.json   # 2 cores
    python bench/boundary_fidelity.py --mode smoke --runs-dir /tmp/bf-smoke                     # CPU, checks the driver

Every run is a ``dlcm fit`` of the small-scale reproduction's recipes (``recipes/sweeps/repro_small_h200/``: the
R = 4 DLCM and its FLOPs-matched dense baseline on the embedded default corpus). The runs of one scale (``Study``)
come in two phases: first the learning-rate grid (``--lr`` × ``--lr-factors``, default the recipes' 1e-3 × 0.5, 1,
2) on seed 0 for the default DLCM and the baseline, and at scale 1 the default at R = 2 and R = 8 on seeds 0–2 at
the central rate; then seeds 1 and 2 of each model at its best rate (lowest seed-0 validation bits per byte), and at
scale 1 the alternative mechanism (``ALTERNATIVE``) on seeds 0–2 and the paper's §8.1 rule-based predictor on
seeds 0–2 with its τ calibrated to the learned seed-0 run's realised validation ratio (matched compression), both
at the DLCM's best rate. A seed sets the initialisation, the boundary-sampling generator and the data order
(``seed_everything``, ``model.init_args.seed``, ``data.seed``): runs of one seed see the same batches, so every
gap is paired by seed.

On a GPU the driver first measures each model's device memory alone (a short run of the most concept-heavy DLCM,
then of the baseline), trains as many runs at a time as the free memory holds (15 % margin, 2 GiB kept free),
times a short probe of that many runs together, and sets the step count so that every round of both phases fits
``--budget-s``. The plan (steps, per-run memory) is written to ``--runs-dir/plan.json``; finished runs keep their
``result.json``. Run again with the same ``--runs-dir``, the driver reuses the plan, skips finished runs and trains
only what is missing (a run cut off mid-way starts again: runs write no checkpoints), with the runs-at-a-time
recomputed from the memory free then. Runs that fail (out of memory) get one more try at half the concurrency.
``--mode cpu`` runs the seed groups only (the default DLCM and the baseline, seeds 0–2, the recipes' rate) on the
CPU demo's recipes, two at a time.

Scale 2 (``--scale 2``) doubles every width and head count of the DLCM (167M instead of 47M inference FLOPs per
token at 1,024 tokens, 3.5×) and gives the baseline the shape ``shape_search.matched_baseline`` matches to it;
``--match-steps`` caps its steps at scale 1's and adds ``scale_trend``: the scale-2 minus scale-1 gap with a 95 %
interval (Welch) and the ratio of training FLOPs (≥ 3 needs ≥ 86 % of scale 1's steps).

Reported per run (``runs``) and per group (``groups``, one per learning rate of the grid: mean, sample std and 95 %
interval over seeds): the inference-mode tokens per concept on the validation split (``val_ratio``; per domain
``ratio_prose``, ``ratio_code``), its error to R, the largest error over the second half's validations, whether the
final ratio is within ±5 % of R, every second-half validation within ±10 % and each domain within ±10 %; the
parser's final τ; ``near_threshold``, the share of validation tokens with ``|p − τ| ≤ 0.05`` (decisiveness);
validation bits per byte and training FLOPs. Gaps, paired by seed: DLCM − baseline, alternative − default, and
matched rule − learned. ``format_report`` prints the same as a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import threading
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
ALTERNATIVE = "consistency"  # compared with the default over seeds at scale 1 (the candidate for the next default)
VOCAB = 4096  # the embedded default corpus's BPE (both modes train on it)
STACK_FIELDS = ("width", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden")
SEEDS = (0, 1, 2)
PLAN = "plan.json"  # in --runs-dir: the steps (and the per-run memory) every later call reuses
MEMORY_MARGIN = 0.15  # on top of a run's measured device memory (allocator growth after the probe's steps)
MEMORY_RESERVE_GIB = 2.0  # left free on the device (the driver's own context, fragmentation)
MEMORY_PROBE_STEPS = 10
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}

# Parser overrides of each mechanism compared at R = 4 (every key is a ParserConfig field).
MECHANISMS: dict[str, dict[str, Any]] = {
    "fixed": {"threshold_mode": "fixed"},  # τ = 0.5, α = 0.1: the previous default
    "calibrated": {"threshold_mode": "calibrated"},  # τ calibrated on training batches (the default)
    "anneal": {"threshold_mode": "fixed", "alpha_final": 0.0},  # α 0.1 → 0 over training, τ = 0.5
    "calibrated-anneal": {"threshold_mode": "calibrated", "alpha_final": 0.0},  # both
    # penalty mean 4p(1 − p) on p near 0.5; 0.1 collapsed the ratio on the CPU phrase language (docs/RESULTS.md)
    "midpoint": {"threshold_mode": "fixed", "midpoint_weight": 0.01},
    # penalty on the chance that sampled training and thresholded inference decide a token differently
    "consistency": {"threshold_mode": "calibrated", "consistency_weight": 0.01},
    "ste": {"threshold_mode": "fixed", "router_grad": "ste"},  # H-Net straight-through, τ = 0.5
    "rule": {"predictor": "rule", "threshold_mode": "fixed"},  # §8.1: cosine of encoder states ≥ 0.5, no router
}
# §8.1's rule at a learned parser's ratio: τ calibrated and used in training too (GlobalParser.training_threshold).
RULE_MATCHED = {"predictor": "rule", "threshold_mode": "calibrated"}


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
    parallel: int | None = None  # dlcm fit processes at a time (None: as many as the free device memory holds)
    lr_factors: tuple[float, ...] = (1.0,)  # the learning-rate grid, as multiples of the recipes' (or --lr)
    extras: bool = True  # scale 1 also runs R = 2, 8, the alternative mechanism and the matched rule predictor


MODES = {
    "gpu": Mode(
        name="gpu",
        dlcm_recipe="recipes/sweeps/repro_small_h200/recipe_dlcm_r4.yaml",
        baseline_recipe="recipes/sweeps/repro_small_h200/recipe_baseline.yaml",
        probe_steps=20,
        max_steps=850,  # the reproduction's count: ≈ 4 epochs of the 3.5M-token corpus
        min_steps=100,
        val_points=10,  # every tenth of the run: the second half's ratio is read at five points
        budget_s=500.0,  # a 10-minute call leaves ≈ 100 s for installs and slack
        reserve_s=30.0,
        note="one GPU, runs at a time from its free memory",
        lr_factors=(0.5, 1.0, 2.0),
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
        extras=False,
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
        lr_factors=(0.5, 1.0, 2.0),
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


def recipe_lr(recipe: Path) -> float:
    """The peak learning rate a recipe sets."""
    return float(yaml.safe_load(recipe.read_text())["model"]["init_args"]["optimizer"]["lr"])


def lr_label(lr: float) -> str:
    return f"lr{lr:.3g}"


@dataclass(frozen=True)
class Job:
    """One training run of the study: its group (what is compared), seed, learning rate and overrides."""

    name: str
    group: str
    kind: str  # dlcm | baseline
    seed: int
    target_ratio: float | None
    overrides: dict[str, Any]
    lr: float | None = None


class Study:
    """The runs of one scale, in two phases (the second reads the first's results):

    1. the learning-rate grid on seed 0 for the default DLCM (R = 4) and the baseline (every seed when the grid
       has one rate); at scale 1 with ``mode.extras`` also R = 2 and R = 8 on every seed at the central rate;
    2. seeds 1 and 2 of each model at its best rate (lowest seed-0 validation bits per byte); at scale 1 with
       extras also the alternative mechanism on every seed and the §8.1 rule predictor on every seed, both at the
       DLCM's best rate, the rule's τ calibrated to the learned seed-0 run's realised validation ratio.
    """

    def __init__(self, mode: Mode, scale: int, base_lr: float | None = None) -> None:
        self.mode, self.scale = mode, scale
        dlcm_recipe, base_recipe = ROOT / mode.dlcm_recipe, ROOT / mode.baseline_recipe
        self.dlcm_size = doubled_widths(dlcm_recipe) if scale == 2 else {}
        self.base_size = matched_baseline_overrides(dlcm_recipe, self.dlcm_size, base_recipe) if scale == 2 else {}
        self.base_lr = base_lr if base_lr is not None else recipe_lr(dlcm_recipe)
        self.lrs = [round(self.base_lr * f, 12) for f in mode.lr_factors]
        self.extras = mode.extras and scale == 1

    def dlcm(self, group: str, seed: int, ratio: float, parser: dict[str, Any], lr: float) -> Job:
        sets = {f"{PARSER}.{k}": v for k, v in {"target_ratio": ratio, **parser}.items()}
        overrides = {**self.dlcm_size, **sets, **seed_overrides(seed), "model.init_args.optimizer.lr": lr}
        return Job(f"{group}-{lr_label(lr)}-s{seed}", group, "dlcm", seed, ratio, overrides, lr)

    def baseline(self, seed: int, lr: float) -> Job:
        overrides = {**self.base_size, **seed_overrides(seed), "model.init_args.optimizer.lr": lr}
        return Job(f"baseline-{lr_label(lr)}-s{seed}", "baseline", "baseline", seed, None, overrides, lr)

    def first_phase(self) -> list[Job]:
        default = MECHANISMS[DEFAULT]
        seeds = SEEDS if len(self.lrs) == 1 else SEEDS[:1]
        jobs = [self.dlcm(f"r4-{DEFAULT}", s, 4.0, default, lr) for lr in self.lrs for s in seeds]
        jobs += [self.baseline(s, lr) for lr in self.lrs for s in seeds]
        if self.extras:
            centre = self.lrs[len(self.lrs) // 2]
            jobs += [self.dlcm(f"r{r}-{DEFAULT}", s, float(r), default, centre) for r in (2, 8) for s in SEEDS]
        return jobs

    def second_phase(self, results: dict[str, dict]) -> list[Job]:
        if not self.second_phase_count():
            return []
        first = self.first_phase()
        best = {kind: best_lr([j for j in first if j.kind == kind and j.seed == 0], results) for kind in KINDS}
        ratio = None
        if self.extras:
            learned = results.get(self.dlcm(f"r4-{DEFAULT}", 0, 4.0, MECHANISMS[DEFAULT], best["dlcm"]).name, {})
            ratio = learned.get("val_ratio")
            if ratio is None:
                raise RuntimeError("the learned parser's seed-0 run has no validation ratio to match the rule to")
        return self._second_jobs(best["dlcm"], best["baseline"], ratio)

    def second_phase_count(self) -> int:
        """How many runs the second phase will have, before the first has run (for planning)."""
        return len(self._second_jobs(self.base_lr, self.base_lr, 4.0))

    def _second_jobs(self, dlcm_lr: float, base_lr: float, rule_ratio: float | None) -> list[Job]:
        jobs = []
        if len(self.lrs) > 1:
            jobs += [self.dlcm(f"r4-{DEFAULT}", s, 4.0, MECHANISMS[DEFAULT], dlcm_lr) for s in SEEDS[1:]]
            jobs += [self.baseline(s, base_lr) for s in SEEDS[1:]]
        if self.extras and rule_ratio is not None:
            jobs += [self.dlcm(f"r4-{ALTERNATIVE}", s, 4.0, MECHANISMS[ALTERNATIVE], dlcm_lr) for s in SEEDS]
            jobs += [self.dlcm("rule-matched", s, round(rule_ratio, 4), RULE_MATCHED, dlcm_lr) for s in SEEDS]
        return jobs


KINDS = ("dlcm", "baseline")


def best_lr(jobs: list[Job], results: dict[str, dict]) -> float:
    """The learning rate of the job with the lowest validation bits per byte (failed runs never win)."""
    scored = [(results.get(j.name, {}).get("val_bpb"), j.lr) for j in jobs]
    scored = [(bpb, lr) for bpb, lr in scored if bpb is not None and math.isfinite(bpb)]
    if not scored:
        raise RuntimeError(f"no learning rate of {[j.name for j in jobs]} finished with a validation loss")
    return min(scored)[1]


def as_runs(mode: Mode, jobs: list[Job], extra: dict[str, Any]) -> list[Any]:
    from dlcm.research.sweep import Run, cli_args

    runs = []
    for job in jobs:
        recipe = ROOT / (mode.dlcm_recipe if job.kind == "dlcm" else mode.baseline_recipe)
        meta = {"group": job.group, "kind": job.kind, "seed": job.seed, "target": job.target_ratio, "lr": job.lr}
        runs.append(Run(job.name, cli_args([recipe], job.overrides, extra), meta))
    return runs


def plan_steps(mode: Mode, slowest: float, seconds_left: float, waves: int, cap: int | None = None) -> int:
    """One step count for every run (equal tokens): the most that lets ``waves`` rounds of concurrent runs at the
    slowest measured rate fit ``seconds_left``, at most ``cap`` (default: the mode's maximum)."""
    steps = min(cap or mode.max_steps, int(seconds_left * SAFETY / (waves * slowest)))
    return steps - steps % mode.val_points


def waves_of(counts: list[int], parallel: int) -> int:
    """Rounds of ``parallel`` concurrent runs the phases of ``counts`` runs take (a phase waits for the last)."""
    return sum(math.ceil(n / parallel) for n in counts if n)


# ---- device memory ---------------------------------------------------------------------------------------------


def device_memory_gib() -> tuple[float, float]:
    """Free and total memory of CUDA device 0, GiB (all processes on the device count)."""
    import torch

    free, total = torch.cuda.mem_get_info(0)
    return free / 2**30, total / 2**30


class PeakMemory:
    """Polls the device's used memory in a thread while the ``with`` block runs; ``peak_gib`` is the most used
    above what was used when the block started (the block's runs, their CUDA contexts included)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.peak_gib = 0.0
        self._stop = threading.Event()

    def _used(self) -> float:
        free, total = device_memory_gib()
        return total - free

    def __enter__(self) -> PeakMemory:
        self._start = self._used()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_gib = max(self.peak_gib, self._used() - self._start)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def runs_that_fit(per_run_gib: float, free_gib: float, limit: int) -> int:
    """Concurrent runs of ``per_run_gib`` (margin included) that ``free_gib`` holds after the reserve, 1 to
    ``limit``."""
    return max(1, min(limit, int((free_gib - MEMORY_RESERVE_GIB) // per_run_gib)))


# ---- results ---------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one value), the 95 % interval of the mean (Student t; None for
    one value) and the values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "ci95": None, "n": 0, "values": []}
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    ci95 = None
    if std is not None:
        half = T95.get(len(values) - 1, 1.96) * std / math.sqrt(len(values))
        ci95 = [mean - half, mean + half]
    return {"mean": mean, "std": std, "ci95": ci95, "n": len(values), "values": values}


def ratio_checks(result: dict[str, Any], target: float) -> dict[str, Any]:
    """The ratio goals of one DLCM run: final validation ratio within ±5 % of R, every validation of the second
    half within ±10 %, each domain's final ratio within ±10 %."""
    curve = (result.get("curves") or {}).get("val/ratio") or {"step": [], "value": []}
    steps = result.get("steps") or 0
    late = [v / target - 1.0 for s, v in zip(curve["step"], curve["value"], strict=True) if s + 1 >= steps / 2]
    domains = [v / target - 1.0 for v in (result.get("tokens_per_concept") or {}).values() if v is not None]
    final = result.get("val_ratio")
    return {
        "second_half_max_abs_error": max(map(abs, late)) if late else None,
        "final_within_5pct": final is not None and abs(final / target - 1.0) <= 0.05,
        "second_half_within_10pct": bool(late) and all(abs(e) <= 0.10 for e in late),
        "domains_within_10pct": bool(domains) and all(abs(e) <= 0.10 for e in domains),
    }


def last_point(result: dict[str, Any], tag: str) -> float | None:
    curve = (result.get("curves") or {}).get(tag)
    return curve["value"][-1] if curve and curve["value"] else None


def run_row(job: Job, result: dict[str, Any]) -> dict[str, Any]:
    """What the study reads from one run's summary (``dlcm.research.run_metrics.summarize_run``)."""
    per_domain = result.get("tokens_per_concept") or {}
    row = {
        "group": job.group,
        "kind": job.kind,
        "seed": job.seed,
        "lr": job.lr,
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
        "near_threshold": last_point(result, "val/segmentation/near_threshold"),
        "midpoint": last_point(result, "val/segmentation/midpoint"),
    }
    for key in ("val_ratio", "ratio_prose", "ratio_code"):
        if job.target_ratio and row[key] is not None:
            row[f"{key}_error"] = row[key] / job.target_ratio - 1.0
    if job.kind == "dlcm" and job.target_ratio and result.get("status") == "ok":
        row.update(ratio_checks(result, job.target_ratio))
    return row


def group_key(job: Job, grid: bool) -> str:
    """The summary group of a run: its group, and its learning rate when the study has a grid."""
    return f"{job.group} {lr_label(job.lr)}" if grid and job.lr is not None else job.group


def paired_gap(rows: dict[str, dict], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """``a − b`` bits per byte for each (seed, a, b) run-name pair with both finished, and their statistics."""
    per_seed = {}
    for a, b in pairs:
        if rows.get(a, {}).get("val_bpb") is not None and rows.get(b, {}).get("val_bpb") is not None:
            per_seed[rows[a]["seed"]] = rows[a]["val_bpb"] - rows[b]["val_bpb"]
    return {"per_seed": per_seed, **mean_std(list(per_seed.values()))}


def summarize(study: Study, jobs: list[Job], results: dict[str, dict]) -> dict[str, Any]:
    """Per-run rows, per-group statistics over seeds (a group per learning rate of the grid), the best rates, the
    paired DLCM − baseline gap at each model's best rate, and at scale 1 the matched rule predictor's gap."""
    grid = len(study.lrs) > 1
    rows = {job.name: run_row(job, results.get(job.name, {})) for job in jobs}
    by_name = {job.name: job for job in jobs}
    groups: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(group_key(job, grid) for job in jobs):
        members = [r for n, r in rows.items() if group_key(by_name[n], grid) == key and r["status"] == "ok"]
        keys = ["val_bpb", "train_flops"]
        if members and members[0]["kind"] == "dlcm":
            keys += ["val_ratio", "val_ratio_error", "ratio_prose", "ratio_prose_error", "ratio_code"]
            keys += ["ratio_code_error", "threshold", "near_threshold", "midpoint", "second_half_max_abs_error"]
        groups[key] = {k: mean_std([m.get(k) for m in members]) for k in keys}
        groups[key]["seeds"] = [m["seed"] for m in members]
        for check in ("final_within_5pct", "second_half_within_10pct", "domains_within_10pct"):
            flags = [m[check] for m in members if check in m]
            if flags:
                groups[key][check] = all(flags)
    first = study.first_phase()
    best = {}
    for kind in KINDS:
        seed0 = [j for j in first if j.kind == kind and j.seed == 0]
        try:
            lr = best_lr(seed0, results)
        except RuntimeError:
            continue
        edge = grid and lr in (min(study.lrs), max(study.lrs))
        best[kind] = {"lr": lr, "at_grid_edge": edge, "grid": study.lrs}
    out: dict[str, Any] = {"runs": rows, "groups": groups, "best_lr": best}
    if len(best) == 2:
        dlcm = {j.seed: j.name for j in jobs if j.group == f"r4-{DEFAULT}" and j.lr == best["dlcm"]["lr"]}
        base = {j.seed: j.name for j in jobs if j.kind == "baseline" and j.lr == best["baseline"]["lr"]}
        out["gap_dlcm_minus_baseline_bpb"] = paired_gap(rows, [(dlcm[s], base[s]) for s in dlcm if s in base])
        rule = {j.seed: j.name for j in jobs if j.group == "rule-matched"}
        alt = {j.seed: j.name for j in jobs if j.group == f"r4-{ALTERNATIVE}"}
        if rule:
            out["gap_rule_minus_learned_bpb"] = paired_gap(rows, [(rule[s], dlcm[s]) for s in rule if s in dlcm])
            matched = [
                rows[rule[s]]["val_ratio"] / rows[dlcm[s]]["val_ratio"] - 1.0
                for s in rule
                if s in dlcm and rows[rule[s]]["val_ratio"] and rows[dlcm[s]]["val_ratio"]
            ]
            out["rule_ratio_vs_learned"] = {
                **mean_std(matched),
                "within_5pct": bool(matched) and all(abs(m) <= 0.05 for m in matched),
            }
        if alt:
            out["gap_alternative_minus_default_bpb"] = paired_gap(rows, [(alt[s], dlcm[s]) for s in alt if s in dlcm])
    else:
        out["gap_dlcm_minus_baseline_bpb"] = mean_std([])
    return out


def scale_trend(small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    """Does the DLCM − baseline gap grow with scale? The difference of the two scales' mean gaps with a 95 %
    interval (Welch: the scales' seeds are independent runs), and the ratio of their training FLOPs."""
    a, b = small["gap_dlcm_minus_baseline_bpb"], large["gap_dlcm_minus_baseline_bpb"]
    out: dict[str, Any] = {"gap_scale1": a.get("mean"), "gap_scale2": b.get("mean")}
    if a.get("std") is None or b.get("std") is None:
        return out
    va, vb = a["std"] ** 2 / a["n"], b["std"] ** 2 / b["n"]
    df = (va + vb) ** 2 / (va**2 / (a["n"] - 1) + vb**2 / (b["n"] - 1)) if va + vb > 0 else 1
    half = T95.get(max(1, math.floor(df)), 1.96) * math.sqrt(va + vb)
    diff = b["mean"] - a["mean"]
    out.update(difference=diff, ci95=[diff - half, diff + half], welch_df=df)
    # more negative = DLCM further ahead
    out["grows"] = "yes" if diff + half < 0 else "no" if diff - half > 0 else "not resolved"
    return out


def format_report(result: dict[str, Any]) -> str:
    """The groups as an aligned table, then the best learning rates and the paired gaps."""

    def cell(stat: dict[str, Any] | None, fmt: str, scale: float = 1.0) -> str:
        if not stat or stat["mean"] is None:
            return "-"
        text = format(stat["mean"] * scale, fmt)
        if stat["std"] is None:  # a group of one seed
            return text
        return f"{text} ± {format(stat['std'] * scale, fmt.lstrip('+'))}"

    def flag(group: dict[str, Any], key: str) -> str:
        return "-" if key not in group else "yes" if group[key] else "NO"

    header = ["group", "seeds", "val ratio", "err %", "2nd half max %", "prose", "code", "τ", "near τ %"]
    header += ["±5 %", "±10 %", "domains", "val bpb", "train FLOPs"]
    table = [header]
    for name, g in result["groups"].items():
        ratio = g.get("val_ratio")
        table.append(
            [
                name,
                ",".join(map(str, g["seeds"])) or "-",
                cell(ratio, ".3f"),
                cell(g.get("val_ratio_error"), "+.1f", 100),
                cell(g.get("second_half_max_abs_error"), ".1f", 100),
                cell(g.get("ratio_prose"), ".2f"),
                cell(g.get("ratio_code"), ".2f"),
                cell(g.get("threshold"), ".3f"),
                cell(g.get("near_threshold"), ".1f", 100),
                flag(g, "final_within_5pct"),
                flag(g, "second_half_within_10pct"),
                flag(g, "domains_within_10pct"),
                cell(g["val_bpb"], ".4f"),
                cell(g["train_flops"], ".3g"),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [f"== boundary_fidelity ({result['mode']}, scale {result['scale']}): {result['note']}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    for kind, best in result.get("best_lr", {}).items():
        edge = " (at the grid's edge)" if best["at_grid_edge"] else ""
        lines.append(f"best learning rate, {kind}: {best['lr']:g} of {best['grid']}{edge}")

    def gap_line(title: str, gap: dict[str, Any] | None) -> None:
        if not gap or gap.get("mean") is None:
            return
        spread = f" ± {gap['std']:.4f}" if gap.get("std") is not None else ""
        ci = f", 95 % interval [{gap['ci95'][0]:+.4f}, {gap['ci95'][1]:+.4f}]" if gap.get("ci95") else ""
        lines.append(f"{title}, bits per byte, paired by seed: {gap['mean']:+.4f}{spread}{ci}")

    gap_line(f"DLCM ({DEFAULT}) − baseline", result.get("gap_dlcm_minus_baseline_bpb"))
    gap_line(f"{ALTERNATIVE} − {DEFAULT}", result.get("gap_alternative_minus_default_bpb"))
    gap_line("rule predictor (matched ratio) − learned parser", result.get("gap_rule_minus_learned_bpb"))
    matched = result.get("rule_ratio_vs_learned")
    if matched and matched.get("mean") is not None:
        lines.append(
            f"rule ratio / learned ratio − 1: {100 * matched['mean']:+.1f} % (within ±5 %: {matched['within_5pct']})"
        )
    trend = result.get("scale_trend")
    if trend and trend.get("difference") is not None:
        lo, hi = trend["ci95"]
        lines.append(
            f"gap scale 2 − scale 1: {trend['difference']:+.4f} bits per byte, 95 % interval [{lo:+.4f}, {hi:+.4f}]"
            f"; grows with scale: {trend['grows']}; training FLOPs ×{trend.get('flops_ratio', float('nan')):.2f}"
        )
    if result["failed"]:
        lines.append(f"FAILED runs: {', '.join(result['failed'])}")
    return "\n".join(lines)


# ---- driver ----------------------------------------------------------------------------------------------------


def memory_plan(mode: Mode, study: Study, runs_dir: Path, executor_class: type) -> dict[str, Any]:
    """Each model's device memory alone (a short run of the most concept-heavy DLCM, then of the baseline), with
    the margin: what one run needs, and how many the free memory holds now."""
    first = study.first_phase()
    heavy = min((j for j in first if j.kind == "dlcm"), key=lambda j: j.target_ratio or math.inf)
    memory = {}
    for job in (heavy, next(j for j in first if j.kind == "baseline")):
        run = as_runs(mode, [job], probe_overrides(MEMORY_PROBE_STEPS))
        with PeakMemory() as peak:
            executor_class(runs_dir / "probe-memory", 1, threads=1, log=_log)(run)
        memory[job.kind] = peak.peak_gib
    per_run = max(memory.values()) * (1 + MEMORY_MARGIN)
    free, total = device_memory_gib()
    parallel = runs_that_fit(per_run, free, os.cpu_count() or 1)
    _log(f"memory: {memory} GiB per run alone; {free:.1f} of {total:.1f} GiB free → {parallel} at a time")
    return {"memory_gib_alone": memory, "per_run_gib": per_run, "parallel_planned": parallel}


def timing_plan(
    mode: Mode, study: Study, runs_dir: Path, parallel: int, seconds_left: float, cap: int | None, executor_class: type
) -> dict[str, Any]:
    """The speed of ``parallel`` runs together (a short probe) and the steps that let every round of both phases
    fit ``seconds_left``."""
    start = time.perf_counter()
    first = study.first_phase()
    probe = as_runs(mode, first[:parallel], probe_overrides(mode.probe_steps))
    probed = executor_class(runs_dir / "probe", parallel, threads=1, log=_log)(probe)
    failed = [name for name, r in probed.items() if r.get("status") != "ok"]
    if failed:
        raise RuntimeError(f"probe runs failed: {failed}; see train.log in {runs_dir / 'probe'}/<run>/")
    rates = {r.name: seconds_per_step(runs_dir / "probe" / r.name / "tb") for r in probe}
    measured = [s for s in rates.values() if s]
    if not measured:
        raise RuntimeError("the probe measured no step time; see the probe's train.log files")
    slowest = max(measured)
    waves = waves_of([len(first), study.second_phase_count()], parallel)
    left = seconds_left - (time.perf_counter() - start) - mode.reserve_s
    steps = plan_steps(mode, slowest, left, waves, cap)
    _log(f"probe: slowest {slowest:.3f} s/step at {parallel} at once; {waves} rounds in {left:.0f} s → {steps} steps")
    return {"steps": steps, "seconds_per_step": rates, "slowest_seconds_per_step": slowest, "rounds": waves}


def load_plan(runs_dir: Path, mode: Mode, scale: int, lrs: list[float]) -> dict[str, Any] | None:
    """The plan an earlier call of this study wrote in ``runs_dir`` (None: first call); refuses another study's."""
    import json

    path = runs_dir / PLAN
    if not path.is_file():
        return None
    plan = json.loads(path.read_text())
    if (plan["mode"], plan["scale"], plan["lrs"]) != (mode.name, scale, lrs):
        raise ValueError(
            f"{runs_dir} holds the study mode={plan['mode']} scale={plan['scale']} lrs={plan['lrs']}, not "
            f"mode={mode.name} scale={scale} lrs={lrs}: give another --runs-dir"
        )
    return plan


def train_phase(mode: Mode, runs: list[Any], runs_dir: Path, parallel: int, executor_class: type) -> dict[str, dict]:
    """Train the runs not finished yet, ``parallel`` at a time; runs that failed (on a GPU: out of memory, most
    likely) get one more try at half the concurrency."""
    results = executor_class(runs_dir, parallel, threads=1, log=_log)(runs)
    failed = [r for r in runs if results[r.name].get("status") != "ok"]
    if failed and parallel > 1:
        _log(f"{len(failed)} run(s) failed; once more, {max(1, parallel // 2)} at a time")
        results.update(executor_class(runs_dir, max(1, parallel // 2), threads=1, log=_log)(failed))
    return results


def run_driver(args: argparse.Namespace, executor_class: type | None = None) -> dict[str, Any]:
    import json

    from dlcm.data.corpus import ensure_default_corpus
    from dlcm.research.sweep import Executor, write_json, write_summary

    executor_class = executor_class or Executor
    mode = MODES[args.mode]
    if args.lr_factors:
        mode = dataclasses.replace(mode, lr_factors=tuple(args.lr_factors))
    if args.probe_steps is not None:
        mode = dataclasses.replace(mode, probe_steps=args.probe_steps)
    start = time.perf_counter()
    runs_dir = args.runs_dir.resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s if args.budget_s is not None else mode.budget_s
    study = Study(mode, args.scale, args.lr)
    _log(f"mode {mode.name}, scale {args.scale}, runs in {runs_dir}, budget {budget:g} s, lrs {study.lrs}")
    _log(f"default corpus ready: {ensure_default_corpus()}")  # once, before any run can race to build it
    small = json.loads(args.match_steps.read_text()) if args.match_steps is not None else None
    cap = small["calibration"]["steps"] if small else None
    plan = load_plan(runs_dir, mode, args.scale, study.lrs)
    if plan is not None:
        if args.steps is not None and args.steps != plan["steps"]:
            raise ValueError(f"--steps {args.steps}: {runs_dir} holds a study of {plan['steps']} steps")
        _log(f"continuing the study in {runs_dir}: {plan['steps']} steps per run ({PLAN})")
    else:
        plan = {"mode": mode.name, "scale": args.scale, "lrs": study.lrs}
        if mode.parallel is None:  # on a GPU: as many at a time as the memory holds
            plan.update(memory_plan(mode, study, runs_dir, executor_class))
            if args.steps is None and mode.probe_steps:
                left = budget - (time.perf_counter() - start)
                parallel = plan["parallel_planned"]
                plan.update(timing_plan(mode, study, runs_dir, parallel, left, cap, executor_class))
        plan.setdefault("steps", args.steps or cap or mode.max_steps)
        write_json(runs_dir / PLAN, plan)
    steps = plan["steps"]
    if steps < mode.min_steps:
        raise RuntimeError(f"the budget allows only {steps} steps (< {mode.min_steps}): raise --budget-s")
    parallel = mode.parallel
    if parallel is None:  # from the memory free now (another call may find more or less of it)
        parallel = runs_that_fit(plan["per_run_gib"], device_memory_gib()[0], os.cpu_count() or 1)
    extra = training_overrides(steps, mode.val_points, False)
    results: dict[str, dict] = {}
    jobs = study.first_phase()
    for phase in (1, 2):
        if phase == 2:
            jobs += study.second_phase(results)
        runs = as_runs(mode, jobs, extra)
        _log(f"phase {phase}: {len(runs)} runs, {parallel} at a time, {steps} steps each")
        results = train_phase(mode, runs, runs_dir, parallel, executor_class)
    write_summary(runs_dir, results)
    timing = {"total_s": time.perf_counter() - start}

    result = {
        "mode": mode.name,
        "scale": args.scale,
        "note": mode.note,
        "what": (
            "val_ratio: validation tokens per concept with inference-mode boundaries (p >= the parser's tau), all "
            "documents; ratio_prose / ratio_code: the same per domain; *_error: ratio / R - 1; "
            "second_half_max_abs_error: largest |ratio / R - 1| over the validations of the run's second half; "
            "threshold: the parser's final tau; near_threshold: share of non-forced validation tokens with "
            "|p - tau| <= 0.05; midpoint: mean 4p(1 - p); val_bpb: validation bits per byte; groups: mean, sample "
            "std and 95 % interval (Student t) over seeds, one group per learning rate of the grid; best_lr: each "
            "model's rate of lowest seed-0 val_bpb; gap_*: paired by seed (same data order), at each model's best "
            "rate; rule-matched: the rule predictor with tau calibrated to the learned seed-0 run's val_ratio"
        ),
        "mechanisms": MECHANISMS,
        "default_mechanism": DEFAULT,
        "alternative_mechanism": ALTERNATIVE,
        "environment": environment(),
        "commands": {
            "driver": [Path(sys.executable).name, *sys.argv],
            "runs": {name: r.get("command") for name, r in results.items()},
        },
        "timing": timing,
        "calibration": {**plan, "parallel": parallel},
        **summarize(study, jobs, results),
        "failed": sorted(n for n, r in results.items() if r.get("status") != "ok"),
        "run_summaries": results,
    }
    if small is not None:
        trend = scale_trend(small, result)
        flops = [mean_std([r.get("train_flops") for r in s["runs"].values()])["mean"] for s in (small, result)]
        if all(flops):
            trend["flops_ratio"] = flops[1] / flops[0]
        result["scale_trend"] = trend
    out_path = args.out or runs_dir / f"boundary_fidelity_{mode.name}_scale{args.scale}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(out_path, result)
    _log(f"results: {out_path} ({timing['total_s']:.0f} s in all)")
    print(format_report(result), flush=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mode", choices=sorted(MODES), default="gpu", help="gpu: the study; cpu: on the demo recipes; smoke: checks"
    )
    parser.add_argument("--scale", type=int, choices=(1, 2), default=1, help="2: doubled widths (≈ 4× FLOPs)")
    parser.add_argument("--runs-dir", type=Path, required=True, help="run directories; reuse it to continue a study")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: in --runs-dir)")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-time budget of the driver (GPU: 500)")
    parser.add_argument("--probe-steps", type=int, default=None, help="probe length (GPU: 20; 0: no probe)")
    parser.add_argument("--steps", type=int, default=None, help="pin every run's steps (no probe)")
    parser.add_argument(
        "--match-steps", type=Path, default=None, help="scale 1's results JSON: at most its steps; the scale trend"
    )
    parser.add_argument("--lr", type=float, default=None, help="centre of the learning-rate grid (default: recipes')")
    parser.add_argument(
        "--lr-factors", type=float, nargs="+", default=None, help="the grid as multiples of the centre (GPU: 0.5 1 2)"
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked (a bad value exits with one line naming it and what is allowed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr {args.lr} is not allowed: a positive learning rate")
    if args.lr_factors is not None and not all(f > 0 for f in args.lr_factors):
        parser.error(f"--lr-factors {args.lr_factors} is not allowed: positive multiples")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps {args.steps} is not allowed: a positive step count")
    if args.match_steps is not None and not args.match_steps.is_file():
        parser.error(f"--match-steps {args.match_steps} is not allowed: no such results file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run_driver(args)
    except ValueError as error:  # a --runs-dir that holds another study
        build_parser().error(str(error))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
