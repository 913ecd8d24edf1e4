"""Coordinate check for decoupled μP: activation and update scales per stream, across widths.

The test of a parametrisation (Yang et al., Tensor Programs V, "coord check"): build the same model at several
widths, train each for a few Adam steps on one fixed batch, and measure every stream's typical coordinate size.
Under μP the scales stay flat as the width grows; under the standard parametrisation (SP: fixed init σ, one LR)
the update of hidden activations grows roughly in proportion to the width (an Adam step changes each weight by
≈ η, and a fan-in of ``d`` sums ``d`` coherent changes), and the logits grow with it.

Widths scale as μP assumes: head dim fixed (heads = width / head_dim), FFN = ``ffn_mult``·width, for DLCM
``d_concept = concept_mult·d_token`` (both streams scale together, so ``s_concept = concept_mult·s_token``). μP
runs use ``model.d_base = d_base`` and the groups of :mod:`dlcm.train.mup`; SP runs use ``d_base = None`` and
``dlcm.train.optim.default_param_groups``. Weight decay is off: over a few steps it only adds a width-dependent shrink.

Data: one micro-batch of the synthetic phrase language (:mod:`dlcm.data.synthetic`). DLCM boundaries are pinned
to the true phrase starts (plus document starts) through a forward hook on the parser, so every width and every
step sees the same concept layout and the concept-stream activations at step ``t`` and step 0 are row-aligned.

Streams (forward hooks; stacks are read at their last block, before the final RMSNorm, whose output is ≈ 1 by
construction): ``token/encoder``, ``concept/pooled`` (after W_up), ``concept/backbone``, ``token/cross`` (Ψ output),
``token/decoder``, ``logits``; the dense baseline has ``token/stack`` and ``logits``. Per stream and step:
``act_rms = RMS(a_t)`` and ``update_rms = RMS(a_t − a_0)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from dlcm.data.synthetic import PhraseLanguage
from dlcm.model.config import BaselineConfig, CrossConfig, DLCMConfig, ParserConfig, StackConfig
from dlcm.model.loss import cross_entropy, next_token_targets
from dlcm.model.packing import PackedSeqs
from dlcm.model.parser import ParserOutput
from dlcm.model.presets import build_model
from dlcm.train.mup import MuPSettings, mup_rules
from dlcm.train.optim import OptimizerConfig, default_param_groups

ModelKind = Literal["dlcm", "baseline"]
Parametrisation = Literal["mup", "sp"]
Metric = Literal["act_rms", "update_rms"]


@dataclass(frozen=True)
class CoordCheckConfig:
    """Shapes, data and optimizer of one coordinate check (everything but the width and the parametrisation)."""

    kind: ModelKind = "dlcm"
    d_base: int = 64  # μP base width (the smallest width is the natural choice)
    head_dim: int = 16
    ffn_mult: int = 3  # SwiGLU hidden = ffn_mult · width (every stack and Ψ)
    concept_mult: int = 2  # d_concept = concept_mult · d_token
    n_layers: int = 2  # per stack (encoder, backbone, decoder; the baseline has one stack of this depth)
    vocab_size: int = 256
    tokens: int = 512  # tokens of the fixed batch
    doc_len: int = 128
    steps: int = 5  # Adam steps; scales are recorded after every step
    lr: float = 3e-3  # base LR: SP uses it for every group, μP as lr_token = lr_concept = lr_others
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    init_std: float = 0.02  # σ_base
    seed: int = 0


@dataclass(frozen=True)
class CoordRecord:
    """One measurement: a stream's scale at one width after ``step`` optimizer steps."""

    kind: ModelKind
    parametrisation: Parametrisation
    width: int  # d_token
    stream: str
    step: int
    act_rms: float
    update_rms: float


