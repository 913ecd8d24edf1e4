"""Decoupled μP rules: name rules cover every parameter once, per-group lr/ε follow Eqs. 19–20, the optimizer check
catches what breaks them, and a coordinate check shows μP flat where SP is not."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from dlcm.model.config import BaselineConfig, DLCMConfig
from dlcm.model.presets import build_model, tiny_baseline, tiny_dlcm
from dlcm.research.coord_check import CoordCheckConfig, coord_check, flatness, format_records
from dlcm.train.mup import (
    GROUPS,
    GroupHParams,
    MuPParamGroups,
    MuPSettings,
    canonical_name,
    check_optimizer_groups,
    group_of,
    mup_rules,
)
from dlcm.train.optim import OptimizerConfig, ScheduleConfig, build_optimizer, default_param_groups

LR_TOKEN, LR_CONCEPT, LR_OTHERS, EPS = 2e-3, 1e-3, 5e-4, 1e-8
SETTINGS: dict[str, Any] = {
    "d_base": 32,
    "lr_token": LR_TOKEN,
    "lr_concept": LR_CONCEPT,
    "lr_others": LR_OTHERS,
    "eps": EPS,
}


def wide_dlcm(d_base: int | None = 32) -> DLCMConfig:
    """tiny_dlcm at d_token 64 / d_concept 128, so s_token = 2 and s_concept = 4 at d_base 32."""
    cfg = tiny_dlcm()
    enc = dataclasses.replace(cfg.encoder, width=64, ffn_hidden=128)
    dec = dataclasses.replace(cfg.decoder, width=64, ffn_hidden=128)
    bb = dataclasses.replace(cfg.backbone, width=128, ffn_hidden=256)
    return dataclasses.replace(cfg, encoder=enc, decoder=dec, backbone=bb, d_base=d_base)


def wide_baseline(d_base: int | None = 32) -> BaselineConfig:
    cfg = tiny_baseline()
    return dataclasses.replace(cfg, stack=dataclasses.replace(cfg.stack, width=64, ffn_hidden=128), d_base=d_base)


def table_for(cfg: DLCMConfig | BaselineConfig, **overrides: Any) -> dict[str, GroupHParams]:
    return mup_rules(cfg, MuPSettings(**SETTINGS | overrides)).table


def groups_for(cfg: DLCMConfig | BaselineConfig) -> tuple[torch.nn.Module, list[dict]]:
    model = build_model(cfg)
    return model, MuPParamGroups(table_for(cfg))(model)


@pytest.mark.parametrize("cfg", [wide_dlcm(), wide_baseline()], ids=["dlcm", "baseline"])
def test_every_parameter_lands_in_exactly_one_named_group(cfg: DLCMConfig | BaselineConfig) -> None:
    model, groups = groups_for(cfg)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    assert {g["name"] for g in groups} <= set(GROUPS)
    for name, _ in model.named_parameters():
        assert group_of(name) in {g["name"] for g in groups}, name


def test_rule_table_places_bridges_by_fan_in() -> None:
    expected = {
        "encoder.layers.0.attn.wq.weight": "token_hidden",
        "decoder.layers.0.ffn.w_down.weight": "token_hidden",
        "stack.layers.1.attn.wo.weight": "token_hidden",
        "parser.wq.weight": "token_hidden",
        "parser.wk.weight": "token_hidden",
        "pooling.w_up.weight": "token_hidden",  # d_token → d_concept: fan-in d_token
        "cross.wq.weight": "token_hidden",
        "cross.wo.weight": "token_hidden",
        "cross.ffn.w_gate.weight": "token_hidden",
        "cross.wk.weight": "concept_hidden",  # fan-in d_concept
        "cross.wv.weight": "concept_hidden",
        "backbone.layers.1.ffn.w_up.weight": "concept_hidden",
        "backbone.layers.0.attn_norm.weight": "norms",
        "backbone.norm.weight": "norms",
        "cross.q_norm.weight": "norms",
        "cross.null_concept": "norms",
        "embed.weight": "embeddings",
        "head.proj.weight": "readout",
    }
    assert {name: group_of(name) for name in expected} == expected


def test_group_lr_and_eps_follow_the_width_multipliers() -> None:
    # d_base 32: s_token = 64/32 = 2, s_concept = 128/32 = 4.
    _, groups = groups_for(wide_dlcm())
    got = {g["name"]: (g["lr"], g["eps"], g["weight_decay"]) for g in groups}
    expected = {
        "token_hidden": (LR_TOKEN / 2, EPS / 2, 0.1),
        "concept_hidden": (LR_CONCEPT / 4, EPS / 4, 0.1),
        "embeddings": (LR_OTHERS, EPS, 0.1),
        "norms": (LR_OTHERS, EPS, 0.0),
        "readout": (LR_TOKEN, EPS / 2, 0.1),  # width-independent LR: the head's 1/s_token multiplier does the scaling
    }
    assert got.keys() == expected.keys()
    for name, values in expected.items():
        assert got[name] == pytest.approx(values, rel=1e-12), name
    _, baseline_groups = groups_for(wide_baseline())
    assert [g["name"] for g in baseline_groups] == ["token_hidden", "embeddings", "norms", "readout"]


def test_wrapper_segments_from_compile_and_activation_checkpointing_are_ignored() -> None:
    assert canonical_name("_orig_mod.encoder.layers.0._checkpoint_wrapped_module.attn.wq.weight") == (
        "encoder.layers.0.attn.wq.weight"
    )
    assert group_of("_orig_mod.backbone.layers.1._checkpoint_wrapped_module.ffn_norm.weight") == "norms"
    assert group_of("_orig_mod.cross.wk.weight") == "concept_hidden"
    # Real wrappers: the same parameters land in the same groups as in the plain model.
    cfg = wide_dlcm()
    model = build_model(cfg)
    plain = {g["name"]: {id(p) for p in g["params"]} for g in MuPParamGroups(table_for(cfg))(model)}
    for stack in (model.encoder, model.backbone, model.decoder):
        for i, layer in enumerate(stack.layers):
            stack.layers[i] = checkpoint_wrapper(layer)
    wrapped = torch.compile(model)  # compiles lazily: only the names change here
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_parameters())
    groups = MuPParamGroups(table_for(cfg))(wrapped)
    assert {g["name"]: {id(p) for p in g["params"]} for g in groups} == plain


def test_unknown_parameters_and_rank_mismatches_are_errors() -> None:
    with pytest.raises(ValueError, match=r"no rule matches parameter 'adapter\.weight'"):
        group_of("adapter.weight")
    model = build_model(wide_baseline())
    model.stack.layers[0].attn.register_parameter("bias", torch.nn.Parameter(torch.zeros(64)))
    with pytest.raises(ValueError, match=r"'stack\.layers\.0\.attn\.bias' has 1 dims but group 'token_hidden'"):
        MuPParamGroups(table_for(wide_baseline()))(model)


def test_check_compares_base_rates_through_the_schedule_and_rejects_sp_groups() -> None:
    cfg = wide_dlcm()
    model, groups = groups_for(cfg)
    table = table_for(cfg)
    # Warm-up: LambdaLR scales lr by 1/10 at construction; initial_lr keeps the rule's value.
    optimizer, _ = build_optimizer(groups, OptimizerConfig(), ScheduleConfig(warmup_steps=10), 100)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["initial_lr"] / 10)
    check_optimizer_groups(optimizer, model, table)

    optimizer.param_groups[1]["eps"] *= 2
    with pytest.raises(ValueError, match=r"group 'concept_hidden': eps="):
        check_optimizer_groups(optimizer, model, table)
    sp = torch.optim.AdamW(default_param_groups(model, OptimizerConfig()))
    with pytest.raises(ValueError, match=r"optimizer group 'decay' is not a μP group"):
        check_optimizer_groups(sp, model, table)
    partial = torch.optim.AdamW([g for g in MuPParamGroups(table)(model) if g["name"] != "norms"])
    with pytest.raises(ValueError, match=r"'cross\.null_concept' is in no optimizer group"):
        check_optimizer_groups(partial, model, table)


def test_overrides_readout_lr_and_group_weight_decay() -> None:
    table = table_for(wide_dlcm(), lr_readout=7e-4, group_weight_decay={"embeddings": 0.0})
    assert table["readout"].lr == 7e-4
    assert table["embeddings"].weight_decay == 0.0
    with pytest.raises(ValueError, match=r"group_weight_decay='embedding' is not allowed: a group name"):
        table_for(wide_dlcm(), group_weight_decay={"embedding": 0.0})


# Coordinate check. Thresholds from runs of 3 seeds × widths 64/128/256 (concept stream 128/256/512), lr 3e-3,
# 5 Adam steps: μP max/min across widths ≤ 1.35 and |slope| ≤ 0.15 on every stream; SP's hidden-stream update
# slopes 1.1–2.6 (update ratios 5–30).
COORD_WIDTHS = [64, 128, 256]
COORD_STEPS = 5
MUP_MAX_RATIO, MUP_MAX_SLOPE = 1.5, 0.25
SP_MIN_SLOPE = 0.9  # update RMS grows ≈ width^1 or faster


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dlcm", "baseline"])
def test_coordinate_check_mup_is_flat_and_sp_is_not(kind: str) -> None:
    cfg = CoordCheckConfig(kind=kind, lr=3e-3, steps=COORD_STEPS)
    records = coord_check(COORD_WIDTHS, cfg, seeds=(0, 1, 2))
    table = format_records(records, 0) + "\n" + format_records(records, COORD_STEPS)
    streams = sorted({r.stream for r in records})
    for stream in streams:
        for metric in ("act_rms", "update_rms"):
            flat = flatness(records, "mup", stream, metric, COORD_STEPS)
            assert flat.ratio <= MUP_MAX_RATIO and abs(flat.slope) <= MUP_MAX_SLOPE, f"{stream} {metric}\n{table}"
        if stream != "logits":
            init = flatness(records, "mup", stream, "act_rms", 0)
            assert init.ratio <= MUP_MAX_RATIO, f"{stream} init\n{table}"
    # The readout's init term shrinks as 1/sqrt(width) (fixed σ, logits × 1/s_token); μP allows it to vanish.
    assert flatness(records, "mup", "logits", "act_rms", 0).slope == pytest.approx(-0.5, abs=0.1), table

    hidden = ["token/stack", "logits"] if kind == "baseline" else ["token/encoder", "concept/backbone", "logits"]
    for stream in hidden:
        grow = flatness(records, "sp", stream, "update_rms", COORD_STEPS)
        assert grow.slope >= SP_MIN_SLOPE and grow.ratio >= 3, f"SP {stream} should grow with width\n{table}"
