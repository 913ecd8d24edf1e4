"""What the exact Ψ kernel's log-count bias costs, and which launch configuration hides it (an ablation).

Same setup as ``bench/cross_attention.py`` (fwd+bwd, bf16, batch 1, 32 heads, segments of ~6 tokens) at one size,
each variant one compiled graph with :func:`dlcm.model.concept_attention.readable_block_mask`:

- ``where``: the exact bias (own row ``log(t − start + 1)``, other rows ``log length``) — what the model computes;
- ``arith``: the same bias written as key bias + own-row correction (no ``where``);
- ``keyonly`` / ``nobias``: wrong functions (no own-row term / no bias), the cost floor;
- ``where_w8``: the exact bias with ``kernel_options={"num_warps": 8}``;
- ``where_w{W}_s{S}``: the exact bias for every ``--warps`` × ``--stages`` pair given (a launch sweep, e.g. to
  find the setting for another head dim: ``--hidden 1024 --seq 8192 --warps 2 4 8 --stages 1 2 3``).

``err`` is the max abs difference from :func:`dlcm.model.concept_attention.flex_concept_attention`'s output.
Run on a CUDA machine: ``python bench/cross_attention_launch.py --out bench/results/cross_attention_launch_h200.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cross_attention import make_inputs, time_ms
from report import run_meta, write_json

from dlcm.model.concept_attention import flex_concept_attention, kernel_inputs, readable_block_mask

SCORE_MODS = ("where", "arith", "keyonly", "nobias")


def variant(kind: str, options: dict | None = None):
    """A compiled fwd+bwd callable with the benchmark signature ``(q, k, v, layout, tok)``."""

    def attend(q_1NTH, k_1KRH, v_1KRH, first_T, j_T, start_T, log_len_R):
        t, rows = q_1NTH.shape[2], k_1KRH.shape[2]
        block_mask = readable_block_mask(first_T, j_T, rows)
        own_log_T = (torch.arange(t, device=j_T.device) - start_T + 1).float().log()
        correction_T = own_log_T - log_len_R[j_T]
        score_mod = {
            "where": lambda s, b, h, qi, ki: s + torch.where(ki == j_T[qi], own_log_T[qi], log_len_R[ki]),
            "arith": lambda s, b, h, qi, ki: s + log_len_R[ki] + (ki == j_T[qi]).to(s.dtype) * correction_T[qi],
            "keyonly": lambda s, b, h, qi, ki: s + log_len_R[ki],
            "nobias": None,
        }[kind]
        return flex_attention(
            q_1NTH, k_1KRH, v_1KRH, score_mod=score_mod, block_mask=block_mask, enable_gqa=True, kernel_options=options
        )

    compiled = torch.compile(attend, dynamic=False, fullgraph=True)

    def run(q, k, v, layout, tok):
        return compiled(*kernel_inputs(q, k, v, layout, tok))[0].transpose(0, 1)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--warps", type=int, nargs="*", default=[], help="num_warps values of the launch sweep")
    parser.add_argument("--stages", type=int, nargs="*", default=[], help="num_stages values of the launch sweep")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 256
    variants = {kind: variant(kind) for kind in SCORE_MODS} | {"where_w8": variant("where", {"num_warps": 8})}
    for warps in args.warps:
        for stages in args.stages or [None]:
            options = {"num_warps": warps} | ({"num_stages": stages} if stages else {})
            variants[f"where_w{warps}" + (f"_s{stages}" if stages else "")] = variant("where", options)
    tok, layout, q, k, v, grad = make_inputs(args.seq, args.hidden)
    ref = flex_concept_attention(q, k, v, layout, tok, tuned_launch=False).float()
    records = []
    for name, fn in variants.items():
        err = (fn(q, k, v, layout, tok).float() - ref).abs().max().item()
        ms = statistics.median(time_ms(fn, q, k, v, grad, layout, tok, 3, 10))
        records.append({"seq": args.seq, "hidden": args.hidden, "variant": name, "ms": round(ms, 3), "err": err})
        print(json.dumps(records[-1]), flush=True)
    if args.out:
        write_json(args.out, {"meta": run_meta(), "records": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
