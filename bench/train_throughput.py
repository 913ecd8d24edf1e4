"""End-to-end training throughput on one GPU: tokens/s, MFU and peak memory of the dense
baseline and DLCM at matched inference FLOPs, and where DLCM's extra time goes.

Each configuration runs training micro-batches — forward, CE (+ λ·L_aux for DLCM), backward — on packed
micro-batches of ``--tokens-per-step`` random tokens in documents of ``--context`` tokens (every context given is
run, in one JSON: the paper recipes train at 2048), and a fused AdamW step after each, timed separately with CUDA
events after warm-up (which includes compilation). The reported step time is the micro-batch's plus the optimizer
step's share at ``--accumulate`` micro-batches per optimizer step: 32 is the single-node paper recipes' (4M tokens
per step = 16,384 × 32 × 8 GPUs), where the optimizer costs the 2.3B DLCM under 1 ms per micro-batch; the time
with an optimizer step after every micro-batch is reported too. Precision is Lightning's ``bf16-mixed`` (fp32
master weights, bf16 autocast) unless ``--precision bf16-true``. The loss is the Lightning module's: the head's
chunked linear cross-entropy (``--loss logits`` materialises the ``[T, V]`` logits and takes an fp32 CE of them,
compiled with the blocks, for an A/B). DLCM's parser runs as in training, but its sampled boundaries are replaced
by Bernoulli(1/R) draws: a freshly initialised parser does not compress at R, and throughput depends on the
concept count (the realised ratio is reported). ``--fp32-matmul`` is ``execution.fp32_matmul_precision`` (the
paper recipes' ``high`` by default).

MFU = model FLOPs / time / peak, with :mod:`dlcm.model.flops`'s training count (3 × forward matmul and attention FLOPs,
no causal discount: ``(6·N + 12·layers·width·seq)·tokens`` for the baseline, N counting every matmul weight
including the head) against the dense bf16 peak (989 TFLOP/s on an H200) and against a bf16 GEMM measured in the
same run. The DLCM breakdown (eager configurations only: a module compiled in place, such as Ψ's block, runs its
hooks inside the compiled graph) times each top-level module's forward and backward with CUDA events from module
hooks in one extra micro-batch; "other" is the remainder (concept layout and its host sync, ratio loss, CE).
``--profile`` adds one profiled step: GPU time per kernel family (GEMM, attention forward/backward, generated
Triton kernels, optimizer, copies), the top kernels and the longest stretches where no kernel ran.

Run on a CUDA machine, e.g.::

    python bench/train_throughput.py --pairs paper --compile on --context 2048 8192 --profile \
        --out bench/results/train_throughput_paper_h200.json
    python bench/table.py bench/results/train_throughput_paper_h200.json

``--device cpu`` runs the same steps on the CPU (the tiny pair, for a smoke test; no profile or breakdown).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import PAIRS, Timer, model_config  # the same model pairs as the decode benchmark
from report import run_meta, write_json

from dlcm.model.attention_backends import BACKENDS
from dlcm.model.dlcm import DLCM
from dlcm.model.flops import model_flops
from dlcm.model.loss import IGNORE_INDEX, next_token_targets
from dlcm.model.presets import DEEPSEEK_V3_VOCAB, build_model
from dlcm.train.execution import ExecutionConfig, apply_execution, compiled_graphs

H200_BF16_PEAK = 989e12


def force_ratio(model: DLCM) -> None:
    """Replace the parser's sampled boundaries by Bernoulli(1/R) draws (document starts kept)."""
    forward, rate = model.parser.forward, 1.0 / model.cfg.parser.target_ratio

    def at_ratio(h_TD, seqs, sample, generator=None, estimate_threshold=False):
        out = forward(h_TD, seqs, sample, generator, estimate_threshold)
        draw_T = torch.rand(out.boundary_T.shape, device=h_TD.device) < rate
        return dataclasses.replace(out, boundary_T=draw_T | (seqs.position == 0))

    model.parser.forward = at_ratio


def gemm_peak(device: torch.device, iters: int = 20) -> float:
    """FLOP/s of a square bf16 GEMM (8192 on a GPU, 512 on a CPU)."""
    n = 8192 if device.type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    with Timer(device) as timer:
        for _ in range(iters):
            a @ b
    return 2 * n**3 * iters / (timer.ms / 1e3)


