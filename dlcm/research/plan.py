"""``dlcm plan``: what a recipe costs on a given cluster before it is launched.

    dlcm plan recipes/paper/dlcm_2.3b_r4_8nodes_8xh200.yaml --nodes 8 --gpus-per-node 8 --gpu h200

For the recipe's model, step (``global_batch.tokens``), micro-batch, context and execution settings on ``nodes`` ×
``gpus_per_node`` GPUs it prints: parameters; memory per GPU (fp32 weights, gradients and AdamW state over the shard
group, the unsharded gradients ``gradient_sync: step`` keeps, activations with and without checkpointing);
collective bytes per GPU per optimizer step, inside a node and across nodes; the predicted step time and tokens/s;
and the wall-clock and GPU-hours to the recipe's ``trainer.max_steps``. Every number comes from the recipe, a
measured record and the assumptions it prints:

- Compute: the single-GPU training throughput measured by ``bench/train_throughput.py`` (``bench/results/
  train_throughput_*.json``) for a model of the same parameter count and the recipe's ``compile_blocks``; at
  another context the achieved model FLOP/s is assumed to carry over (time per token scales with the model FLOPs per
  token of docs/design.md). The measured step includes a fused AdamW step per micro-batch (~3% of it on the paper
  models).
- Activation checkpointing recomputes the forward of the checkpointed blocks: +1/3 of their share of the FLOPs.
- Collectives (NCCL ring): all-gather / reduce-scatter move ``(n−1)/n`` of the buffer per GPU, all-reduce twice
  that, at the bus bandwidth of the slowest link the group spans (NVLink inside a node, the network across nodes).
  FSDP2 prefetches, so a micro-batch takes max(compute, collectives) and the collectives of the step's last
  micro-batch that wait for its backward add their time after it.
- Activation bytes per token are counted per block from the saved tensors of the compiled bf16 forward (norm
  inputs, QKV, attention output, SwiGLU gate/up/product); logits and their gradient in bf16 (compiled
  cross-entropy) or also in fp32 (eager). Eager blocks keep more (unfused norms and SwiGLU): that extra is taken
  from a benchmark run that measured both settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlcm.infer.recipe import load_recipe, load_yaml, section
from dlcm.model.config import BaselineConfig, DLCMConfig, StackConfig
from dlcm.model.flops import inference_flops_per_token
from dlcm.model.presets import DEEPSEEK_V3_VOCAB

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    """Datasheet numbers of one GPU and the interconnect assumed around it."""

    name: str
    device: str  # as torch.cuda.get_device_name reports it (the benchmark records' "device")
    memory_gib: float
    peak_bf16_flops: float
    nvlink_gbps: float  # NCCL bus bandwidth inside a node, GB/s per GPU
    network_gbps: float  # NCCL bus bandwidth across nodes, GB/s per GPU (one 400 Gb/s NIC per GPU)


GPUS = {
    # Memory as torch.cuda.get_device_properties reports it (143,771 and 81,559 MiB).
    "h200": Gpu("h200", "NVIDIA H200", 143_771 / 1024, 989e12, 360.0, 40.0),
    "h100": Gpu("h100", "NVIDIA H100 80GB HBM3", 81_559 / 1024, 989e12, 360.0, 40.0),
}


@dataclass
class Recipe:
    """What the plan reads from a recipe (no data, trainer or network is built)."""

    name: str
    config: DLCMConfig | BaselineConfig
    vocab_note: str
    context: int
    micro_batch_tokens: int
    step_tokens: int
    max_steps: int
    compile_blocks: bool
    checkpointing: str
    sharding: str
    hsdp_shard_size: int | None
    gradient_sync: str


def read_recipe(path: Path, vocab_size: int | None, step_tokens: int | None) -> Recipe:
    try:
        model = load_recipe(path, vocab_size)
    except ValueError as err:
        if vocab_size is not None or "vocabulary size" not in str(err):
            raise
        model = load_recipe(path, DEEPSEEK_V3_VOCAB)  # the paper recipes' tokenizer, when their data is elsewhere
        model.vocab_note = f"vocab {DEEPSEEK_V3_VOCAB:,} (DeepSeek-V3; the recipe's data is not readable here)"
    recipe = load_yaml(path)
    trainer = section(recipe, "trainer", path.parent)
    data = section(recipe, "data", path.parent)
    data = data.get("init_args") or data
    execution = (section(recipe, "model", path.parent).get("init_args") or {}).get("execution") or {}
    micro = int(data.get("tokens_per_batch", 4096))
    tokens = step_tokens or (recipe.get("global_batch") or {}).get("tokens")
    if tokens is None:
        raise ValueError(f"{path}: global_batch.tokens is not set: pass --step-tokens (tokens per optimizer step)")
    max_steps = trainer.get("max_steps")
    if not max_steps or max_steps < 0:
        raise ValueError(f"{path}: trainer.max_steps={max_steps} is not allowed: a planned number of optimizer steps")
    return Recipe(
        name=path.stem,
        config=model.config,
        vocab_note=model.vocab_note,
        context=int(model.context_length),
        micro_batch_tokens=micro,
        step_tokens=int(tokens),
        max_steps=int(max_steps),
        compile_blocks=bool(execution.get("compile_blocks", False)),
        checkpointing=str(execution.get("activation_checkpointing", "none")),
        sharding=str(execution.get("sharding", "full")),
        hsdp_shard_size=execution.get("hsdp_shard_size"),
        gradient_sync=str(execution.get("gradient_sync", "micro_batch")),
    )


def parameter_count(config: DLCMConfig | BaselineConfig) -> int:
    """All parameters, counted on the meta device (nothing is allocated)."""
    import torch

    from dlcm.model.presets import build_model

    with torch.device("meta"):
        return sum(p.numel() for p in build_model(config).parameters())


def block_activation_bytes(width: int, kv_width: int, ffn: int) -> int:
    """Bytes one token keeps for the backward of one pre-norm GQA + SwiGLU block, bf16: the two norm inputs, the
    attention input, Q, K, V and output, the MLP input, gate, up and their product (the down projection's input)."""
    return 2 * (5 * width + 2 * kv_width + 3 * ffn)


def stacks(config: DLCMConfig | BaselineConfig) -> list[tuple[StackConfig, float]]:
    """(stack, rows per token) of every transformer stack: concept stacks see 1/R rows per token."""
    if isinstance(config, BaselineConfig):
        return [(config.stack, 1.0)]
    per_concept = 1.0 / config.parser.target_ratio
    return [(config.encoder, 1.0), (config.backbone, per_concept), (config.decoder, 1.0)]


def activation_gib(
    config: DLCMConfig | BaselineConfig, tokens: int, checkpointing: str, compiled_loss: bool = True
) -> float:
    """Activation memory of one micro-batch of ``tokens`` tokens at the backward's start (peak of a step).

    The token cross-entropy keeps bf16 logits and their bf16 gradient when compiled (``compile_blocks``); eager, it
    also holds fp32 copies of both: 8 bytes more per logit (measured: 15.7 GiB on the 1.3B baseline at 16,384
    tokens, bench/results/train_throughput_baseline_*_loss_h200.json)."""
    saved = 0.0
    largest_block = 0.0
    for stack, rows in stacks(config):
        full = block_activation_bytes(stack.width, stack.n_kv_heads * stack.head_dim, stack.ffn_hidden) * rows
        boundary = 2 * stack.width * rows  # a checkpointed block keeps its input
        largest_block = max(largest_block, full)
        recomputed = {"none": 0, "selective": stack.n_layers // 2, "full": stack.n_layers}[checkpointing]
        saved += (stack.n_layers - recomputed) * full + recomputed * boundary
    d = config.d_token
    if isinstance(config, DLCMConfig):
        x = config.cross
        kv = x.n_kv_heads * (d // x.n_heads)
        cross = block_activation_bytes(d, kv, x.ffn_hidden)
        saved += 2 * d if checkpointing == "full" else cross
        largest_block = max(largest_block, cross)
        saved += 2 * 4 * d + 4 * d  # parser: fp32 scores' inputs (W_q, W_k) and its fp32 input copy
        saved += 2 * (d + config.d_concept) / config.parser.target_ratio  # pooled concepts and their up-projection
    saved += 2 * d  # embedding output
    if checkpointing != "none":
        saved += largest_block  # one block's activations live again while it is recomputed
    logits = (4 if compiled_loss else 12) * config.vocab_size  # logits and their gradient at the head's backward
    return tokens * (saved + logits) / GIB


def benchmark_records(params: int, files: list[Path]) -> list[tuple[dict, str, Path]]:
    """(record, device, file) of every single-GPU training measurement of a model with ``params`` parameters."""
    records = []
    for file in files:
        data = json.loads(file.read_text())
        for record in data.get("records", []):
            if record.get("params") == params and record.get("activation_checkpointing") == "none":
                records.append((record, data.get("device", ""), file))
    return records


def eager_extra_bytes_per_token(params: int, files: list[Path]) -> tuple[float, str]:
    """Activation bytes per token that eager blocks keep beyond compiled ones (unfused norms and SwiGLU, fp32
    intermediates), measured: the peak difference of the two settings in one benchmark run, same tokens."""
    by_file: dict[tuple[Path, int], dict[bool, dict]] = {}
    for record, _, file in benchmark_records(params, files):
        by_file.setdefault((file, record["tokens_per_step"]), {})[bool(record["compile_blocks"])] = record
    for (file, tokens), pair in sorted(by_file.items()):
        if len(pair) == 2:
            extra = (pair[False]["peak_memory_gib"] - pair[True]["peak_memory_gib"]) * GIB / tokens
            return max(extra, 0.0), f"eager blocks: +{extra / 1024:.0f} KiB/token measured in {file.name}"
    return 0.0, "eager blocks' extra activations not measured for this model (not included)"


def measured_throughput(
    params: int, context: int, compile_blocks: bool, gpu: Gpu, files: list[Path]
) -> tuple[dict, str]:
    """The benchmark record of a model with ``params`` parameters: at ``context`` if measured there, on the GPU asked
    for if measured there, with the same compile setting if measured; of those the fastest (the current code).
    The note says which preference could not be met."""
    records = benchmark_records(params, files)
    if not records:
        raise ValueError(
            f"no single-GPU throughput measured for a model of {params:,} parameters in "
            f"{', '.join(str(f) for f in files) or 'bench/results'}: run bench/train_throughput.py for it"
        )
    notes = []
    same_context = [r for r in records if r[0].get("context") == context]
    records = same_context or records
    same_gpu = [r for r in records if r[1] == gpu.device]
    if not same_gpu:
        notes.append(f"measured on {records[0][1]}, assumed equal on {gpu.device}")
    pool = same_gpu or records
    same_compile = [r for r in pool if bool(r[0].get("compile_blocks")) == compile_blocks]
    if not same_compile:
        notes.append(f"compile_blocks={compile_blocks} not measured: the other setting's throughput")
    record, device, file = max(same_compile or pool, key=lambda r: r[0]["tokens_per_sec"])
    source = (
        f"{file.name}: {record['tokens_per_sec']:,.0f} tokens/s at context {record['context']:,}, "
        f"{record['tokens_per_step']:,} tokens per step, compile_blocks={record['compile_blocks']}, {device}"
    )
    return record, "; ".join([source, *notes])


def collective_seconds(size_bytes: float, ranks: int, gbps: float, all_reduce: bool = False) -> float:
    """NCCL ring time of an all-gather / reduce-scatter (``all_reduce``: both) of a ``size_bytes`` buffer."""
    if ranks <= 1:
        return 0.0
    moved = size_bytes * (ranks - 1) / ranks * (2 if all_reduce else 1)
    return moved / (gbps * 1e9)


def plan(recipe: Recipe, nodes: int, gpus_per_node: int, gpu: Gpu, files: list[Path]) -> dict[str, Any]:
    """Every planned number, as plain values (``--json`` prints them)."""
    cfg = recipe.config
    world = nodes * gpus_per_node
    per_micro_step = recipe.micro_batch_tokens * world
    if recipe.step_tokens % per_micro_step:
        raise ValueError(
            f"global_batch.tokens={recipe.step_tokens} is not allowed on {world} GPUs: a multiple of "
            f"data.tokens_per_batch × world size = {recipe.micro_batch_tokens} × {world} = {per_micro_step}"
        )
    accumulation = recipe.step_tokens // per_micro_step
    params = parameter_count(cfg)
    hybrid = recipe.sharding == "hybrid" and world > 1
    shard = (recipe.hsdp_shard_size or gpus_per_node) if hybrid else world
    replicas = world // shard
    if world % shard:
        raise ValueError(f"execution.hsdp_shard_size={shard} is not allowed: a divisor of the {world} GPUs")
    # Memory: fp32 weights, gradients, AdamW moments over the shard group; all-gathered bf16 units (current and
    # prefetched: at most twice the largest, the embedding or head); unsharded fp32 gradients under `step`.
    states = 16 * params / shard / GIB
    gathered = 2 * 2 * cfg.d_token * cfg.vocab_size / GIB if world > 1 else 0.0
    unsharded_grads = 4 * params / GIB if recipe.gradient_sync == "step" and world > 1 else 0.0
    tokens, compiled = recipe.micro_batch_tokens, recipe.compile_blocks
    eager_extra, eager_note = (0.0, "") if compiled else eager_extra_bytes_per_token(params, files)
    kept = {"none": 1.0, "selective": 0.5, "full": 0.0}  # share of the blocks whose internals stay saved
    activations = {
        mode: activation_gib(cfg, tokens, mode, compiled) + kept[mode] * eager_extra * tokens / GIB
        for mode in ("none", "full")
    }
    active = activation_gib(cfg, tokens, recipe.checkpointing, compiled)
    active += kept[recipe.checkpointing] * eager_extra * tokens / GIB
    total = states + gathered + unsharded_grads + active

    # Collective bytes per GPU per optimizer step: all-gathers in bf16 for forward and backward, gradient
    # reduce-scatter and replica all-reduce in fp32.
    shard_links = gpu.network_gbps if shard > gpus_per_node else gpu.nvlink_gbps
    gather = collective_seconds(2 * params, shard, shard_links)
    scatter = collective_seconds(4 * params, shard, shard_links)
    all_reduce = collective_seconds(4 * params / shard, replicas, gpu.network_gbps, all_reduce=True)
    reduce_each = recipe.gradient_sync == "micro_batch"
    scatter_each = recipe.gradient_sync != "step"
    per_micro_comm = 2 * gather + (scatter if scatter_each else 0) + (all_reduce if reduce_each else 0)
    last_comm = 2 * gather + scatter + all_reduce
    moved = lambda size, ranks, factor=1: size * (ranks - 1) / ranks * factor if ranks > 1 else 0.0  # noqa: E731
    scatters = accumulation if scatter_each else 1
    reduces = accumulation if reduce_each else 1
    intra = 2 * accumulation * moved(2 * params, shard) + scatters * moved(4 * params, shard)
    inter = reduces * moved(4 * params / shard, replicas, 2)
    if shard > gpus_per_node:  # full sharding across nodes: the shard group's traffic crosses the network
        intra, inter = 0.0, inter + intra

    # Compute: the measured single-GPU step, scaled to the recipe's context by FLOPs per token.
    record, source = measured_throughput(params, recipe.context, recipe.compile_blocks, gpu, files)
    flops_recipe = inference_flops_per_token(cfg, recipe.context).total
    flops_measured = inference_flops_per_token(cfg, int(record["context"])).total
    seconds_per_token = 1.0 / record["tokens_per_sec"] * flops_recipe / flops_measured
    recompute = {"none": 0.0, "selective": 1 / 6, "full": 1 / 3}[recipe.checkpointing]
    compute = recipe.micro_batch_tokens * seconds_per_token * (1 + recompute)
    # Every micro-batch but the last overlaps its collectives with compute; the last one's gradient reductions
    # finish after its backward (at worst all of them; FSDP2 overlaps the earlier units').
    step_s = (accumulation - 1) * max(compute, per_micro_comm) + max(compute, 2 * gather) + scatter + all_reduce
    if world == 1:
        step_s = accumulation * compute
    tokens_per_s = recipe.step_tokens / step_s
    wall_s = recipe.max_steps * step_s
    return {
        "recipe": recipe.name,
        "gpu": gpu.name,
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "world": world,
        "parameters": params,
        "vocab": recipe.vocab_note,
        "context": recipe.context,
        "micro_batch_tokens": recipe.micro_batch_tokens,
        "step_tokens": recipe.step_tokens,
        "accumulation": accumulation,
        "sharding": "hybrid" if hybrid else "full",
        "mesh": [replicas, shard] if hybrid else [world],
        "gradient_sync": recipe.gradient_sync,
        "activation_checkpointing": recipe.checkpointing,
        "compile_blocks": recipe.compile_blocks,
        "memory_gib": {
            "weights_fp32": 4 * params / shard / GIB,
            "gradients_fp32": 4 * params / shard / GIB,
            "adamw_fp32": 8 * params / shard / GIB,
            "gathered_bf16": gathered,
            "unsharded_gradients": unsharded_grads,
            "activations_none": activations["none"],
            "activations_full": activations["full"],
            "activations": active,
            "total": total,
            "gpu": gpu.memory_gib,
        },
        "comm_gib_per_step": {"intra_node": intra / GIB, "inter_node": inter / GIB},
        "comm_s_last_micro_batch": last_comm,
        "compute_s_per_micro_batch": compute,
        "throughput_source": source,
        "activation_note": eager_note,
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / world,
        "max_steps": recipe.max_steps,
        "tokens": recipe.max_steps * recipe.step_tokens,
        "days": wall_s / 86400,
        "gpu_hours": wall_s * world / 3600,
    }


def render(p: dict[str, Any], gpu: Gpu) -> str:
    mem, comm = p["memory_gib"], p["comm_gib_per_step"]
    mesh = " × ".join(map(str, p["mesh"])) + (" (replicate × shard)" if p["sharding"] == "hybrid" else " (shard)")
    fits = "fits" if mem["total"] < mem["gpu"] else "DOES NOT FIT"
    lines = [
        f"Plan: {p['recipe']} on {p['nodes']} node(s) × {p['gpus_per_node']} {gpu.name.upper()} = {p['world']} GPUs",
        f"  parameters            {p['parameters']:,} ({p['vocab']})",
        f"  step                  {p['step_tokens']:,} tokens = {p['micro_batch_tokens']:,} per micro-batch × "
        f"{p['accumulation']} accumulation × {p['world']} GPUs; context {p['context']:,}",
        f"  sharding              {p['sharding']}, mesh {mesh}, gradient_sync {p['gradient_sync']}, "
        f"compile_blocks {str(p['compile_blocks']).lower()}, activation_checkpointing {p['activation_checkpointing']}",
        "Memory per GPU (GiB)",
        f"  weights fp32          {mem['weights_fp32']:8.2f}",
        f"  gradients fp32        {mem['gradients_fp32']:8.2f}",
        f"  AdamW state fp32      {mem['adamw_fp32']:8.2f}",
        f"  gathered bf16 units   {mem['gathered_bf16']:8.2f}",
        f"  unsharded gradients   {mem['unsharded_gradients']:8.2f}   (gradient_sync: step keeps 4 bytes/parameter)",
        f"  activations           {mem['activations_none']:8.2f}   without checkpointing",
        f"                        {mem['activations_full']:8.2f}   with full checkpointing",
        f"  total                 {mem['total']:8.2f}   of {mem['gpu']:.0f} ({fits}; "
        f"activation_checkpointing {p['activation_checkpointing']})",
        "Communication per GPU per optimizer step",
        f"  inside a node         {comm['intra_node']:8.2f} GiB",
        f"  across nodes          {comm['inter_node']:8.2f} GiB",
        "Time",
        f"  compute/micro-batch   {p['compute_s_per_micro_batch'] * 1e3:8.1f} ms",
        f"  collectives, last mb  {p['comm_s_last_micro_batch'] * 1e3:8.1f} ms",
        f"  step                  {p['step_s']:8.3f} s",
        f"  throughput            {p['tokens_per_s']:,.0f} tokens/s ({p['tokens_per_s_per_gpu']:,.0f} per GPU)",
        f"  to {p['tokens']:.3g} tokens   {p['max_steps']:,} steps: {p['days']:.1f} days, "
        f"{p['gpu_hours']:,.0f} GPU-hours",
        "Assumptions",
        f"  - compute from {p['throughput_source']}; scaled to context {p['context']:,} by FLOPs per token",
        f"  - {gpu.name.upper()}: {gpu.memory_gib:.0f} GiB, NCCL bus bandwidth {gpu.nvlink_gbps:.0f} GB/s per GPU "
        f"in a node (NVLink), {gpu.network_gbps:.0f} GB/s across nodes (one 400 Gb/s NIC per GPU)",
        "  - collectives overlap compute except the last micro-batch's gradient reductions; ring algorithm",
        "  - activations: bf16 saved tensors per compiled block; logits and their gradient in bf16"
        + ("" if p["compile_blocks"] else f" and fp32 (eager cross-entropy); {p['activation_note']}")
        + "; allocator slack not included",
        "  - no data-loading, checkpoint-saving or validation time; no stragglers or failures",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dlcm plan", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", type=Path, help="training recipe (YAML)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h200")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the recipe's data, else DeepSeek-V3")
    parser.add_argument("--step-tokens", type=int, default=None, help="default: the recipe's global_batch.tokens")
    parser.add_argument("--nvlink-gbps", type=float, default=None, help="NCCL bus bandwidth in a node, GB/s")
    parser.add_argument("--network-gbps", type=float, default=None, help="NCCL bus bandwidth across nodes, GB/s")
    parser.add_argument("--throughput", type=Path, nargs="*", default=None, help="train_throughput JSON files")
    parser.add_argument("--compile-blocks", choices=["true", "false"], help="override execution.compile_blocks")
    parser.add_argument(
        "--activation-checkpointing", choices=["none", "selective", "full"], help="override the recipe's"
    )
    parser.add_argument("--gradient-sync", choices=["micro_batch", "step", "replicas_at_step"], help="override")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: at least 1")
    gpu = GPUS[args.gpu]
    overrides = {"nvlink_gbps": args.nvlink_gbps, "network_gbps": args.network_gbps}
    gpu = dataclasses.replace(gpu, **{k: v for k, v in overrides.items() if v is not None})
    files = args.throughput or sorted(RESULTS.glob("train_throughput_*.json"))
    try:
        recipe = read_recipe(args.recipe, args.vocab_size, args.step_tokens)
        if args.compile_blocks is not None:
            recipe.compile_blocks = args.compile_blocks == "true"
        recipe.checkpointing = args.activation_checkpointing or recipe.checkpointing
        recipe.gradient_sync = args.gradient_sync or recipe.gradient_sync
        result = plan(recipe, args.nodes, args.gpus_per_node, gpu, files)
    except (ValueError, FileNotFoundError) as err:
        print(f"dlcm plan: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else render(result, gpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
