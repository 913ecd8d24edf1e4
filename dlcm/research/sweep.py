"""``dlcm sweep``: expand a sweep spec into ``dlcm fit`` runs, run them concurrently and resumably, summarise them.

    dlcm sweep run recipes/sweeps/lr_scope_grid_tiny_cpu.yaml --parallel 2        # runs/sweeps/<spec name>/
    dlcm sweep run recipes/sweeps/mup_transfer_tiny_cpu.yaml --out runs/mup --dry-run
    dlcm sweep summary runs/sweeps/lr_scope_grid_tiny_cpu                          # table of finished runs

A spec is YAML with strict keys (paths relative to the spec file)::

    protocol: grid              # grid | mup-transfer | ratio-fraction
    configs: [../dlcm_tiny_r4_defaultcorpus_cpu.yaml]   # composed in order, as dlcm fit --config …
    set: {trainer.max_steps: 200}                       # dotted keys → values, for every run
    axes:                       # grid only; the runs are the Cartesian product of the axes
      - {name: lr, key: model.init_args.optimizer.lr, values: [1.0e-3, 2.0e-3]}
      - name: scope
        points: {global: {model.init_args.config.parser.ratio_scope: global}, …}
    mup: {…}                    # mup-transfer only, see MuPSpec
    ratio_fraction: {…}         # ratio-fraction only, see RatioFractionSpec

Every run is a ``python -m dlcm fit`` subprocess with the spec's configs and ``--key=value`` overrides, its own
directory ``<out>/<run name>/`` (TensorBoard logs and checkpoints in ``tb/version_0/``, output in ``train.log``,
the exact command in ``run.json``) and, once it exits cleanly, ``result.json``: final metrics and curves read from
its event files (:func:`dlcm.research.run_metrics.summarize_run`). A re-run skips runs with a ``result.json``, resumes
interrupted ones from their ``last.ckpt`` and refuses a run directory whose recorded command differs (a changed
spec must go to a new ``--out``). ``<out>/summary.csv`` and ``summary.json`` list every run.

Protocols:

- ``grid``: the product of the axes (no axes: one run called ``base``).
- ``mup-transfer`` (paper §6.1): decoupled μP (the protocol adds :class:`dlcm.callbacks.mup.DecoupledMuP`,
  or, when the configs already end their callback list with one, as the μP recipes do, sets that one's width and
  rates; its other options stay). Coordinate descent on the proxy (the first width) over the token-stream base LR,
  then the concept-stream one (or both ``tied``), trying the multipliers around the current best until a round moves
  nothing or ``max_rounds`` is reached; then, at every width, a line over each coordinate through the proxy's optimum.
  Output ``mup_transfer.json``: the loss-vs-LR tables and whether the wider models' minima fall on the proxy's.
- ``ratio-fraction``: for each compression ratio R and backbone share P, a DLCM shape that meets one inference-FLOPs
  budget per token (:func:`dlcm.research.shape_search.budget_shape`), listed with its FLOPs before anything runs;
  each run also gets a ``scaling.json`` sidecar (N without embedding and head, P the backbone's share of N, as in
  :mod:`dlcm.model.presets`) so ``dlcm scaling fit --runs <out>/*`` fits Eq. 22 to the results.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import os
import queue
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlcm.model.config import BaselineConfig, DLCMConfig

PROTOCOLS = ("grid", "mup-transfer", "ratio-fraction")
COORDINATES = ("token", "concept", "tied")
SWEEP_KEYS = ("protocol", "configs", "set", "axes", "mup", "ratio_fraction")
MUP_CALLBACK = "dlcm.callbacks.mup.DecoupledMuP"
MODEL_PREFIX = "model.init_args.config."
# Summary columns besides the run's own meta keys; per-domain tokens per concept follow them.
SUMMARY_COLUMNS = (
    "status",
    "steps",
    "val_loss",
    "val_bpb",
    "val_ratio",
    "train_ratio",
    "target_ratio",
    "train_flops",
    "flops_per_token",
    "tokens",
    "wall_s",
)
_NAME_OK = re.compile(r"[^A-Za-z0-9.+=_-]")


# ---- spec ------------------------------------------------------------------------------------------------------


def _check_keys(where: str, given: dict, allowed: Sequence[str], required: Sequence[str] = ()) -> None:
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(allowed)}")
    missing = [k for k in required if k not in given]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")


def _positive_number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{where}={value!r} is not allowed: a number > 0")
    return float(value)


@dataclass(frozen=True)
class Axis:
    """One grid axis: named points, each a set of dotted-key overrides."""

    name: str
    points: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class MuPSpec:
    """The μP transfer protocol's settings (``mup:`` in a spec)."""

    widths: tuple[int, ...]  # token widths; the first is the proxy and d_base
    lr: float  # starting η_token (and η_concept unless lr_concept is given)
    lr_concept: float | None = None
    lr_others: float = 1e-3  # embeddings, norms, null concept: width-independent, not tuned
    coordinates: tuple[str, ...] = ("token", "concept")
    multipliers: tuple[float, ...] = (0.5, 0.75, 1.5, 2.0)
    max_rounds: int = 2  # descent rounds on the proxy (0: only the transfer lines around lr)

    KEYS = ("widths", "lr", "lr_concept", "lr_others", "coordinates", "multipliers", "max_rounds")

    @classmethod
    def parse(cls, where: str, raw: Any) -> MuPSpec:
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: a mapping with keys {', '.join(cls.KEYS)}")
        _check_keys(where, raw, cls.KEYS, ("widths", "lr"))
        widths = raw["widths"]
        if not isinstance(widths, list) or len(widths) < 2 or not all(isinstance(w, int) and w > 0 for w in widths):
            raise ValueError(f"{where}.widths={widths!r} is not allowed: at least two positive integer widths")
        if len(set(widths)) != len(widths):
            raise ValueError(f"{where}.widths={widths!r} is not allowed: widths must differ")
        coords = tuple(raw.get("coordinates", cls.coordinates))
        bad = [c for c in coords if c not in COORDINATES]
        if bad or not coords or len(set(coords)) != len(coords):
            raise ValueError(f"{where}.coordinates={list(coords)!r} is not allowed: distinct names from {COORDINATES}")
        mults = tuple(_positive_number(f"{where}.multipliers[]", m) for m in raw.get("multipliers", cls.multipliers))
        if not mults or 1.0 in mults:
            raise ValueError(f"{where}.multipliers={list(mults)!r} is not allowed: factors other than 1 (1 is implied)")
        rounds = raw.get("max_rounds", cls.max_rounds)
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"{where}.max_rounds={rounds!r} is not allowed: an integer >= 0")
        lr_concept = raw.get("lr_concept")
        return cls(
            widths=tuple(widths),
            lr=_positive_number(f"{where}.lr", raw["lr"]),
            lr_concept=None if lr_concept is None else _positive_number(f"{where}.lr_concept", lr_concept),
            lr_others=_positive_number(f"{where}.lr_others", raw.get("lr_others", cls.lr_others)),
            coordinates=coords,
            multipliers=mults,
            max_rounds=rounds,
        )


