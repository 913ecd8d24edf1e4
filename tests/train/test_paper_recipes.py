"""The paper's recipes (recipes/paper): current with their generator, instantiable through the real CLI, and every
number their headers state recomputed from the recipe as the CLI builds it.

Networks are built on the meta device (the recipes set `execution.meta_init`: the 2.3B model must not be
allocated on a CPU runner) and the data is a tiny mixture with the recipes' four source names, so the linked
vocabulary is the fixture tokenizer's: counts and FLOPs at the DeepSeek-V3 vocabulary are recomputed from the
instantiated widths (embedding and head are d × V each).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from dlcm.data.shards import build_shards
from dlcm.data.sources import Document
from dlcm.data.tokenizer import train_bpe
from dlcm.model.config import DLCMConfig
from dlcm.model.dlcm import DLCM
from dlcm.model.flops import inference_flops_per_token
from dlcm.model.presets import (
    DEEPSEEK_V3_VOCAB,
    GRID_FRACTIONS,
    GRID_RATIOS,
    GRID_SIZES,
    baseline_1_3b,
    dlcm_2_3b,
    dlcm_87m,
    dlcm_family,
    dlcm_grid,
)
from dlcm.research.scaling import SIDECAR_KEYS
from dlcm.train.checkpoint_io import AtomicModelParallelStrategy
from dlcm.train.cli import run_cli

PAPER = Path(__file__).parents[2] / "recipes" / "paper"
RECIPES = sorted(PAPER.rglob("*.yaml"))
PAPER_MIXTURE = {"nemotron_cc": 0.5, "map_cc": 0.25, "opencoder": 0.15, "megamath_web": 0.1}  # paper Table 1
NUMBER = r"([\d,]+)"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_recipes", PAPER / "make_recipes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def integer(text: str) -> int:
    return int(text.replace(",", ""))


def stated(text: str, pattern: str, recipe: Path) -> tuple[str, ...]:
    match = re.search(pattern, text)
    assert match, f"{recipe.name} must state {pattern!r}"
    return match.groups()


@pytest.fixture(scope="module")
def mixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recipes' four mixture sources as tiny shard directories sharing one tokenizer."""
    root = tmp_path_factory.mktemp("paper_mix")
    docs = {
        name: [Document(f"{name}{i}", f"{name} document {i} " + "text " * (i % 7 + 3), name) for i in range(24)]
        for name in PAPER_MIXTURE
    }
    tokenizer = root / "tokenizer.json"
    train_bpe((d.text for ds in docs.values() for d in ds), 280, tokenizer)
    for name, source_docs in docs.items():
        build_shards(source_docs, tokenizer, root / name, val_fraction=0.25, docs_per_shard=8, progress=False)
    return root


def instantiate(recipe: Path, data_dir: Path, *extra: str) -> Any:
    args = [
        f"--config={recipe}",
        f"--data.data_dir={data_dir}",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--trainer.logger=false",
        "--data.num_workers=0",
        *extra,
    ]
    return run_cli(args, run=False)


def expected_config(recipe: Path) -> Any:
    """The preset a recipe's name says it trains."""
    name = recipe.stem
    if name.startswith("baseline_1.3b"):
        return baseline_1_3b()
    if name.startswith("dlcm_2.3b_r4"):
        return dlcm_2_3b()
    if name == "mup_proxy_87m":
        return dataclasses.replace(dlcm_87m(), d_base=384)  # μP: widths relative to the proxy's own d_token
    size, ratio, percent = re.fullmatch(r"dlcm_(\d+m)_r(\d)_p(\d+)_8xh200", name).groups()
    return dlcm_grid(size, int(percent) / 100, float(ratio))


# --- the files ---


def test_recipes_are_what_the_generator_writes() -> None:
    generator = load_generator()
    runs = generator.runs()
    assert sorted(PAPER / run.path for run in runs) == RECIPES  # no stale or missing file
    for run in runs:
        assert (PAPER / run.path).read_text() == generator.render(run), f"rerun {PAPER / 'make_recipes.py'}"


def test_the_grid_is_complete() -> None:
    grid = {p.stem for p in RECIPES if p.parent.name == "grid"}
    expected = {
        f"dlcm_{size}_r{ratio:g}_p{round(100 * fraction)}_8xh200"
        for size in ("274m", "468m", "833m")
        for ratio in (2, 4, 8)
        for fraction in (0.3, 0.5, 0.7)
    }
    assert grid == expected and len(grid) == 27
    assert set(GRID_RATIOS) == {2.0, 4.0, 8.0} and set(GRID_FRACTIONS) == {0.3, 0.5, 0.7}


