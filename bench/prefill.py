"""Prefill latency: one ``extend`` of a batch of prompts through the incremental decoder (KV caches written, the
last token's logits), DLCM vs its FLOPs-matched dense baseline, at several prompt lengths and batch sizes.

Each (pair, model) builds a randomly initialised network in ``--dtype`` on ``--device``; for every prompt length
and batch a fresh decoder (caches sized to the prompt, not timed) prefills ``batch`` random prompts with
``decoder.extend(prompts, last_only=True)``. Times are medians over ``--iters`` runs after ``--warmup`` runs (CUDA
events on a GPU, which include the host's work between launches and the call's device→host reads; the wall clock
on a CPU). DLCM's boundaries are Bernoulli(1/R) draws, as in ``bench/decode.py``; the realised ratio is reported.
On CUDA the device→host synchronisations of one prefill are counted (DLCM reads its per-document concept counts
back once; the baseline never waits).

    python bench/prefill.py --out bench/results/prefill_h200.json       # on the GPU: both pairs, 512 and 4096
    python bench/prefill.py --device cpu --pairs tiny --prompt-len 32 64 --batch 1 4 --dtype float32
    python bench/table.py bench/results/prefill_h200.json
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from typing import Any

import torch
from decode import DTYPES, PAIRS, Timer, add_model_arguments, boundaries_at_ratio, run_pairs  # the decode bench's pairs
from report import run_meta  # bench/report.py (this script's folder is on sys.path)

from dlcm.infer.generation import DLCMDecoder, incremental_decoder
from dlcm.model.dlcm import DLCM
from dlcm.model.presets import build_model


def prefill_once(model, prompts_BP: torch.Tensor) -> tuple[float, int]:
    """Milliseconds of one prefill into a fresh decoder, and the concepts it started (0 for the baseline)."""
    decoder = incremental_decoder(model, prompts_BP.shape[0], prompts_BP.shape[1])
    with Timer(prompts_BP.device) as timer:
        decoder.extend(prompts_BP, last_only=True)
    return timer.ms, sum(decoder.num_concepts) if isinstance(decoder, DLCMDecoder) else 0


def syncs_per_prefill(model, prompts_BP: torch.Tensor) -> int | None:
    """Device→host synchronisations of one prefill, counted by CUDA's sync debug mode."""
    if prompts_BP.device.type != "cuda":
        return None
    decoder = incremental_decoder(model, prompts_BP.shape[0], prompts_BP.shape[1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            decoder.extend(prompts_BP, last_only=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


@torch.no_grad()
def bench_model(name: str, config, args, device: torch.device) -> list[dict[str, Any]]:
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = build_model(config)
    model = model.to(DTYPES[args.dtype]).eval()
    is_dlcm = isinstance(model, DLCM)
    if is_dlcm:
        boundaries_at_ratio(model)
    records = []
    for prompt_len in args.prompt_len:
        for batch in args.batch:
            prompts_BP = torch.randint(0, config.vocab_size, (batch, prompt_len), device=device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            runs = [prefill_once(model, prompts_BP) for _ in range(args.warmup + args.iters)][args.warmup :]
            record = {
                "model": name,
                "family": "dlcm" if is_dlcm else "baseline",
                "params": sum(p.numel() for p in model.parameters()),
                "prompt_len": prompt_len,
                "batch": batch,
                "prefill_ms": statistics.median(ms for ms, _ in runs),
                "prefill_ms_runs": [ms for ms, _ in runs],
                "host_syncs": syncs_per_prefill(model, prompts_BP),
                "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            }
            if is_dlcm:
                record["target_ratio"] = config.parser.target_ratio
                record["realised_ratio"] = batch * prompt_len / statistics.median(c for _, c in runs)
            records.append(record)
            print(f"{name:<50} prompt {prompt_len:>5} batch {batch:>3}: {record['prefill_ms']:.1f} ms", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del model
    return records


def markdown_table(data: dict[str, Any]) -> str:
    """Per pair, prompt length and batch: both models' prefill ms and DLCM / baseline time."""
    meta = data["meta"]
    lines = [
        f"`{meta['command']}` — {meta['device']}, torch {meta['torch']}, {meta['dtype']}, commit "
        f"{str(meta['commit'])[:10]}, median of {meta['iters']} after {meta['warmup']} warm-up\n",
        "| pair | prompt | batch | baseline ms | DLCM ms | DLCM / baseline | DLCM realised R | host syncs "
        "(baseline / DLCM) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["pair"], r["prompt_len"], r["batch"], r["family"]): r for r in data["records"]}
    for pair, prompt_len, batch, family in by_key:
        if family != "dlcm" or (pair, prompt_len, batch, "baseline") not in by_key:
            continue
        base, dlcm = by_key[(pair, prompt_len, batch, "baseline")], by_key[(pair, prompt_len, batch, "dlcm")]
        syncs = " / ".join("-" if r["host_syncs"] is None else str(r["host_syncs"]) for r in (base, dlcm))
        lines.append(
            f"| {pair} | {prompt_len} | {batch} | {base['prefill_ms']:.1f} | {dlcm['prefill_ms']:.1f} "
            f"| {dlcm['prefill_ms'] / base['prefill_ms']:.2f}× | {dlcm['realised_ratio']:.2f} | {syncs} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["small", "paper"], choices=sorted(PAIRS))
    parser.add_argument("--prompt-len", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    add_model_arguments(parser)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if min(args.prompt_len) < 1 or min(args.batch) < 1 or args.iters < 1:
        parser.error("--prompt-len, --batch and --iters must be positive")
    device = torch.device(args.device)
    meta = {"benchmark": "prefill", **run_meta(device), **{k: getattr(args, k) for k in ("dtype", "warmup", "iters")}}
    print(markdown_table(run_pairs(args, meta, device, bench_model)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
