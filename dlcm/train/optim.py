"""AdamW with named parameter groups and learning-rate schedules as relative per-group multipliers.

A schedule returns a multiplier of each group's own base learning rate (``LambdaLR``), never an absolute rate, so
per-group ratios (μP groups, no-decay groups) survive warm-up and decay. Shapes, in optimizer steps:

- ``constant``: linear warm-up, then 1.
- ``cosine``: linear warm-up, then cosine from 1 to ``min_lr_ratio`` at ``total_steps`` (LLaMA: 2,000 warm-up
  steps, decay to 10%).
- ``wsd`` (warmup–stable–decay): linear warm-up, flat, then linear decay to ``min_lr_ratio`` over the last
  ``decay_fraction`` of ``total_steps``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dlcm.model.config import require, require_choice

ScheduleKind = Literal["constant", "cosine", "wsd"]


@dataclass
class OptimizerConfig:
    """AdamW hyper-parameters (defaults: LLaMA-1's, which the paper adopts)."""

    lr: float = 3e-4  # peak learning rate of the base group
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only (norm gains and the null concept are exempt)

    def __post_init__(self) -> None:
        require(self.lr > 0, "optimizer.lr", self.lr, "a number > 0")
        require(all(0 <= b < 1 for b in self.betas), "optimizer.betas", self.betas, "two numbers in [0, 1)")
        require(self.eps > 0, "optimizer.eps", self.eps, "a number > 0")
        require(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "a number >= 0")


@dataclass
class ScheduleConfig:
    """Learning-rate multiplier over optimizer steps."""

    kind: ScheduleKind = "cosine"
    warmup_steps: int = 2000
    total_steps: int | None = None  # None: the trainer's estimated optimizer steps (max_steps / epochs)
    min_lr_ratio: float = 0.1  # final multiplier of cosine and wsd
    decay_fraction: float = 0.2  # wsd only: share of total_steps spent decaying

    def __post_init__(self) -> None:
        require_choice("schedule.kind", self.kind, ScheduleKind)
        require(self.warmup_steps >= 0, "schedule.warmup_steps", self.warmup_steps, "an integer >= 0")
        require(
            self.total_steps is None or self.total_steps > 0,
            "schedule.total_steps",
            self.total_steps,
            "None or a positive integer",
        )
        require(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        require(0 < self.decay_fraction <= 1, "schedule.decay_fraction", self.decay_fraction, "a number in (0, 1]")


def lr_multiplier(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.kind == "cosine":
        span = max(total_steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_start = total_steps - round(cfg.decay_fraction * total_steps)
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start) / max(total_steps - decay_start, 1), 1.0)
    return 1.0 - (1.0 - floor) * progress


class ScheduleMultiplier:
    """``lr_multiplier`` as the callable ``LambdaLR`` holds. An object, not a closure: ``LambdaLR`` saves an
    object's attributes in its state dict, so the schedule's length is fixed in every checkpoint and a resumed run
    keeps it whatever ``max_steps`` it is started with (see :mod:`dlcm.train.resume`). Attributes are plain values:
    checkpoints load with ``weights_only``."""

    def __init__(self, cfg: ScheduleConfig, total_steps: int) -> None:
        self.schedule = dataclasses.asdict(cfg)
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        return lr_multiplier(ScheduleConfig(**self.schedule), step, self.total_steps)


def default_param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """Standard parametrisation: one named group per weight-decay class (matrices decay, vectors do not)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "eps": cfg.eps},
        {"name": "no_decay", "params": no_decay, "lr": cfg.lr, "weight_decay": 0.0, "eps": cfg.eps},
    ]
    return [g for g in groups if g["params"]]


def all_plain_cpu(param_groups: list[dict]) -> bool:
    """Whether every parameter is an ordinary CPU tensor. PyTorch's AdamW then defaults to its per-parameter loop,
    which costs a quarter of a step of the CPU demo; the fused kernel takes the same step (to rounding) in a tenth of
    that time. Elsewhere PyTorch's default stays (``foreach`` on CUDA; sharded parameters are DTensors)."""
    return all(type(p) is nn.Parameter and p.device.type == "cpu" for g in param_groups for p in g["params"])


def build_optimizer(
    param_groups: list[dict], cfg: OptimizerConfig, schedule: ScheduleConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(
        param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True if all_plain_cpu(param_groups) else None
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, ScheduleMultiplier(schedule, total_steps))
    return optimizer, scheduler
