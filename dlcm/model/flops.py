"""Analytic FLOPs of DLCM and the dense baseline from the actual document lengths of a packed batch.

Why analytic: the number of concepts is data-dependent (a meta-device ``measure_flops`` cannot run the parser),
and ``FlopCounterMode`` counts 0 for ``varlen_attn`` (torch 2.11). One convention serves both models:

- **Matmuls**: 2 FLOPs per multiply-add, forward. Every matrix counts once per row it is applied to: token rows
  ``T`` (encoder, parser W_q/W_k, cross W_Q/W_O and the cross FFN, decoder, LM head) or concept rows ``C``
  (W_up — it acts on the pooled concepts —, cross W_K/W_V, backbone). Embedding lookups, norms, RoPE, pooling
  sums, smoothing and the loss are not matmuls and count 0.
- **Attention**: QKᵀ and PV, ``2·2·head_dim·heads`` per (query, key) pair scored, forward. *Model FLOPs*
  (the MFU convention, docs/design.md) score every pair of a document, no causal discount: ``Σ_i L_i²`` for token
  self-attention, ``Σ_i C_i²`` for the backbone, and the model's definition of Ψ — tokens against the unique
  concepts of their document — ``Σ_i L_i·C_i``. With one document of length ``seq`` this is the familiar
  ``12·layers·width·seq`` per training token.
- **Hardware FLOPs** differ only for Ψ, and depend on the kernel that ran (:func:`cross_kernel`): concept
  replication (Eq. 17) runs a causal ``L×L`` kernel whose keys are the replicated concepts, ``Σ_i L_i²`` pairs;
  the exact kernel (``cross.impl='exact'``, or ``'auto'`` on CUDA for batches whose ``max_seqlen`` reaches
  ``EXACT_MIN_TOKENS``) scores the unique concepts, the model's ``Σ_i L_i·C_i`` (up to its 128-row tiles).
- ``causal_discount=True`` counts only the pairs inside the causal mask — ``L(L+1)/2`` per document, and
  ``L(C+1)/2`` for the L×C form (exact for equal-length concepts) — closer to what a FlashAttention-style kernel
  executes; the default (no discount) is the MFU convention.
- **Training** = 3 × forward (backward w.r.t. activations and weights), for matmuls and attention alike.

Every count is linear in five length sums of a micro-batch (:class:`LengthStats`), so per-micro-batch sums can be
accumulated on the device (:func:`packed_length_sums`, no host sync) and turned into FLOPs once per logging step.
Worked example, tiny DLCM, one micro-batch of documents ``L = [40, 25, 60, 3]`` split into ``C = [24, 8, 24, 1]``
concepts: 46,080 token-side and 44,544 concept-side matmul parameters, so training matmuls are
``6·(46,080·128 + 44,544·57) = 50,623,488`` FLOPs — what ``FlopCounterMode`` reports for ``aten.mm``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from dlcm.model.config import BaselineConfig, DLCMConfig, StackConfig, resolve_cross_impl

# The counts are plain arithmetic on configs; torch is imported only by the helpers that take tensors, so that
# `dlcm flops` / `dlcm plan` (and the presets, which size the grid with these counts) start without it.
if TYPE_CHECKING:
    import torch

Stream = Literal["token", "concept", "cross", "none"]
CrossKernel = Literal["replicate", "exact"]
# Order of the entries of packed_length_sums / LengthStats.from_sums.
SUM_FIELDS = ("tokens", "concepts", "token_pairs", "concept_pairs", "cross_pairs", "documents")


@dataclass(frozen=True)
class LengthStats:
    """The length sums of a packed micro-batch (or of several) that every FLOPs count is linear in."""

    tokens: float  # T = Σ L_i
    concepts: float = 0.0  # C = Σ C_i (0 for the baseline)
    token_pairs: float = 0.0  # Σ L_i²
    concept_pairs: float = 0.0  # Σ C_i²
    cross_pairs: float = 0.0  # Σ L_i·C_i
    documents: float = 0.0

    @classmethod
    def from_lengths(
        cls, token_doc_lengths: Sequence[int] | torch.Tensor, concept_doc_lengths: Sequence[int] | torch.Tensor | None
    ) -> LengthStats:
        """Sums from per-document token counts ``L_i`` and (DLCM) concept counts ``C_i`` held on the host."""
        tok = [int(n) for n in _as_list(token_doc_lengths)]
        cpt = [0] * len(tok) if concept_doc_lengths is None else [int(n) for n in _as_list(concept_doc_lengths)]
        if len(cpt) != len(tok):
            raise ValueError(
                f"concept_doc_lengths has {len(cpt)} documents but token_doc_lengths has {len(tok)}: "
                "one concept count per document"
            )
        return cls(
            tokens=float(sum(tok)),
            concepts=float(sum(cpt)),
            token_pairs=float(sum(n * n for n in tok)),
            concept_pairs=float(sum(c * c for c in cpt)),
            cross_pairs=float(sum(n * c for n, c in zip(tok, cpt, strict=True))),
            documents=float(len(tok)),
        )

    @classmethod
    def from_sums(cls, sums: Sequence[float] | torch.Tensor) -> LengthStats:
        """Inverse of :func:`packed_length_sums` once its values are on the host (entries in ``SUM_FIELDS`` order)."""
        values = [float(v) for v in _as_list(sums)]
        if len(values) != len(SUM_FIELDS):
            raise ValueError(f"expected {len(SUM_FIELDS)} sums ({', '.join(SUM_FIELDS)}), got {len(values)}")
        return cls(**dict(zip(SUM_FIELDS, values, strict=True)))

    def __add__(self, other: LengthStats) -> LengthStats:
        return LengthStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))


def packed_length_sums(cu_seqlens_tok: torch.Tensor, cu_seqlens_cpt: torch.Tensor | None = None) -> torch.Tensor:
    """``int64 [6]`` sums (``SUM_FIELDS`` order) computed where the offsets live: no device→host sync.

    Sums of several micro-batches add up, so a callback can accumulate them on the device and read them back once
    per logging step (:meth:`LengthStats.from_sums`).
    """
    import torch

    tok_N = cu_seqlens_tok.diff().to(torch.int64)
    cpt_N = torch.zeros_like(tok_N) if cu_seqlens_cpt is None else cu_seqlens_cpt.diff().to(torch.int64)
    docs = torch.full_like(tok_N[:1], tok_N.shape[0]).squeeze(0)
    return torch.stack(
        [tok_N.sum(), cpt_N.sum(), (tok_N * tok_N).sum(), (cpt_N * cpt_N).sum(), (tok_N * cpt_N).sum(), docs]
    )


class _Totals:
    """``total`` (model FLOPs) and ``hardware_total`` from ``matmul``, ``attention`` and ``hardware_attention``."""

    matmul: float
    attention: float
    hardware_attention: float

    @property
    def total(self) -> float:
        return self.matmul + self.attention

    @property
    def hardware_total(self) -> float:
        return self.matmul + self.hardware_attention


@dataclass(frozen=True)
class StageFlops(_Totals):
    """FLOPs of one stage: matmuls, attention scores as the model defines them, and as the kernel runs them."""

    matmul: float
    attention: float
    hardware_attention: float

    def scaled(self, factor: float) -> StageFlops:
        return StageFlops(self.matmul * factor, self.attention * factor, self.hardware_attention * factor)


@dataclass(frozen=True)
class FlopsBreakdown(_Totals):
    """FLOPs per stage of one count (a batch, or per token after :meth:`per_token`).

    ``total`` is the model-FLOPs convention used for MFU; ``hardware_total`` counts Ψ's attention as its kernel
    ran it: the replication kernel's L×L work, or L×C for the exact kernel (then, as for the baseline, equal).
    """

    stages: dict[str, StageFlops]
    tokens: float
    concepts: float
    training: bool
    causal_discount: bool

    @property
    def matmul(self) -> float:
        return sum(s.matmul for s in self.stages.values())

    @property
    def attention(self) -> float:
        return sum(s.attention for s in self.stages.values())

    @property
    def hardware_attention(self) -> float:
        return sum(s.hardware_attention for s in self.stages.values())

    def share(self, stage: str) -> float:
        """Fraction of the model FLOPs ``total`` spent in ``stage``."""
        return self.stages[stage].total / self.total if self.total else 0.0

    def per_token(self) -> FlopsBreakdown:
        """The same count divided by the number of tokens it covers."""
        if self.tokens <= 0:
            raise ValueError("per_token needs a count over at least one token")
        scale = 1.0 / self.tokens
        stages = {name: s.scaled(scale) for name, s in self.stages.items()}
        return FlopsBreakdown(stages, 1.0, self.concepts * scale, self.training, self.causal_discount)

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers (for JSON): per-stage matmul/attention/hardware parts and the totals."""
        return {
            "training": self.training,
            "causal_discount": self.causal_discount,
            "tokens": self.tokens,
            "concepts": self.concepts,
            "stages": {
                name: {
                    "matmul": s.matmul,
                    "attention": s.attention,
                    "hardware_attention": s.hardware_attention,
                    "total": s.total,
                }
                for name, s in self.stages.items()
            },
            "matmul": self.matmul,
            "attention": self.attention,
            "total": self.total,
            "hardware_total": self.hardware_total,
        }


