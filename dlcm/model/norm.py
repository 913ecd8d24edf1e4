"""RMSNorm computed in (at least) fp32 and cast back, so bf16 activations keep exact mean-square statistics."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``x / rms(x) · g`` over the last dimension (Zhang & Sennrich 2019)."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        xa = x.to(acc)
        y = xa * torch.rsqrt(xa.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.to(acc)).to(x.dtype)
