"""Rotary position embedding applied from explicit per-row positions (position within the document).

Positions come from the packed layout rather than from ``arange(T)``, so every packed document (and every
document's concept sequence in the backbone) starts again at position 0. Angles are computed on the fly in fp32:
no cached buffer that meta-device materialisation would have to rebuild.
"""

from __future__ import annotations

import torch


def rope_angles(position_T: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of shape ``[T, head_dim/2]`` for the given integer positions."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=position_T.device, dtype=torch.float32) / head_dim)
    angle_TH = position_T.float()[:, None] * inv_freq[None, :]
    return angle_TH.cos(), angle_TH.sin()


def apply_rope(x_TNH: torch.Tensor, cos_TH: torch.Tensor, sin_TH: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive halves (GPT-NeoX / LLaMA-HF layout) of every head by the position's angles."""
    half = x_TNH.shape[-1] // 2
    x1, x2 = x_TNH.float()[..., :half], x_TNH.float()[..., half:]
    cos, sin = cos_TH[:, None, :], sin_TH[:, None, :]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x_TNH.dtype)
