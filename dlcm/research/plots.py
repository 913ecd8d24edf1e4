"""``dlcm plot``: figures of training runs as PNG files and as TensorBoard images.

    dlcm plot runs/sweeps/ratio_fraction_tiny_cpu --out docs/figures
    dlcm plot runs/a runs/b --analysis analysis.json --mup runs/sweeps/mup/mup_transfer.json --tensorboard runs/figures

Inputs: run directories of ``dlcm fit`` / ``dlcm sweep`` (a sweep directory stands for all its runs; a run's
``result.json`` is used when present, otherwise its event files are read), ``dlcm analyze`` outputs and a μP
transfer table. Figures (each drawn only when some input has the data):

- ``loss_vs_flops``: validation loss (or ``--metric val/bpb``) against the training FLOPs spent when it was
  measured, one line per run (FLOPs from the FLOPs callback, :mod:`dlcm.research.run_metrics`);
- ``ratio_over_training``: realised tokens per concept — sampled as trained (``train/ratio``), thresholded as
  inference decides on training batches (``train/segmentation/ratio_threshold``) and on validation (``val/ratio``) —
  with the target R;
- ``tokens_per_concept``: the last validation tokens per concept of each domain (the paper's Table 5), per run;
- ``position_loss``: mean loss by position inside a concept, DLCM and baseline (the paper's Figure 7), and their
  difference;
- ``lr_transfer``: final loss against the learning rate of each μP coordinate, one line per width.

matplotlib is an optional extra (``pip install -e .[research]``); the figure functions take the plain dicts that
``result.json``, ``dlcm analyze`` and ``mup_transfer.json`` hold, so any driver can reuse them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dlcm.research.run_metrics import RENAMED_TAGS

RATIO_CURVES = (
    ("train/ratio", "train, sampled", "-"),
    ("train/segmentation/ratio_threshold", "train, thresholded", ":"),
    ("val/ratio", "validation, thresholded", "--"),
)


def _figure(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 4.2) -> tuple[Any, list]:
    """A figure without pyplot's global state (no display needed) and its axes as a flat list."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("dlcm plot needs matplotlib: pip install -e '.[research]'") from err
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return fig, list(fig.subplots(nrows, ncols, squeeze=False).flat)


def _curve(run: dict[str, Any], tag: str) -> dict[str, list] | None:
    """A run's curve of ``tag``, or of the tag's old name in summaries written before it was renamed."""
    curves = run.get("curves", {})
    old = [o for o, new in RENAMED_TAGS.items() if new == tag]
    return curves.get(tag) or next((curves[o] for o in old if o in curves), None)


def _steps_values(curve: dict[str, list] | None) -> tuple[list, list]:
    return (curve["step"], curve["value"]) if curve else ([], [])


def loss_vs_flops(runs: dict[str, dict], metric: str = "val/loss") -> Any | None:
    """Validation ``metric`` against training FLOPs, one line per run that has both; ``None`` if none has."""
    fig, (ax,) = _figure()
    drawn = 0
    for name, run in runs.items():
        steps, values = _steps_values(run.get("curves", {}).get(metric))
        flops = run.get("val_flops")
        val_steps = run.get("curves", {}).get("val/loss", {}).get("step", [])
        if not steps or not flops or len(flops) != len(val_steps):
            continue
        at = dict(zip(val_steps, flops, strict=True))
        points = [(at[s], v) for s, v in zip(steps, values, strict=True) if s in at and math.isfinite(v)]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=name)
            drawn += 1
    if not drawn:
        return None
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (model FLOPs, FLOPs callback)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs training compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def ratio_over_training(runs: dict[str, dict]) -> Any | None:
    """Realised tokens per concept over training, one panel per run with boundary statistics."""
    dlcm = {n: r for n, r in runs.items() if any(_curve(r, tag) for tag, _, _ in RATIO_CURVES)}
    if not dlcm:
        return None
    ncols = min(len(dlcm), 3)
    fig, axes = _figure(ncols, math.ceil(len(dlcm) / ncols), width=4.4, height=3.4)
    for ax, (name, run) in zip(axes, dlcm.items(), strict=False):
        for tag, label, style in RATIO_CURVES:
            steps, values = _steps_values(_curve(run, tag))
            if steps:
                ax.plot(steps, values, style, label=label)
        if run.get("target_ratio"):
            ax.axhline(run["target_ratio"], color="black", linewidth=0.8, alpha=0.6, label="target R")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("tokens per concept")
        ax.set_title(name, fontsize="small")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small")
    for ax in axes[len(dlcm) :]:
        ax.set_visible(False)
    return fig