@dataclass(frozen=True)
class RatioFractionSpec:
    """The (R, P) grid's settings (``ratio_fraction:`` in a spec)."""

    ratios: tuple[float, ...] = (2.0, 4.0, 8.0)
    fractions: tuple[float, ...] = (0.3, 0.5, 0.7)  # backbone share of inference FLOPs per token
    budget: float | None = None  # inference FLOPs per token; None: the base recipe's own
    tolerance: float = 0.05  # relative, on the FLOPs per token
    share_tolerance: float = 0.03  # absolute, on the backbone share

    KEYS = ("ratios", "fractions", "budget", "tolerance", "share_tolerance")

    @classmethod
    def parse(cls, where: str, raw: Any) -> RatioFractionSpec:
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: a mapping with keys {', '.join(cls.KEYS)}")
        _check_keys(where, raw, cls.KEYS)
        ratios = tuple(_positive_number(f"{where}.ratios[]", r) for r in raw.get("ratios", cls.ratios))
        if not ratios or any(r <= 1 for r in ratios):
            raise ValueError(f"{where}.ratios={list(ratios)!r} is not allowed: numbers > 1")
        fractions = tuple(_positive_number(f"{where}.fractions[]", p) for p in raw.get("fractions", cls.fractions))
        if not fractions or any(p >= 1 for p in fractions):
            raise ValueError(f"{where}.fractions={list(fractions)!r} is not allowed: numbers in (0, 1)")
        budget = raw.get("budget")
        return cls(
            ratios=ratios,
            fractions=fractions,
            budget=None if budget is None else _positive_number(f"{where}.budget", budget),
            tolerance=_positive_number(f"{where}.tolerance", raw.get("tolerance", cls.tolerance)),
            share_tolerance=_positive_number(
                f"{where}.share_tolerance", raw.get("share_tolerance", cls.share_tolerance)
            ),
        )


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep spec (see the module docstring)."""

    path: Path
    protocol: str
    configs: tuple[Path, ...]
    overrides: dict[str, Any]
    axes: tuple[Axis, ...] = ()
    mup: MuPSpec | None = None
    ratio_fraction: RatioFractionSpec | None = None
    vocab_size: int | None = None  # for planning shapes and FLOPs only (runs read theirs from the data)

    @property
    def name(self) -> str:
        return self.path.stem


def _parse_axis(where: str, raw: Any) -> Axis:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: an axis is a mapping with name and key+values or points")
    _check_keys(where, raw, ("name", "key", "values", "points"), ("name",))
    name = raw["name"]
    if not isinstance(name, str) or not name or _NAME_OK.search(name):
        raise ValueError(f"{where}.name={name!r} is not allowed: letters, digits and . + = _ - only")
    if ("key" in raw) == ("points" in raw) or ("key" in raw) != ("values" in raw):
        raise ValueError(f"{where} ({name}): give either key and values, or points")
    if "points" in raw:
        points = raw["points"]
        if not isinstance(points, dict) or not points:
            raise ValueError(f"{where}.points: a non-empty mapping of label → {{dotted.key: value}}")
        for label, sets in points.items():
            if not isinstance(sets, dict):
                raise ValueError(f"{where}.points.{label}: a mapping of dotted.key → value")
        return Axis(name, {str(label): dict(sets) for label, sets in points.items()})
    values = raw["values"]
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}.values={values!r} is not allowed: a non-empty list")
    labels = [format_value(v) for v in values]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{where}.values={values!r} is not allowed: values must differ")
    return Axis(name, {label: {raw["key"]: v} for label, v in zip(labels, values, strict=True)})


def load_spec(path: str | Path, vocab_size: int | None = None) -> SweepSpec:
    """Parse and check a sweep spec file; errors name the file and the offending key. ``vocab_size`` stands in for
    the data's vocabulary when planning shapes and FLOPs where the data directory is not built."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep spec {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:  # from the file, so that YAML's own message names it too
            raw = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"sweep spec {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a sweep spec is a YAML mapping with keys {', '.join(SWEEP_KEYS)}")
    _check_keys(str(path), raw, SWEEP_KEYS, ("configs",))
    protocol = raw.get("protocol", "grid")
    if protocol not in PROTOCOLS:
        raise ValueError(f"{path}: protocol={protocol!r} is not allowed: one of {', '.join(PROTOCOLS)}")
    configs = raw["configs"]
    if isinstance(configs, str):
        configs = [configs]
    if not isinstance(configs, list) or not configs:
        raise ValueError(f"{path}: configs must be a non-empty list of recipe paths")
    resolved = tuple((path.parent / c).resolve() for c in configs)
    for c in resolved:
        if not c.is_file():
            raise FileNotFoundError(f"{path}: config {c} does not exist")
    overrides = raw.get("set") or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"{path}: set must be a mapping of dotted.key → value")
    for key in ("axes", "mup", "ratio_fraction"):
        wanted = {"axes": "grid", "mup": "mup-transfer", "ratio_fraction": "ratio-fraction"}[key]
        if key in raw and protocol != wanted:
            raise ValueError(f"{path}: key {key} belongs to protocol {wanted}, not {protocol}")
    axes = raw.get("axes") or []
    if not isinstance(axes, list):
        raise ValueError(f"{path}: axes must be a list")
    parsed_axes = tuple(_parse_axis(f"{path}: axes[{i}]", a) for i, a in enumerate(axes))
    if len({a.name for a in parsed_axes}) != len(parsed_axes):
        raise ValueError(f"{path}: axis names must differ")
    if protocol == "mup-transfer" and "mup" not in raw:
        raise ValueError(f"{path}: protocol mup-transfer needs a mup: section")
    return SweepSpec(
        path=path,
        protocol=protocol,
        configs=resolved,
        overrides=dict(overrides),
        axes=parsed_axes,
        mup=MuPSpec.parse(f"{path}: mup", raw["mup"]) if protocol == "mup-transfer" else None,
        ratio_fraction=(
            RatioFractionSpec.parse(f"{path}: ratio_fraction", raw.get("ratio_fraction"))
            if protocol == "ratio-fraction"
            else None
        ),
        vocab_size=vocab_size,
    )


