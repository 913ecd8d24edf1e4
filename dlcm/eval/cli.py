"""``dlcm eval``: zero-shot accuracy of a trained checkpoint on local benchmark files.

Example::

    dlcm eval --config recipes/dlcm_tiny_r4_defaultcorpus_cpu.yaml --ckpt_path runs/…/last.ckpt \\
        --tasks arc_easy,piqa,lambada_openai --data-dir /path/to/eval --limit 500 --out results.json \\
        --tensorboard runs/…/tensorboard

The recipe (and its data section, which names the tokenizer) must be the one the checkpoint was trained with: the
model is rebuilt through the training CLI, so vocabulary size and context length come out exactly as in training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dlcm.eval.scoring import evaluate_examples
from dlcm.eval.tasks import TASKS, load_task
from dlcm.train.restore import build_from_recipe, load_weights


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlcm eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", required=True, help="recipe YAML (repeatable, composes in order)")
    p.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", help="Lightning checkpoint; omit for init weights")
    p.add_argument("--tasks", required=True, help=f"comma-separated, from: {', '.join(sorted(TASKS))}")
    p.add_argument("--data-dir", required=True, help="directory holding <task>.jsonl (ceval/cmmlu: also .csv or dir)")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task (default: all)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="packed tokens per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument(
        "--tensorboard", default=None, metavar="DIR", help="also log a results table and per-metric scalars here"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _cells(r: dict[str, float]) -> tuple[str, str, str]:
    """acc ± stderr, acc_norm ± stderr and ppl of one task, "-" where the task has no such metric."""
    acc = f"{r['acc']:.4f} ± {r['acc_stderr']:.4f}"
    norm = f"{r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}" if "acc_norm" in r else "-"
    ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"
    return acc, norm, ppl


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Plain-text table of every task's metrics (value ± standard error)."""
    lines = [f"{'task':<16} {'n':>6}  {'acc':>16}  {'acc_norm':>16}  {'ppl':>10}"]
    for task, r in results.items():
        acc, norm, ppl = _cells(r)
        lines.append(f"{task:<16} {r['n']:>6}  {acc:>16}  {norm:>16}  {ppl:>10}")
    return "\n".join(lines)


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """The results as a markdown table (TensorBoard's text tab renders markdown); missing metrics show as "-"."""
    lines = ["| task | n | acc | acc_norm | ppl |", "|---|---:|---:|---:|---:|"]
    for task, r in results.items():
        acc, norm, ppl = _cells(r)
        lines.append(f"| {task} | {int(r['n'])} | {acc} | {norm} | {ppl} |")
    return "\n".join(lines)


def write_tensorboard(results: dict[str, dict[str, float]], log_dir: str | Path, step: int = 0) -> None:
    """Log ``eval/results`` (markdown table) and one scalar ``eval/<task>/<metric>`` per metric at ``step``."""
    from torch.utils.tensorboard import SummaryWriter  # imported here: only this option needs tensorboard

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        writer.add_text("eval/results", markdown_table(results), step)
        for task, r in results.items():
            for metric, value in r.items():
                if metric != "n":  # the item count is in the table; as a curve it says nothing
                    writer.add_scalar(f"eval/{task}/{metric}", value, step)
    finally:
        writer.close()


def main(argv: list[str]) -> int:
    """Run ``dlcm eval``; returns the process exit code."""
    args = _parser().parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    # Load every task before building the model, so a typo or a malformed file fails in seconds.
    examples = {t: load_task(t, args.data_dir, args.limit) for t in tasks}
    module, tokenizer = build_from_recipe(args.config)
    step = load_weights(module, args.ckpt_path) if args.ckpt_path else 0
    network = module.network.to(args.device)
    results: dict[str, dict[str, float]] = {}
    for task, items in examples.items():
        start = time.perf_counter()
        results[task] = evaluate_examples(
            network, tokenizer, items, module.context_length, args.batch_tokens, progress=not args.no_progress
        )
        print(f"{task}: {len(items)} items in {time.perf_counter() - start:.1f} s")
    print(format_table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if args.tensorboard:
        write_tensorboard(results, args.tensorboard, step)
    return 0