@dataclass(frozen=True)
class StageCost:
    """One stage as coefficients: matmul parameters per token row and per concept row, attention width per pair.

    ``attn_width`` is Σ over the stage's attention layers of ``query heads × head_dim`` (``width · n_layers`` for a
    stack); ``stream`` names the pairs it scores and ``hardware_stream`` those its kernel scores.
    """

    token_params: int = 0
    concept_params: int = 0
    attn_width: int = 0
    stream: Stream = "none"
    hardware_stream: Stream = "none"


def stack_params(cfg: StackConfig) -> int:
    """Matmul parameters of a stack: GQA projections and SwiGLU per layer (norms are not matmuls)."""
    d, h = cfg.width, cfg.head_dim
    attn = d * cfg.n_heads * h * 2 + d * cfg.n_kv_heads * h * 2  # W_q, W_o; W_k, W_v
    return cfg.n_layers * (attn + 3 * d * cfg.ffn_hidden)


def stack_cost(cfg: StackConfig, stream: Stream, rows: Literal["token", "concept"]) -> StageCost:
    params = stack_params(cfg)
    width = cfg.n_layers * cfg.n_heads * cfg.head_dim
    return StageCost(
        token_params=params if rows == "token" else 0,
        concept_params=params if rows == "concept" else 0,
        attn_width=width,
        stream=stream,
        hardware_stream=stream,
    )


