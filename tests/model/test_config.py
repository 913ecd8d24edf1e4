"""Impossible shapes and unknown options fail at construction with the field, value and what is allowed."""

from __future__ import annotations

import dataclasses

import pytest

from dlcm.model.config import CrossConfig, ParserConfig, StackConfig
from dlcm.model.presets import preset_config, tiny_baseline, tiny_dlcm


def stack(**overrides: object) -> StackConfig:
    fields = {"width": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64} | overrides
    return StackConfig(**fields)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"encoder": stack(n_heads=5)}, r"encoder\.n_heads=5 .*divisor of encoder\.width=32"),
        ({"backbone": stack(width=48, n_heads=4, n_kv_heads=3)}, r"backbone\.n_kv_heads=3 .*divisor of backbone"),
        ({"decoder": stack(width=64, n_heads=4)}, r"decoder\.width=64 .*equal to encoder\.width=32"),
        ({"cross": CrossConfig(n_heads=3, n_kv_heads=1, ffn_hidden=64)}, r"cross\.n_heads=3 .*divisor of d_token"),
        ({"cross": CrossConfig(n_heads=4, n_kv_heads=3, ffn_hidden=64)}, r"cross\.n_kv_heads=3"),
        ({"cross": CrossConfig(n_heads=4, n_kv_heads=2, ffn_hidden=64, impl="fast")}, r"cross\.impl='fast'"),
        ({"parser": ParserConfig(target_ratio=1.0)}, r"parser\.target_ratio=1\.0 .*> 1"),
        ({"parser": ParserConfig(target_ratio=0.5)}, r"parser\.target_ratio=0\.5"),
        ({"parser": ParserConfig(ratio_scope="local")}, r"parser\.ratio_scope='local' .*'global', 'batch'"),
        ({"parser": ParserConfig(boundary_mode="soft")}, r"parser\.boundary_mode='soft'"),
        ({"parser": ParserConfig(router_grad="ce")}, r"parser\.router_grad='ce'"),
        ({"parser": ParserConfig(sharpen_alpha=0.0)}, r"parser\.sharpen_alpha=0\.0"),
        (
            {"attn_backend": "flash"},
            r"attn_backend='flash' .*'sdpa', 'varlen', 'flash_attn', 'flash_attn_cute', 'flex'",
        ),
        ({"smoothing": "mean"}, r"smoothing='mean' .*'ema', 'identity'"),
        ({"vocab_size": 0}, r"vocab_size=0"),
        ({"d_base": -8}, r"d_base=-8"),
    ],
)
def test_dlcm_config_rejects_impossible_values(change: dict, message: str) -> None:
    base = tiny_dlcm()
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)} | change
    with pytest.raises(ValueError, match=message):
        type(base)(**fields)


def test_baseline_config_rejects_bad_heads() -> None:
    with pytest.raises(ValueError, match=r"stack\.n_heads=6 .*divisor of stack\.width=32"):
        dataclasses.replace(tiny_baseline(), stack=stack(n_heads=6))


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"preset='dlcm_7b' .*baseline_1\.3b, dlcm_2\.3b"):
        preset_config("dlcm_7b")