# ---- runs ------------------------------------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """A value as the CLI (jsonargparse/YAML) reads it back: floats in shortest round-trip form, lists as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return repr(value) if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Run:
    """One ``dlcm fit`` invocation: a directory name, its CLI arguments (after ``fit``) and what it stands for."""

    name: str
    args: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    sidecar: dict[str, Any] | None = None  # scaling.json (N, R, P); tokens_per_step is added after the run


def cli_args(configs: Sequence[Path], *override_maps: dict[str, Any], extra: Sequence[str] = ()) -> tuple[str, ...]:
    """``--config=…`` for each config, then ``extra``, then ``--key=value`` for every override (later maps win)."""
    merged: dict[str, Any] = {}
    for overrides in override_maps:
        merged.update(overrides)
    return (
        *(f"--config={c}" for c in configs),
        *extra,
        *(f"--{key}={format_value(value)}" for key, value in merged.items()),
    )


def grid_runs(spec: SweepSpec) -> list[Run]:
    """The Cartesian product of the spec's axes (one ``base`` run without axes)."""
    if not spec.axes:
        return [Run("base", cli_args(spec.configs, spec.overrides))]
    runs = []
    for combo in itertools.product(*(list(a.points.items()) for a in spec.axes)):
        sets: dict[str, Any] = {}
        for axis, (_, point) in zip(spec.axes, combo, strict=True):
            clash = sorted(set(sets) & set(point))
            if clash:
                raise ValueError(f"{spec.path}: axes set the same key(s) {', '.join(clash)} (axis {axis.name})")
            sets.update(point)
        name = "__".join(f"{a.name}-{label}" for a, (label, _) in zip(spec.axes, combo, strict=True))
        meta = {a.name: label for a, (label, _) in zip(spec.axes, combo, strict=True)}
        runs.append(Run(_NAME_OK.sub("_", name), cli_args(spec.configs, spec.overrides, sets), meta))
    return runs