def cross_kernel(cfg: DLCMConfig, device_type: str = "cpu", max_seqlen: int = 0) -> CrossKernel:
    """The Ψ kernel a forward runs on a micro-batch whose ``max_seqlen`` (the host-side bound the model is given)
    is this: the same rule the model applies (:func:`dlcm.model.config.resolve_cross_impl`)."""
    return resolve_cross_impl(cfg.cross.impl, device_type, max_seqlen)


def stage_costs(cfg: DLCMConfig | BaselineConfig, kernel: CrossKernel | None = None) -> dict[str, StageCost]:
    """Per-stage coefficients of a config (no model is built, so the paper presets cost nothing).

    ``kernel`` is the Ψ kernel for the hardware count (default: :func:`cross_kernel` on CPU).
    """
    if isinstance(cfg, BaselineConfig):
        return {
            "embedding": StageCost(),
            "stack": stack_cost(cfg.stack, "token", "token"),
            "head": StageCost(token_params=cfg.d_token * cfg.vocab_size),
        }
    d_tok, d_cpt = cfg.d_token, cfg.d_concept
    x = cfg.cross
    x_head_dim = d_tok // x.n_heads
    d_scan = cfg.parser.d_scan or d_tok
    return {
        "embedding": StageCost(),
        "encoder": stack_cost(cfg.encoder, "token", "token"),
        "parser": StageCost(token_params=2 * d_tok * d_scan),
        "pooling": StageCost(concept_params=d_tok * d_cpt),  # W_up on the pooled concept rows
        "backbone": stack_cost(cfg.backbone, "concept", "concept"),
        "cross_attention": StageCost(
            token_params=2 * d_tok * x.n_heads * x_head_dim + 3 * d_tok * x.ffn_hidden,  # W_Q, W_O, SwiGLU
            concept_params=2 * d_cpt * x.n_kv_heads * x_head_dim,  # W_K, W_V on the concept rows
            attn_width=x.n_heads * x_head_dim,
            stream="cross",
            hardware_stream="token" if (kernel or cross_kernel(cfg)) == "replicate" else "cross",
        ),
        "decoder": stack_cost(cfg.decoder, "token", "token"),
        "head": StageCost(token_params=d_tok * cfg.vocab_size),
    }


def resolve_config(network_or_config: Any) -> DLCMConfig | BaselineConfig:
    """The config behind a config, a network (``.cfg``) or a Lightning module (``.network.cfg``)."""
    obj = network_or_config
    for _ in range(3):
        if isinstance(obj, (DLCMConfig, BaselineConfig)):
            return obj
        obj = getattr(obj, "cfg", None) or getattr(obj, "network", None)
    raise TypeError(
        f"cannot find a DLCMConfig or BaselineConfig in {type(network_or_config).__name__}: pass a config, "
        "a DLCM/DenseBaseline network or a module with a .network attribute"
    )


