"""Learning-rate schedules are relative multipliers; default groups split by weight-decay class."""

from __future__ import annotations

import math

import pytest
import torch

from dlcm.model.presets import build_model, tiny_dlcm
from dlcm.train.optim import OptimizerConfig, ScheduleConfig, build_optimizer, default_param_groups, lr_multiplier


def test_cosine_warmup_then_decay_to_floor() -> None:
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(cfg, 0, 100) == pytest.approx(0.1)
    assert lr_multiplier(cfg, 9, 100) == pytest.approx(1.0)
    assert lr_multiplier(cfg, 55, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(cfg, 100, 100) == pytest.approx(0.1)
    assert lr_multiplier(cfg, 500, 100) == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_over_the_last_fraction() -> None:
    cfg = ScheduleConfig(kind="wsd", warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(cfg, 50, 100) == 1.0
    assert lr_multiplier(cfg, 79, 100) == 1.0
    assert lr_multiplier(cfg, 90, 100) == pytest.approx(0.5)
    assert lr_multiplier(cfg, 100, 100) == pytest.approx(0.0)


def test_schedule_keeps_per_group_ratios() -> None:
    model = build_model(tiny_dlcm())
    groups = default_param_groups(model, OptimizerConfig(lr=1e-3))
    groups[1]["lr"] = 5e-4  # e.g. a μP group with half the base rate
    optimizer, scheduler = build_optimizer(groups, OptimizerConfig(lr=1e-3), ScheduleConfig(warmup_steps=4), 20)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs[1] / lrs[0] == pytest.approx(0.5)


def test_default_groups_cover_every_parameter_once_and_exempt_vectors_from_decay() -> None:
    model = build_model(tiny_dlcm())
    groups = default_param_groups(model, OptimizerConfig(weight_decay=0.1))
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    by_name = {g["name"]: g for g in groups}
    assert all(p.ndim >= 2 for p in by_name["decay"]["params"])
    assert by_name["no_decay"]["weight_decay"] == 0.0
    assert any(p is model.cross.null_concept for p in by_name["no_decay"]["params"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "linear"}, r"schedule\.kind='linear'"),
        ({"warmup_steps": -1}, r"schedule\.warmup_steps=-1"),
        ({"min_lr_ratio": 2.0}, r"schedule\.min_lr_ratio=2\.0"),
    ],
)
def test_bad_schedule_values_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScheduleConfig(**kwargs)


def test_bad_optimizer_values_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"optimizer\.lr=0"):
        OptimizerConfig(lr=0)
    with pytest.raises(ValueError, match=r"optimizer\.betas"):
        OptimizerConfig(betas=(0.9, 1.5))


def test_cpu_optimizer_is_fused_and_steps_as_the_reference_loop() -> None:
    torch.manual_seed(0)
    fast, slow = build_model(tiny_dlcm()), build_model(tiny_dlcm())
    slow.load_state_dict(fast.state_dict())
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1)
    optimizer, _ = build_optimizer(default_param_groups(fast, cfg), cfg, ScheduleConfig(warmup_steps=0), 10)
    assert all(group["fused"] for group in optimizer.param_groups)
    reference = torch.optim.AdamW(default_param_groups(slow, cfg), betas=cfg.betas, eps=cfg.eps, foreach=False)
    for _ in range(5):
        for p, q in zip(fast.parameters(), slow.parameters(), strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        optimizer.step()
        reference.step()
    for p, q in zip(fast.parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
