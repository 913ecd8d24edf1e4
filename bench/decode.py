"""Decode throughput (docs/design.md): generated tokens/s of DLCM vs its FLOPs-matched dense baseline, batched
incremental decoding (:mod:`dlcm.infer.generation`) at batch 1 and 32.

Each (pair, model, batch) builds a randomly initialised network in ``--dtype`` on ``--device``, prefills ``batch``
prompts of ``--prompt-len`` random tokens, then decodes ``--new-tokens`` tokens per prompt one step at a time
(sampling at temperature 1 on the device, so no step reads a token back). The prefill also draws the first token;
each decode step is one ``decoder.step`` of the newest tokens (CUDA-graph replays unless ``--cuda-graphs off``) and
one draw. Untimed steps first let the graphs be captured (DLCM's backbone phase is captured at its second concept
completion). Times are medians over ``--iters`` runs after ``--warmup`` runs (CUDA events on a GPU, the wall clock
on a CPU); throughput is ``batch · new_tokens`` over the decode time.

A freshly initialised parser does not compress at the target ratio R, and decode cost depends on how often a concept
completes (each completion is a backbone step). The parser's probabilities are therefore replaced by Bernoulli(1/R)
draws thresholded as usual (its projections still run); the realised ratios of the prompts and of the generated
tokens are reported. Also reported: prefill time, peak memory, inference FLOPs per token at the mean decode
position (:func:`dlcm.model.flops.inference_flops_per_token`) and, on CUDA, the host synchronisations of one decode step
(DLCM reads the step's boundary decisions back once; the baseline never waits).

    python bench/decode.py --out bench/results/decode_h200.json          # on the H200: paper and small pairs
    python bench/decode.py --device cpu --pairs tiny --prompt-len 32 --new-tokens 8 --batch 1 4 --dtype float32
    python bench/table.py bench/results/decode_h200.json                 # markdown table for docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from report import run_meta, write_json  # bench/report.py (this script's folder is on sys.path)

from dlcm.infer.generation import DLCMDecoder, incremental_decoder, sample_tokens
from dlcm.infer.recipe import load_recipe
from dlcm.model.config import BaselineConfig, DLCMConfig
from dlcm.model.dlcm import DLCM
from dlcm.model.flops import inference_flops_per_token
from dlcm.model.presets import DEEPSEEK_V3_VOCAB, build_model
from dlcm.research.flops_report import load_preset

ROOT = Path(__file__).resolve().parents[1]
# (baseline, DLCM): presets or recipe files; the recipes' vocabulary comes from --vocab-size.
PAIRS = {
    "paper": ("baseline_1.3b", "dlcm_2.3b"),
    "small": ("recipes/baseline_small_defaultcorpus_h200.yaml", "recipes/dlcm_small_r4_defaultcorpus_h200.yaml"),
    "tiny": ("tiny_baseline", "tiny_dlcm"),
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
SETTLE_STEPS = 64  # untimed steps allowed for warm-up and CUDA-graph capture (DLCM's backbone phase needs 2 concepts)


def model_config(name: str, vocab_size: int) -> BaselineConfig | DLCMConfig:
    if name.endswith(".yaml"):
        return load_recipe(ROOT / name, vocab_size).config
    return load_preset(name, None if name.startswith("tiny") else vocab_size).config


def boundaries_at_ratio(model: DLCM) -> None:
    """Make the parser's ``p`` a Bernoulli(1/R) draw (1 or 0) after computing it. The draws come from the default
    generator (seeded by the caller), which CUDA graphs capture and advance on every replay."""
    compute, rate = model.parser.neighbour_prob, 1.0 / model.cfg.parser.target_ratio

    def at_ratio(prev_q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        prob = compute(prev_q, k)
        return (torch.rand(prob.shape, device=prob.device) < rate).to(prob.dtype)

    model.parser.neighbour_prob = at_ratio


class Timer:
    """Elapsed milliseconds of a block: CUDA events on a GPU (they include host gaps between launches), else the
    wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Timer:
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def settle_steps(decoder, token_B: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Untimed steps until the decoder's CUDA graphs are captured (at most ``SETTLE_STEPS``); the last draw and the
    number of steps."""
    steps = 0
    while not decoder.steps_settled and steps < SETTLE_STEPS:
        token_B = sample_tokens(decoder.step(token_B), 1.0, generator=generator)
        steps += 1
    return token_B, steps


def run_once(
    model, prompts_BP: torch.Tensor, new_tokens: int, generator: torch.Generator, cuda_graphs: bool
) -> dict[str, Any]:
    """Prefill (and draw the first token), untimed steps until the decoder's CUDA graphs are captured (at most
    ``SETTLE_STEPS``), then ``new_tokens`` timed decode steps of one forward and one draw each."""
    b, p = prompts_BP.shape
    decoder = incremental_decoder(model, b, p + SETTLE_STEPS + new_tokens + 1, cuda_graphs)
    counts = isinstance(decoder, DLCMDecoder)  # the baseline has no concepts
    with Timer(prompts_BP.device) as prefill:
        token_B = sample_tokens(decoder.extend(prompts_BP, last_only=True), temperature=1.0, generator=generator)
    concepts_prompt = sum(decoder.num_concepts) if counts else 0
    token_B, settle = settle_steps(decoder, token_B, generator)
    concepts_settled = sum(decoder.num_concepts) if counts else 0
    with Timer(prompts_BP.device) as decode:
        for _ in range(new_tokens):
            token_B = sample_tokens(decoder.step(token_B), 1.0, generator=generator)
    return {
        "prefill_ms": prefill.ms,
        "decode_ms": decode.ms,
        "settle_steps": settle,
        "concepts_prompt": concepts_prompt,
        "concepts_decode": sum(decoder.num_concepts) - concepts_settled if counts else 0,  # opened while timed
    }


def syncs_per_step(model, prompts_BP: torch.Tensor, generator: torch.Generator, cuda_graphs: bool) -> int | None:
    """Host synchronisations of one settled decode step (sampling included), counted by CUDA's sync debug mode."""
    if prompts_BP.device.type != "cuda":
        return None
    decoder = incremental_decoder(model, prompts_BP.shape[0], prompts_BP.shape[1] + SETTLE_STEPS + 2, cuda_graphs)
    token_B = sample_tokens(decoder.extend(prompts_BP, last_only=True), temperature=1.0, generator=generator)
    token_B, _ = settle_steps(decoder, token_B, generator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sample_tokens(decoder.step(token_B), temperature=1.0, generator=generator)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def bench_model(name: str, config, args, device: torch.device) -> list[dict[str, Any]]:
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = build_model(config)
    model = model.to(DTYPES[args.dtype]).eval()
    params = sum(p.numel() for p in model.parameters())
    is_dlcm = isinstance(model, DLCM)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if is_dlcm:
        boundaries_at_ratio(model)
    position = args.prompt_len + args.new_tokens // 2
    ratio = config.parser.target_ratio if is_dlcm else None
    flops = inference_flops_per_token(config, position, ratio).total
    records = []
    for batch in args.batch:
        prompts_BP = torch.randint(0, config.vocab_size, (batch, args.prompt_len), device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            runs = [
                run_once(model, prompts_BP, args.new_tokens, generator, args.cuda_graphs == "on")
                for _ in range(args.warmup + args.iters)
            ]
            syncs = syncs_per_step(model, prompts_BP, generator, args.cuda_graphs == "on")
        runs = runs[args.warmup :]
        decode_ms = statistics.median(r["decode_ms"] for r in runs)
        generated = batch * args.new_tokens
        record = {
            "model": name,
            "family": "dlcm" if is_dlcm else "baseline",
            "params": params,
            "batch": batch,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "decode_tokens_per_s": generated / (decode_ms / 1e3),
            "decode_ms_per_step": decode_ms / args.new_tokens,
            "prefill_ms": statistics.median(r["prefill_ms"] for r in runs),
            "decode_ms_runs": [r["decode_ms"] for r in runs],
            "settle_steps": max(r["settle_steps"] for r in runs),
            "flops_per_token": flops,
            "host_syncs_per_step": syncs,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }
        if is_dlcm:
            record["target_ratio"] = config.parser.target_ratio
            record["realised_ratio_prompt"] = (
                batch * args.prompt_len / statistics.median(r["concepts_prompt"] for r in runs)
            )
            completed = statistics.median(r["concepts_decode"] for r in runs)
            record["realised_ratio_decode"] = generated / completed if completed else float("inf")
        records.append(record)
        print(
            f"{name:<50} batch {batch:>3}: {record['decode_tokens_per_s']:>10.1f} tokens/s "
            f"({record['decode_ms_per_step']:.2f} ms/step), prefill {record['prefill_ms']:.1f} ms"
            + (f", ratio {record['realised_ratio_decode']:.2f}" if is_dlcm else ""),
            flush=True,
        )
    del model
    return records


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Precision, device, vocabulary, timing and seed options shared by the decode and prefill benchmarks."""
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab-size", type=int, default=DEEPSEEK_V3_VOCAB, help="vocabulary of the non-tiny pairs")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)


def run_pairs(args: Any, meta: dict[str, Any], device: torch.device, bench: Any) -> dict[str, Any]:
    """``bench(name, config, args, device)`` over every model of ``args.pairs``, with the peak GPU memory of each
    model's sweep; the JSON is rewritten after each model, so a run stopped early keeps what it measured."""
    records, cuda = [], device.type == "cuda"
    for pair in args.pairs:
        for name in PAIRS[pair]:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            measured = bench(name, model_config(name, args.vocab_size), args, device)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None  # the model's whole sweep
            records += [{"pair": pair, **record, "peak_memory_gib": peak} for record in measured]
            if args.out:
                write_json(args.out, {"meta": meta, "records": records})
    return {"meta": meta, "records": records}


def _si(value: float) -> str:
    """3 significant digits with a k/M/G suffix."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def markdown_table(data: dict[str, Any]) -> str:
    """The results as a markdown table: per pair and batch, both models and DLCM/baseline throughput."""
    meta = data["meta"]
    lines = [
        f"`{meta['command']}` — {meta['device']}, torch {meta['torch']}, {meta['dtype']}, prompt {meta['prompt_len']}"
        f" tokens, {meta['new_tokens']} generated per prompt (sampled, T = 1), median of {meta['iters']} after "
        f"{meta['warmup']} warm-up, CUDA graphs {meta.get('cuda_graphs', 'off')}\n",
        "| pair | batch | model | params | FLOPs/token | realised R (prompt / decode) | prefill ms | ms/step "
        "| tokens/s | DLCM / baseline | host syncs/step |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["pair"], r["batch"], r["family"]): r for r in data["records"]}
    for r in data["records"]:
        base = by_key.get((r["pair"], r["batch"], "baseline"))
        speedup = f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}×" if base and r is not base else "-"
        ratio = (
            f"{r['realised_ratio_prompt']:.2f} / {r['realised_ratio_decode']:.2f} (R = {r['target_ratio']:g})"
            if r["family"] == "dlcm"
            else "-"
        )
        syncs = "-" if r["host_syncs_per_step"] is None else str(r["host_syncs_per_step"])
        model = r["model"].removeprefix("recipes/").removesuffix(".yaml")  # a preset name or a recipe file
        lines.append(
            f"| {r['pair']} | {r['batch']} | {model} | {_si(r['params'])} "
            f"| {_si(r['flops_per_token'])} | {ratio} | {r['prefill_ms']:.1f} | {r['decode_ms_per_step']:.2f} "
            f"| {r['decode_tokens_per_s']:.0f} | {speedup} | {syncs} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["small", "paper"], choices=sorted(PAIRS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    add_model_arguments(parser)
    parser.add_argument("--cuda-graphs", default="on", choices=["on", "off"], help="replay decode steps as graphs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.new_tokens < 1 or args.prompt_len < 1:
        parser.error("--prompt-len and --new-tokens must be positive")
    device = torch.device(args.device)
    meta = {
        "benchmark": "decode",
        **run_meta(device),
        **{
            k: getattr(args, k) for k in ("dtype", "prompt_len", "new_tokens", "warmup", "iters", "seed", "cuda_graphs")
        },
    }
    print(markdown_table(run_pairs(args, meta, device, bench_model)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
