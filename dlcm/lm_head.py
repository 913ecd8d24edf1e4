"""Untied LM head with the μP output multiplier (paper Eq. 21): logits × 1/s_token, s_token = d_token/d_base."""

from __future__ import annotations

import torch
from torch import nn

from dlcm.linear import Linear


class LMHead(nn.Module):
    """Readout ``W_head x / s_token``; with ``d_base = d_token`` (standard parametrisation) the multiplier is 1."""

    def __init__(self, d_token: int, vocab_size: int, std: float, d_base: int | None) -> None:
        super().__init__()
        self.proj = Linear(d_token, vocab_size, std)
        self.logit_scale = 1.0 if d_base is None else d_base / d_token

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.proj(x_TD) * self.logit_scale
