"""Rotary position embedding applied from explicit per-row positions (position within the document).

Positions come from the packed layout rather than from ``arange(T)``, so every packed document (and every
document's concept sequence in the backbone) starts again at position 0. Angles are computed on the fly in fp64
(exact for long contexts, negligible cost at ``[T, head_dim/2]``): no cached buffer that meta-device
materialisation would have to rebuild.
"""

from __future__ import annotations

import torch


def rope_angles(position_T: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 ``(cos, sin)`` of shape ``[T, head_dim/2]`` for the given integer positions."""
    exponent = torch.arange(0, head_dim, 2, device=position_T.device, dtype=torch.float64) / head_dim
    angle_TH = position_T.double()[:, None] * (theta**-exponent)[None, :]
    return angle_TH.cos(), angle_TH.sin()


def apply_rope(x_TNH: torch.Tensor, cos_TH: torch.Tensor, sin_TH: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive halves (GPT-NeoX / LLaMA-HF layout) of every head by the position's angles."""
    half = x_TNH.shape[-1] // 2
    acc = torch.promote_types(x_TNH.dtype, torch.float32)
    x1, x2 = x_TNH.to(acc)[..., :half], x_TNH.to(acc)[..., half:]
    cos, sin = cos_TH[:, None, :].to(acc), sin_TH[:, None, :].to(acc)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x_TNH.dtype)
