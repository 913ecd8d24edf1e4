"""SwiGLU feed-forward network (the paper's "Swish" activation in a LLaMA-style block)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlcm.model.linear import Linear


class SwiGLU(nn.Module):
    """``W_down(silu(W_gate x) ⊙ W_up x)``; all three matrices belong to the stream of width ``width``."""

    def __init__(self, width: int, hidden: int, std: float) -> None:
        super().__init__()
        self.w_gate = Linear(width, hidden, std)
        self.w_up = Linear(width, hidden, std)
        self.w_down = Linear(hidden, width, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