def test_grid_shapes_follow_table_3_rules_and_hit_their_targets() -> None:
    assert dlcm_family(1536, 10, 16, 6) == dlcm_2_3b()  # the rule reproduces the paper's own shape
    for size, (width, target) in GRID_SIZES.items():
        for fraction in (0.7,) if size == "87m" else GRID_FRACTIONS:
            cfg = dlcm_grid(size, fraction)
            with torch.device("meta"):
                net = DLCM(cfg)
            body = sum(p.numel() for p in net.parameters()) - net.embed.weight.numel() - net.head.proj.weight.numel()
            backbone = sum(p.numel() for p in net.backbone.parameters())
            assert cfg.d_token == width and cfg.d_concept == 2 * width
            assert body == pytest.approx(target, rel=0.025), (size, fraction)
            assert backbone / body == pytest.approx(fraction, abs=0.025), (size, fraction)
            assert cfg.encoder.n_layers >= cfg.decoder.n_layers >= 1  # Table 3's 10:6 split
    with pytest.raises(ValueError, match=r"size='1b' is not allowed"):
        dlcm_grid("1b", 0.5)
    with pytest.raises(ValueError, match=r"backbone_fraction=1.0 is not allowed"):
        dlcm_grid("274m", 1.0)


def test_slurm_example_matches_the_multi_node_recipes() -> None:
    script = (PAPER / "slurm_8x8.sbatch").read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script, flags=re.M))
    recipe = Path(__file__).parents[2] / stated(script, r"RECIPE:-(recipes/paper/\S+\.yaml)", PAPER / "sbatch")[0]
    text = recipe.read_text()
    assert "8nodes" in recipe.name and directives["nodes"] == stated(text, r"num_nodes: (\d+)", recipe)[0] == "8"
    planned = stated(text, r"devices: auto .*planned: (\d+)\)", recipe)[0]  # auto: the node's GPUs
    assert directives["ntasks-per-node"] == directives["gpus-per-node"] == planned
    assert re.search(r"^srun .*dlcm fit --config \"\$RECIPE\"", script, flags=re.M)


