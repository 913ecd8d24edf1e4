"""Named model configurations: the paper's Table 3 pair, its μP proxy and scaling-law grid, and tiny shapes.

Parameter counts (untied embeddings, vocab 128,815; checked by ``tests/model/test_presets.py``):
``baseline_1.3b`` ≈ 1.30B and ``dlcm_2.3b`` ≈ 2.37B (the paper rounds to 2.3B).

The μP proxy (87M) and the scaling-law grid (274M / 468M / 833M at P ∈ {30, 50, 70}%, paper §6.1–6.2) have no
published shapes. Ours (:func:`dlcm_grid`) keep Table 3's shape rules (:func:`dlcm_family`) and choose widths and
depths: N counts parameters without embedding and LM head — the paper's sizes cannot include a 128,815-token
embedding (an 87M model would have room for no layer at any useful width), and it is the count in which Eq. 22's
``N·P`` and ``N(1−P)`` are the concept- and token-stream parameters — and P is the backbone's share of N.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from dlcm.model.config import BaselineConfig, CrossConfig, DLCMConfig, ParserConfig, StackConfig
from dlcm.model.flops import stack_params, stage_costs

if TYPE_CHECKING:
    from torch import nn

DEEPSEEK_V3_VOCAB = 128_815


def baseline_1_3b() -> BaselineConfig:
    """Table 3 baseline: 32 layers at 1536, 24 heads (no GQA), SwiGLU 4096."""
    return BaselineConfig(
        vocab_size=DEEPSEEK_V3_VOCAB,
        stack=StackConfig(width=1536, n_layers=32, n_heads=24, n_kv_heads=24, ffn_hidden=4096),
    )


def dlcm_2_3b() -> DLCMConfig:
    """Table 3 DLCM: encoder 10 / backbone 16 / decoder 6 layers, d_token 1536, d_concept 3072, R = 4."""
    token = {"width": 1536, "n_heads": 24, "n_kv_heads": 12, "ffn_hidden": 6144}
    return DLCMConfig(
        vocab_size=DEEPSEEK_V3_VOCAB,
        encoder=StackConfig(n_layers=10, **token),
        backbone=StackConfig(width=3072, n_layers=16, n_heads=48, n_kv_heads=24, ffn_hidden=6144),
        decoder=StackConfig(n_layers=6, **token),
        cross=CrossConfig(n_heads=24, n_kv_heads=12, ffn_hidden=6144),
        parser=ParserConfig(target_ratio=4.0),
    )


HEAD_DIM = 64  # Table 3: 1536 / 24 = 3072 / 48
# Grid sizes: name → (d_token, N = parameters without embedding and head). Widths step by 256 from the proxy's 384
# to Table 3's 1536, so the family reads 384 / 640 / 896 / 1152 / 1536 with depths of 20–35 layers.
GRID_SIZES: dict[str, tuple[int, int]] = {
    "87m": (384, 87_000_000),
    "274m": (640, 274_000_000),
    "468m": (896, 468_000_000),
    "833m": (1152, 833_000_000),
}
GRID_FRACTIONS = (0.3, 0.5, 0.7)  # P: the backbone's share of N (paper §6.2)
GRID_RATIOS = (2.0, 4.0, 8.0)  # R (paper §6.2)
ENCODER_SHARE = 10 / 16  # Table 3: 10 encoder and 6 decoder layers


def dlcm_family(d_token: int, n_encoder: int, n_backbone: int, n_decoder: int, target_ratio: float = 4.0) -> DLCMConfig:
    """Table 3's shape rules at another width and depth: d_concept = 2·d_token, head dim 64, two query heads per KV
    head in both streams and Ψ, SwiGLU 4·d_token (token stream, Ψ) and 2·d_concept (backbone).
    ``dlcm_family(1536, 10, 16, 6)`` is :func:`dlcm_2_3b`."""
    d_concept = 2 * d_token
    heads = {"n_heads": d_token // HEAD_DIM, "n_kv_heads": d_token // (2 * HEAD_DIM)}
    token = {"width": d_token, "ffn_hidden": 4 * d_token, **heads}
    return DLCMConfig(
        vocab_size=DEEPSEEK_V3_VOCAB,
        encoder=StackConfig(n_layers=n_encoder, **token),
        backbone=StackConfig(
            width=d_concept,
            n_layers=n_backbone,
            n_heads=d_concept // HEAD_DIM,
            n_kv_heads=d_concept // (2 * HEAD_DIM),
            ffn_hidden=2 * d_concept,
        ),
        decoder=StackConfig(n_layers=n_decoder, **token),
        cross=CrossConfig(ffn_hidden=4 * d_token, **heads),
        parser=ParserConfig(target_ratio=target_ratio),
    )


def dlcm_grid(size: str, backbone_fraction: float, target_ratio: float = 4.0) -> DLCMConfig:
    """The grid model of ``size`` (a :data:`GRID_SIZES` key) with backbone share ``backbone_fraction`` of N.

    Widths are the size's; token-stream layers (split 10:6 into encoder and decoder, as Table 3) and backbone layers
    are the integers whose matmul parameters come closest to N and P (smallest max(|N/N_target − 1|,
    |P − P_target|)). Whole layers are coarse, so realised N and P differ from the targets by up to about 2%;
    recipes state the realised values.
    """
    if size not in GRID_SIZES:
        raise ValueError(f"size={size!r} is not allowed: expected one of {', '.join(GRID_SIZES)}")
    if not 0 < backbone_fraction < 1:
        raise ValueError(f"backbone_fraction={backbone_fraction!r} is not allowed: a share strictly between 0 and 1")
    d_token, target = GRID_SIZES[size]
    one = dlcm_family(d_token, 1, 1, 1, target_ratio)
    costs = stage_costs(one)
    token_block, backbone_block = stack_params(one.encoder), stack_params(one.backbone)
    fixed = sum(c.token_params + c.concept_params for name, c in costs.items() if name != "head")
    fixed -= 2 * token_block + backbone_block
    best: tuple[float, int, int] | None = None
    for n_backbone in range(1, 4 * target // backbone_block + 2):
        for n_token in range(2, 4 * target // token_block + 3):
            backbone = n_backbone * backbone_block
            n = fixed + n_token * token_block + backbone
            error = max(abs(n / target - 1), abs(backbone / n - backbone_fraction))
            if best is None or error < best[0]:
                best = (error, n_token, n_backbone)
    _, n_token, n_backbone = best
    n_encoder = max(round(n_token * ENCODER_SHARE), 1)
    return dlcm_family(d_token, n_encoder, n_backbone, n_token - n_encoder, target_ratio)


def dlcm_87m() -> DLCMConfig:
    """The μP proxy (paper §6.1: 87M, shape unpublished): the grid rule at 87M and P = 70%, the grid point nearest
    Table 3's own backbone share (69% of N)."""
    return dlcm_grid("87m", 0.7)