def base_model(spec: SweepSpec) -> tuple[DLCMConfig | BaselineConfig, int]:
    """The model config and context length the spec's runs start from: the first config's model section with the
    spec's ``set`` overrides under ``model.init_args.config.`` applied (shapes come from there, not later configs)."""
    from dlcm.infer.recipe import load_recipe
    from dlcm.model.config_io import dataclass_from_dict

    recipe = load_recipe(spec.configs[0], spec.vocab_size)
    values = dataclasses.asdict(recipe.config)
    for key, value in spec.overrides.items():
        if key.startswith(MODEL_PREFIX):
            *parents, leaf = key.removeprefix(MODEL_PREFIX).split(".")
            node = values
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ValueError(f"{spec.path}: set key {key} does not name a field of the model config")
                node = node[part]
            node[leaf] = value
    config = dataclass_from_dict(type(recipe.config), values, "model.init_args.config")
    context = spec.overrides.get("model.init_args.context_length", recipe.context_length)
    return config, int(context)


def _lr_label(value: float) -> str:
    return f"{value:.4g}"


def _round_lr(value: float) -> float:
    """LRs are kept to 4 significant digits so a point reached by different multiplier paths is one run."""
    return float(_lr_label(value))


def _callback_names(config: Path) -> list[str] | None:
    """Class names of a recipe's trainer callbacks (inline or in the trainer fragment it names); None if it sets
    none (a later config's list replaces an earlier one's)."""
    import yaml

    recipe = yaml.safe_load(config.read_text()) or {}
    trainer = recipe.get("trainer") if isinstance(recipe, dict) else None
    if isinstance(trainer, str):
        trainer = yaml.safe_load((config.parent / trainer).read_text()) or {}
    callbacks = trainer.get("callbacks") if isinstance(trainer, dict) else None
    if callbacks is None:
        return None
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    return [(c.get("class_path", "") if isinstance(c, dict) else str(c)).rpartition(".")[2] for c in callbacks]


