"""Markdown table of a cross-attention, self-attention, decode, prefill, eval, LM-head cross-entropy or
training-throughput benchmark JSON:
``python bench/table.py bench/results/<file>.json``. Several training-throughput JSONs (e.g. one per context, from
separate runs) render as one table: ``python bench/table.py a.json b.json``."""

from __future__ import annotations

import importlib
import json
import sys
from collections import defaultdict
from pathlib import Path


def main(path: str, *more: str) -> int:
    with open(path) as f:
        data = json.load(f)
    if more:
        runs = [data] + [json.loads(Path(p).read_text()) for p in more]
        if any("meta" in run for run in runs):
            print("bench/table.py: only training-throughput JSONs combine into one table", file=sys.stderr)
            return 2
        print(throughput_table({"runs": runs, "records": [r for run in runs for r in run["records"]]}))
        return 0
    benchmark = data.get("meta", {}).get("benchmark")
    # bench/<name>.py renders its own JSON (this script's folder is on sys.path).
    if benchmark in ("decode", "prefill", "self_attention", "eval_throughput", "linear_cross_entropy"):
        print(importlib.import_module(benchmark).markdown_table(data))
        return 0
    if "meta" not in data:  # bench/train_throughput.py
        print(throughput_table(data))
        return 0
    by = defaultdict(dict)
    for r in data["records"]:
        by[(r["seq"], r["hidden"])][r["method"]] = r
    print(
        f"`{data['meta']['command']}` — {data['meta']['device']}, torch {data['meta']['torch']}, median of "
        f"{data['meta']['iters']} after {data['meta']['warmup']} warm-up, fwd+bwd, ms\n"
    )
    # Runs before the launch option existed have no "ours_default_options" column.
    launch = any("ours_default_options" in m for m in by.values())
    extra = " ours, Flex default launch |" if launch else ""
    print(
        f"| seq | hidden | C | replicate + varlen | Flex + create_block_mask | ours |{extra} "
        "replicate / ours | Flex-mask / ours | max abs err vs replicate |"
    )
    print("|---" * (10 if launch else 9) + "|")
    for (seq, hidden), m in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rep, flex, ours = m["replicate_varlen"], m["flex_create_block_mask"], m["ours"]
        default = f" {m['ours_default_options']['median_ms']:.2f} |" if launch else ""
        print(
            f"| {seq} | {hidden} | {ours['concepts']} | {rep['median_ms']:.2f} | {flex['median_ms']:.2f} "
            f"| {ours['median_ms']:.2f} |{default} {rep['median_ms'] / ours['median_ms']:.2f}× "
            f"| {flex['median_ms'] / ours['median_ms']:.2f}× | {ours['max_abs_err_vs_replication']:.3f} |"
        )
    return 0


def throughput_table(data: dict) -> str:
    """One row per configuration of ``bench/train_throughput.py``; DLCM against the baseline at each context and
    compile mode run side by side; the kernel families of profiled steps."""
    lines = []
    for run in data.get("runs", [data]):  # the runs whose records are combined, or this one
        commit = f", commit {run['commit'][:10]}" if run.get("commit") else ""
        lines.append(
            f"`{run['command']}` — {run['device']}, torch {run['torch']}{commit}, measured bf16 GEMM "
            f"{run['gemm_peak_flops'] / 1e12:.0f} TFLOP/s\n"
        )
    lines += [
        "| model | context | precision | compile | tokens/step | step ms | tokens/s | MFU (989 TF) | MFU (GEMM) "
        "| R realised | peak GiB |",
        "|---" * 11 + "|",
    ]
    for r in data["records"]:
        ratio = f"{r['realised_ratio']:.2f}" if r["realised_ratio"] else "–"
        peak = "–" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        lines.append(
            f"| {r['model']} | {r.get('context', '–')} | {r['precision']} | {'on' if r['compile_blocks'] else 'off'} "
            f"| {r['tokens_per_step']} | {r['median_step_ms']:.0f} | {r['tokens_per_sec'] / 1e3:.1f}k | {r['mfu']:.1%} "
            f"| {r['mfu_vs_measured_gemm']:.1%} | {ratio} | {peak} |"
        )
    pairs = dlcm_vs_baseline(data["records"])
    if pairs:
        lines += [
            "",
            "| context | precision | compile | DLCM / baseline MFU | DLCM / baseline tokens/s |",
            "|---|---|---|---|---|",
        ]
        for (context, precision, compiled), (base, dlcm) in pairs.items():
            lines.append(
                f"| {context} | {precision} | {'on' if compiled else 'off'} | {dlcm['mfu'] / base['mfu']:.2f}× "
                f"| {dlcm['tokens_per_sec'] / base['tokens_per_sec']:.2f}× |"
            )
    profiled = [r for r in data["records"] if "kernels" in r]
    if profiled:
        lines += ["", profile_table(profiled)]
    return "\n".join(lines)


def dlcm_vs_baseline(records: list[dict]) -> dict[tuple, tuple[dict, dict]]:
    """(baseline, DLCM) records of the same context, precision and compile mode, in run order."""
    by_kind: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        kind = "dlcm" if r["realised_ratio"] else "baseline"  # older records carry no "kind"
        by_kind[(r.get("context"), r["precision"], r["compile_blocks"])][kind] = r
    return {key: (kinds["baseline"], kinds["dlcm"]) for key, kinds in by_kind.items() if len(kinds) == 2}


def profile_table(records: list[dict]) -> str:
    """GPU milliseconds per kernel family of each ``--profile`` step, side by side."""
    families = list(dict.fromkeys(f for r in records for f in r["kernels"]["families_ms"]))
    contexts = {r.get("context") for r in records}
    names = [r["model"] + (f" @ {r['context']}" if len(contexts) > 1 else "") for r in records]
    lines = [
        "| kernel family (profiled step, ms) | " + " | ".join(names) + " |",
        "|---" * (len(records) + 1) + "|",
    ]
    for family in families:
        cells = " | ".join(f"{r['kernels']['families_ms'].get(family, 0.0):.1f}" for r in records)
        lines.append(f"| {family} | {cells} |")
    for label, key in (("all kernels", "kernel_ms"), ("GPU idle (no kernel running)", "idle_ms")):
        # Profiles written before the idle stretches were recorded have no idle_ms.
        cells = (f"{r['kernels'][key]:.1f}" if key in r["kernels"] else "–" for r in records)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
