"""``dlcm eval``: zero-shot accuracy of a trained checkpoint on local benchmark files.

Example::

    dlcm eval --ckpt_path runs/…/last.ckpt \\
        --tasks arc_easy,piqa,lambada_openai --data-dir /path/to/eval --limit 500 --out results.json \\
        --tensorboard runs/…/tensorboard

``--ckpt_path`` is a checkpoint or an exported folder, loaded with its own config, tokenizer and context length
(:func:`dlcm.load`). ``--config`` alone evaluates a recipe's initial weights; with a checkpoint it is needed only for
format version 0, and must then be the recipe (and data section, which names the tokenizer) it was trained with.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dlcm.eval.provenance import file_record, package_versions, source_commit
from dlcm.eval.tasks import TASKS, load_task, task_path
from dlcm.infer.device import torch_device

# What each metric of the results means (stored in the results JSON, so nobody has to guess which acc_norm it is).
METRIC_DEFINITIONS = {
    "acc": "argmax over options of the summed log-likelihood of the continuation",
    "acc_norm_bytes": "argmax of log-likelihood / UTF-8 bytes of the continuation as scored (' ' + ending)",
    "acc_norm_chars": "argmax of log-likelihood / characters of the ending (lm-evaluation-harness's acc_norm)",
    "ppl": "exp(-mean per-example log-likelihood of the target) (cloze tasks)",
    "*_stderr": "binomial standard error sqrt(p(1-p)/n)",
    "n": "items evaluated",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlcm eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", help="recipe YAML: initial weights, or a format version 0 checkpoint's")
    p.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", help="checkpoint or exported folder")
    p.add_argument("--tasks", required=True, help=f"comma-separated, from: {', '.join(sorted(TASKS))}")
    p.add_argument("--data-dir", required=True, help="directory holding <task>.jsonl (ceval/cmmlu: also .csv or dir)")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task (default: all)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="packed tokens per forward pass")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument(
        "--tensorboard", default=None, metavar="DIR", help="also log a results table and per-metric scalars here"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


COLUMNS = ("acc", "acc_norm_bytes", "acc_norm_chars")


def _cells(r: dict[str, float]) -> list[str]:
    """acc, acc_norm_bytes, acc_norm_chars (± stderr) and ppl of one task, "-" where the task has no such metric."""
    cells = [f"{r[m]:.4f} ± {r[f'{m}_stderr']:.4f}" if m in r else "-" for m in COLUMNS]
    return [*cells, f"{r['ppl']:.2f}" if "ppl" in r else "-"]


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Plain-text table of every task's metrics (value ± standard error)."""
    lines = [f"{'task':<16} {'n':>6}  " + "  ".join(f"{c:>16}" for c in COLUMNS) + f"  {'ppl':>10}"]
    for task, r in results.items():
        *accs, ppl = _cells(r)
        lines.append(f"{task:<16} {r['n']:>6}  " + "  ".join(f"{c:>16}" for c in accs) + f"  {ppl:>10}")
    return "\n".join(lines)


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """The results as a markdown table (TensorBoard's text tab renders markdown); missing metrics show as "-"."""
    header = ["task", "n", *COLUMNS, "ppl"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for task, r in results.items():
        lines.append(f"| {task} | {int(r['n'])} | " + " | ".join(_cells(r)) + " |")
    return "\n".join(lines)


def provenance(args: argparse.Namespace, tasks: list[str], step: int) -> dict[str, Any]:
    """Where the results come from: command, checkpoint, recipes, task files (with SHA-256), code and versions."""
    return {
        "command": " ".join(["dlcm", "eval", *sys.argv[2:]]) if sys.argv[1:2] == ["eval"] else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": {**file_record(args.ckpt_path), "global_step": step} if args.ckpt_path else None,
        "recipes": [file_record(c) for c in args.config or []],
        "tasks": {t: file_record(task_path(t, args.data_dir)) for t in tasks},
        "limit": args.limit,
        "device": args.device,
        "commit": source_commit(),
        "versions": package_versions(),
    }


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


def write_json_atomically(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file, so an interrupted write leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    """Run ``dlcm eval``; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        parser.error(f"--tasks={args.tasks!r} names no task: comma-separated, from {', '.join(sorted(TASKS))}")
    # Load every task before building the model, so a typo or a malformed file fails in seconds.
    examples = {t: load_task(t, args.data_dir, args.limit) for t in tasks}

    from dlcm.eval.scoring import evaluate_examples
    from dlcm.infer.load import load_for_command

    args.device = torch_device(args.device)
    model = load_for_command(args.config, args.ckpt_path, args.device)
    step = int(model.record.get("global_step") or 0)
    network, tokenizer = model.network, model.tokenizer
    results: dict[str, dict[str, float]] = {}
    for task, items in examples.items():
        start = time.perf_counter()
        results[task] = evaluate_examples(
            network, tokenizer, items, model.context_length, args.batch_tokens, progress=not args.no_progress
        )
        print(f"{task}: {len(items)} items in {time.perf_counter() - start:.1f} s")
    print(format_table(results))
    if args.out:
        record = {
            "tasks": results,
            "metric_definitions": METRIC_DEFINITIONS,
            "provenance": provenance(args, tasks, step),
        }
        write_json_atomically(args.out, record)
    if args.tensorboard:
        write_tensorboard(results, args.tensorboard, step)
    return 0