@dataclass
class MuPProtocol:
    """Runs of the μP transfer protocol (see the module docstring): names, arguments, and the descent itself."""

    spec: SweepSpec
    base: DLCMConfig | BaselineConfig = field(init=False)
    recipe_has_callback: bool = field(init=False)  # the configs' DecoupledMuP gets the run's values (else one added)

    def __post_init__(self) -> None:
        assert self.spec.mup is not None
        lists = [names for names in map(_callback_names, self.spec.configs) if names is not None]
        names, mup = (lists[-1] if lists else []), MUP_CALLBACK.rpartition(".")[2]
        self.recipe_has_callback = mup in names
        if self.recipe_has_callback and names[-1] != mup:
            # Command-line init_args reach the last callback of the list only.
            raise ValueError(
                f"{self.spec.path}: the configs' trainer callbacks {names} include DecoupledMuP, but not last; the "
                "mup-transfer protocol sets each run's width and rates on the last callback, so put it last"
            )
        self.base, _ = base_model(self.spec)

    @property
    def mup(self) -> MuPSpec:
        assert self.spec.mup is not None
        return self.spec.mup

    def start(self) -> tuple[float, float]:
        lr_concept = self.mup.lr if self.mup.lr_concept is None else self.mup.lr_concept
        return _round_lr(self.mup.lr), _round_lr(lr_concept)

    def run(self, width: int, lrs: tuple[float, float]) -> Run:
        from dlcm.research.shape_search import config_overrides, width_scaled

        proxy = self.mup.widths[0]
        config = width_scaled(self.base, width, proxy)
        lr_token, lr_concept = lrs
        extra = (
            *(() if self.recipe_has_callback else (f"--trainer.callbacks+={MUP_CALLBACK}",)),
            f"--trainer.callbacks.init_args.d_base={proxy}",
            f"--trainer.callbacks.init_args.lr_token={format_value(lr_token)}",
            f"--trainer.callbacks.init_args.lr_concept={format_value(lr_concept)}",
            f"--trainer.callbacks.init_args.lr_others={format_value(self.mup.lr_others)}",
        )
        name = f"w{width}_tok{_lr_label(lr_token)}_cpt{_lr_label(lr_concept)}"
        meta = {"width": width, "lr_token": lr_token, "lr_concept": lr_concept}
        return Run(name, cli_args(self.spec.configs, self.spec.overrides, config_overrides(config), extra=extra), meta)

    @staticmethod
    def moved(center: tuple[float, float], coordinate: str, factor: float) -> tuple[float, float]:
        tok, cpt = center
        if coordinate in ("token", "tied"):
            tok = _round_lr(tok * factor)
        if coordinate in ("concept", "tied"):
            cpt = _round_lr(cpt * factor)
        return tok, cpt

    def line(self, center: tuple[float, float], coordinate: str) -> list[tuple[float, tuple[float, float]]]:
        """(multiplier, point) along one coordinate through ``center``, multipliers ascending (1 included)."""
        factors = sorted({1.0, *self.mup.multipliers})
        return [(f, self.moved(center, coordinate, f)) for f in factors]

    def transfer_runs(self, center: tuple[float, float]) -> list[Run]:
        """Every width's lines through ``center`` (what the loss-vs-LR tables are made of)."""
        runs: dict[str, Run] = {}
        for width in self.mup.widths:
            for coordinate in self.mup.coordinates:
                for _, point in self.line(center, coordinate):
                    run = self.run(width, point)
                    runs.setdefault(run.name, run)
        return list(runs.values())

    def execute(self, runner: Callable[[list[Run]], dict[str, dict]], log: Callable[[str], None]) -> dict[str, Any]:
        """Descend on the proxy, run the transfer lines, and return the tables (``runner`` executes a stage)."""
        proxy = self.mup.widths[0]
        losses: dict[str, float] = {}

        def loss_of(results: dict[str, dict], run: Run) -> float:
            value = results[run.name].get("val_loss")
            return float(value) if value is not None and math.isfinite(value) else math.inf

        def evaluate(runs: list[Run]) -> None:
            results = runner(runs)
            losses.update({r.name: loss_of(results, r) for r in runs})

        center = self.start()
        evaluate([self.run(proxy, center)])
        descent = []
        for round_index in range(self.mup.max_rounds):
            moved = False
            for coordinate in self.mup.coordinates:
                line = [self.run(proxy, point) for _, point in self.line(center, coordinate)]
                evaluate(line)
                best = min(line, key=lambda r: (losses[r.name], r.name))
                new_center = (best.meta["lr_token"], best.meta["lr_concept"])
                descent.append({"round": round_index, "coordinate": coordinate, "center": list(new_center)})
                log(f"μP descent round {round_index}, {coordinate}: best {best.name} ({losses[best.name]:.4f})")
                moved |= new_center != center
                center = new_center
            if not moved:
                break
        evaluate(self.transfer_runs(center))
        return self.tables(center, losses, descent)

    def tables(self, center: tuple[float, float], losses: dict[str, float], descent: list) -> dict[str, Any]:
        """Loss-vs-LR per coordinate and width through ``center``, each width's argmin and whether it matches the
        proxy's."""
        # center: where the lines cross — the descent's result on the proxy, or the starting rates without descent.
        out: dict[str, Any] = {"proxy_width": self.mup.widths[0], "center": list(center), "descent": descent}
        coordinates = {}
        for coordinate in self.mup.coordinates:
            rows = []
            argmin: dict[int, float] = {}
            for factor, point in self.line(center, coordinate):
                row = {"multiplier": factor, "lr_token": point[0], "lr_concept": point[1]}
                for width in self.mup.widths:
                    row[f"w{width}"] = losses.get(self.run(width, point).name, math.nan)
                rows.append(row)
            for width in self.mup.widths:
                best_row = min(rows, key=lambda r, w=width: (_inf_if_nan(r[f"w{w}"]), r["multiplier"]))
                argmin[width] = best_row["multiplier"]
            factors = [r["multiplier"] for r in rows]
            proxy_index = factors.index(argmin[self.mup.widths[0]])
            coordinates[coordinate] = {
                "rows": rows,
                "argmin_multiplier": {f"w{w}": m for w, m in argmin.items()},
                # Same grid point as the proxy; or at most one grid point away.
                "aligned": all(m == argmin[self.mup.widths[0]] for m in argmin.values()),
                "within_one_step": all(abs(factors.index(m) - proxy_index) <= 1 for m in argmin.values()),
            }
        out["coordinates"] = coordinates
        return out


def _inf_if_nan(value: float) -> float:
    return math.inf if value is None or not math.isfinite(value) else value


def format_mup_tables(result: dict[str, Any]) -> str:
    """The loss-vs-LR tables of :meth:`MuPProtocol.tables` as text."""
    center = tuple(result["center"])
    lines = [f"μP transfer: proxy width {result['proxy_width']}, lines through (η_token, η_concept) = {center}"]
    for coordinate, table in result["coordinates"].items():
        widths = [k for k in table["rows"][0] if k.startswith("w")]
        lines += ["", f"coordinate {coordinate}: final val/loss", "  " + f"{'×':>6}{'lr_token':>11}{'lr_concept':>11}"]
        lines[-1] += "".join(f"{w:>10}" for w in widths)
        for row in table["rows"]:
            cells = "".join(f"{row[w]:>10.4f}" for w in widths)
            lines.append(f"  {row['multiplier']:>6g}{row['lr_token']:>11.4g}{row['lr_concept']:>11.4g}{cells}")
        best = ", ".join(f"{w}: ×{m:g}" for w, m in table["argmin_multiplier"].items())
        verdict = "aligned" if table["aligned"] else ("within one step" if table["within_one_step"] else "NOT aligned")
        lines.append(f"  argmin {best} → {verdict}")
    return "\n".join(lines)


