"""Write the recipes that reproduce the paper's runs: ``recipes/paper/*.yaml`` and ``recipes/paper/grid/*.yaml``.

    python recipes/paper/make_recipes.py           # (re)write every file
    python recipes/paper/make_recipes.py --check   # exit 1 if a file on disk differs from what this writes

One template for all, so the main runs, the μP proxy and the 27 scaling-grid runs share their trainer, data and
optimizer settings, and every number a header states (parameters, FLOPs per token, tokens per step, planned steps)
is computed here from the model, never typed. ``tests/train/test_paper_recipes.py`` checks the files are current and
recomputes each stated number from the recipe as the CLI instantiates it. Edit this file, not the YAML.

Choices the paper leaves open (docs/design.md, "What the paper leaves open"), made once here:
- Sequence length 2,048 and 4,194,304 (2²²) tokens per optimizer step: the paper trains with "the same global
  batch size, learning rate and sequence length as LLaMA" (LLaMA-1: 4M tokens, 2,048). Table 3's 8k maximum
  position is reachable with ``--model.init_args.context_length=8192`` (the step keeps its token count).
- Micro-batch 16,384 tokens per GPU: it bounds the fp32 logits of the 128,815-token vocabulary to 8.4 GB per GPU.
- Main runs (1T tokens): LLaMA-1's AdamW (peak 3e-4, β = (0.9, 0.95), weight decay 0.1, clip 1.0) with 2,000
  warm-up steps and cosine decay to 10%. Grid runs (200B tokens) and the μP proxy: the paper's WSD schedule with
  the decay over the last 10% of steps (its decay-phase law, Eq. 23, is fitted on the 90–99% window), same floor.
- μP proxy: 2³¹ tokens (≈ 25 tokens per non-embedding parameter) at 2¹⁹ tokens per step on one H200; its base
  learning rates start the paper's coordinate descent at LLaMA-1's 3e-4 (recipes/README.md shows the sweep).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dlcm.model.config import BaselineConfig, DLCMConfig, StackConfig
from dlcm.model.flops import inference_flops_per_token
from dlcm.model.presets import (
    GRID_FRACTIONS,
    GRID_RATIOS,
    GRID_SIZES,
    baseline_1_3b,
    build_model,
    dlcm_2_3b,
    dlcm_87m,
    dlcm_grid,
)
from dlcm.train.global_batch import accumulation_for

HERE = Path(__file__).resolve().parent
CONTEXT = 2048
MICRO_BATCH = 16_384  # tokens per micro-batch per GPU
GLOBAL_BATCH = 4_194_304  # tokens per optimizer step (LLaMA-1's 4M = 2**22)
GPUS_PER_NODE = 8
MAIN_TOKENS = 10**12  # paper §7.1
GRID_TOKENS = 200 * 10**9  # paper §6.2
PROXY_TOKENS = 2**31
PROXY_BATCH = 2**19
PEAK_LR = "3.0e-4"  # LLaMA-1 (as written into the YAML)
WARMUP_STEPS = 2000  # LLaMA-1
PROXY_WARMUP_STEPS = 200  # ≈ 5% of the proxy's steps, the grid's warm-up share (2,000 of 47,684 ≈ 4%)
VALIDATION_TOKENS = 2_097_152  # tokens per validation pass (2**21)
VALIDATION_EVERY = 1000  # optimizer steps between validations (main and grid runs)
PROXY_VALIDATION_EVERY = 256  # optimizer steps between validations of the proxy
CHECKPOINT_EVERY = 500  # optimizer steps between step checkpoints (every_n_minutes bounds the time between them)
MUP_D_BASE = 384  # the proxy's d_token: μP widths are multiples of it (s_token = 1 on the proxy)
MIXTURE = (  # paper Table 1 (§5): source directory name, token share, what it is
    ("nemotron_cc", 0.50, "Nemotron-CC: English web"),
    ("map_cc", 0.25, "MAP-CC: Chinese web"),
    ("opencoder", 0.15, "OpenCoder pre-training corpus: code"),
    ("megamath_web", 0.10, "MegaMath-Web: mathematics"),
)
DATA_DIR = "/data/dlcm/paper_mix"
# FSDP2 through Lightning's ModelParallelStrategy, subclassed so a crash mid-save never corrupts the last checkpoint.
STRATEGY = "dlcm.train.checkpoint_io.AtomicModelParallelStrategy"
# Per-block torch.compile in every paper recipe: switch on once the same-run A/B at context 2,048
# (bench/train_throughput.py --pairs paper --compile off on --context 2048) measures it faster.
COMPILE_BLOCKS = False


@dataclass(frozen=True)
class Run:
    """One recipe: what it trains, on how many GPUs, for how many tokens, and the prose its header adds."""

    path: str  # relative to recipes/paper
    title: str
    config: DLCMConfig | BaselineConfig
    preset: str  # how `dlcm flops` names the shape
    nodes: int
    gpus_per_node: int
    tokens: int
    tokens_source: str
    tokens_per_step: int
    schedule: str  # cosine | wsd
    warmup_steps: int
    validation_every: int
    mup: bool = False
    notes: tuple[str, ...] = ()
    scaling_sidecar: bool = False


_COUNTS: dict[str, tuple[int, int, int]] = {}


def count(config: DLCMConfig | BaselineConfig) -> tuple[int, int, int]:
    """(all parameters, parameters without embedding and head, backbone parameters) of the built network."""
    key = repr([getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "parser"])  # R: same counts
    if key not in _COUNTS:
        with torch.device("meta"):
            net = build_model(config)
        total = sum(p.numel() for p in net.parameters())
        body = total - net.embed.weight.numel() - net.head.proj.weight.numel()
        backbone = sum(p.numel() for p in net.backbone.parameters()) if isinstance(config, DLCMConfig) else 0
        _COUNTS[key] = (total, body, backbone)
    return _COUNTS[key]


def accumulation(run: Run) -> int:
    """Micro-batches per step on the planned hardware (the trainer derives it again from the launch's world size)."""
    return accumulation_for(run.tokens_per_step, MICRO_BATCH, run.gpus_per_node * run.nodes)


def planned_steps(run: Run) -> int:
    return math.ceil(run.tokens / run.tokens_per_step)


def stack_yaml(stack: StackConfig) -> str:
    return (
        f"{{width: {stack.width}, n_layers: {stack.n_layers}, n_heads: {stack.n_heads}, "
        f"n_kv_heads: {stack.n_kv_heads}, ffn_hidden: {stack.ffn_hidden}}}"
    )


def comment(lines: list[str], width: int = 39) -> str:
    """YAML lines with their ``# comment`` parts aligned (a value line must carry one: tests/train/test_recipes.py)."""
    out = []
    for line in lines:
        code, sep, note = line.partition(" # ")
        out.append(f"{code.ljust(width - 1)} # {note}" if sep else line)
    return "\n".join(out) + "\n"


def header(run: Run) -> list[str]:
    cfg = run.config
    total, body, backbone = count(cfg)
    dlcm = isinstance(cfg, DLCMConfig)
    flops = inference_flops_per_token(cfg, CONTEXT)
    steps = planned_steps(run)
    ratio = f" at R = {cfg.parser.target_ratio:g}" if dlcm else ""
    lines = [f"# {line}" for line in run.title.splitlines()]
    lines += [
        "# Generated by recipes/paper/make_recipes.py: edit that and rerun it"
        " (tests/train/test_paper_recipes.py checks).",
        f"# Run: dlcm fit --config recipes/paper/{run.path}"
        + ("\n#   on every node, one process per GPU (srun: see slurm_8x8.sbatch)" if run.nodes > 1 else ""),
        "#",
        f"# Parameters: {total:,} in total (DeepSeek-V3 vocabulary, 128,815 ids, untied embedding and head).",
        f"# Parameters without embedding and head: {body / 1e6:.2f}M"
        + (f"; backbone share P = {backbone / body:.1%}." if dlcm else "."),
        f"# Inference FLOPs per token: {flops.total / 1e9:.3f} GFLOP (matmul {flops.matmul / 1e9:.3f}, attention "
        f"{flops.attention / 1e9:.3f}) for {CONTEXT:,}-token documents{ratio},",
        "#   2 FLOPs per multiply-add, no causal discount (dlcm.model.flops), as printed by",
        f"#   `dlcm flops --preset {run.preset}"
        + (f" --ratio {cfg.parser.target_ratio:g}" if dlcm else "")
        + f" --context {CONTEXT}`.",
    ]
    if run.path.startswith("dlcm_2.3b"):
        base = inference_flops_per_token(baseline_1_3b(), CONTEXT).total
        lines.append(
            f"#   That is {flops.total / base:.3f} × the baseline's {base / 1e9:.3f} GFLOP (baseline_1.3b_*.yaml): the "
            "paper's FLOPs-matched pair."
        )
    nodes = f"{run.nodes} node" + ("s" if run.nodes > 1 else "")
    gpus = f"{run.gpus_per_node} GPU" + ("s" if run.gpus_per_node > 1 else "")
    lines += [
        f"# Tokens per optimizer step: {run.tokens_per_step:,} = {MICRO_BATCH:,} per micro-batch × "
        f"{accumulation(run)} accumulation × {gpus} × {nodes}.",
        "#   global_batch.tokens fixes it: on another GPU count the trainer derives the accumulation again.",
        f"# Training tokens: {run.tokens:,} ({run.tokens_source})",
        f"#   → planned steps: {steps:,} = ceil(tokens / tokens per step) = trainer.max_steps.",
        f"# Training compute ≈ 3 × FLOPs per token × {steps * run.tokens_per_step:,} tokens = "
        f"{3 * flops.total * steps * run.tokens_per_step:.2e} FLOPs.",
    ]
    if run.mup:
        lines += [
            f"# Learning rate: decoupled μP at d_base = {MUP_D_BASE}, base rates {PEAK_LR} for every group",
            f"#   (the coordinate descent's start); WSD: {run.warmup_steps:,} warm-up steps, flat, linear decay over",
            f"#   the last 10% of the {steps:,} steps to 10%.",
        ]
    elif run.schedule == "cosine":
        lines += [
            f"# Learning rate (LLaMA-1's): AdamW peak {PEAK_LR}, β = (0.9, 0.95), weight decay 0.1, clip 1.0;",
            f"#   {run.warmup_steps:,} warm-up steps, then cosine to 10% of the peak at step {steps:,}.",
        ]
    else:
        lines += [
            f"# Learning rate: AdamW peak {PEAK_LR}, β = (0.9, 0.95), weight decay 0.1, clip 1.0 (LLaMA-1's);",
            f"#   WSD (the paper's scaling-law schedule): {run.warmup_steps:,} warm-up steps, flat, linear decay over",
            f"#   the last 10% of the {steps:,} steps to 10%.",
        ]
    if run.scaling_sidecar:
        sidecar = (
            f'{{"N": {body}, "R": {cfg.parser.target_ratio:g}, "P": {backbone / body:.4f}, '
            f'"tokens_per_step": {run.tokens_per_step}}}'
        )
        lines += ["# scaling.json in the run's log directory, for `dlcm scaling fit --runs`:", f"#   {sidecar}"]
    lines += [f"# {note}" for note in run.notes]
    return lines


def model_lines(run: Run) -> list[str]:
    cfg = run.config
    if isinstance(cfg, BaselineConfig):
        lines = [
            "model:",
            "  class_path: dlcm.train.lightning_modules.BaselineModule # dense LLaMA-style decoder-only network",
            "  init_args:",
            f"    context_length: {CONTEXT} # longest document piece in tokens (linked to data.max_seq_len)",
            "    seed: 0 # unused by the baseline",
            "    config: # vocab_size comes from the shards' tokenizer (linked from data)",
            f"      stack: {stack_yaml(cfg.stack)} # Table 3 baseline",
            "      d_base: null # μP base width; null = standard parametrisation",
            f"      init_std: {cfg.init_std} # init std of hidden matrices",
            "      attn_backend: auto # flash_attn if importable, else torch varlen_attn",
        ]
    else:
        c = cfg.cross
        lines = [
            "model:",
            "  class_path: dlcm.train.lightning_modules.DLCMModule # DLCM network + L_CE + λ·L_aux",
            "  init_args:",
            f"    context_length: {CONTEXT} # longest document piece in tokens (linked to data.max_seq_len)",
            "    seed: 0 # seed of the per-step boundary-sampling generator",
            "    config: # vocab_size comes from the shards' tokenizer (linked from data)",
            f"      encoder: {stack_yaml(cfg.encoder)} # token stream E",
            f"      backbone: {stack_yaml(cfg.backbone)} # concept stream M",
            f"      decoder: {stack_yaml(cfg.decoder)} # token stream D",
            f"      cross: {{n_heads: {c.n_heads}, n_kv_heads: {c.n_kv_heads}, ffn_hidden: {c.ffn_hidden}, impl: auto}}"
            " # Ψ (Eqs. 12-17); auto = fastest exact kernel",
            "      parser:",
            f"        target_ratio: {cfg.parser.target_ratio} # R, tokens per concept",
            "        boundary_mode: sample # training discretisation (inference thresholds p >= τ)",
            "        threshold_mode: calibrated # τ tracks the value that realises R on training batches",
            f"        sharpen_alpha: {cfg.parser.sharpen_alpha} # α of sharpen(p) = σ(logit(p)/α)",
            "        router_grad: aux # W_q/W_k learn from the ratio loss only (paper §3.3)",
            "        ratio_scope: global # F over the whole optimizer step, all ranks (Eq. 10)",
            f"        aux_weight: {cfg.parser.aux_weight} # λ",
            "      smoothing: ema # causal EMA over concepts (Eq. 11)",
            (
                f"      d_base: {MUP_D_BASE} # μP base width (= the callback's d_base)"
                if run.mup
                else "      d_base: null # μP base width; null = standard parametrisation"
            ),
            f"      init_std: {cfg.init_std} # σ_base",
            "      attn_backend: auto # flash_attn if importable, else torch varlen_attn",
        ]
    lines += ["    optimizer:"]
    if run.mup:
        lines += ["      betas: [0.9, 0.95] # AdamW β1, β2 (rates, ε and weight decay: the μP callback's groups)"]
    else:
        lines += [
            f"      lr: {PEAK_LR} # peak learning rate (LLaMA-1)",
            "      betas: [0.9, 0.95] # AdamW β1, β2 (LLaMA-1)",
            "      eps: 1.0e-8 # AdamW ε (PyTorch's default; LLaMA-1 states none)",
            "      weight_decay: 0.1 # decoupled weight decay on matrices (LLaMA-1)",
        ]
    lines += [
        "    execution:",
        "      activation_checkpointing: none # none | selective | full: recompute blocks to save memory",
        f"      compile_blocks: {str(COMPILE_BLOCKS).lower()} # true compiles each block; watch "
        "train/compile_graphs for recompiles",
        "      meta_init: true # build on the meta device; configure_model allocates only each rank's shards",
        "      fp32_matmul_precision: high # the parser's fp32 scan projections on TF32 tensor cores (highest: fp32)",
    ]
    lines += sharding_lines(run)
    lines += [
        "    schedule:",
        f"      kind: {run.schedule} # " + ("warm-up, cosine" if run.schedule == "cosine" else "warm-up, flat, decay"),
        f"      warmup_steps: {run.warmup_steps} # optimizer steps of linear warm-up",
        "      total_steps: null # null = trainer.max_steps",
        "      min_lr_ratio: 0.1 # final learning rate / peak",
    ]
    if run.schedule == "wsd":
        lines += ["      decay_fraction: 0.1 # share of the steps spent decaying (paper Eq. 23: 90-99% window)"]
    return lines


def sharding_lines(run: Run) -> list[str]:
    """FSDP2 layout: several nodes replicate across nodes and shard within one (HSDP), so per step only one fp32
    all-reduce of each GPU's gradient shard crosses the network; one node shards over all its GPUs."""
    if run.gpus_per_node * run.nodes == 1:
        return []
    if run.nodes == 1:
        return [
            "      sharding: full # FSDP2 over every GPU (hybrid: shard in a node, replicate across nodes)",
            "      gradient_sync: micro_batch # reduce-scatter every micro-batch (step: +4 B/param, once per step)",
        ]
    return [
        "      sharding: hybrid # HSDP: shard within each node, replicate across nodes",
        "      hsdp_shard_size: null # null = the GPUs of one node (trainer.devices)",
        "      gradient_sync: replicas_at_step # reduce-scatter in the node every micro-batch; all-reduce across "
        "nodes once per step",
    ]


def trainer_lines(run: Run) -> list[str]:
    gpus = run.gpus_per_node * run.nodes
    devices = (
        f"  devices: {run.gpus_per_node} # one GPU, one process"
        if gpus == 1
        else f"  devices: auto # GPUs per node, one process each (auto: all visible; planned: {run.gpus_per_node})"
    )
    lines = [
        "trainer:",
        "  accelerator: gpu # CUDA",
        devices,
        f"  num_nodes: {run.nodes} # nodes"
        + (" (SLURM: --nodes; ranks come from the SLURM environment)" if run.nodes > 1 else ""),
    ]
    if gpus > 1:
        lines += [
            "  strategy: # FSDP2: parameters, gradients, AdamW state sharded (model's execution.sharding)",
            f"    class_path: {STRATEGY} # sharding applied in configure_model",
            "    init_args:",
            "      data_parallel_size: auto # auto = devices × num_nodes: pure data parallelism",
            "      tensor_parallel_size: 1 # dlcm has no tensor parallelism",
            "      async_save: true # checkpoints written in the background: the loop waits for the host copy only",
        ]
    lines += [
        "  precision: bf16-mixed # bf16 compute; gradients reduced and AdamW state kept in fp32",
        f"  max_steps: {planned_steps(run)} # planned optimizer steps (header)",
        "  gradient_clip_val: 1.0 # global gradient-norm clip (LLaMA-1)",
        "  check_val_every_n_epoch: null # count the validation interval across epochs",
        "  num_sanity_val_steps: 0 # no pre-fit validation",
        "  log_every_n_steps: 10 # optimizer steps between scalar writes",
    ]
    if run.mup:
        lines += [
            "  callbacks:",
            "    - class_path: dlcm.callbacks.mup.DecoupledMuP # μP parameter groups (docs/design.md)",
            "      init_args:",
            f"        d_base: {MUP_D_BASE} # μP base width; must equal model.config.d_base",
            f"        lr_token: {PEAK_LR} # η_token at d_base (Adam lr = η_token / s_token)",
            f"        lr_concept: {PEAK_LR} # η_concept at d_base (Adam lr = η_concept / s_concept)",
            f"        lr_others: {PEAK_LR} # embeddings, norm gains, null concept",
            "        eps: 1.0e-8 # AdamW ε at d_base (divided by s per group)",
            "        weight_decay: 0.1 # on matrices and the embedding table",
        ]
    return lines


def data_lines(run: Run) -> list[str]:
    gpus = run.gpus_per_node * run.nodes
    val_batches = max(VALIDATION_TOKENS // (MICRO_BATCH * gpus), 1)
    lines = [
        "data:",
        f"  data_dir: {DATA_DIR} # one `dlcm data build --tokenizer deepseek-v3` directory per source below",
        "  mixture: # token share per source (paper Table 1); must sum to 1",
    ]
    lines += [f"    {name}: {share} # {what}" for name, share, what in MIXTURE]
    lines += [
        f"  tokens_per_batch: {MICRO_BATCH} # tokens per micro-batch per GPU",
        f"  val_batches: {val_batches} # validation micro-batches per GPU ({val_batches * MICRO_BATCH * gpus:,} "
        "tokens in all)",
        "  seed: 0 # data-order seed",
        "  num_workers: 4 # DataLoader workers per GPU (packing runs off the training process)",
    ]
    return lines


def checkpoint_lines() -> list[str]:
    """Saves for weeks of requeued jobs: independent of validation, at least every 30 minutes, resumed by default."""
    return [
        "resume: auto # a restarted or requeued job continues this recipe's newest run from its newest checkpoint",
        "step_checkpoint: # dlcm.train.step_checkpoint.StepCheckpoint: step<N>.ckpt, last.ckpt links the newest",
        f"  every_n_steps: {CHECKPOINT_EVERY} # optimizer steps between saves",
        "  every_n_minutes: 30 # and at least every 30 minutes of training",
        "  keep_last: 2 # complete saves kept (older ones deleted once a newer one is on disk)",
    ]


def render(run: Run) -> str:
    throughput = [
        "throughput: # dlcm.callbacks.throughput.FlopsThroughput: tokens/s, FLOPs/s, MFU (train/perf/*)",
        "  peak_flops_per_device: 9.89e+14 # FLOP/s per GPU: H200 dense bf16 datasheet",
        "  window: 2 # logging points averaged over",
        "  causal_discount: false # false = model FLOPs, no causal discount (docs/design.md)",
    ]
    global_batch = [
        "global_batch: # the optimizer step in tokens; accumulation = tokens / (tokens_per_batch × world size)",
        f"  tokens: {run.tokens_per_step} # tokens per optimizer step over all GPUs",
        f"  validate_every_steps: {run.validation_every} # optimizer steps between validations",
    ]
    body = ["seed_everything: 0 # global seed at start"]
    body += trainer_lines(run) + global_batch + checkpoint_lines() + throughput + model_lines(run) + data_lines(run)
    return "\n".join(header(run)) + "\n" + comment(body)


def runs() -> list[Run]:
    main = {
        "tokens": MAIN_TOKENS,
        "tokens_source": "paper §7.1",
        "tokens_per_step": GLOBAL_BATCH,
        "schedule": "cosine",
        "warmup_steps": WARMUP_STEPS,
        "validation_every": VALIDATION_EVERY,
    }
    out = []
    for nodes, where in ((1, "8xh200"), (8, "8nodes_8xh200")):
        hardware = "one node of 8 H200" if nodes == 1 else "8 nodes × 8 H200"
        out += [
            Run(
                f"baseline_1.3b_{where}.yaml",
                f"The paper's dense LLaMA-style baseline (Table 3, 1.3B) on 1T tokens, {hardware}, FSDP2.",
                baseline_1_3b(),
                "baseline_1.3b",
                nodes,
                GPUS_PER_NODE,
                **main,
            ),
            Run(
                f"dlcm_2.3b_r4_{where}.yaml",
                f"The paper's main DLCM (Table 3, 2.3B, R = 4) on 1T tokens, {hardware}, FSDP2.",
                dlcm_2_3b(),
                "dlcm_2.3b",
                nodes,
                GPUS_PER_NODE,
                **main,
            ),
        ]
    out.append(
        Run(
            "mup_proxy_87m.yaml",
            "The μP proxy (paper §6.1: 87M parameters without embedding and head;"
            " shape ours, dlcm.model.presets.dlcm_87m)\n"
            "on one H200: tune the base learning rates here, then transfer them by width (recipes/README.md).",
            dlcm_87m(),
            "dlcm_87m",
            1,
            1,
            PROXY_TOKENS,
            "ours: ≈ 25 per parameter without embedding and head",
            PROXY_BATCH,
            "wsd",
            PROXY_WARMUP_STEPS,
            PROXY_VALIDATION_EVERY,
            mup=True,
        )
    )
    for size in (s for s in GRID_SIZES if s != "87m"):
        for fraction in GRID_FRACTIONS:
            for ratio in GRID_RATIOS:
                p = round(100 * fraction)
                out.append(
                    Run(
                        f"grid/dlcm_{size}_r{ratio:g}_p{p}_8xh200.yaml",
                        f"Scaling-law grid (paper §6.2): DLCM {size.upper()} (without embedding and head), R = "
                        f"{ratio:g}, backbone share P ≈ {p}%,\non 200B tokens, one node of 8 H200, FSDP2 "
                        f"(shape: dlcm.model.presets.dlcm_grid('{size}', {fraction})).",
                        dlcm_grid(size, fraction, ratio),
                        f"dlcm_{size}_p{p}",
                        1,
                        GPUS_PER_NODE,
                        GRID_TOKENS,
                        "paper §6.2",
                        GLOBAL_BATCH,
                        "wsd",
                        WARMUP_STEPS,
                        VALIDATION_EVERY,
                        scaling_sidecar=True,
                    )
                )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file differs instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for run in runs():
        path = HERE / run.path
        text = render(run)
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(run.path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    verb = "differ from make_recipes.py" if args.check else "written"
    print(f"{len(stale)} recipe(s) {verb}" + (f": {', '.join(stale)}" if stale else ""))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