def tokens_per_concept(runs: dict[str, dict]) -> Any | None:
    """Grouped bars: last validation tokens per concept per domain, one bar per run (paper Table 5)."""
    with_domains = {n: r["tokens_per_concept"] for n, r in runs.items() if r.get("tokens_per_concept")}
    if not with_domains:
        return None
    domains = sorted({d for v in with_domains.values() for d in v})
    fig, (ax,) = _figure()
    width = 0.8 / len(with_domains)
    for i, (name, values) in enumerate(with_domains.items()):
        xs = [j + (i - (len(with_domains) - 1) / 2) * width for j in range(len(domains))]
        heights = [values.get(d, math.nan) for d in domains]
        bars = ax.bar(xs, heights, width=width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize="x-small")
    targets = {r.get("target_ratio") for r in runs.values() if r.get("tokens_per_concept")} - {None}
    for target in targets:
        ax.axhline(target, color="black", linewidth=0.8, alpha=0.6)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("tokens per concept (validation, thresholded)")
    ax.set_title("tokens per concept by domain" + (f" (target R = {', '.join(map(str, targets))})" if targets else ""))
    ax.legend(fontsize="small")
    return fig


def position_loss(analyses: dict[str, dict]) -> Any | None:
    """Loss by position inside a concept (``dlcm analyze`` outputs), and DLCM − baseline where both exist."""
    if not analyses:
        return None
    paired = any("baseline" in a for a in analyses.values())
    fig, axes = _figure(2 if paired else 1)
    for name, analysis in analyses.items():
        for model in ("dlcm", "baseline"):
            if model not in analysis:
                continue
            data = analysis[model]
            points = [(p, v) for p, v in zip(data["position"], data["loss_by_position"], strict=True) if v is not None]
            if points:
                label = f"{name}: {model}" if len(analyses) > 1 else model
                axes[0].plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
        if "baseline" in analysis:
            d, b = analysis["dlcm"], analysis["baseline"]
            points = [
                (p, x - y)
                for p, x, y in zip(d["position"], d["loss_by_position"], b["loss_by_position"], strict=True)
                if x is not None and y is not None
            ]
            if points:
                axes[1].plot(*zip(*points, strict=True), marker="o", markersize=3, label=name)
    cap = next(iter(analyses.values()))["dlcm"]["max_position"]
    axes[0].set_xlabel(f"position of the predicted token in its concept (last bucket: ≥ {cap})")
    axes[0].set_ylabel("mean loss (nats)")
    axes[0].set_title("loss by position in concept (DLCM boundaries)")
    axes[0].grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    if paired:
        axes[1].axhline(0.0, color="black", linewidth=0.8)
        axes[1].set_xlabel("position in concept")
        axes[1].set_ylabel("DLCM − baseline (nats); < 0: DLCM better")
        axes[1].set_title("difference")
        axes[1].grid(True, alpha=0.3)
    return fig


def lr_transfer(mup: dict[str, Any]) -> Any | None:
    """Final loss against each μP coordinate's learning rate, one line per width (``mup_transfer.json``)."""
    coordinates = mup.get("coordinates") or {}
    if not coordinates:
        return None
    fig, axes = _figure(len(coordinates), width=4.6)
    for ax, (coordinate, table) in zip(axes, coordinates.items(), strict=True):
        rows = table["rows"]
        key = "lr_concept" if coordinate == "concept" else "lr_token"
        for width in (k for k in rows[0] if k.startswith("w")):
            points = [(r[key], r[width]) for r in rows if r[width] is not None and math.isfinite(r[width])]
            if points:
                line = ax.plot(*zip(*points, strict=True), marker="o", label=f"d_token {width[1:]}")[0]
                best = min(points, key=lambda p: p[1])
                ax.plot(*best, marker="*", markersize=14, color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel({"token": "η_token", "concept": "η_concept", "tied": "η_token = η_concept"}[coordinate])
        ax.set_ylabel("final val/loss")
        verdict = "aligned" if table["aligned"] else ("±1 step" if table["within_one_step"] else "not aligned")
        ax.set_title(f"μP transfer, {coordinate} ({verdict})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def boundary_scores(results: list[dict[str, Any]]) -> Any | None:
    """Precision, recall and F1 of the parser on known boundaries (``bench/synthetic_boundaries.py`` results), per
    ``router_grad``, exact and ±1 token, with the chance reference as outlined bars."""
    if not results:
        return None
    keys = list(results[0]["scores"])
    fig, axes = _figure(len(keys), width=4.8)
    metrics = ("precision", "recall", "f1")
    width = 0.8 / len(results)
    for ax, key in zip(axes, keys, strict=True):
        for i, result in enumerate(results):
            xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(metrics))]
            bars = ax.bar(xs, [result["scores"][key][m] for m in metrics], width=width, label=result["router_grad"])
            ax.bar(
                xs,
                [result["chance"][key][m] for m in metrics],
                width=width,
                fill=False,
                edgecolor="black",
                linestyle="--",
                label="chance (same count)" if i == 0 else None,
            )
            ax.bar_label(bars, fmt="%.2f", fontsize="x-small")
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_ylim(0, 1)
        ax.set_title(f"phrase boundaries, tolerance ±{results[0]['scores'][key]['tolerance']}")
        ax.legend(fontsize="small")
    return fig