def ratio_fraction_runs(spec: SweepSpec) -> tuple[list[Run], list[dict[str, Any]]]:
    """One run per (R, P) with its budget shape, and the table of shapes (FLOPs per token, share, parameters)."""
    from dlcm.model.flops import inference_flops_per_token
    from dlcm.research.shape_search import budget_shape, config_overrides, matmul_parameters

    rf = spec.ratio_fraction
    assert rf is not None
    base, context = base_model(spec)
    if not isinstance(base, DLCMConfig):
        raise ValueError(f"{spec.path}: protocol ratio-fraction needs a DLCM recipe, {spec.configs[0]} is a baseline")
    budget = rf.budget or inference_flops_per_token(base, context).total
    runs, table = [], []
    for ratio in rf.ratios:
        for fraction in rf.fractions:
            shape = budget_shape(base, ratio, fraction, budget, context, rf.tolerance, rf.share_tolerance)
            row = {"context": context, "budget": budget, **shape.describe()}
            params = matmul_parameters(shape.config)
            sidecar = {"N": params["N"], "R": ratio, "P": params["backbone"] / params["N"]}
            name = f"R{ratio:g}_P{round(fraction * 100)}"
            runs.append(Run(name, cli_args(spec.configs, spec.overrides, config_overrides(shape.config)), row, sidecar))
            table.append({"name": name, **row})
    return runs, table


def format_shape_table(table: list[dict[str, Any]]) -> str:
    """The (R, P) shapes as text."""
    head = (
        f"{'run':<10}{'d_tok':>6}{'enc':>4}{'dec':>4}{'d_cpt':>6}{'bb':>4}"
        f"{'FLOPs/tok':>12}{'vs budget':>10}{'bb share':>9}{'params':>10}{'bb params':>10}"
    )
    lines = [f"inference FLOPs per token at context {table[0]['context']}: budget {table[0]['budget']:.4g}", head]
    for r in table:
        lines.append(
            f"{r['name']:<10}{r['d_token']:>6}{r['encoder_layers']:>4}{r['decoder_layers']:>4}{r['d_concept']:>6}"
            f"{r['backbone_layers']:>4}{r['flops_per_token']:>12.4g}{r['flops_error']:>+10.1%}"
            f"{r['backbone_share']:>9.3f}{r['params'] / 1e6:>9.2f}M{r['backbone_param_fraction']:>10.1%}"
        )
    return "\n".join(lines)


# ---- execution -------------------------------------------------------------------------------------------------


def fit_command(run: Run, run_dir: Path, ckpt_path: Path | None = None) -> list[str]:
    """The ``dlcm fit`` command of ``run`` writing into ``run_dir`` (TensorBoard logs in ``run_dir/tb/version_0``)."""
    return [
        sys.executable,
        "-m",
        "dlcm",
        "fit",
        *run.args,
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        "--trainer.logger.init_args.name=tb",
        "--trainer.logger.init_args.version=0",
        "--trainer.enable_progress_bar=false",
        *([f"--ckpt_path={ckpt_path}"] if ckpt_path is not None else []),
    ]


