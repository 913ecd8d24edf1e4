"""Analytic FLOPs (dlcm/model/flops.py) against FlopCounterMode, the paper presets' compute split, `dlcm flops`, and
the FlopsThroughput callback on a real tiny fit."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dlcm.callbacks.throughput import FlopsThroughput
from dlcm.data.shards import Manifest, build_shards
from dlcm.data.sources import Document
from dlcm.data.tokenizer import train_bpe
from dlcm.infer.recipe import load_recipe
from dlcm.model.config import EXACT_MIN_TOKENS, DLCMConfig
from dlcm.model.flops import (
    LengthStats,
    cross_kernel,
    flops_from_stats,
    inference_flops_per_token,
    model_flops,
    packed_length_sums,
    stage_costs,
)
from dlcm.model.linear import Linear
from dlcm.model.presets import baseline_1_3b, build_model, dlcm_2_3b, tiny_baseline, tiny_dlcm
from dlcm.research.flops_report import format_report, load_preset, main, report
from dlcm.train.cli import run_cli
from tests.conftest import random_cu_seqlens

RECIPES = Path(__file__).parents[2] / "recipes"
aten = torch.ops.aten


def sdpa_pairs(lengths: list[int]) -> int:
    """Query-key pairs `_sdpa` scores: a dense [T, T] mask or a padded [docs, max_seqlen] batch, whichever is less."""
    total, longest = sum(lengths), max(lengths)
    return min(total * total, len(lengths) * longest * longest)


@pytest.mark.parametrize("kind", ["dlcm", "baseline"])
@pytest.mark.parametrize("doc_lengths", [[96], [40, 25, 60, 3]], ids=["one_doc", "four_docs"])
def test_matmul_flops_match_flop_counter_on_forward_backward(kind: str, doc_lengths: list[int]) -> None:
    # FlopCounterMode sees linear layers as aten.mm. It counts 0 for the CPU flash kernel of SDPA, so attention runs
    # on the math backend, whose QKᵀ/PV (and their gradients) show up as aten.bmm on the layout _sdpa builds.
    torch.manual_seed(0)
    cfg = tiny_dlcm() if kind == "dlcm" else tiny_baseline()
    cfg.attn_backend = "sdpa"
    net = build_model(cfg).train()
    cu_T = random_cu_seqlens(doc_lengths)
    ids_T = torch.randint(0, cfg.vocab_size, (sum(doc_lengths),))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if kind == "dlcm":
            out = net(ids_T, cu_T, max(doc_lengths), generator=torch.Generator().manual_seed(0))
            loss = out.logits_TV.logsumexp(-1).mean() + out.aux_loss
            concepts = out.layout.seqs.cu_seqlens.diff().tolist()
        else:
            loss = net(ids_T, cu_T, max(doc_lengths)).logsumexp(-1).mean()
            concepts = None
        loss.backward()
    counted = counter.get_flop_counts()["Global"]
    flops = model_flops(net, doc_lengths, concepts, training=True)

    mm = counted[aten.mm]
    print(f"{kind} {doc_lengths}: aten.mm {mm:,} vs analytic matmul {flops.matmul:,.0f} ({mm / flops.matmul - 1:+.2%})")
    assert mm == pytest.approx(flops.matmul, rel=0.02)
    assert mm == flops.matmul  # in fact exact: every matrix, every row, 3 passes

    costs = stage_costs(cfg)
    tok_width = sum(c.attn_width for c in costs.values() if c.hardware_stream == "token")
    expected_bmm = 12 * tok_width * sdpa_pairs(doc_lengths)
    if concepts is not None:
        expected_bmm += 12 * costs["backbone"].attn_width * sdpa_pairs(concepts)
    assert counted[aten.bmm] == expected_bmm
    if len(doc_lengths) == 1:  # one document: the dense kernel scores exactly the replication kernel's pairs
        assert counted[aten.bmm] == flops.hardware_attention


def test_worked_example_and_length_sums() -> None:
    lengths, concepts = [40, 25, 60, 3], [24, 8, 24, 1]
    flops = model_flops(tiny_dlcm(), lengths, concepts)
    assert flops.matmul == 6 * (46_080 * 128 + 44_544 * 57) == 50_623_488  # the module docstring's example
    on_device = packed_length_sums(random_cu_seqlens(lengths), random_cu_seqlens(concepts))
    assert LengthStats.from_sums(on_device) == LengthStats.from_lengths(lengths, concepts)
    # FLOPs are linear in the sums: two micro-batches counted together = counted apart.
    other = LengthStats.from_lengths([7, 9], [2, 3])
    both = flops_from_stats(tiny_dlcm(), LengthStats.from_lengths(lengths, concepts) + other)
    assert both.total == pytest.approx(flops.total + flops_from_stats(tiny_dlcm(), other).total, rel=1e-12)
    # Model FLOPs: L×C pairs for Ψ; hardware: the replication kernel's L×L; causal: L(C+1)/2 and L(L+1)/2.
    one = model_flops(tiny_dlcm(), [8], [2], training=False)
    width = stage_costs(tiny_dlcm())["cross_attention"].attn_width
    assert one.stages["cross_attention"].attention == 4 * width * 8 * 2
    assert one.stages["cross_attention"].hardware_attention == 4 * width * 8 * 8
    causal = model_flops(tiny_dlcm(), [8], [2], training=False, causal_discount=True)
    assert causal.stages["cross_attention"].attention == 4 * width * 8 * 3 / 2
    assert causal.stages["encoder"].attention == 4 * 2 * 32 * 8 * 9 / 2
    exact = model_flops(tiny_dlcm(), [8], [2], training=False, kernel="exact")
    assert exact.hardware_total == exact.total == one.total
    # impl='auto' runs the exact L×C kernel only on CUDA, for batches whose max_seqlen reaches EXACT_MIN_TOKENS.
    assert cross_kernel(tiny_dlcm(), "cuda", EXACT_MIN_TOKENS) == "exact"
    assert cross_kernel(tiny_dlcm(), "cuda", EXACT_MIN_TOKENS - 1) == cross_kernel(tiny_dlcm()) == "replicate"
    with pytest.raises(ValueError, match="concept_doc_lengths"):
        model_flops(tiny_dlcm(), lengths)


@pytest.mark.parametrize("make", [dlcm_2_3b, baseline_1_3b, tiny_dlcm, tiny_baseline])
def test_stage_parameters_are_the_networks_matrices(make) -> None:
    cfg = make()
    with torch.device("meta"):
        net = build_model(cfg)
    prefix = {"cross_attention": "cross"}
    for stage, cost in stage_costs(cfg).items():
        name = prefix.get(stage, stage)
        weights = [m.weight for n, m in net.named_modules() if isinstance(m, Linear) and n.startswith(f"{name}.")]
        assert cost.token_params + cost.concept_params == sum(w.numel() for w in weights), stage
    if isinstance(cfg, DLCMConfig):  # Ψ's concept rows go through W_K and W_V only
        assert stage_costs(cfg)["cross_attention"].concept_params == net.cross.wk.weight.numel() * 2
    all_matrices = sum(m.weight.numel() for m in net.modules() if isinstance(m, Linear))
    assert sum(c.token_params + c.concept_params for c in stage_costs(cfg).values()) == all_matrices


def test_paper_presets_backbone_share_and_flops_ratio() -> None:
    # Bands. "About a third of inference compute in the backbone" (paper, R = 4) read as within ±20% of 1/3,
    # [0.27, 0.40]: it holds both readings of Table 3's ambiguous token-stack FFN width (6144, ours: 30% of matmul
    # FLOPs; 4096: 34%, paper digest §6.4) and excludes a quarter and a half. "Approximately matched" FLOPs: ±10%.
    dlcm, base = load_preset("dlcm_2.3b"), load_preset("baseline_1.3b")
    found = {}
    for context in (2048, 8192):
        for causal in (False, True):
            result = report(dlcm, base, context, 4.0, causal)
            found[context, causal] = (result["model"]["backbone_share"], result["flops_ratio"])
            if not causal:
                print(format_report(result))
    print("(context, causal discount): (backbone share, DLCM/baseline FLOPs)", found)

    # Matmul part against the paper digest's hand count (§6.4): 2.29 vs 2.21 GFLOP/token, backbone ≈ 30%.
    d, b = inference_flops_per_token(dlcm.config, 2048, 4), inference_flops_per_token(base.config, 2048)
    assert d.matmul == pytest.approx(2.29e9, rel=0.01) and b.matmul == pytest.approx(2.21e9, rel=0.01)
    assert 0.27 <= d.stages["backbone"].matmul / d.matmul <= 0.40 and 0.9 <= d.matmul / b.matmul <= 1.1
    for causal in (False, True):
        share_2k, ratio_2k = found[2048, causal]
        share_8k, ratio_8k = found[8192, causal]
        assert 0.27 <= share_2k <= 0.40 and 0.9 <= ratio_2k <= 1.1
        # At 8k, token-side attention grows ∝ L per token and the backbone's only ∝ L/R²: the backbone's share
        # falls below the band and DLCM becomes cheaper than the baseline (32 token layers vs 16 + Ψ).
        assert 0.2 < share_8k < share_2k and 0.8 < ratio_8k < ratio_2k


def test_flops_subcommand_presets_json_and_every_recipe(capsys) -> None:
    args = ["--preset", "dlcm_2.3b", "--baseline-preset", "baseline_1.3b", "--ratio", "4", "--context", "8192"]
    assert main([*args, "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    d = inference_flops_per_token(dlcm_2_3b(), 8192, 4)
    assert result["model"]["flops_per_token"]["total"] == pytest.approx(d.total)
    assert result["model"]["backbone_share"] == pytest.approx(d.share("backbone"))
    assert result["flops_ratio"] == pytest.approx(d.total / inference_flops_per_token(baseline_1_3b(), 8192).total)
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "backbone share" in table and "dlcm_2.3b / baseline_1.3b" in table

    recipes = sorted(RECIPES.glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        model = load_recipe(recipe)
        assert "4,096" in model.vocab_note and "embedded default corpus" in model.vocab_note  # data_dir: null
        assert main(["--config", str(recipe)]) == 0, recipe
        assert f"context {model.context_length:,}" in capsys.readouterr().out
    assert load_recipe(recipes[0], vocab_size=1000).config.vocab_size == 1000


def test_flops_subcommand_errors(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  class_path: dlcm.train.lightning_modules.BaselineModule\n  init_args:\n    config:\n"
        "      stack: {width: 32, n_layers: 1, n_heads: 4, n_kv_heads: 4, ffn_hidden: 64, n_layer: 3}\n"
    )
    assert main(["--config", str(bad)]) == 1
    assert "n_layer is not a field of StackConfig" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 1
    with pytest.raises(SystemExit):
        main(["--preset", "dlcm_9b"])


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few hundred documents of varied length (ragged ``cu_seqlens``), cheaper than the embedded corpus."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    docs = [
        Document(f"doc{i}", " ".join(rng.choice(words) for _ in range(rng.randint(5, 300))), "prose")
        for i in range(300)
    ]
    root = tmp_path_factory.mktemp("flops-data")
    train_bpe((d.text for d in docs), 300, root / "tokenizer.json")
    build_shards(docs, root / "tokenizer.json", root / "shards", val_fraction=0.1, progress=False)
    return root / "shards"


@pytest.mark.parametrize("mixture", [False, True], ids=["directory", "mixture"])
def test_recipe_vocabulary_comes_from_its_data(tmp_path: Path, tiny_shards: Path, mixture: bool) -> None:
    data = f"data_dir: {tiny_shards}"
    if mixture:  # one source directory below data_dir, named by the mixture's key
        (tmp_path / "mix").mkdir()
        (tmp_path / "mix" / "web").symlink_to(tiny_shards)
        data = f"data_dir: {tmp_path / 'mix'}\n  mixture: {{web: 1.0}}"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((RECIPES / "dlcm_tiny_r4_defaultcorpus_cpu.yaml").read_text().replace("data_dir: null", data))
    model = load_recipe(recipe)
    assert model.config.vocab_size == Manifest.load(tiny_shards).vocab_size
    assert ("mixture" if mixture else "manifest.json") in model.vocab_note


class FakeClock(Callback):
    """1 s per training micro-batch and 100 s per validation batch; records each optimizer step's FLOPs.

    ``kernels`` is the Ψ kernel the callback was told ran for each micro-batch (it sees the batch first).
    """

    def __init__(self, kernels: list[str]) -> None:
        self.now = 0.0
        self.step = 0
        self.kernels = kernels
        self.steps: dict[int, list[float]] = {}  # step -> [tokens, model FLOPs, hardware FLOPs]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.now += 1.0
        self.step = trainer.global_step + 1  # the optimizer step this micro-batch contributes to

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.now += 100.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        layout = outputs.get("layout")
        concepts = None if layout is None else layout.seqs.cu_seqlens.diff().tolist()
        stats = LengthStats.from_lengths(batch["cu_seqlens"].diff().tolist(), concepts)
        kernel = self.kernels[-1] if self.kernels else None
        flops = flops_from_stats(pl_module.network, stats, training=True, kernel=kernel)
        totals = self.steps.setdefault(self.step, [0.0, 0.0, 0.0])
        for i, value in enumerate((stats.tokens, flops.total, flops.hardware_total)):
            totals[i] += value


@pytest.mark.parametrize("recipe", ["dlcm_tiny_r4_defaultcorpus_cpu.yaml", "baseline_tiny_defaultcorpus_cpu.yaml"])
def test_throughput_callback_logs_consistent_perf_scalars(
    tmp_path: Path, tiny_shards: Path, recipe: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    accumulate, steps, peak = 2, 4, 1e9
    cli = run_cli(
        [
            f"--config={RECIPES / recipe}",
            f"--data.data_dir={tiny_shards}",
            "--data.tokens_per_batch=512",
            f"--trainer.max_steps={steps}",
            f"--trainer.accumulate_grad_batches={accumulate}",
            "--trainer.val_check_interval=6",  # micro-batches: validation inside step 3 (excluded from the time)
            "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ],
        run=False,
    )
    # On CPU Ψ always replicates; pretend the kernel alternates per micro-batch (as impl='auto' may on CUDA when
    # max_seqlen crosses EXACT_MIN_TOKENS) so the per-kernel accounting is exercised too.
    kernels: list[str] = []

    def alternating(cfg, device_type, max_seqlen) -> str:
        kernels.append("exact" if len(kernels) % 2 == 0 else "replicate")
        return kernels[-1]

    monkeypatch.setattr("dlcm.callbacks.throughput.cross_kernel", alternating)
    clock, monitor = FakeClock(kernels), FlopsThroughput(peak_flops_per_device=peak)
    monitor.clock = lambda: clock.now
    # The CLI adds its own FlopsThroughput (the `throughput` section); replace it by the instrumented one.
    cli.trainer.callbacks[:] = [c for c in cli.trainer.callbacks if not isinstance(c, FlopsThroughput)]
    cli.trainer.callbacks.extend([monitor, clock])  # the monitor sees each batch before the clock records it
    cli.trainer.fit(cli.model, cli.datamodule)

    events = EventAccumulator(str(cli.trainer.logger.log_dir))
    events.Reload()
    logged = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"] if "train/perf/" in tag}
    # Step 1 is the reference point; steps 2…4 each cover `accumulate` micro-batches = `accumulate` fake seconds.
    tokens, model, hardware = zip(*(clock.steps[s] for s in range(2, steps + 1)), strict=True)
    assert list(tokens) == [512.0 * accumulate] * (steps - 1)
    assert logged["train/perf/tokens_per_sec"] == pytest.approx([512.0] * (steps - 1), rel=1e-6)
    assert logged["train/perf/tokens_per_sec_per_device"] == logged["train/perf/tokens_per_sec"]  # one device
    assert logged["train/perf/model_flops_per_sec"] == pytest.approx([f / accumulate for f in model], rel=1e-6)
    assert logged["train/perf/hardware_flops_per_sec"] == pytest.approx([f / accumulate for f in hardware], rel=1e-6)
    assert logged["train/perf/mfu"] == pytest.approx([f / accumulate / peak for f in model], rel=1e-6)
    assert logged["train/perf/hfu"] == pytest.approx([f / accumulate / peak for f in hardware], rel=1e-6)
    per_token = [f / n for f, n in zip(model, tokens, strict=True)]
    assert logged["train/perf/model_flops_per_token"] == pytest.approx(per_token, rel=1e-6)
    if isinstance(cli.model.network.cfg, DLCMConfig):  # replicated Ψ scores L×L, more than the model's L×C
        assert len(kernels) == accumulate * steps
        assert all(h > m for h, m in zip(logged["train/perf/hfu"], logged["train/perf/mfu"], strict=True))
    else:
        assert not kernels and logged["train/perf/hfu"] == logged["train/perf/mfu"]
    assert all(math.isfinite(v) and v > 0 for values in logged.values() for v in values)
