"""Figure of ``bench/boundary_fidelity.py`` results: validation bits per byte against training FLOPs for every run
(DLCM and baseline, each seed), and the DLCM runs' inference-mode validation ratio over training against R ± 5 %.

    python bench/plot_boundary_fidelity.py bench/results/boundary_fidelity_cpu_scale1.json \\
        bench/results/boundary_fidelity_cpu_scale2_lr1e-3.json bench/results/boundary_fidelity_cpu_scale2_lr5e-4.json \\
        --out docs/figures/boundary_fidelity_cpu.png

Needs matplotlib (``pip install -e '.[research]'``). Only the seed groups are drawn: the default DLCM and the baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLOURS = ["tab:blue", "tab:green", "tab:purple", "tab:red"]


def label(result: dict[str, Any]) -> str:
    """What distinguishes one results file: its scale and, when set, the learning rate."""
    lr = result.get("calibration", {}).get("lr")
    return f"scale {result['scale']}" + (f", lr {lr:g}" if lr else ", recipe lr")


def seeds_figure(results: list[dict[str, Any]]) -> Any:
    """Two panels: bits per byte vs training FLOPs (DLCM solid, baseline dashed), and the DLCM's validation ratio."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12.0, 4.4), layout="constrained")
    bpb_ax, ratio_ax = fig.subplots(1, 2)
    target = None
    for colour, result in zip(COLOURS, results, strict=False):
        default_group = f"r4-{result['default_mechanism']}"  # the study's group name of its default DLCM
        best = {kind: b["lr"] for kind, b in result.get("best_lr", {}).items()}  # a grid: each model's best rate
        for run in result["run_summaries"].values():
            if run.get("group") not in (default_group, "baseline") or run.get("status") != "ok":
                continue
            if run.get("kind") in best and run.get("lr") != best[run["kind"]]:
                continue
            is_dlcm = run["group"] == default_group
            first = run.get("seed") == 0  # one legend entry per file and kind
            bpb = run["curves"]["val/bpb"]
            ax_label = f"{label(result)}, {'DLCM' if is_dlcm else 'baseline'}" if first else None
            style = {"color": colour, "marker": "o", "markersize": 3, "linestyle": "-" if is_dlcm else "--"}
            bpb_ax.plot(run["val_flops"][-len(bpb["value"]) :], bpb["value"], label=ax_label, **style)
            if is_dlcm:
                ratio = run["curves"]["val/ratio"]
                ratio_ax.plot(ratio["step"], ratio["value"], label=label(result) if first else None, **style)
                target = run.get("target_ratio") or target
    if target:
        ratio_ax.axhline(target, color="black", linewidth=0.8, label=f"R = {target:g}")
        ratio_ax.axhspan(0.95 * target, 1.05 * target, color="grey", alpha=0.2, label="R ± 5 %")
    bpb_ax.set_xscale("log")
    bpb_ax.set_xlabel("training FLOPs")
    bpb_ax.set_ylabel("validation bits per byte")
    bpb_ax.set_title("DLCM (solid) vs FLOPs-matched baseline (dashed), each seed")
    ratio_ax.set_xlabel("step")
    ratio_ax.set_ylabel("validation tokens per concept (inference mode)")
    ratio_ax.set_title("DLCM realised ratio, each seed")
    for ax in (bpb_ax, ratio_ax):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="boundary_fidelity results JSONs")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        parser.error(f"results file {missing[0]} does not exist")
    if len(args.results) > len(COLOURS):
        parser.error(f"{len(args.results)} results files given: at most {len(COLOURS)} fit one figure")
    fig = seeds_figure([json.loads(p.read_text()) for p in args.results])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
