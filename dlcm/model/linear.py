"""Linear and embedding layers whose initialisation is explicit and lives in ``reset_parameters``.

FSDP and Lightning build large models on the ``meta`` device and materialise them with ``to_empty()`` followed by
each module's ``reset_parameters()``. Every parameter in dlcm is therefore owned by a module whose
``reset_parameters`` initialises exactly its own parameters (never its children's), so the eager build and the
materialised build draw from the same distributions (μP σ, identity router init).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def mup_std(init_std: float, width: int, d_base: int | None) -> float:
    """Init std of a hidden matrix in a stream of ``width``: variance σ²_base / s with s = width / d_base (§3)."""
    if d_base is None:
        return init_std
    return init_std / math.sqrt(width / d_base)


class Linear(nn.Module):
    """Bias-free ``y = x Wᵀ`` with a normal(0, std) or identity initialisation."""

    def __init__(self, in_features: int, out_features: int, std: float, identity_init: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.std = std
        self.identity_init = identity_init
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.identity_init:
            nn.init.eye_(self.weight)
        else:
            nn.init.normal_(self.weight, mean=0.0, std=self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        init = "identity" if self.identity_init else f"std={self.std:.4g}"
        return f"{self.in_features} -> {self.out_features}, {init}"


class Embedding(nn.Module):
    """Token embedding table with a fixed normal(0, std) init (μP 'others' group: width-independent)."""

    def __init__(self, vocab_size: int, width: int, std: float) -> None:
        super().__init__()
        self.std = std
        self.weight = nn.Parameter(torch.empty(vocab_size, width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)

    def forward(self, ids_T: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids_T, self.weight)
