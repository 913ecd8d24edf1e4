"""Loss by position inside a concept and by concept length (the paper's Figure 7 analysis), and ``dlcm analyze``.

    dlcm analyze --config <dlcm recipe> --ckpt_path <dlcm ckpt> \\
        --baseline-config <baseline recipe> --baseline-ckpt <baseline ckpt> --out analysis.json
    dlcm analyze --run runs/sweeps/x/dlcm --baseline-run runs/sweeps/x/baseline --out analysis.json

``--run`` takes a run directory of ``dlcm fit`` (or ``dlcm sweep``): the resolved recipe LightningCLI saved there
(``config.yaml``, which holds every command-line override) and its ``last.ckpt``.

A trained DLCM runs in inference mode (boundaries ``p ≥ 0.5``) over validation batches; every token's loss is put
in the bucket of its position within its concept and of its concept's length. Given a dense baseline trained on the
same data, its per-token losses on the *same* batches go into the same buckets (the DLCM's segmentation), which is
the paper's comparison: a U-shape where the concept model gains at concept starts and ends.

Convention: the loss of token ``x_t`` is the cross-entropy of predicting it, computed at position ``t − 1``; it is
credited to ``x_t``'s position (0 = the first token of a concept) and its concept's length. Document-initial tokens
are never predicted, so they contribute nothing. Worked example, one document, boundaries at tokens 0, 2 and 3:

    token t             0    1    2    3    4    5
    concept             0    0    1    2    2    2
    position in concept 0    1    0    0    1    2
    concept length      2    2    1    3    3    3
    loss credited       -    ℓ0   ℓ1   ℓ2   ℓ3   ℓ4      (ℓ_{t−1} = CE at position t−1 of predicting x_t)

so position 0 averages (ℓ1 + ℓ2)/2, position 1 (ℓ0 + ℓ3)/2, position 2 ℓ4; length 1 holds ℓ1, length 2 ℓ0, length 3
(ℓ2 + ℓ3 + ℓ4)/3. Positions at or beyond ``max_position`` share the last bucket, as lengths beyond ``max_length`` do.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning import Trainer
from lightning.pytorch.cli import LightningCLI

from dlcm.model.packing import PackedSeqs
from dlcm.model.pooling import concept_layout


def concept_positions(boundary_T: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: its position within its concept and the concept's length (``boundary_T`` marks concept starts,
    including every document start)."""
    layout = concept_layout(boundary_T, PackedSeqs.from_cu_seqlens(cu_seqlens, boundary_T.shape[0]))
    rows_T = torch.arange(boundary_T.shape[0], device=boundary_T.device)
    return rows_T - layout.start_C[layout.concept_id_T], layout.length_C[layout.concept_id_T]


