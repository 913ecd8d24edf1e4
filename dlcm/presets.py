"""Named model configurations: the paper's Table 3 pair and tiny shapes for tests and CPU demos.

Parameter counts (untied embeddings, vocab 128,815; checked by ``tests/test_presets.py``):
``baseline_1.3b`` ≈ 1.30B and ``dlcm_2.3b`` ≈ 2.37B (the paper rounds to 2.3B).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dlcm.baseline import DenseBaseline
from dlcm.config import BaselineConfig, CrossConfig, DLCMConfig, ParserConfig, StackConfig
from dlcm.model import DLCM

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
}


def preset_config(name: str) -> BaselineConfig | DLCMConfig:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not allowed: expected one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def build_model(cfg: BaselineConfig | DLCMConfig) -> nn.Module:
    """Instantiate the network a config describes (build under ``torch.device('meta')`` to defer memory)."""
    return DLCM(cfg) if isinstance(cfg, DLCMConfig) else DenseBaseline(cfg)