def json_ready(data: Any) -> Any:
    """``data`` with non-finite floats (diverged or missing losses) as ``None``, so files are strict JSON."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: json_ready(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_ready(v) for v in data]
    return data


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as strict JSON atomically (temporary file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(json_ready(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def run_state(run: Run, run_dir: Path) -> tuple[str, dict | None]:
    """``('done', result)``, ``('resume', None)`` (a ``last.ckpt`` exists) or ``('new', None)``.

    Raises ``ValueError`` when the directory holds a run with other arguments.
    """
    recorded = run_dir / "run.json"
    if recorded.is_file():
        previous = json.loads(recorded.read_text())
        if list(previous.get("args", [])) != list(run.args):
            raise ValueError(
                f"{run_dir} holds run {run.name!r} with other arguments (the spec changed since it ran); write this "
                "sweep to another --out or delete that directory"
            )
    result = run_dir / "result.json"
    if result.is_file():
        return "done", json.loads(result.read_text())
    return ("resume", None) if (run_dir / "tb" / "version_0" / "checkpoints" / "last.ckpt").is_file() else ("new", None)


class Executor:
    """Runs ``dlcm fit`` subprocesses, ``parallel`` at a time, each in its own directory below ``out``.

    ``gpus``: CUDA device ids assigned round-robin to the worker slots (``CUDA_VISIBLE_DEVICES``); ``None`` leaves
    the environment alone (all runs see every device). ``threads``: ``OMP_NUM_THREADS`` per run, so concurrent runs
    do not oversubscribe the CPU.
    """

    def __init__(
        self,
        out: Path,
        parallel: int = 1,
        gpus: Sequence[str] | None = None,
        threads: int | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        if parallel < 1:
            raise ValueError(f"parallel={parallel} is not allowed: at least 1 run at a time")
        if threads is not None and threads < 1:
            raise ValueError(f"threads={threads} is not allowed: at least 1 per run")
        self.out = Path(out)
        self.parallel = parallel
        self.gpus = list(gpus) if gpus else None
        self.threads = threads
        self.log = log
        self.results: dict[str, dict] = {}

    def environment(self, slot: int) -> dict[str, str]:
        env = dict(os.environ)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
        if self.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        return env

    def __call__(self, runs: list[Run]) -> dict[str, dict]:
        names = [r.name for r in runs]
        if len(set(names)) != len(names):
            raise ValueError(f"run names must be unique: {sorted(n for n in set(names) if names.count(n) > 1)}")
        pending, out = [], {}
        for run in runs:
            state, result = run_state(run, self.out / run.name)
            if state == "done":
                out[run.name] = result
            else:
                pending.append((run, state))
        if pending:
            self.log(f"sweep: {len(pending)} run(s) to train, {len(out)} already done; {self.parallel} at a time")
        slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.parallel):
            slots.put(slot)

        def work(item: tuple[Run, str]) -> tuple[str, dict]:
            slot = slots.get()
            try:
                return item[0].name, self.train(item[0], item[1] == "resume", slot)
            finally:
                slots.put(slot)

        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            for name, result in pool.map(work, pending):
                out[name] = result
        self.results.update(out)
        return out

    def train(self, run: Run, resume: bool, slot: int) -> dict:
        run_dir = self.out / run.name
        if not resume and (run_dir / "tb").exists():
            shutil.rmtree(run_dir / "tb")  # a run that died before its first checkpoint starts afresh
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = run_dir / "tb" / "version_0" / "checkpoints" / "last.ckpt" if resume else None
        command = fit_command(run, run_dir, ckpt)
        write_json(run_dir / "run.json", {"name": run.name, "args": list(run.args), "meta": run.meta})
        self.log(f"sweep: {'resuming' if resume else 'starting'} {run.name}")
        start = time.perf_counter()
        with open(run_dir / "train.log", "a") as log_file:
            log_file.write(f"$ {' '.join(command)}\n")
            log_file.flush()
            code = subprocess.call(command, stdout=log_file, stderr=subprocess.STDOUT, env=self.environment(slot))
        wall = time.perf_counter() - start
        base = {"name": run.name, **run.meta, "wall_s": wall, "command": command}
        if code != 0:
            self.log(f"sweep: {run.name} FAILED (exit {code}); see {run_dir / 'train.log'}")
            return {**base, "status": "failed", "returncode": code}
        from dlcm.research.run_metrics import summarize_run

        summary = summarize_run(run_dir / "tb")
        if run.sidecar is not None and summary["tokens_per_step"]:
            write_json(run_dir / "scaling.json", {**run.sidecar, "tokens_per_step": summary["tokens_per_step"]})
        result = {**base, "status": "ok", **summary}
        write_json(run_dir / "result.json", result)
        loss = summary["val_loss"]
        self.log(f"sweep: {run.name} done in {wall:.0f} s, val/loss {loss if loss is None else round(loss, 4)}")
        return result


def write_summary(out: Path, results: dict[str, dict]) -> list[dict[str, Any]]:
    """``summary.json`` and ``summary.csv`` in ``out``: one row of scalars per run (curves stay in result.json)."""
    rows = []
    for name, result in sorted(results.items()):
        row = {"name": name}
        row.update({k: v for k, v in result.items() if not isinstance(v, (dict, list)) and k != "run_dir"})
        for domain, value in (result.get("tokens_per_concept") or {}).items():
            row[f"tokens_per_concept/{domain}"] = value
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", rows)
    columns = ["name"]
    for key in (k for row in rows for k in row):
        if key not in columns and key not in SUMMARY_COLUMNS and not key.startswith("tokens_per_concept/"):
            columns.append(key)
    columns += list(SUMMARY_COLUMNS)
    columns += sorted({k for row in rows for k in row if k.startswith("tokens_per_concept/")})
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The summary rows as an aligned text table."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    columns = ["name", "status", "val_loss", "val_bpb", "val_ratio", "train_ratio", "train_flops", "steps"]
    widths = {c: max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(f"{c:<{widths[c]}}" for c in columns)]
    lines += ["  ".join(f"{cell(r.get(c)):<{widths[c]}}" for c in columns) for r in rows]
    return "\n".join(lines)


def collect_results(out: Path) -> dict[str, dict]:
    """``result.json`` of every finished run below ``out`` (names are paths relative to ``out``)."""
    return {
        str(path.parent.relative_to(out)): json.loads(path.read_text()) for path in sorted(out.rglob("result.json"))
    }


def static_runs(spec: SweepSpec) -> list[Run]:
    """Every run of a spec that is known before any result: all of grid and ratio-fraction, and for mup-transfer
    the first descent stage (or, with ``max_rounds: 0``, all of its transfer lines)."""
    if spec.protocol == "grid":
        return grid_runs(spec)
    if spec.protocol == "ratio-fraction":
        return ratio_fraction_runs(spec)[0]
    protocol = MuPProtocol(spec)
    center = protocol.start()
    if protocol.mup.max_rounds == 0:
        return protocol.transfer_runs(center)
    proxy = protocol.mup.widths[0]
    return [protocol.run(proxy, point) for _, point in protocol.line(center, protocol.mup.coordinates[0])]


def run_spec(spec: SweepSpec, executor: Executor, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a spec to completion; returns the protocol's output (the μP tables, the shape table) and the results."""
    output: dict[str, Any] = {"spec": str(spec.path), "protocol": spec.protocol}
    if spec.protocol == "mup-transfer":
        output["mup_transfer"] = MuPProtocol(spec).execute(executor, log)
        write_json(executor.out / "mup_transfer.json", output["mup_transfer"])
        log(format_mup_tables(output["mup_transfer"]))
    elif spec.protocol == "ratio-fraction":
        runs, table = ratio_fraction_runs(spec)
        log(format_shape_table(table))
        write_json(executor.out / "shapes.json", table)
        output["shapes"] = table
        executor(runs)
    else:
        executor(grid_runs(spec))
    rows = write_summary(executor.out, executor.results)
    log(format_summary(rows))
    output["failed"] = [r["name"] for r in rows if r.get("status") != "ok"]
    return output


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlcm sweep", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="expand a sweep spec and run it")
    run.add_argument("spec", type=Path, help="sweep spec YAML (see `dlcm sweep --help` and recipes/sweeps/)")
    run.add_argument("--out", type=Path, default=None, help="sweep directory (default: runs/sweeps/<spec name>)")
    run.add_argument("--parallel", type=int, default=1, help="runs at a time")
    run.add_argument("--gpus", default=None, help="comma-separated CUDA ids assigned round-robin to the slots")
    run.add_argument(
        "--threads-per-run",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of each run (default with --parallel > 1 and no --gpus: the CPU cores / parallel)",
    )
    run.add_argument("--dry-run", action="store_true", help="print the runs' commands (and shapes) and stop")
    run.add_argument(
        "--vocab-size", type=int, default=None, help="vocabulary for planning where the data is not built here"
    )
    summary = sub.add_parser("summary", help="table of the finished runs of a sweep directory")
    summary.add_argument("out", type=Path, help="sweep directory")
    return parser


