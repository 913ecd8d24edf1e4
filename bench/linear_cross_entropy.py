"""The LM head's cross-entropy, forward and backward, at the paper recipes' shape: speed, peak memory and error.

Candidates, all computing ``sum CE(x Wᵀ)`` over a packed micro-batch and the gradients of ``x`` and ``W``:

- ``logits``: the head's GEMM into ``[T, V]`` bf16 logits and an fp32 CE of them, compiled (what training did
  before the fused head);
- ``chunked`` / ``chunked_compiled``: :func:`dlcm.model.linear_cross_entropy.linear_cross_entropy` (the head's
  fused form; ``compile_blocks`` runs the compiled one);
- ``liger``: Liger-Kernel's fused linear cross-entropy (``pip install liger-kernel``), when importable;
- ``cce_exact`` / ``cce``: Cut Cross-Entropy (``pip install cut-cross-entropy``) without and with its default
  gradient filtering, when importable.

Inputs are bf16 (as autocast gives the head); errors are measured against an fp32 reference on the same bf16
values: the relative error of the summed loss and the largest gradient error relative to that gradient's largest
entry. Times are CUDA-event medians after warm-up; peak memory is what one forward and backward allocates beyond
the inputs. Run on a CUDA machine::

    python bench/linear_cross_entropy.py --out bench/results/linear_cross_entropy_h100.json
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import Timer
from report import run_meta, write_json

from dlcm.model.linear_cross_entropy import linear_cross_entropy
from dlcm.model.lm_head import aligned
from dlcm.model.loss import IGNORE_INDEX
from dlcm.model.presets import DEEPSEEK_V3_VOCAB

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def logits_loss() -> Loss:
    compiled_ce = torch.compile(
        lambda logits, targets: F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    )
    return lambda x, w, targets: compiled_ce(x @ w.t(), targets)


def chunked_loss(compiled: bool) -> Loss:
    def loss(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Aligned as the head aligns its GEMMs.
        return linear_cross_entropy(x, aligned(w), targets, vocab=w.shape[0], compiled=compiled).total

    return loss


def liger_loss() -> Loss | None:
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except (ImportError, AttributeError, OSError, RuntimeError):  # absent, or built for another torch / triton
        return None
    return functools.partial(liger_fused_linear_cross_entropy, ignore_index=IGNORE_INDEX, reduction="sum")


def cce_loss(filter_eps: str | None) -> Loss | None:
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except (ImportError, AttributeError, OSError, RuntimeError):  # absent, or built for another torch / triton
        return None
    return lambda x, w, targets: cce(x, w, targets, ignore_index=IGNORE_INDEX, reduction="sum", filter_eps=filter_eps)


def candidates() -> dict[str, Loss | None]:
    return {
        "logits": logits_loss(),
        "chunked": chunked_loss(compiled=False),
        "chunked_compiled": chunked_loss(compiled=True),
        "liger": liger_loss(),
        "cce_exact": cce_loss(None),
        "cce": cce_loss("high"),
    }


def reference(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    total = F.cross_entropy(xf @ wf.t(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return (total.detach(), *torch.autograd.grad(total, (xf, wf)))


def measure(loss: Loss, x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, args) -> dict:
    def run() -> tuple[torch.Tensor, ...]:
        xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()
        total = loss(xl, wl, targets)
        total.backward()
        return total.detach(), xl.grad, wl.grad

    for _ in range(args.warmup):
        run()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        with Timer(x.device) as timer:
            out = run()
        times.append(timer.ms)
    peak = torch.cuda.max_memory_allocated() - base
    return {"ms": statistics.median(times), "peak_extra_gib": peak / 2**30, "outputs": out}


def errors(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> dict[str, float]:
    total, dx, dw = got
    total_ref, dx_ref, dw_ref = want
    return {
        "loss_rel_err": abs(float(total) - float(total_ref)) / abs(float(total_ref)),
        "dx_err": float((dx.float() - dx_ref).abs().max() / dx_ref.abs().max()),
        "dw_err": float((dw.float() - dw_ref).abs().max() / dw_ref.abs().max()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="rows: tokens per micro-batch")
    parser.add_argument("--width", type=int, default=1536, help="d_token of the paper pair")
    parser.add_argument("--vocab", type=int, default=DEEPSEEK_V3_VOCAB)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/linear_cross_entropy.py needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(args.tokens, args.width, device=device, generator=g).to(torch.bfloat16)
    w = (torch.randn(args.vocab, args.width, device=device, generator=g) * args.width**-0.5).to(torch.bfloat16)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=g)
    targets[:: args.tokens // 8] = IGNORE_INDEX  # document ends
    want = reference(x, w, targets)
    torch.cuda.empty_cache()
    records = []
    for name, loss in candidates().items():
        rec = {"impl": name, "tokens": args.tokens, "width": args.width, "vocab": args.vocab}
        if loss is None:
            rec["skipped"] = "not importable"
        else:
            try:
                got = measure(loss, x, w, targets, args)
                rec |= {k: v for k, v in got.items() if k != "outputs"} | errors(got["outputs"], want)
            except (RuntimeError, ValueError, TypeError) as err:  # one candidate's failure keeps the others
                rec["error"] = repr(err)[:500]
            torch.cuda.empty_cache()
        print(rec, flush=True)
        records.append(rec)
    meta = {"benchmark": "linear_cross_entropy", **run_meta(device), "warmup": args.warmup, "iters": args.iters}
    data = {"meta": meta, "records": records}
    if args.out:
        write_json(args.out, data)
    print(markdown_table(data))
    return 0


def markdown_table(data: dict) -> str:
    meta = data["meta"]
    lines = [
        f"`{meta['command']}` — {meta['device']}, torch {meta['torch']}, bf16 inputs, forward + backward, median of "
        f"{meta['iters']} after {meta['warmup']} warm-up\n",
        "| implementation | rows × width × vocab | ms | memory beyond inputs (GiB) | loss rel. err | dx err | dW err |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in data["records"]:
        shape = f"{r['tokens']} × {r['width']} × {r['vocab']}"
        if "ms" not in r:
            lines.append(f"| {r['impl']} | {shape} | {r.get('skipped') or r.get('error', '')[:60]} | | | | |")
            continue
        lines.append(
            f"| {r['impl']} | {shape} | {r['ms']:.1f} | {r['peak_extra_gib']:.2f} | {r['loss_rel_err']:.1e} "
            f"| {r['dx_err']:.1e} | {r['dw_err']:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
