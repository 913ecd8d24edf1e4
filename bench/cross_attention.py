"""Cross-attention kernel benchmark (paper Table 6 setup): fwd+bwd, bf16, batch 1, 32 heads, head dim = hidden/32,
segments of ~6 tokens. Methods, each timed with its own per-step metadata construction:

- ``replicate_varlen``: the paper's path (Eq. 17): gather concept K/V to tokens, causal ``varlen_attn``;
- ``flex_create_block_mask``: the paper's baseline: FlexAttention L×C with ``create_block_mask`` every step;
- ``ours``: :func:`dlcm.model.concept_attention.flex_concept_attention` (block tables from concept offsets, the exact
  replication function with its log-count bias, one compiled graph per step).

Run on a CUDA machine: ``python bench/cross_attention.py --out bench/results/cross_attention_h200.json``.
``--warm-only`` compiles every shape once (run several in parallel with ``--hidden`` to fill Inductor's cache).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch
import torch._dynamo
from report import run_meta, write_json  # bench/report.py (this script's folder is on sys.path)
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.nn.attention.varlen import varlen_attn

from dlcm.model.concept_attention import flex_concept_attention, readable_rows
from dlcm.model.packing import PackedSeqs
from dlcm.model.pooling import concept_layout

torch._dynamo.config.cache_size_limit = 256  # one compiled kernel per shape; never fall back to eager
HEADS = 32
SEGMENT = 6


def make_inputs(seq: int, hidden: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    boundary = torch.rand(seq, generator=g) < 1 / SEGMENT
    boundary[0] = True
    cu = torch.tensor([0, seq], dtype=torch.int32, device="cuda")
    tok = PackedSeqs.from_cu_seqlens(cu, seq, seq)
    layout = concept_layout(boundary.cuda(), tok)
    c, hd = layout.num_concepts, hidden // HEADS
    make = lambda rows: torch.randn(rows, HEADS, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    return tok, layout, make(seq), make(c), make(c), torch.randn(seq, HEADS, hd, device="cuda", dtype=torch.bfloat16)


compiled_flex = torch.compile(flex_attention, dynamic=False)
compiled_mask = torch.compile(create_block_mask, dynamic=False)


def replicate_varlen(q, k, v, layout, tok):
    cid = layout.concept_id_T
    return varlen_attn(q, k[cid], v[cid], tok.cu_seqlens, tok.cu_seqlens, tok.total, tok.total, window_size=(-1, 0))


def flex_create_block_mask(q, k, v, layout, tok):
    first_T, j_T = readable_rows(layout, tok)

    def readable(b, h, q_idx, kv_idx):
        return (kv_idx >= first_T[q_idx]) & (kv_idx <= j_T[q_idx])

    mask = compiled_mask(readable, None, None, q.shape[0], k.shape[0], device="cuda")
    out = compiled_flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=mask)
    return out[0].transpose(0, 1)


METHODS = {
    "replicate_varlen": replicate_varlen,
    "flex_create_block_mask": flex_create_block_mask,
    "ours": flex_concept_attention,
    # The same exact kernel with Flex's default launch configuration, to show what LAUNCH_BY_HEAD_DIM buys.
    "ours_default_options": functools.partial(flex_concept_attention, tuned_launch=False),
}


def step(fn, q, k, v, grad, layout, tok):
    out = fn(q, k, v, layout, tok)
    return torch.autograd.grad(out, (q, k, v), grad)


def time_ms(fn, q, k, v, grad, layout, tok, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        step(fn, q, k, v, grad, layout, tok)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(fn, q, k, v, grad, layout, tok)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warm-only", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per method instead")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    records = []
    for hidden in args.hidden:
        for seq in args.seqs:
            tok, layout, q, k, v, grad = make_inputs(seq, hidden)
            # Correctness at every size: ours equals the paper's replication path up to bf16 rounding.
            ref = replicate_varlen(q, k, v, layout, tok).float()
            err = (flex_concept_attention(q, k, v, layout, tok).float() - ref).abs().max().item()
            for name, fn in METHODS.items():
                t0 = time.perf_counter()
                if args.profile:
                    time_ms(fn, q, k, v, grad, layout, tok, args.warmup, 2)
                    with torch.profiler.profile() as prof:
                        time_ms(fn, q, k, v, grad, layout, tok, 0, 5)
                    print(f"== {name} seq={seq} hidden={hidden}")
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
                    continue
                if args.warm_only:
                    step(fn, q, k, v, grad, layout, tok)
                    torch.cuda.synchronize()
                    print(f"warmed {name} seq={seq} hidden={hidden} in {time.perf_counter() - t0:.1f}s", flush=True)
                    continue
                times = time_ms(fn, q, k, v, grad, layout, tok, args.warmup, args.iters)
                rec = {
                    "seq": seq,
                    "hidden": hidden,
                    "head_dim": hidden // HEADS,
                    "concepts": layout.num_concepts,
                    "method": name,
                    "median_ms": statistics.median(times),
                    "p10_ms": sorted(times)[len(times) // 10],
                    "p90_ms": sorted(times)[(9 * len(times)) // 10],
                    "max_abs_err_vs_replication": err,
                }
                records.append(rec)
                print(json.dumps(rec), flush=True)
    if args.out and records:
        meta = {
            **run_meta(),
            "heads": HEADS,
            "segment_mean_tokens": SEGMENT,
            "warmup": args.warmup,
            "iters": args.iters,
        }
        write_json(args.out, {"meta": meta, "records": records})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
