"""``dlcm analyze``: loss by position inside a concept and by concept length of a trained DLCM, against a baseline.

    dlcm analyze --ckpt_path <dlcm ckpt> --baseline-ckpt <baseline ckpt> --out analysis.json
    dlcm analyze --run runs/sweeps/x/dlcm --baseline-run runs/sweeps/x/baseline --out analysis.json

``--run`` takes a run directory of ``dlcm fit`` (or ``dlcm sweep``): the resolved recipe LightningCLI saved there
(``config.yaml``, which holds every command-line override) and its ``last.ckpt``. A checkpoint alone brings the
recipe its run recorded (whose validation split is analysed); ``--config`` / ``--baseline-config`` name another
recipe for the data. The weights are read with :func:`dlcm.load`. The analysis and its convention
are :mod:`dlcm.research.concept_analysis`'s.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

# torch, Lightning and the analysis itself are imported where they are used, after the command line is parsed:
# they take seconds to load, and `dlcm analyze --help` needs none of them.


def run_files(run_dir: str | Path, scratch: Path) -> tuple[str, str]:
    """(recipe, checkpoint) of a ``dlcm fit`` run directory: its saved ``config.yaml`` (see :func:`recipe_file`) and
    its newest ``last.ckpt``."""
    run_dir = Path(run_dir)
    configs = sorted(run_dir.rglob("config.yaml"), key=lambda p: p.stat().st_mtime)
    ckpts = sorted(run_dir.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not configs or not ckpts:
        raise FileNotFoundError(f"{run_dir}: need a config.yaml and a last.ckpt below it (a dlcm fit run directory)")
    return recipe_file(configs[-1].read_text(), scratch), str(ckpts[-1])


def recipe_file(saved_config: str, scratch: Path) -> str:
    """A run's saved ``config.yaml`` text as a recipe file in ``scratch``, minus the arguments only ``fit`` takes."""
    import yaml
    from lightning import Trainer
    from lightning.pytorch.cli import LightningCLI

    recipe = yaml.safe_load(saved_config)
    # The saved file also holds the arguments of Trainer.fit that `fit` takes from the command line (ckpt_path,
    # weights_only); the CLI without a subcommand refuses them. Model and data are the CLI's own groups.
    fit_only = set(inspect.signature(Trainer.fit).parameters) - LightningCLI.subcommands()["fit"] - {"self"}
    for key in fit_only:
        recipe.pop(key, None)
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / f"{len(list(scratch.iterdir()))}-config.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def recorded_recipe(record: dict[str, Any], ckpt_path: str) -> str:
    if not record.get("recipe"):
        raise ValueError(f"{ckpt_path} records no recipe: pass the one it was trained with (--config)")
    return record["recipe"]


def _build(configs: list[str]) -> Any:
    """The CLI objects (module, data module) of a recipe, without a logger and on CPU (the trainer is not used)."""
    from dlcm.train.cli import run_cli

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
        args = [f"--config={c}" for c in configs]
        return run_cli([*args, "--trainer.logger=false", "--trainer.accelerator=cpu", "--trainer.devices=1"], run=False)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlcm analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", default=[], help="the DLCM's recipe (repeatable, composes)")
    p.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", default=None, help="the DLCM's checkpoint")
    p.add_argument("--run", default=None, help="a DLCM run directory instead of --config and --ckpt_path")
    p.add_argument("--baseline-config", action="append", default=[], help="a dense baseline's recipe (repeatable)")
    p.add_argument("--baseline-ckpt", default=None, help="the baseline's checkpoint (with --baseline-config)")
    p.add_argument("--baseline-run", default=None, help="a baseline run directory instead of the two above")
    p.add_argument("--batches", type=int, default=None, help="validation micro-batches (default: the whole split)")
    p.add_argument("--max-position", type=int, default=20, help="positions ≥ this share the last bucket")
    p.add_argument("--max-length", type=int, default=32, help="concept lengths ≥ this share the last bucket")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--out", type=Path, required=True, help="write the analysis JSON here")
    return p


def main(argv: list[str]) -> int:
    """Entry point of ``dlcm analyze``; returns the exit status (2 on bad input)."""

    parser = _parser()
    args = parser.parse_args(argv)
    if (args.run and (args.config or args.ckpt_path)) or not (args.run or args.ckpt_path):
        parser.error("give the DLCM as --run DIR, or as --ckpt_path CKPT (with --config RECIPE to use its data)")
    if args.baseline_run and (args.baseline_config or args.baseline_ckpt):
        parser.error("give the baseline as --baseline-run DIR, or as --baseline-ckpt (and --baseline-config)")
    if args.baseline_config and not args.baseline_ckpt:
        parser.error("--baseline-config needs --baseline-ckpt")
    with tempfile.TemporaryDirectory(prefix="dlcm-analyze-") as scratch:
        try:
            result, _ = _run(args, Path(scratch))
        except (ValueError, FileNotFoundError) as err:
            print(f"dlcm analyze: error: {err}", file=sys.stderr)
            return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name in ("dlcm", "baseline"):
        if name in result:
            losses = result[name]["loss_by_position"]
            shown = " ".join("-" if v is None else f"{v:.3f}" for v in losses[:8])
            print(f"{name}: mean loss {result[name]['mean_loss']:.4f}; by position 0…7: {shown}")
    print(f"analysis of {result['batches']} batches ({result['tokens']:,} tokens) written to {args.out}")
    return 0


def _run(args: argparse.Namespace, scratch: Path) -> tuple[dict[str, Any], Any]:
    import torch

    from dlcm.infer.load import load, load_network_weights
    from dlcm.research.concept_analysis import analyze

    if args.run:
        config, args.ckpt_path = run_files(args.run, scratch)
        args.config = [config]
    if args.baseline_run:
        config, args.baseline_ckpt = run_files(args.baseline_run, scratch)
        args.baseline_config = [config]
    dlcm = load(args.ckpt_path)
    if not args.config:  # the validation data of the run the checkpoint recorded
        args.config = [recipe_file(recorded_recipe(dlcm.record, args.ckpt_path), scratch)]
    cli = _build(args.config)
    if not hasattr(cli.model.network, "parser"):
        raise ValueError(f"{args.run or args.config}: not a DLCM (its model has no parser)")
    load_network_weights(cli.model.network, dlcm.network.state_dict(), Path(args.ckpt_path))
    baseline = None
    if args.baseline_ckpt:
        base = load(args.baseline_ckpt)
        if not args.baseline_config:
            args.baseline_config = [recipe_file(recorded_recipe(base.record, args.baseline_ckpt), scratch)]
        base_cli = _build(args.baseline_config)
        if base_cli.datamodule.manifest.tokenizer_sha256 != cli.datamodule.manifest.tokenizer_sha256:
            raise ValueError("the baseline's data has another tokenizer than the DLCM's: its losses would not align")
        load_network_weights(base_cli.model.network, base.network.state_dict(), Path(args.baseline_ckpt))
        baseline = base_cli.model
    result = analyze(
        cli.model,
        cli.datamodule.val_dataloader(),
        baseline,
        args.max_position,
        args.max_length,
        args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        args.batches,
    )
    sources = {"dlcm": args.run or {"config": args.config, "ckpt_path": args.ckpt_path}}
    if baseline is not None:
        sources["baseline"] = args.baseline_run or {"config": args.baseline_config, "ckpt_path": args.baseline_ckpt}
    return {"sources": sources, **result}, baseline
