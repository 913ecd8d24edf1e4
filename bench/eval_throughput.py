"""Evaluation speed: items per second of ``dlcm eval``'s scoring, DLCM vs its FLOPs-matched baseline, on one task
file.

Each recipe is built exactly as ``dlcm eval`` builds it (the training CLI: model and tokenizer of the recipe's data
section), at initialisation weights, in ``--dtype`` on ``--device``. DLCM's boundaries are Bernoulli(1/R) draws, as
in ``bench/decode.py`` (an untrained parser does not compress at R). One untimed pass over the first
``--warmup-items`` items, then ``--iters`` timed passes of ``evaluate_examples`` over the task's first ``--limit``
items (``bench/decode.py``'s timer: CUDA events, which include the host's work such as tokenisation, as a user waits
for it; the wall clock on a CPU).

    python bench/eval_throughput.py --data-dir /path/to/eval --task piqa --out bench/results/eval_throughput_h200.json
    python bench/eval_throughput.py --data-dir tests/fixtures/eval --task piqa --device cpu --limit 8 \\
        --recipes recipes/baseline_tiny_defaultcorpus_cpu.yaml recipes/dlcm_tiny_r4_defaultcorpus_cpu.yaml
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import torch
from decode import DTYPES, Timer, boundaries_at_ratio  # the decode bench's timer and Bernoulli(1/R) boundaries
from report import run_meta, write_json  # bench/report.py (this script's folder is on sys.path)

from dlcm.eval.scoring import evaluate_examples
from dlcm.eval.tasks import TASKS, Example, load_task
from dlcm.infer.load import load_with_recipe
from dlcm.model.dlcm import DLCM

SMALL_PAIR = ["recipes/baseline_small_defaultcorpus_h200.yaml", "recipes/dlcm_small_r4_defaultcorpus_h200.yaml"]


def bench_recipe(recipe: str, items: list[Example], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Items per second of one recipe's model on the task's items."""
    torch.manual_seed(args.seed)
    model = load_with_recipe(recipe, None, device, DTYPES[args.dtype])  # the recipe's initial weights
    network, tokenizer = model.network, model.tokenizer
    is_dlcm = isinstance(network, DLCM)
    if is_dlcm:
        boundaries_at_ratio(network)
    evaluate_examples(network, tokenizer, items[: args.warmup_items], model.context_length, args.batch_tokens)
    seconds = []
    for _ in range(args.iters):
        with Timer(device) as timer:
            evaluate_examples(network, tokenizer, items, model.context_length, args.batch_tokens)
        seconds.append(timer.ms / 1e3)
    median = statistics.median(seconds)
    record = {
        "recipe": recipe,
        "family": "dlcm" if is_dlcm else "baseline",
        "params": sum(p.numel() for p in network.parameters()),
        "task": args.task,
        "items": len(items),
        "seconds": median,
        "seconds_runs": seconds,
        "items_per_s": len(items) / median,
    }
    if is_dlcm:
        record["target_ratio"] = network.cfg.parser.target_ratio
    print(f"{recipe}: {len(items)} items in {record['seconds']:.2f} s, {record['items_per_s']:.1f} items/s", flush=True)
    del model, network
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def markdown_table(data: dict[str, Any]) -> str:
    meta, records = data["meta"], data["records"]
    lines = [
        f"`{meta['command']}` — {meta['device']}, torch {meta['torch']}, {meta['dtype']}, commit "
        f"{str(meta['commit'])[:10]}, median of {meta['iters']}\n",
        "| recipe | task | items | s | items/s | / baseline |",
        "|---|---|---:|---:|---:|---:|",
    ]
    base = next((r for r in records if r["family"] == "baseline"), None)
    for r in records:
        ratio = f"{r['items_per_s'] / base['items_per_s']:.2f}×" if base and r is not base else "-"
        lines.append(
            f"| {r['recipe']} | {r['task']} | {r['items']} | {r['seconds']:.2f} | {r['items_per_s']:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=SMALL_PAIR, help="baseline recipe first, then DLCM")
    parser.add_argument("--task", default="piqa", choices=sorted(TASKS))
    parser.add_argument("--data-dir", required=True, help="directory holding <task>.jsonl")
    parser.add_argument("--limit", type=int, default=1000, help="first N items of the task")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="packed tokens per forward, as dlcm eval")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dlcm eval runs float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup-items", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.limit < 1 or args.iters < 1 or args.warmup_items < 1:
        parser.error("--limit, --iters and --warmup-items must be positive")
    device = torch.device(args.device)
    meta = {
        "benchmark": "eval_throughput",
        **run_meta(device),
        **{k: getattr(args, k) for k in ("task", "limit", "batch_tokens", "dtype", "iters")},
    }
    items = load_task(args.task, args.data_dir, args.limit)
    records: list[dict[str, Any]] = []
    for recipe in args.recipes:
        records.append(bench_recipe(recipe, items, args, device))
        if args.out:
            write_json(args.out, {"meta": meta, "records": records})
    print(markdown_table({"meta": meta, "records": records}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