def save_figures(figures: dict[str, Any], out_dir: Path, tensorboard_dir: Path | None = None) -> list[Path]:
    """Write each figure as ``<out_dir>/<name>.png`` and, with ``tensorboard_dir``, as a TensorBoard image
    ``figures/<name>``; returns the PNG paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=130)
        paths.append(path)
    if tensorboard_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(tensorboard_dir)) as writer:
            for name, fig in figures.items():
                writer.add_figure(f"figures/{name}", fig, global_step=0, close=False)
    return paths


def load_runs(paths: Sequence[Path]) -> dict[str, dict]:
    """Run summaries by name: a sweep directory gives its runs (``result.json``), any other directory one run."""
    from dlcm.research.run_metrics import event_files, summarize_run

    runs: dict[str, dict] = {}
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"run directory {path} does not exist")
        results = sorted(path.rglob("result.json"))
        if (path / "result.json").is_file():
            runs[path.name] = json.loads((path / "result.json").read_text())
        elif results:
            runs.update({str(r.parent.relative_to(path)): json.loads(r.read_text()) for r in results})
        elif event_files(path):
            runs[path.name] = summarize_run(path)
        else:
            raise ValueError(f"{path}: neither a sweep (result.json files) nor a run (TensorBoard event files)")
    return runs


def draw_all(
    runs: dict[str, dict],
    analyses: dict[str, dict] | None = None,
    mup: dict[str, Any] | None = None,
    metric: str = "val/loss",
) -> dict[str, Any]:
    """Every figure the inputs have data for, by name."""
    figures = {
        "loss_vs_flops": loss_vs_flops(runs, metric),
        "ratio_over_training": ratio_over_training(runs),
        "tokens_per_concept": tokens_per_concept(runs),
        "position_loss": position_loss(analyses or {}),
        "lr_transfer": lr_transfer(mup) if mup else None,
    }
    return {name: fig for name, fig in figures.items() if fig is not None}


def main(argv: list[str]) -> int:
    """Entry point of ``dlcm plot``; returns the exit status (2 on bad input)."""
    parser = argparse.ArgumentParser(prog="dlcm plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="*", help="run or sweep directories")
    parser.add_argument("--analysis", type=Path, action="append", default=[], help="dlcm analyze output (JSON)")
    parser.add_argument("--mup", type=Path, default=None, help="mup_transfer.json of a mup-transfer sweep")
    parser.add_argument("--metric", default="val/loss", help="validation scalar for loss_vs_flops (e.g. val/bpb)")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="directory for the PNG files")
    parser.add_argument("--tensorboard", type=Path, default=None, help="also write the figures as TensorBoard images")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs)
        analyses = {p.stem: json.loads(p.read_text()) for p in args.analysis}
        mup = json.loads(args.mup.read_text()) if args.mup else None
        figures = draw_all(runs, analyses, mup, args.metric)
        if not figures:
            raise ValueError("nothing to draw: the inputs hold no curves, analyses or μP tables")
        paths = save_figures(figures, args.out, args.tensorboard)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"dlcm plot: error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    if args.tensorboard:
        print(f"TensorBoard images: tensorboard --logdir {args.tensorboard}")
    return 0
