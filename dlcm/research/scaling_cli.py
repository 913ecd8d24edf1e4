"""``dlcm scaling fit``: fit the compression-aware scaling law (Eq. 22) and suggest (R, P) for a compute budget.

    dlcm scaling fit --csv obs.csv
    dlcm scaling fit --csv obs.csv --runs runs/dlcm/r4_p50 runs/dlcm/r2_p30 --budget 1e21 --json fit.json

Observations come from ``--csv`` (columns ``N,D,R,P,loss``) and/or ``--runs`` (TensorBoard run directories with a
``scaling.json`` sidecar; see :mod:`dlcm.research.scaling`). Prints each coefficient with its bootstrap standard
deviation, R², and with ``--budget`` the best (R, P) under the FLOPs model C = 6 · (N(1−P) + N·P/R) · D.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlcm scaling", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit Eq. 22 to observations")
    fit.add_argument("--csv", type=Path, action="append", default=[], help="CSV of N,D,R,P,loss (repeatable)")
    fit.add_argument("--runs", type=Path, nargs="+", default=[], help="TensorBoard run dirs with scaling.json")
    fit.add_argument("--budget", type=float, default=None, help="training compute in FLOPs for the (R, P) choice")
    fit.add_argument("--ratios", type=float, nargs="+", default=[2, 4, 8], help="compression ratios R to compare")
    fit.add_argument("--n-params", type=float, default=None, help="fix the model size N instead of optimising it")
    fit.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the ± (0: none)")
    fit.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    fit.add_argument("--huber-delta", type=float, default=1e-3, help="Huber threshold on log-loss residuals")
    fit.add_argument("--json", type=Path, default=None, help="also write the fit (and allocation) as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``dlcm scaling …``; returns the exit status (2 on bad input)."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    # Imported here: `dlcm scaling --help` needs neither numpy nor torch.
    from dlcm.research.scaling import (
        PARAM_NAMES,
        Observations,
        best_allocation,
        fit_scaling_law,
        read_csv,
        read_runs,
    )

    if not args.csv and not args.runs:
        print("dlcm scaling fit: error: give --csv and/or --runs", file=sys.stderr)
        return 2
    try:
        parts = [read_csv(p) for p in args.csv]
        if args.runs:
            parts.append(read_runs(args.runs))
        obs = Observations.concat(parts)
        fit = fit_scaling_law(obs, n_bootstrap=args.bootstrap, seed=args.seed, huber_delta=args.huber_delta)
        alloc = None
        if args.budget is not None:
            alloc = best_allocation(fit, args.budget, ratios=args.ratios, n_params=args.n_params)
    except ValueError as err:
        print(f"dlcm scaling fit: error: {err}", file=sys.stderr)
        return 2

    spread = f"bootstrap std over {fit.n_bootstrap} resamples, seed {fit.seed}" if fit.n_bootstrap else "no ±"
    print(f"Eq. 22 fit on {fit.n_obs} observations ({spread}); N in parameters, D in tokens")
    for name in PARAM_NAMES:
        print(f"  {name:7s} {fit.coefficients[name]:14.6g} ± {fit.stderr[name]:.3g}")
    print(f"  R²      {fit.r2:.5f}")
    result = {"fit": fit.to_dict()}
    if alloc is not None:
        print(
            f"Best for {alloc.budget:.3g} FLOPs: R={alloc.R:g}, P={alloc.P:.2f} "
            f"(N={alloc.N:.3g} params, D={alloc.D:.3g} tokens, predicted loss {alloc.loss:.4f})"
        )
        result["allocation"] = {k: v for k, v in vars(alloc).items()}
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