def cpu_threads(parallel: int, gpus: list[str] | None) -> int | None:
    """Threads per concurrent CPU run: the cores shared out. Left to torch (all cores each), two runs on two cores
    trained 13× slower than one alone (100 tiny steps: 271 s vs 20 s)."""
    if parallel <= 1 or gpus:
        return None
    return max(1, (os.cpu_count() or 1) // parallel)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dlcm sweep`` (``argv`` without the program name and subcommand); 2 on bad input."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "summary":
            if not args.out.is_dir():
                raise FileNotFoundError(f"sweep directory {args.out} does not exist")
            results = collect_results(args.out)
            if not results:
                raise ValueError(f"{args.out}: no finished run (no result.json below it)")
            print(format_summary(write_summary(args.out, results)))
            return 0
        spec = load_spec(args.spec, args.vocab_size)
        out = (args.out or Path("runs") / "sweeps" / spec.name).resolve()
        if args.dry_run:
            if spec.protocol == "ratio-fraction":
                print(format_shape_table(ratio_fraction_runs(spec)[1]))
            runs = static_runs(spec)
            for run in runs:
                print(f"# {run.name}\n" + " ".join(fit_command(run, out / run.name)))
            if spec.protocol == "mup-transfer" and spec.mup and spec.mup.max_rounds > 0:
                print("# later stages (descent, transfer lines) depend on these runs' losses")
            return 0
        gpus = args.gpus.split(",") if args.gpus else None
        executor = Executor(out, args.parallel, gpus, args.threads_per_run or cpu_threads(args.parallel, gpus))
        output = run_spec(spec, executor)
    except (ValueError, FileNotFoundError) as err:
        print(f"dlcm sweep: error: {err}", file=sys.stderr)
        return 2
    if output["failed"]:
        print(f"dlcm sweep: {len(output['failed'])} run(s) failed: {', '.join(output['failed'])}", file=sys.stderr)
        return 1
    return 0
