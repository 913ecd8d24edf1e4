"""Markdown table of a cross-attention or decode benchmark JSON: ``python bench/table.py bench/results/<file>.json``."""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> int:
    with open(path) as f:
        data = json.load(f)
    if data.get("meta", {}).get("benchmark") == "decode":
        from decode import markdown_table  # bench/decode.py (this script's folder is on sys.path)

        print(markdown_table(data))
        return 0
    by = defaultdict(dict)
    for r in data["records"]:
        by[(r["seq"], r["hidden"])][r["method"]] = r
    print(
        f"`{data['meta']['command']}` — {data['meta']['device']}, torch {data['meta']['torch']}, median of "
        f"{data['meta']['iters']} after {data['meta']['warmup']} warm-up, fwd+bwd, ms\n"
    )
    print(
        "| seq | hidden | C | replicate + varlen | Flex + create_block_mask | ours | ours, Flex default launch "
        "| replicate / ours | Flex-mask / ours | max abs err vs replicate |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (seq, hidden), m in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rep, flex, ours = m["replicate_varlen"], m["flex_create_block_mask"], m["ours"]
        default = m.get("ours_default_options", {}).get("median_ms", float("nan"))
        print(
            f"| {seq} | {hidden} | {ours['concepts']} | {rep['median_ms']:.2f} | {flex['median_ms']:.2f} "
            f"| {ours['median_ms']:.2f} | {default:.2f} | {rep['median_ms'] / ours['median_ms']:.2f}× "
            f"| {flex['median_ms'] / ours['median_ms']:.2f}× | {ours['max_abs_err_vs_replication']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