class Batch:
    """A packed micro-batch of ``docs`` documents of ``context`` random tokens, fresh every step."""

    def __init__(self, vocab: int, docs: int, context: int, device: torch.device) -> None:
        self.vocab, self.docs, self.context, self.device = vocab, docs, context, device
        self.cu = torch.arange(docs + 1, device=device, dtype=torch.int32) * context

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids_T = torch.randint(0, self.vocab, (self.docs * self.context,), device=self.device)
        return ids_T, next_token_targets(ids_T, self.cu)


def logits_nats(compiled: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The unfused CE of ``--loss logits``: fp32 CE of materialised ``[T, V]`` logits (compiled with the blocks)."""

    def nats(logits_TV: torch.Tensor, targets_T: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_TV.float(), targets_T, ignore_index=IGNORE_INDEX, reduction="sum")

    return torch.compile(nats) if compiled else nats


def micro_batch(model, batch: Batch, autocast: bool, unfused_ce: Callable | None) -> tuple[int, torch.Tensor | None]:
    """Forward and backward of one micro-batch (the loss as the Lightning module computes it); returns the concept
    count (0 for the baseline) and the parser's τ estimate (None for the baseline or a fixed τ). ``unfused_ce``:
    the ``--loss logits`` CE, else the head's fused one."""
    ids_T, targets_T = batch.next()
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=autocast):
        fused = None if unfused_ce is not None else targets_T
        out = model(ids_T, batch.cu, batch.context, targets_T=fused)
        dlcm = isinstance(model, DLCM)
        if unfused_ce is not None:
            total = unfused_ce(out.logits_TV if dlcm else out, targets_T)
        else:
            total = out.lm_loss.total if dlcm else out.total
        loss = total / (targets_T != IGNORE_INDEX).sum()
        if dlcm:
            loss = loss + model.cfg.parser.aux_weight * out.aux_loss
    loss.backward()
    return (out.layout.num_concepts, out.parser.threshold_estimate) if dlcm else (0, None)


def optimizer_step(model, optimizer, estimates: list[torch.Tensor | None]) -> None:
    """The step, then (DLCM) the fold of its micro-batches' τ estimates, as the Lightning module does."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if isinstance(model, DLCM):
        model.fold_threshold(estimates)


def train_step(model, optimizer, batch: Batch, autocast: bool, unfused_ce: Callable | None) -> int:
    """A micro-batch and an optimizer step (warm-up, breakdown and profile); returns the concept count."""
    concepts, estimate = micro_batch(model, batch, autocast, unfused_ce)
    optimizer_step(model, optimizer, [estimate])
    return concepts


def stage_breakdown(model: DLCM, step: Callable[[], int]) -> dict[str, float]:
    """Forward and backward milliseconds of each top-level module of one step, from CUDA events at module hooks."""
    events: dict[str, list] = {}

    def mark(key: str):
        def hook(*_):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            events.setdefault(key, []).append(ev)

        return hook

    handles = []
    for name, module in model.named_children():
        if name == "ratio_loss":
            continue
        handles += [
            module.register_forward_pre_hook(mark(f"{name}.fwd.start")),
            module.register_forward_hook(mark(f"{name}.fwd.end")),
            module.register_full_backward_pre_hook(mark(f"{name}.bwd.start")),
            module.register_full_backward_hook(mark(f"{name}.bwd.end")),
        ]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    for handle in handles:
        handle.remove()
    stages: dict[str, float] = {}
    for key in sorted(k for k in events if k.endswith(".start")):
        stem = key.removesuffix(".start")
        # A module whose inputs need no gradient (the embedding) gets no backward post-hook: nothing to pair.
        if len(events.get(f"{stem}.end", [])) == len(events[key]):
            stages[stem] = sum(a.elapsed_time(b) for a, b in zip(events[key], events[f"{stem}.end"], strict=True))
    total = start.elapsed_time(end)
    stages["other"] = total - sum(stages.values())
    stages["total"] = total
    return stages


# Kernel families by name (first match wins), for the profile's where-does-the-time-go table.
KERNEL_FAMILIES = (
    ("attention_bwd", re.compile(r"flash.*bwd|bwd.*flash|fmha.*bwd|attn.*bwd|dot_prod.*bwd|cudnn.*bprop", re.I)),
    ("attention_fwd", re.compile(r"flash|fmha|attn|attention|cudnn|flex", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|matmul", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam", re.I)),
    ("compiled (triton)", re.compile(r"^triton_", re.I)),
    ("cross-entropy (eager)", re.compile(r"softmax|nll|cross_entropy", re.I)),
    ("copy / cast", re.compile(r"copy|cast|convert|fill|cat|index|scatter|gather", re.I)),
)


def kernel_profile(step: Callable[[], int], top: int = 25, gaps: int = 12) -> dict:
    """GPU kernel time of one step by family, the ``top`` kernels, and the ``gaps`` longest stretches with no
    kernel running (named by the kernels around them: where the GPU waited for the host — launch overhead, the
    host sync), from torch.profiler's CUDA activity. The profiler slows the host, so gaps are upper bounds."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    per_kernel: dict[str, list[float]] = {}
    for start, end, name in kernels:
        per_kernel.setdefault(name, []).append((end - start) / 1e3)
    families: dict[str, float] = {}
    for kernel, times in per_kernel.items():
        family = next((f for f, pattern in KERNEL_FAMILIES if pattern.search(kernel)), "other")
        families[family] = families.get(family, 0.0) + sum(times)
    idle, busy_until = [], kernels[0][1] if kernels else 0
    for (_, _, before), (start, end, after) in itertools.pairwise(kernels):
        if start > busy_until:
            idle.append(((start - busy_until) / 1e3, before[:80], after[:80]))
        busy_until = max(busy_until, end)
    ranked = sorted(per_kernel.items(), key=lambda item: -sum(item[1]))[:top]
    return {
        "wall_ms": wall_ms,
        "kernel_ms": sum(families.values()),
        "idle_ms": sum(gap for gap, _, _ in idle),
        "families_ms": dict(sorted(families.items(), key=lambda item: -item[1])),
        "top": [{"name": k[:160], "ms": sum(t), "calls": len(t)} for k, t in ranked],
        "longest_idle": [{"ms": g, "after": a, "before": b} for g, a, b in sorted(idle, reverse=True)[:gaps]],
    }