def tiny_baseline(vocab_size: int = 256) -> BaselineConfig:
    """A few-thousand-parameter baseline for tests and CPU smoke runs."""
    return BaselineConfig(
        vocab_size=vocab_size,
        stack=StackConfig(width=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64),
    )


def tiny_dlcm(vocab_size: int = 256, target_ratio: float = 4.0) -> DLCMConfig:
    """The smallest DLCM with every mechanism on (GQA everywhere, wider concept stream)."""
    return DLCMConfig(
        vocab_size=vocab_size,
        encoder=StackConfig(width=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64),
        backbone=StackConfig(width=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96),
        decoder=StackConfig(width=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64),
        cross=CrossConfig(n_heads=4, n_kv_heads=2, ffn_hidden=64),
        parser=ParserConfig(target_ratio=target_ratio),
    )


PRESETS: dict[str, Callable[[], BaselineConfig | DLCMConfig]] = {
    "baseline_1.3b": baseline_1_3b,
    "dlcm_2.3b": dlcm_2_3b,
    "tiny_baseline": tiny_baseline,
    "tiny_dlcm": tiny_dlcm,
    "dlcm_87m": dlcm_87m,
    **{
        f"dlcm_{size}_p{round(100 * fraction)}": functools.partial(dlcm_grid, size, fraction)
        for size in GRID_SIZES
        if size != "87m"
        for fraction in GRID_FRACTIONS
    },
}


def preset_config(name: str) -> BaselineConfig | DLCMConfig:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not allowed: expected one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def build_model(cfg: BaselineConfig | DLCMConfig) -> nn.Module:
    """Instantiate the network a config describes (build under ``torch.device('meta')`` to defer memory)."""
    # Imported here: the presets themselves are torch-free, so command lines can list them without loading torch.
    from dlcm.model.baseline import DenseBaseline
    from dlcm.model.dlcm import DLCM

    return DLCM(cfg) if isinstance(cfg, DLCMConfig) else DenseBaseline(cfg)
