"""Self-attention kernel rates on the training shapes: forward + backward milliseconds and executed
TFLOP/s of each ``causal_attention`` backend on packed documents, and of SDPA's padded layout under each of its
kernels (cuDNN, FlashAttention-2, memory-efficient), side by side in one run.

Executed FLOPs count the causal half that kernels compute: forward ``4·N·H·Σ_d L_d(L_d+1)/2`` for N query heads of
dim H, backward 2.5× the forward (FlashAttention's convention). Every method's output is compared with the first
one's (``max_abs_err``). A method a kernel cannot run (shape, dtype, GQA) is recorded with its error, not dropped.

    python bench/self_attention.py --out bench/results/self_attention_h200.json    # on the H200
    python bench/self_attention.py --shapes tiny --device cpu --dtype float32      # smoke run
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from report import run_meta, write_json  # bench/report.py (this script's folder is on sys.path)
from torch.nn.attention import SDPBackend, sdpa_kernel

from dlcm.model.attention_backends import causal_attention, flash_attn_available
from dlcm.model.packing import PackedSeqs

# (query heads, KV heads, head dim, document lengths): the paper models' attention at 2 × 8,192 tokens per step.
SHAPES = {
    "baseline_1.3b": (24, 24, 64, [8192, 8192]),
    "dlcm_2.3b_token": (24, 12, 64, [8192, 8192]),  # encoder and decoder layers
    "dlcm_2.3b_backbone": (48, 24, 64, [2048, 2048]),  # concepts at R = 4
    "tiny": (4, 2, 16, [48, 16]),
}
SDPA_KERNELS = {
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def methods(device: torch.device) -> dict[str, Callable[[], object]]:
    """Context factories per method name; the backend name goes to ``causal_attention`` (``njt_*``: SDPA on
    nested jagged tensors, the packed layout without padding, under one SDPA kernel). Flex last: it compiles."""
    if device.type != "cuda":
        return {"sdpa": nullcontext, "njt": nullcontext, "flex": nullcontext}
    found = {"varlen": nullcontext}
    if flash_attn_available():
        found["flash_attn"] = nullcontext
    for name, kernel in SDPA_KERNELS.items():
        found[name] = found["njt" + name.removeprefix("sdpa")] = lambda k=kernel: sdpa_kernel([k])
    return {**found, "flex": nullcontext}


def njt_attention(q_TNH: torch.Tensor, k_TKH: torch.Tensor, v_TKH: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
    """SDPA over the packed rows as nested jagged tensors (KV heads expanded: NJT SDPA takes no GQA flag)."""
    groups = q_TNH.shape[1] // k_TKH.shape[1]
    offsets = seqs.cu_seqlens.long()

    def nest(x_TNH: torch.Tensor) -> torch.Tensor:
        return torch.nested.nested_tensor_from_jagged(x_TNH, offsets).transpose(1, 2)  # [docs, N, (j), H]

    k_TNH, v_TNH = (x.repeat_interleave(groups, dim=1) for x in (k_TKH, v_TKH))
    out = F.scaled_dot_product_attention(nest(q_TNH), nest(k_TNH), nest(v_TNH), is_causal=True)
    return out.transpose(1, 2).values()


def executed_flops(heads: int, head_dim: int, lengths: list[int]) -> float:
    forward = 4 * heads * head_dim * sum(n * (n + 1) / 2 for n in lengths)
    return 3.5 * forward


def time_method(run: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def bench_shape(name: str, args: argparse.Namespace, device: torch.device, recorded: Callable[[dict], None]) -> None:
    """Time every method on one shape, handing each record to ``recorded`` as soon as it exists."""
    heads, kv_heads, head_dim, lengths = SHAPES[name]
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    total = sum(lengths)
    q = torch.randn(total, heads, head_dim, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(total, kv_heads, head_dim, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(total, kv_heads, head_dim, device=device, dtype=dtype, generator=g).requires_grad_()
    grad = torch.randn(total, heads, head_dim, device=device, dtype=dtype, generator=g)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    flops = executed_flops(heads, head_dim, lengths)
    reference = None
    for method, context in methods(device).items():
        backend = "sdpa" if method.startswith("sdpa") else method
        seqs = PackedSeqs.from_cu_seqlens(offsets, total, max(lengths))  # fresh: no mask cached across methods
        attend = njt_attention if method.startswith("njt") else functools.partial(causal_attention, backend=backend)

        def run(context=context, seqs=seqs, attend=attend) -> torch.Tensor:
            with context():
                out = attend(q, k, v, seqs)
            torch.autograd.grad(out, (q, k, v), grad)
            return out

        record = {"shape": name, "method": method, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}
        try:
            first_ms = time_method(run, device, 0, 1)[0]  # includes compilation or plan building
            times = time_method(run, device, args.warmup, args.iters)
            with torch.no_grad(), context():
                out = attend(q, k, v, seqs).float()
        except RuntimeError as err:  # e.g. no kernel of this SDPA backend for the shape or GQA
            record["error"] = str(err).splitlines()[0][:300]
            recorded(record)
            print(f"{name:<20} {method:<15} not run: {record['error']}", flush=True)
            continue
        reference = out if reference is None else reference
        median = statistics.median(times)
        record.update(
            {
                "median_ms": median,
                "first_call_ms": first_ms,
                "tflops": flops / (median / 1e3) / 1e12,
                "max_abs_err": (out - reference).abs().max().item(),
            }
        )
        recorded(record)
        print(f"{name:<20} {method:<15} {median:8.2f} ms  {record['tflops']:6.1f} TFLOP/s", flush=True)


def markdown_table(data: dict) -> str:
    meta = data["meta"]
    lines = [
        f"`{meta['command']}` — {meta['device']}, torch {meta['torch']}, {meta['dtype']}, fwd+bwd, median of "
        f"{meta['iters']} after {meta['warmup']} warm-up\n",
        "| shape | heads / KV / dim | method | ms | executed TFLOP/s | max abs err |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in data["records"]:
        dims = f"{r['heads']} / {r['kv_heads']} / {r['head_dim']}"
        if "error" in r:
            lines.append(f"| {r['shape']} | {dims} | {r['method']} | not run: {r['error'][:80]} | | |")
        else:
            lines.append(
                f"| {r['shape']} | {dims} | {r['method']} | {r['median_ms']:.2f} | {r['tflops']:.0f} "
                f"| {r['max_abs_err']:.3g} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["baseline_1.3b", "dlcm_2.3b_token", "dlcm_2.3b_backbone"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    unknown = sorted(set(args.shapes) - set(SHAPES))
    if unknown:
        parser.error(f"--shapes {unknown} not known: expected some of {sorted(SHAPES)}")
    device = torch.device(args.device)
    meta = {
        "benchmark": "self_attention",
        **run_meta(device),
        **{k: getattr(args, k) for k in ("dtype", "warmup", "iters")},
    }
    data = {"meta": meta, "records": []}

    def recorded(record: dict) -> None:
        data["records"].append(record)
        if args.out:  # rewritten after every method: a run cut by a time limit keeps what it measured
            write_json(args.out, data)

    for name in args.shapes:
        bench_shape(name, args, device, recorded)
    print(markdown_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