def pair_count(stats: LengthStats, stream: Stream, causal_discount: bool) -> float:
    """Query-key pairs scored on ``stream``; with the causal discount, only those inside the causal mask."""
    if stream == "none":
        return 0.0
    full, rows = {
        "token": (stats.token_pairs, stats.tokens),
        "concept": (stats.concept_pairs, stats.concepts),
        # Σ_t (j(t)+1) keys for the L×C form; = L(C+1)/2 per document when concepts have equal length.
        "cross": (stats.cross_pairs, stats.tokens),
    }[stream]
    return (full + rows) / 2 if causal_discount else full


def flops_from_stats(
    network_or_config: Any,
    stats: LengthStats,
    training: bool = True,
    causal_discount: bool = False,
    kernel: CrossKernel | None = None,
) -> FlopsBreakdown:
    """FLOPs of the batch(es) summarised by ``stats`` (see the module docstring for the convention)."""
    cfg = resolve_config(network_or_config)
    passes = 3.0 if training else 1.0
    stages = {}
    for name, cost in stage_costs(cfg, kernel).items():
        matmul = 2.0 * (cost.token_params * stats.tokens + cost.concept_params * stats.concepts)
        per_pair = 4.0 * cost.attn_width  # QKᵀ and PV: 2 FLOPs per multiply-add each, all query heads
        attention = per_pair * pair_count(stats, cost.stream, causal_discount)
        hardware = per_pair * pair_count(stats, cost.hardware_stream, causal_discount)
        stages[name] = StageFlops(passes * matmul, passes * attention, passes * hardware)
    return FlopsBreakdown(stages, stats.tokens, stats.concepts, training, causal_discount)


def model_flops(
    network_or_config: Any,
    token_doc_lengths: Sequence[int] | torch.Tensor,
    concept_doc_lengths: Sequence[int] | torch.Tensor | None = None,
    training: bool = True,
    causal_discount: bool = False,
    kernel: CrossKernel | None = None,
) -> FlopsBreakdown:
    """FLOPs of one packed micro-batch from its per-document token counts and (DLCM) concept counts.

    Lengths are host lists or tensors; a device tensor here costs a device→host copy, so training loops should
    accumulate :func:`packed_length_sums` instead (what :class:`dlcm.callbacks.throughput.FlopsThroughput` does).
    """
    cfg = resolve_config(network_or_config)
    if isinstance(cfg, DLCMConfig) and concept_doc_lengths is None:
        raise ValueError("a DLCM count needs concept_doc_lengths (e.g. layout.seqs.cu_seqlens.diff())")
    if isinstance(cfg, BaselineConfig):
        concept_doc_lengths = None
    stats = LengthStats.from_lengths(token_doc_lengths, concept_doc_lengths)
    return flops_from_stats(cfg, stats, training, causal_discount, kernel)


def inference_flops_per_token(
    config: DLCMConfig | BaselineConfig,
    context_length: int,
    ratio: float | None = None,
    causal_discount: bool = False,
    kernel: CrossKernel | None = None,
) -> FlopsBreakdown:
    """Forward FLOPs per token for documents of exactly ``context_length`` tokens and ``L/R`` concepts each.

    ``ratio`` is R (default ``config.parser.target_ratio``; ignored for a baseline). Without the causal discount the
    attention term is also the cost of generating the token at position ``L`` with a KV cache (``4·width·L`` per
    layer); with it, the average over the positions of the document.
    """
    if context_length < 1:
        raise ValueError(f"context_length={context_length} is not allowed: a positive number of tokens")
    length = float(context_length)
    if isinstance(config, DLCMConfig):
        r = config.parser.target_ratio if ratio is None else ratio
        if r < 1:
            raise ValueError(f"ratio={r} is not allowed: at least 1 token per concept")
        concepts = length / r
    else:
        concepts = 0.0
    stats = LengthStats(length, concepts, length * length, concepts * concepts, length * concepts, 1.0)
    return flops_from_stats(config, stats, False, causal_discount, kernel).per_token()


def _as_list(values: Sequence[float] | torch.Tensor) -> list:
    torch = sys.modules.get("torch")  # a tensor can only come from a process that has imported torch
    if torch is not None and isinstance(values, torch.Tensor):
        return values.detach().cpu().reshape(-1).tolist()
    return list(values)