@dataclass
class ConceptLossStats:
    """Summed nats and token counts per position-in-concept bucket and per concept-length bucket.

    Bucket ``i`` of ``by_position`` is position ``i`` (the last: ``≥ max_position``); bucket ``i`` of ``by_length``
    is length ``i + 1`` (the last: ``≥ max_length``).
    """

    max_position: int = 20
    max_length: int = 32
    nats_by_position: torch.Tensor = field(init=False)
    count_by_position: torch.Tensor = field(init=False)
    nats_by_length: torch.Tensor = field(init=False)
    count_by_length: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if self.max_position < 1 or self.max_length < 1:
            raise ValueError(f"max_position={self.max_position}, max_length={self.max_length}: both must be at least 1")
        self.nats_by_position = torch.zeros(self.max_position + 1, dtype=torch.float64)
        self.count_by_position = torch.zeros(self.max_position + 1, dtype=torch.int64)
        self.nats_by_length = torch.zeros(self.max_length, dtype=torch.float64)
        self.count_by_length = torch.zeros(self.max_length, dtype=torch.int64)

    def update(
        self, nats_T: torch.Tensor, has_target_T: torch.Tensor, boundary_T: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> None:
        """Add one packed batch: ``nats_T[t]`` is the CE of predicting token ``t + 1`` (valid where
        ``has_target_T``), ``boundary_T`` the concept starts used for the buckets."""
        position_T, length_T = concept_positions(boundary_T, cu_seqlens)
        # The prediction made at t is about token t + 1: credit it to that token's bucket. has_target_T is False at
        # every document's last token, so the wrap-around of roll never lands in a bucket.
        position_T = torch.roll(position_T, -1).clamp(max=self.max_position)
        length_T = torch.roll(length_T, -1).clamp(max=self.max_length) - 1
        keep_T = has_target_T.bool()
        nats = nats_T.detach().to(torch.float64)[keep_T].cpu()
        self.nats_by_position.index_add_(0, position_T[keep_T].cpu(), nats)
        self.count_by_position.index_add_(0, position_T[keep_T].cpu(), torch.ones_like(nats, dtype=torch.int64))
        self.nats_by_length.index_add_(0, length_T[keep_T].cpu(), nats)
        self.count_by_length.index_add_(0, length_T[keep_T].cpu(), torch.ones_like(nats, dtype=torch.int64))

    @staticmethod
    def _means(nats: torch.Tensor, count: torch.Tensor) -> list[float | None]:
        return [float(n / c) if c else None for n, c in zip(nats.tolist(), count.tolist(), strict=True)]

    def to_dict(self) -> dict[str, Any]:
        """Mean nats and token counts per bucket (``None`` for empty buckets), JSON-ready."""
        return {
            "max_position": self.max_position,
            "max_length": self.max_length,
            "position": list(range(self.max_position + 1)),
            "loss_by_position": self._means(self.nats_by_position, self.count_by_position),
            "tokens_by_position": self.count_by_position.tolist(),
            "length": list(range(1, self.max_length + 1)),
            "loss_by_length": self._means(self.nats_by_length, self.count_by_length),
            "tokens_by_length": self.count_by_length.tolist(),
            "mean_loss": float(self.nats_by_position.sum() / max(int(self.count_by_position.sum()), 1)),
        }


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def analyze(
    dlcm_module: Any,
    batches: Any,
    baseline_module: Any | None = None,
    max_position: int = 20,
    max_length: int = 32,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Accumulate per-position and per-length losses of a DLCM (and a baseline) over ``batches``.

    ``dlcm_module`` / ``baseline_module`` are ``dlcm.train.lightning_modules`` modules (their ``lm_terms`` give
    per-token CE); both run in eval mode, the DLCM with inference-mode boundaries, which bucket both.
    """
    device = torch.device(device)
    models = {"dlcm": dlcm_module} | ({"baseline": baseline_module} if baseline_module is not None else {})
    stats = {name: ConceptLossStats(max_position, max_length) for name in models}
    for module in models.values():
        module.to(device).eval()
    # bf16 on CUDA, as trained there; fp32 elsewhere (the reference path).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    tokens, n_batches = 0, 0
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        batch = _to_device(batch, device)
        with autocast:
            nats_T, has_target_T, out = dlcm_module.lm_terms(batch)
            boundary_T = out.parser.boundary_T
            stats["dlcm"].update(nats_T, has_target_T, boundary_T, batch["cu_seqlens"])
            if baseline_module is not None:
                base_nats_T, base_has_target_T, _ = baseline_module.lm_terms(batch)
                stats["baseline"].update(base_nats_T, base_has_target_T, boundary_T, batch["cu_seqlens"])
        tokens += int(batch["input_ids"].shape[0])
        n_batches += 1
    if n_batches == 0:
        raise ValueError("no validation batch to analyze")
    return {"batches": n_batches, "tokens": tokens} | {name: s.to_dict() for name, s in stats.items()}


def run_files(run_dir: str | Path, scratch: Path) -> tuple[str, str]:
    """(recipe, checkpoint) of a ``dlcm fit`` run directory: its saved ``config.yaml`` (minus the arguments only
    ``fit`` takes, written to ``scratch``) and its newest ``last.ckpt``."""
    import yaml

    run_dir = Path(run_dir)
    configs = sorted(run_dir.rglob("config.yaml"), key=lambda p: p.stat().st_mtime)
    ckpts = sorted(run_dir.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not configs or not ckpts:
        raise FileNotFoundError(f"{run_dir}: need a config.yaml and a last.ckpt below it (a dlcm fit run directory)")
    recipe = yaml.safe_load(configs[-1].read_text())
    # The saved file also holds the arguments of Trainer.fit that `fit` takes from the command line (ckpt_path,
    # weights_only); the CLI without a subcommand refuses them. Model and data are the CLI's own groups.
    fit_only = set(inspect.signature(Trainer.fit).parameters) - LightningCLI.subcommands()["fit"] - {"self"}
    for key in fit_only:
        recipe.pop(key, None)
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / f"{len(list(scratch.iterdir()))}-config.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path), str(ckpts[-1])


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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--out", type=Path, required=True, help="write the analysis JSON here")
    return p


def main(argv: list[str]) -> int:
    """Entry point of ``dlcm analyze``; returns the exit status (2 on bad input)."""

    parser = _parser()
    args = parser.parse_args(argv)
    by_files = bool(args.config) and bool(args.ckpt_path)
    if (args.run and (args.config or args.ckpt_path)) or not (args.run or by_files):
        parser.error("give the DLCM as --run DIR, or as --config RECIPE with --ckpt_path CKPT")
    if args.baseline_run and (args.baseline_config or args.baseline_ckpt):
        parser.error("give the baseline as --baseline-run DIR, or as --baseline-config with --baseline-ckpt")
    if bool(args.baseline_config) != bool(args.baseline_ckpt):
        parser.error("give --baseline-config and --baseline-ckpt together")
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
    from dlcm.train.restore import load_weights

    if args.run:
        config, args.ckpt_path = run_files(args.run, scratch)
        args.config = [config]
    if args.baseline_run:
        config, args.baseline_ckpt = run_files(args.baseline_run, scratch)
        args.baseline_config = [config]
    cli = _build(args.config)
    if not hasattr(cli.model.network, "parser"):
        raise ValueError(f"{args.run or args.config}: not a DLCM (its model has no parser)")
    load_weights(cli.model, args.ckpt_path)
    baseline = None
    if args.baseline_config:
        base_cli = _build(args.baseline_config)
        if base_cli.datamodule.manifest.tokenizer_sha256 != cli.datamodule.manifest.tokenizer_sha256:
            raise ValueError("the baseline's data has another tokenizer than the DLCM's: its losses would not align")
        load_weights(base_cli.model, args.baseline_ckpt)
        baseline = base_cli.model
    result = analyze(
        cli.model,
        cli.datamodule.val_dataloader(),
        baseline,
        args.max_position,
        args.max_length,
        args.device,
        args.batches,
    )
    sources = {"dlcm": args.run or {"config": args.config, "ckpt_path": args.ckpt_path}}
    if baseline is not None:
        sources["baseline"] = args.baseline_run or {"config": args.baseline_config, "ckpt_path": args.baseline_ckpt}
    return {"sources": sources, **result}, baseline
