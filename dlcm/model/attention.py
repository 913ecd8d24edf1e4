"""Grouped-query self-attention with RoPE and optional QK-RMSNorm, over packed documents."""

from __future__ import annotations

import torch
from torch import nn

from dlcm.model.attention_backends import causal_attention
from dlcm.model.linear import Linear
from dlcm.model.norm import RMSNorm
from dlcm.model.packing import PackedSeqs
from dlcm.model.rope import apply_rope


class SelfAttention(nn.Module):
    """GQA attention: ``n_heads`` query heads share ``n_kv_heads`` key/value heads (Ainslie et al. 2023)."""

    def __init__(
        self,
        width: int,
        n_heads: int,
        n_kv_heads: int,
        std: float,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = width // n_heads
        self.backend = backend
        self.wq = Linear(width, n_heads * self.head_dim, std)
        self.wk = Linear(width, n_kv_heads * self.head_dim, std)
        self.wv = Linear(width, n_kv_heads * self.head_dim, std)
        self.wo = Linear(n_heads * self.head_dim, width, std)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else nn.Identity()

    def project(
        self, x_TD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated, normalised ``q_TNH``, ``k_TKH`` and ``v_TKH`` of the rows (shared with cached decoding)."""
        t = x_TD.shape[0]
        q_TNH = self.q_norm(self.wq(x_TD).view(t, self.n_heads, self.head_dim))
        k_TKH = self.k_norm(self.wk(x_TD).view(t, self.n_kv_heads, self.head_dim))
        v_TKH = self.wv(x_TD).view(t, self.n_kv_heads, self.head_dim)
        return apply_rope(q_TNH, *rope), apply_rope(k_TKH, *rope), v_TKH

    def forward(self, x_TD: torch.Tensor, seqs: PackedSeqs, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q_TNH, k_TKH, v_TKH = self.project(x_TD, rope)
        o_TNH = causal_attention(q_TNH, k_TKH, v_TKH, seqs, self.backend)
        return self.wo(o_TNH.reshape(x_TD.shape[0], -1))