# --- every recipe through the CLI ---


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_instantiates_and_its_header_is_right(recipe: Path, mixture_root: Path) -> None:
    text = recipe.read_text()
    planned = re.search(r"devices: auto .*planned: (\d+)\)", text)  # as launched on the planned node
    cli = instantiate(recipe, mixture_root, *([f"--trainer.devices={planned[1]}"] if planned else []))
    assert all(p.is_meta for p in cli.model.network.parameters())  # nothing was allocated
    model, trainer, data = cli.model, cli.trainer, cli.datamodule
    config = dataclasses.replace(model.config, vocab_size=DEEPSEEK_V3_VOCAB)
    assert config == expected_config(recipe)
    assert data.mixture.weights == PAPER_MIXTURE
    assert model.context_length == data.max_seq_len == 2048

    # Parameters, at the DeepSeek-V3 vocabulary: embedding and head are d_token × V each (untied).
    net = model.network
    d_token = net.embed.weight.shape[1]
    assert net.embed.weight.numel() == net.head.proj.weight.numel() == d_token * data.vocab_size
    body = sum(p.numel() for p in net.parameters()) - 2 * d_token * data.vocab_size
    assert integer(stated(text, rf"Parameters: {NUMBER} in total", recipe)[0]) == body + 2 * d_token * DEEPSEEK_V3_VOCAB
    (body_m,) = stated(text, r"Parameters without embedding and head: ([\d.]+)M", recipe)
    assert float(body_m) == pytest.approx(body / 1e6, abs=0.006)
    is_dlcm = isinstance(config, DLCMConfig)
    if is_dlcm:
        share = sum(p.numel() for p in net.backbone.parameters()) / body
        assert float(stated(text, r"backbone share P = ([\d.]+)%", recipe)[0]) == pytest.approx(100 * share, abs=0.05)

    # Inference FLOPs per token at the recipe's context and R.
    flops = inference_flops_per_token(config, model.context_length)
    total, matmul, attention = map(
        float,
        stated(
            text,
            r"FLOPs per token: ([\d.]+) GFLOP \(matmul ([\d.]+), "
            r"attention ([\d.]+)\)",
            recipe,
        ),
    )
    for value, exact in ((total, flops.total), (matmul, flops.matmul), (attention, flops.attention)):
        assert value == pytest.approx(exact / 1e9, abs=5e-4)
    at_ratio = f" at R = {config.parser.target_ratio:g}," if is_dlcm else ","
    assert f"for {model.context_length:,}-token documents{at_ratio}" in text
    if recipe.name.startswith("dlcm_2.3b"):
        base = inference_flops_per_token(baseline_1_3b(), model.context_length).total
        factor, base_g = map(float, stated(text, r"That is ([\d.]+) × the baseline's ([\d.]+) GFLOP", recipe))
        assert factor == pytest.approx(flops.total / base, abs=5e-4) and base_g == pytest.approx(base / 1e9, abs=5e-4)

    # Tokens per optimizer step = micro-batch × accumulation × GPUs × nodes, as the trainer and strategy run it.
    step, micro, acc, gpus, nodes = map(
        integer,
        stated(
            text,
            rf"Tokens per optimizer step: {NUMBER} = {NUMBER} per micro-batch × (\d+) accumulation × "
            r"(\d+) GPUs? × (\d+) nodes?",
            recipe,
        ),
    )
    assert micro == data.tokens_per_batch and acc == trainer.accumulate_grad_batches
    assert gpus == trainer.num_devices and nodes == trainer.num_nodes and trainer.world_size == gpus * nodes
    assert step == micro * acc * gpus * nodes
    if "mup" not in recipe.name:
        assert step == 2**22  # LLaMA-1's 4M-token batch, which the paper adopts
    if gpus * nodes > 1:
        assert isinstance(trainer.strategy, AtomicModelParallelStrategy)  # FSDP2, atomic sharded checkpoints
        strategy = cli.config.trainer.strategy.init_args
        assert strategy.data_parallel_size == "auto" and strategy.tensor_parallel_size == 1  # = devices × num_nodes
        assert model.execution_cfg.sharding == ("hybrid" if nodes > 1 else "full")  # HSDP across nodes
    # The step is fixed in tokens: accumulation was derived from it for this world size.
    assert cli.config.global_batch.tokens == step

    # Planned steps = ceil(training tokens / tokens per step) = trainer.max_steps, and the compute they imply.
    tokens = integer(stated(text, rf"Training tokens: {NUMBER}", recipe)[0])
    steps = integer(stated(text, rf"planned steps: {NUMBER}", recipe)[0])
    assert steps == math.ceil(tokens / step) == trainer.max_steps
    if recipe.parent.name == "grid":
        assert tokens == 200 * 10**9  # paper §6.2
    elif "mup" not in recipe.name:
        assert tokens == 10**12  # paper §7.1
    seen, compute = stated(text, rf"× {NUMBER} tokens = ([\d.e+]+) FLOPs", recipe)
    assert integer(seen) == steps * step
    assert float(compute) == pytest.approx(3 * flops.total * steps * step, rel=5e-3)

    # Optimisation: LLaMA-1's settings, as the paper says; cosine for the 1T runs, WSD over the last 10% otherwise.
    opt, schedule = model.optimizer_cfg, model.schedule_cfg
    assert (opt.betas, opt.eps, opt.weight_decay, trainer.gradient_clip_val) == ((0.9, 0.95), 1e-8, 0.1, 1.0)
    assert schedule.total_steps is None and schedule.min_lr_ratio == 0.1
    if recipe.parent.name == "paper" and "mup" not in recipe.name:
        assert (opt.lr, schedule.kind, schedule.warmup_steps) == (3e-4, "cosine", 2000)
        assert "2,000 warm-up steps, then cosine to 10% of the peak" in text
    else:
        assert (schedule.kind, schedule.decay_fraction) == ("wsd", 0.1)
        assert f"{schedule.warmup_steps:,} warm-up steps, flat, linear decay" in text
    if "mup" in recipe.name:
        (mup,) = [c for c in trainer.callbacks if type(c).__name__ == "DecoupledMuP"]
        assert mup.d_base == config.d_base == config.d_token == 384
    else:
        assert opt.lr == 3e-4 and config.d_base is None

    if recipe.parent.name == "grid":
        (sidecar,) = stated(text, r"dlcm scaling fit --runs`:\n#   (\{.*\})", recipe)
        meta = json.loads(sidecar)
        assert set(meta) <= set(SIDECAR_KEYS)
        assert meta["N"] == body and meta["R"] == config.parser.target_ratio and meta["tokens_per_step"] == step
        assert meta["P"] == pytest.approx(share, abs=5e-5)


MUP_TRANSFER = [  # recipes/README.md: μP on any paper recipe, with base rates tuned on the proxy
    "--model.init_args.config.d_base=384",
    "--trainer.callbacks+=dlcm.callbacks.mup.DecoupledMuP",
    "--trainer.callbacks.d_base=384",
    "--trainer.callbacks.lr_token=6e-4",
    "--trainer.callbacks.lr_concept=5e-4",
    "--trainer.callbacks.lr_others=4e-4",
]


@pytest.mark.parametrize(
    ("recipe", "extra", "rates"),
    [
        ("mup_proxy_87m.yaml", ["--trainer.callbacks.init_args.lr_concept=4.5e-4"], (3e-4, 4.5e-4, 3e-4)),
        ("grid/dlcm_468m_r4_p50_8xh200.yaml", MUP_TRANSFER, (6e-4, 5e-4, 4e-4)),
    ],
    ids=["proxy_sweep", "transfer"],
)
def test_documented_mup_commands_reach_the_callback(
    recipe: str, extra: list[str], rates: tuple[float, ...], mixture_root: Path
) -> None:
    cli = instantiate(PAPER / recipe, mixture_root, *extra)
    (mup,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "DecoupledMuP"]
    assert (mup.lr_token, mup.lr_concept, mup.lr_others) == rates
    assert mup.d_base == cli.model.config.d_base == 384
