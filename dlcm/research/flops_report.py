"""``dlcm flops``: inference FLOPs per token per stage of a DLCM (and a baseline to compare against).

    dlcm flops --preset dlcm_2.3b --baseline-preset baseline_1.3b --ratio 4 --context 8192
    dlcm flops --config recipes/dlcm_small_r4_defaultcorpus_h200.yaml \\
               --baseline-config recipes/baseline_small_defaultcorpus_h200.yaml --json

Counts follow :mod:`dlcm.model.flops`: forward FLOPs per token for documents of exactly ``--context`` tokens split into
``context / R`` concepts, 2 FLOPs per multiply-add, attention without causal discount (the MFU convention) unless
``--causal-discount``. The table gives each stage's matmul and attention parts, the backbone's share and the
DLCM/baseline ratio; ``--json`` prints the same numbers as a list with one object per context.

Recipes are read by :mod:`dlcm.infer.recipe` without building data or a trainer: only the ``model`` section (its
``class_path`` picks the config type) and, for the vocabulary size, the ``data`` section. The report says where the
vocabulary size came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from dlcm.infer.recipe import RecipeModel, load_recipe
from dlcm.model.config import DLCMConfig
from dlcm.model.config_io import ModelConfig
from dlcm.model.flops import FlopsBreakdown, cross_kernel, inference_flops_per_token, stage_costs
from dlcm.model.presets import PRESETS, preset_config


def load_preset(name: str, vocab_size: int | None = None) -> RecipeModel:
    config = preset_config(name)
    if vocab_size is not None:
        return RecipeModel(
            name, dataclasses.replace(config, vocab_size=vocab_size), None, f"vocab {vocab_size:,} (set)"
        )
    return RecipeModel(name, config, None, f"vocab {config.vocab_size:,} (preset)")


def matmul_params(config: ModelConfig) -> tuple[int, int]:
    """Non-embedding matmul parameters applied to token rows and to concept rows."""
    costs = stage_costs(config).values()
    return sum(c.token_params for c in costs), sum(c.concept_params for c in costs)


def report(
    model: RecipeModel, baseline: RecipeModel | None, context: int, ratio: float | None, causal_discount: bool
) -> dict[str, Any]:
    """Inference FLOPs per token of ``model`` (and ``baseline``) at one context length, as plain numbers."""

    def entry(m: RecipeModel) -> tuple[dict[str, Any], FlopsBreakdown]:
        # Hardware count: Ψ on the kernel a CUDA device runs for documents of this length (impl='auto' picks it).
        dlcm = isinstance(m.config, DLCMConfig)
        kernel = cross_kernel(m.config, "cuda", context) if dlcm else None
        flops = inference_flops_per_token(m.config, context, ratio, causal_discount, kernel)
        tok, cpt = matmul_params(m.config)
        out: dict[str, Any] = {
            "name": m.name,
            "kind": "dlcm" if dlcm else "baseline",
            "vocab": m.vocab_note,
            "token_matmul_params": tok,
            "concept_matmul_params": cpt,
            "flops_per_token": flops.to_dict(),
        }
        if dlcm:
            out["cross_kernel"] = kernel
            out["ratio"] = m.config.parser.target_ratio if ratio is None else ratio
            out["backbone_share"] = flops.share("backbone")
            out["backbone_share_matmul"] = flops.stages["backbone"].matmul / flops.matmul
        return out, flops

    result: dict[str, Any] = {"context": context, "causal_discount": causal_discount}
    result["model"], flops = entry(model)
    if baseline is not None:
        result["baseline"], base = entry(baseline)
        result["flops_ratio"] = flops.total / base.total
        result["hardware_flops_ratio"] = flops.hardware_total / base.hardware_total
        result["matmul_flops_ratio"] = flops.matmul / base.matmul
    return result


def _unit(value: float) -> tuple[float, str]:
    for scale, name in ((1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP")):
        if value >= scale:
            return scale, name
    return 1.0, "FLOP"


def format_report(result: dict[str, Any]) -> str:
    """The human-readable table of one :func:`report`."""
    model, base = result["model"], result.get("baseline")
    mf = model["flops_per_token"]
    scale, unit = _unit(mf["total"])
    convention = "causal pairs only" if result["causal_discount"] else "every pair, no causal discount"
    lines = [f"Inference FLOPs per token at context {result['context']:,} ({unit}/token; attention: {convention})"]
    for role, m in (("model", model), ("baseline", base)):
        if m is None:
            continue
        params = f"{m['token_matmul_params'] / 1e6:,.1f}M on tokens"
        if m["concept_matmul_params"]:
            params += f" + {m['concept_matmul_params'] / 1e6:,.1f}M on concepts"
        r = f", R = {m['ratio']:g}" if "ratio" in m else ""
        lines.append(f"  {role + ':':<10}{m['name']}{r}; matmul parameters {params}")
        lines.append(f"  {'':<10}{m['vocab']}")
    models = [model] if base is None else [model, base]
    cell = f"{'matmul':>10}{'attention':>11}{'total':>10}{'share':>8}"
    header = f"  {'stage':<17}" + " |".join(cell for _ in models)
    rule = "  " + "-" * (len(header) - 2)
    lines += ["", f"  {'':<17}" + " |".join(f"{m['name'][:38]:>39}" for m in models), header, rule]
    stages = list(dict.fromkeys(s for m in models for s in m["flops_per_token"]["stages"]))

    def cells(flops: dict[str, Any], part: dict[str, Any] | None) -> str:
        if part is None:
            return " " * 39
        numbers = (part["matmul"], part["attention"], part["total"])
        return f"{numbers[0] / scale:>10.3f}{numbers[1] / scale:>11.3f}{numbers[2] / scale:>10.3f}" + (
            f"{part['total'] / flops['total']:>8.1%}"
        )

    for stage in stages:
        row = " |".join(cells(m["flops_per_token"], m["flops_per_token"]["stages"].get(stage)) for m in models)
        lines.append(f"  {stage:<17}{row}".rstrip())
    lines += [rule, f"  {'total':<17}" + " |".join(cells(m["flops_per_token"], m["flops_per_token"]) for m in models)]
    if "cross_kernel" in model:
        kernel, pairs = ("replication", "L×L") if model["cross_kernel"] == "replicate" else ("exact", "L×C")
        lines.append(f"  hardware total (Ψ on the {kernel} kernel, {pairs}): {mf['hardware_total'] / scale:.3f}")
    if "backbone_share" in model:
        lines.append(
            f"  backbone share: {model['backbone_share']:.1%} of the model's FLOPs "
            f"({model['backbone_share_matmul']:.1%} of its matmul FLOPs)"
        )
    if base is not None:
        lines.append(
            f"  {model['name']} / {base['name']}: {result['flops_ratio']:.3f} "
            f"(hardware {result['hardware_flops_ratio']:.3f}, matmul only {result['matmul_flops_ratio']:.3f})"
        )
    return "\n".join(lines)


def _model_args(
    parser: argparse.ArgumentParser, preset: str | None, config: str | None, vocab: int | None, role: str
) -> RecipeModel | None:
    if preset is not None and config is not None:
        parser.error(f"give either --{role}preset or --{role}config, not both")
    if preset is not None:
        if preset not in PRESETS:
            parser.error(f"--{role}preset={preset!r}: expected one of {', '.join(sorted(PRESETS))}")
        return load_preset(preset, vocab)
    if config is not None:
        return load_recipe(config, vocab)
    return None


def main(argv: list[str]) -> int:
    """Entry point of ``dlcm flops`` (``argv`` without the program name and subcommand)."""
    parser = argparse.ArgumentParser(prog="dlcm flops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", help=f"model preset: {', '.join(sorted(PRESETS))}")
    parser.add_argument("--config", help="model recipe YAML (only its model section is read)")
    parser.add_argument("--baseline-preset", help="preset to compare against")
    parser.add_argument("--baseline-config", help="recipe to compare against")
    parser.add_argument("--ratio", type=float, help="tokens per concept R (default: the config's target_ratio)")
    parser.add_argument(
        "--context",
        type=int,
        nargs="+",
        help="document length(s) in tokens (default: the recipe's context_length; 2048 and 8192 for presets)",
    )
    parser.add_argument("--vocab-size", type=int, help="vocabulary size (default: see the module docstring)")
    parser.add_argument("--causal-discount", action="store_true", help="count only causal attention pairs")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    try:
        model = _model_args(parser, args.preset, args.config, args.vocab_size, "")
        if model is None:
            parser.error("give the model with --preset or --config")
        baseline = _model_args(parser, args.baseline_preset, args.baseline_config, args.vocab_size, "baseline-")
        contexts = args.context or ([model.context_length] if model.context_length else [2048, 8192])
        results = [report(model, baseline, c, args.ratio, args.causal_discount) for c in contexts]
    except (ValueError, FileNotFoundError) as err:
        print(f"dlcm flops: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n\n".join(format_report(r) for r in results))
    return 0