def model_config(cfg: CoordCheckConfig, width: int, parametrisation: Parametrisation) -> DLCMConfig | BaselineConfig:
    """The model at ``width`` (d_token): heads = width / head_dim, KV heads half of them, FFN = ffn_mult·width."""
    if width % (2 * cfg.head_dim):
        raise ValueError(f"width={width} is not allowed: a multiple of 2·head_dim={2 * cfg.head_dim}")
    d_base = cfg.d_base if parametrisation == "mup" else None

    def stack(w: int) -> StackConfig:
        heads = w // cfg.head_dim
        ffn = cfg.ffn_mult * w
        return StackConfig(width=w, n_layers=cfg.n_layers, n_heads=heads, n_kv_heads=heads // 2, ffn_hidden=ffn)

    common = {"vocab_size": cfg.vocab_size, "d_base": d_base, "init_std": cfg.init_std, "attn_backend": "sdpa"}
    if cfg.kind == "baseline":
        return BaselineConfig(stack=stack(width), **common)
    heads = width // cfg.head_dim
    return DLCMConfig(
        encoder=stack(width),
        backbone=stack(cfg.concept_mult * width),
        decoder=stack(width),
        cross=CrossConfig(n_heads=heads, n_kv_heads=heads // 2, ffn_hidden=cfg.ffn_mult * width),
        # Threshold mode: boundaries are pinned anyway, and nothing is drawn from the global RNG.
        parser=ParserConfig(boundary_mode="threshold"),
        **common,
    )


def param_groups(
    model: nn.Module, model_cfg: DLCMConfig | BaselineConfig, cfg: CoordCheckConfig, parametrisation: Parametrisation
) -> list[dict]:
    """SP: ``default_param_groups`` at one LR; μP: the named groups of :mod:`dlcm.train.mup` (no weight decay)."""
    if parametrisation == "sp":
        return default_param_groups(model, OptimizerConfig(lr=cfg.lr, eps=cfg.eps, weight_decay=0.0))
    settings = MuPSettings(cfg.d_base, cfg.lr, cfg.lr, cfg.lr, eps=cfg.eps, weight_decay=0.0)
    return mup_rules(model_cfg, settings).param_groups(model)


def watched_modules(model: nn.Module, kind: ModelKind) -> dict[str, nn.Module]:
    """Stream name → module whose forward output is that stream."""
    if kind == "baseline":
        return {"token/stack": model.stack.layers[-1], "logits": model.head}
    return {
        "token/encoder": model.encoder.layers[-1],
        "concept/pooled": model.pooling,
        "concept/backbone": model.backbone.layers[-1],
        "token/cross": model.cross,
        "token/decoder": model.decoder.layers[-1],
        "logits": model.head,
    }


def pin_boundaries(model: nn.Module, boundary_T: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
    """Make the parser report ``boundary_T`` (probabilities stay live, so the ratio loss still trains it)."""

    def hook(module: nn.Module, args: tuple, out: ParserOutput) -> ParserOutput:
        return replace(out, boundary_T=boundary_T, threshold_T=boundary_T)

    return model.parser.register_forward_hook(hook)


def rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


def run_width(cfg: CoordCheckConfig, width: int, parametrisation: Parametrisation) -> list[CoordRecord]:
    """Train one model for ``cfg.steps`` Adam steps on the fixed batch; record every stream after every step."""
    language = PhraseLanguage(cfg.vocab_size, n_phrases=64, seed=cfg.seed)
    batch = language.batch(cfg.tokens, cfg.doc_len, torch.Generator().manual_seed(cfg.seed))
    ids_T, cu_seqlens = batch.input_ids_T, batch.cu_seqlens
    targets_T = next_token_targets(ids_T, cu_seqlens)
    model_cfg = model_config(cfg, width, parametrisation)
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg)
    optimizer = torch.optim.AdamW(param_groups(model, model_cfg, cfg, parametrisation), betas=cfg.betas)
    handles = []
    if cfg.kind == "dlcm":
        doc_start_T = PackedSeqs.from_cu_seqlens(cu_seqlens, ids_T.shape[0]).position == 0
        handles.append(pin_boundaries(model, batch.phrase_start_T | doc_start_T))
    captured: dict[str, torch.Tensor] = {}
    for stream, module in watched_modules(model, cfg.kind).items():
        handles.append(module.register_forward_hook(lambda m, a, out, s=stream: captured.__setitem__(s, out.detach())))

    def forward() -> torch.Tensor:
        out = model(ids_T, cu_seqlens, cfg.doc_len)
        if cfg.kind == "baseline":
            return cross_entropy(out, targets_T)
        return cross_entropy(out.logits_TV, targets_T) + model_cfg.parser.aux_weight * out.aux_loss

    def measure() -> dict[str, torch.Tensor]:
        model.eval()
        with torch.no_grad():
            forward()
        model.train()
        return dict(captured)

    records: list[CoordRecord] = []
    try:
        initial = measure()
        for step in range(cfg.steps + 1):
            now = initial if step == 0 else measure()
            records += [
                CoordRecord(cfg.kind, parametrisation, width, s, step, rms(a), rms(a - initial[s]))
                for s, a in now.items()
            ]
            if step == cfg.steps:
                break
            optimizer.zero_grad(set_to_none=True)
            forward().backward()
            optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
    return records


def coord_check(
    widths: list[int],
    cfg: CoordCheckConfig | None = None,
    parametrisations: tuple[Parametrisation, ...] = ("mup", "sp"),
    seeds: tuple[int, ...] | None = None,
) -> list[CoordRecord]:
    """Records for every parametrisation × width × stream × step (0 … ``cfg.steps``).

    With ``seeds`` each width runs once per seed (init and data) and the records hold the mean scales: at small
    widths a single draw is noisy (±20% at width 64), the seed mean shows the trend.
    """
    cfg = cfg or CoordCheckConfig()
    # One intra-op thread: these matmuls are too small to gain from more, and on a shared CPU every op would wait
    # at a thread barrier for a descheduled worker (measured 10× slower on a loaded 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [
            [r for p in parametrisations for w in widths for r in run_width(replace(cfg, seed=s), w, p)]
            for s in (seeds or (cfg.seed,))
        ]
    finally:
        torch.set_num_threads(threads)
    return [
        replace(
            first,
            act_rms=sum(run[i].act_rms for run in runs) / len(runs),
            update_rms=sum(run[i].update_rms for run in runs) / len(runs),
        )
        for i, first in enumerate(runs[0])
    ]


@dataclass(frozen=True)
class Flatness:
    """How one metric moves across widths: values, max/min ratio and the slope of log-value vs log-width."""

    widths: tuple[int, ...]
    values: tuple[float, ...]
    ratio: float
    slope: float


def flatness(
    records: list[CoordRecord], parametrisation: Parametrisation, stream: str, metric: Metric, step: int
) -> Flatness:
    """Collect ``metric`` of ``stream`` at ``step`` across widths (needs ≥ 2 widths with positive values)."""
    rows = sorted(
        (r.width, getattr(r, metric))
        for r in records
        if r.parametrisation == parametrisation and r.stream == stream and r.step == step
    )
    if len(rows) < 2 or any(v <= 0 for _, v in rows):
        raise ValueError(f"flatness of {parametrisation}/{stream}/{metric}@{step} needs ≥ 2 widths with values > 0")
    widths, values = zip(*rows, strict=True)
    xs, ys = [math.log(w) for w in widths], [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return Flatness(tuple(widths), tuple(values), max(values) / min(values), slope)


def format_records(records: list[CoordRecord], step: int) -> str:
    """A plain-text table of both metrics at ``step``: one row per (parametrisation, stream), widths as columns."""
    widths = sorted({r.width for r in records})
    keys = sorted({(r.parametrisation, r.stream) for r in records}, key=lambda k: (k[0] != "mup", k[1]))
    by_key = {(r.parametrisation, r.stream, r.width): r for r in records if r.step == step}
    header = f"{'param':5} {'stream':17} {'metric':10} " + " ".join(f"{w:>9}" for w in widths) + "   slope"
    lines = [f"after {step} steps", header]
    for p, s in keys:
        for metric in ("act_rms", "update_rms"):
            values = [getattr(by_key[p, s, w], metric) for w in widths if (p, s, w) in by_key]
            try:
                slope = f"{flatness(records, p, s, metric, step).slope:+.2f}"
            except ValueError:
                slope = "   –"
            lines.append(f"{p:5} {s:17} {metric:10} " + " ".join(f"{v:9.3g}" for v in values) + f"   {slope}")
    return "\n".join(lines)
