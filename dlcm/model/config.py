"""Typed, validated configuration for the DLCM network and the dense baseline.

Every dataclass checks itself in ``__post_init__``: an impossible shape or an unknown option raises a
``ValueError`` naming the field, the bad value and what is allowed, so a misspelt or inconsistent recipe fails
before any tensor is allocated. Literal-typed fields are also what LightningCLI/jsonargparse validate against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

AttnBackend = Literal["auto", "sdpa", "varlen", "flash_attn", "flash_attn_cute", "flex"]
BoundaryMode = Literal["sample", "threshold"]
RouterGrad = Literal["aux", "ste"]
BoundaryPredictor = Literal["learned", "rule"]
ThresholdMode = Literal["fixed", "calibrated"]
RatioScope = Literal["global", "batch", "sequence"]
Smoothing = Literal["ema", "identity"]
CrossImpl = Literal["auto", "replicate", "exact"]


def require(ok: bool, name: str, value: object, allowed: str) -> None:
    """Raise a ``ValueError`` that names the field, its value and what would be accepted."""
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: {allowed}")


def require_choice(name: str, value: object, literal: object) -> None:
    choices = get_args(literal)
    require(value in choices, name, value, f"expected one of {', '.join(map(repr, choices))}")


@dataclass
class StackConfig:
    """Shape of one causal transformer stack (encoder, concept backbone, decoder or the dense baseline)."""

    width: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    qk_norm: bool = False
    rope_theta: float = 10_000.0

    def validate(self, prefix: str) -> None:
        require(self.width > 0, f"{prefix}.width", self.width, "a positive integer")
        require(self.n_layers >= 0, f"{prefix}.n_layers", self.n_layers, "a non-negative integer")
        require(self.n_heads > 0, f"{prefix}.n_heads", self.n_heads, "a positive integer")
        require(
            self.width % self.n_heads == 0,
            f"{prefix}.n_heads",
            self.n_heads,
            f"a divisor of {prefix}.width={self.width}",
        )
        require(
            self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
            f"{prefix}.n_kv_heads",
            self.n_kv_heads,
            f"a positive divisor of {prefix}.n_heads={self.n_heads}",
        )
        require(self.ffn_hidden > 0, f"{prefix}.ffn_hidden", self.ffn_hidden, "a positive integer")
        require(self.rope_theta > 0, f"{prefix}.rope_theta", self.rope_theta, "a positive number")

    @property
    def head_dim(self) -> int:
        return self.width // self.n_heads


@dataclass
class ParserConfig:
    """The global parser (paper §3.3): boundary scoring, discretisation and the Eq. 10 ratio loss.

    Training samples ``b ~ Bernoulli(σ(logit(p)/α))``; inference decides ``p_t ≥ τ``. With
    ``threshold_mode='calibrated'`` (default) τ follows, as a running average over optimizer steps, the value at
    which the thresholded ratio of the step's batches equals R (the training loop folds it in once per step, no
    forward moves it); τ is a buffer of the parser, so checkpoints,
    ``dlcm validate``, ``dlcm eval`` and ``dlcm generate`` use the same one. See docs/design.md §4.
    """

    target_ratio: float = 4.0  # R: tokens per concept the ratio loss steers towards
    d_scan: int | None = None  # width of W_q/W_k; None means d_token (identity init is then exact)
    # learned: p from W_q/W_k (Eq. 5); rule: p = (1 − cos(h_{t−1}, h_t))/2 on the encoder states with no
    # parameters, thresholded at τ in training too (the paper's §8.1 rule-based ablation)
    predictor: BoundaryPredictor = "learned"
    boundary_mode: BoundaryMode = "sample"  # training-time discretisation; eval always thresholds at τ
    # fixed: τ = threshold; calibrated: τ starts at threshold and tracks the batch τ that realises R (see above)
    threshold_mode: ThresholdMode = "calibrated"
    threshold: float = 0.5  # τ (fixed), its starting value (calibrated); for the rule predictor the cosine cut
    calibration_momentum: float = 0.1  # weight of each optimizer step's τ in the running τ (a mean for 1/m steps)
    # α in σ(logit(p)/α); → 0 recovers the threshold rule at 0.5. Nothing in L_aux makes p bimodal, so with a
    # fixed τ = 0.5 a loose α lets the sampled ratio meet R while thresholded inference drifts (tiny demo: 187 at
    # α = 0.5, R = 4); a calibrated τ follows the drift instead (docs/design.md §4).
    sharpen_alpha: float = 0.1
    alpha_final: float | None = None  # anneal α linearly from sharpen_alpha to this over training; None: constant
    midpoint_weight: float = 0.0  # weight of the penalty mean(4p(1 − p)) on probabilities near 0.5
    # weight of mean P(sampled b ≠ [p ≥ 0.5]): the chance that training and inference decide a token differently
    # (parser.decision_disagreement); moves only probabilities within ≈ α/4 of 0.5, each away from it
    consistency_weight: float = 0.0
    router_grad: RouterGrad = "aux"  # aux: W_q/W_k learn only from L_aux; ste: H-Net straight-through
    ratio_scope: RatioScope = "global"  # statistics over the optimizer step, the micro-batch or each document
    aux_weight: float = 0.03  # λ in L = L_CE + λ·L_aux

    def validate(self) -> None:
        require(self.target_ratio > 1, "parser.target_ratio", self.target_ratio, "a number > 1")
        require(self.d_scan is None or self.d_scan > 0, "parser.d_scan", self.d_scan, "None or a positive int")
        require_choice("parser.predictor", self.predictor, BoundaryPredictor)
        require(
            self.predictor == "learned" or self.d_scan is None,
            "parser.d_scan",
            self.d_scan,
            "None with predictor='rule' (the rule compares encoder states directly)",
        )
        require_choice("parser.boundary_mode", self.boundary_mode, BoundaryMode)
        require_choice("parser.threshold_mode", self.threshold_mode, ThresholdMode)
        require(0 < self.threshold < 1, "parser.threshold", self.threshold, "a number in (0, 1)")
        require(
            0 < self.calibration_momentum <= 1,
            "parser.calibration_momentum",
            self.calibration_momentum,
            "a number in (0, 1]",
        )
        require(self.sharpen_alpha > 0, "parser.sharpen_alpha", self.sharpen_alpha, "a number > 0")
        require(
            self.alpha_final is None or 0 <= self.alpha_final <= self.sharpen_alpha,
            "parser.alpha_final",
            self.alpha_final,
            f"None or a number in [0, sharpen_alpha={self.sharpen_alpha}]",
        )
        require(self.midpoint_weight >= 0, "parser.midpoint_weight", self.midpoint_weight, "a number >= 0")
        require(self.consistency_weight >= 0, "parser.consistency_weight", self.consistency_weight, "a number >= 0")
        require_choice("parser.router_grad", self.router_grad, RouterGrad)
        require_choice("parser.ratio_scope", self.ratio_scope, RatioScope)
        require(self.aux_weight >= 0, "parser.aux_weight", self.aux_weight, "a number >= 0")

    def alpha_at(self, progress: float) -> float:
        """α at ``progress`` (fraction of training done, clipped to [0, 1])."""
        if self.alpha_final is None:
            return self.sharpen_alpha
        progress = min(max(progress, 0.0), 1.0)
        return self.sharpen_alpha + (self.alpha_final - self.sharpen_alpha) * progress


@dataclass
class CrossConfig:
    """The token→concept cross-attention block Ψ (Eqs. 12–17) and its own SwiGLU FFN."""

    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    # replicate: paper Eq. 17; exact: L×C with explicit log-count bias (same function); auto: the faster of the two
    # for the stream length on this device (resolve_cross_impl)
    impl: CrossImpl = "auto"


# From this document length (tokens) on, the exact kernel beats replication + varlen at every head dim measured
# (H200 bf16, bench/results/cross_attention_h200.json: 1.04–1.41× at 4K, 0.69–0.97× at 2K); ``impl='auto'`` uses it.
EXACT_MIN_TOKENS = 4096


def resolve_cross_impl(impl: str, device_type: str, max_seqlen: int) -> str:
    """The Ψ kernel that runs: ``impl`` itself, or for ``'auto'`` the exact kernel on CUDA for long documents.

    Here rather than beside the kernels so that the analytic FLOPs count (:mod:`dlcm.model.flops`) applies the
    model's rule without importing torch.
    """
    if impl != "auto":
        return impl
    return "exact" if device_type == "cuda" and max_seqlen >= EXACT_MIN_TOKENS else "replicate"


@dataclass
class DLCMConfig:
    """Full DLCM: encoder → global parser → pooling + backbone → smoothing → cross-attention → decoder."""

    vocab_size: int
    encoder: StackConfig
    backbone: StackConfig
    decoder: StackConfig
    cross: CrossConfig
    parser: ParserConfig = field(default_factory=ParserConfig)
    smoothing: Smoothing = "ema"
    d_base: int | None = None  # μP base width; None means d_token (standard parametrisation)
    init_std: float = 0.02  # σ_base: init std of a hidden matrix at width d_base
    attn_backend: AttnBackend = "auto"
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        require(self.vocab_size > 0, "vocab_size", self.vocab_size, "a positive integer")
        self.encoder.validate("encoder")
        self.backbone.validate("backbone")
        self.decoder.validate("decoder")
        require(
            self.decoder.width == self.encoder.width,
            "decoder.width",
            self.decoder.width,
            f"equal to encoder.width={self.encoder.width} (both are d_token)",
        )
        require(self.cross.n_heads > 0, "cross.n_heads", self.cross.n_heads, "a positive integer")
        require(
            self.d_token % self.cross.n_heads == 0,
            "cross.n_heads",
            self.cross.n_heads,
            f"a divisor of d_token={self.d_token}",
        )
        require(
            self.cross.n_kv_heads > 0 and self.cross.n_heads % self.cross.n_kv_heads == 0,
            "cross.n_kv_heads",
            self.cross.n_kv_heads,
            f"a positive divisor of cross.n_heads={self.cross.n_heads}",
        )
        require(self.cross.ffn_hidden > 0, "cross.ffn_hidden", self.cross.ffn_hidden, "a positive integer")
        require_choice("cross.impl", self.cross.impl, CrossImpl)
        self.parser.validate()
        require_choice("smoothing", self.smoothing, Smoothing)
        validate_common(self.d_base, self.init_std, self.attn_backend, self.norm_eps)

    @property
    def d_token(self) -> int:
        return self.encoder.width

    @property
    def d_concept(self) -> int:
        return self.backbone.width


@dataclass
class BaselineConfig:
    """LLaMA-style dense decoder-only baseline built from the same blocks as DLCM."""

    vocab_size: int
    stack: StackConfig
    d_base: int | None = None
    init_std: float = 0.02
    attn_backend: AttnBackend = "auto"
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        require(self.vocab_size > 0, "vocab_size", self.vocab_size, "a positive integer")
        self.stack.validate("stack")
        validate_common(self.d_base, self.init_std, self.attn_backend, self.norm_eps)

    @property
    def d_token(self) -> int:
        return self.stack.width


def validate_common(d_base: int | None, init_std: float, attn_backend: str, norm_eps: float) -> None:
    require(d_base is None or d_base > 0, "d_base", d_base, "None or a positive integer")
    require(init_std > 0, "init_std", init_std, "a number > 0")
    require_choice("attn_backend", attn_backend, AttnBackend)
    require(norm_eps > 0, "norm_eps", norm_eps, "a number > 0")