def run_config(name: str, args, context: int, compile_blocks: bool, gemm: float) -> dict:
    torch.manual_seed(0)
    device, docs = torch.device(args.device), args.tokens_per_step // context
    cuda = device.type == "cuda"
    cfg = model_config(name, DEEPSEEK_V3_VOCAB)
    if args.attn_backend:
        cfg = dataclasses.replace(cfg, attn_backend=args.attn_backend)
    with torch.device(device):
        model = build_model(cfg)
    true_bf16 = args.precision == "bf16-true"
    if true_bf16:
        model.to(torch.bfloat16)
    if isinstance(model, DLCM):
        force_ratio(model)
    execution = ExecutionConfig(args.activation_checkpointing, compile_blocks, fp32_matmul_precision=args.fp32_matmul)
    apply_execution(model, execution)
    if cuda:
        torch.set_float32_matmul_precision(args.fp32_matmul)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = Batch(cfg.vocab_size, docs, context, device)
    autocast = not true_bf16
    unfused_ce = logits_nats(compile_blocks and cuda) if args.loss == "logits" else None
    step = functools.partial(train_step, model, optimizer, batch, autocast, unfused_ce)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with Timer(device) as warm:
        for _ in range(args.warmup):
            step()
    graphs_after_warmup = compiled_graphs()
    micro_times, optimizer_times, concepts = [], [], []
    for _ in range(args.steps):
        with Timer(device) as timer:
            count, estimate = micro_batch(model, batch, autocast, unfused_ce)
        concepts.append(count)
        micro_times.append(timer.ms)
        with Timer(device) as timer:
            optimizer_step(model, optimizer, [estimate])
        optimizer_times.append(timer.ms)
    micro_ms, optimizer_ms = statistics.median(micro_times), statistics.median(optimizer_times)
    times = [m + o / args.accumulate for m, o in zip(micro_times, optimizer_times, strict=True)]
    step_ms = statistics.median(times)
    every_ms = statistics.median([m + o for m, o in zip(micro_times, optimizer_times, strict=True)])
    tokens = docs * context
    doc_lengths = [context] * docs
    mean_concepts = statistics.mean(concepts)
    concept_lengths = [mean_concepts / docs] * docs if isinstance(model, DLCM) else None
    flops = model_flops(cfg, doc_lengths, concept_lengths)
    rec = {
        "model": name,
        "attn_backend": cfg.attn_backend,
        "loss": args.loss,
        "fp32_matmul_precision": args.fp32_matmul,
        "accumulate": args.accumulate,
        "kind": "dlcm" if isinstance(model, DLCM) else "baseline",
        "params": sum(p.numel() for p in model.parameters()),
        "precision": args.precision,
        "compile_blocks": compile_blocks,
        "activation_checkpointing": args.activation_checkpointing,
        "context": context,
        "docs": docs,
        "tokens_per_step": tokens,
        "median_step_ms": step_ms,
        "micro_batch_ms": micro_ms,
        "optimizer_ms": optimizer_ms,
        "step_ms_optimizer_every_micro_batch": every_ms,
        "tokens_per_sec_optimizer_every_micro_batch": tokens / (every_ms / 1e3),
        "p10_step_ms": sorted(times)[len(times) // 10],
        "p90_step_ms": sorted(times)[(9 * len(times)) // 10],
        "tokens_per_sec": tokens / (step_ms / 1e3),
        "model_flops_per_step": flops.total,
        "mfu": flops.total / (step_ms / 1e3) / H200_BF16_PEAK,
        "mfu_vs_measured_gemm": flops.total / (step_ms / 1e3) / gemm,
        "realised_ratio": tokens / mean_concepts if concept_lengths else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "warmup_s": warm.ms / 1e3,
        "graphs_compiled_during_timed_steps": compiled_graphs() - graphs_after_warmup,
    }
    if isinstance(model, DLCM) and args.breakdown and not compile_blocks:
        try:
            rec["breakdown_ms"] = stage_breakdown(model, step)
        except (RuntimeError, ValueError) as err:  # a breakdown failure must not lose the throughput numbers
            rec["breakdown_error"] = repr(err)
    if args.profile:
        rec["kernels"] = kernel_profile(step)
    print(json.dumps(rec), flush=True)
    del model, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return rec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["small", "paper"], choices=sorted(PAIRS))
    parser.add_argument("--context", type=int, nargs="+", default=[2048, 8192], help="document lengths, each run")
    parser.add_argument("--tokens-per-step", type=int, default=16384, help="tokens per micro-batch, at every context")
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "bf16-true"])
    parser.add_argument("--activation-checkpointing", default="none", choices=["none", "selective", "full"])
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--breakdown", action="store_true", help="time DLCM's stages in one extra eager step")
    parser.add_argument("--kinds", nargs="+", default=["baseline", "dlcm"], choices=["baseline", "dlcm"])
    parser.add_argument("--attn-backend", default=None, choices=["auto", *BACKENDS], help="override the models'")
    parser.add_argument("--loss", default="fused", choices=["fused", "logits"], help="the head's chunked CE, or logits")
    parser.add_argument("--accumulate", type=int, default=32, help="micro-batches per optimizer step (paper: 32)")
    parser.add_argument("--fp32-matmul", default="high", choices=["highest", "high"], help="fp32 matmul precision")
    parser.add_argument("--profile", action="store_true", help="kernel time by family in one extra step")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.accumulate < 1:
        parser.error(f"--accumulate {args.accumulate} is not allowed: a positive number of micro-batches")
    uneven = [c for c in args.context if c < 1 or args.tokens_per_step % c]
    if uneven:
        parser.error(f"--context {uneven[0]} is not allowed: a positive divisor of --tokens-per-step")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/train_throughput.py needs a CUDA device (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    if device.type != "cuda" and (args.profile or args.breakdown):
        parser.error("--profile and --breakdown time CUDA kernels: they need --device cuda")
    torch._dynamo.config.cache_size_limit = 64
    gemm = gemm_peak(device)
    print(f"measured bf16 GEMM peak: {gemm / 1e12:.0f} TFLOP/s", flush=True)
    records = []
    for pair in args.pairs:
        for context in args.context:
            for mode in args.compile:
                for kind, name in zip(("baseline", "dlcm"), PAIRS[pair], strict=True):
                    if kind not in args.kinds:
                        continue
                    records.append(run_config(name, args, context, mode == "on", gemm))
                    write(args.out, records, gemm, device)
    return 0


def write(out: str | None, records: list[dict], gemm: float, device: torch.device) -> None:
    """Rewrite the result file after every configuration, so a later failure keeps what was measured."""
    result = {
        **run_meta(device),
        "gemm_peak_flops": gemm,
        "peak_flops": H200_BF16_PEAK,
        "records": records,
    }
    if out:
        write_json(out, result)


if __name__ == "__main__":
    sys.exit(main())
