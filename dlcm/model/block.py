"""The one pre-norm transformer block and the causal stack that every DLCM stage and the baseline use."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dlcm.model.attention import SelfAttention
from dlcm.model.config import StackConfig
from dlcm.model.ffn import SwiGLU
from dlcm.model.norm import RMSNorm
from dlcm.model.packing import PackedSeqs
from dlcm.model.rope import rope_angles


class TransformerBlock(nn.Module):
    """LLaMA-style block: ``x + Attn(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))``."""

    def __init__(self, cfg: StackConfig, std: float, norm_eps: float, backend: str) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.width, norm_eps)
        self.attn = SelfAttention(cfg.width, cfg.n_heads, cfg.n_kv_heads, std, cfg.qk_norm, norm_eps, backend)
        self.ffn_norm = RMSNorm(cfg.width, norm_eps)
        self.ffn = SwiGLU(cfg.width, cfg.ffn_hidden, std)

    def forward(self, x_TD: torch.Tensor, seqs: PackedSeqs, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.residual(x_TD, lambda h_TD: self.attn(h_TD, seqs, rope))

    def residual(self, x_TD: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The block around a given attention (``attend`` maps normed rows to attention output): cached
        decoding reuses it with attention over a KV cache."""
        x_TD = x_TD + attend(self.attn_norm(x_TD))
        return x_TD + self.ffn(self.ffn_norm(x_TD))


class TransformerStack(nn.Module):
    """``n_layers`` causal blocks over a packed stream, closed by a final RMSNorm.

    RoPE angles are computed once per forward from the stream's in-document positions (token position for the
    encoder/decoder/baseline, concept index for the backbone) and shared by all layers.
    """

    def __init__(self, cfg: StackConfig, std: float, norm_eps: float, backend: str) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.layers = nn.ModuleList(TransformerBlock(cfg, std, norm_eps, backend) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.width, norm_eps)

    def forward(self, x_TD: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
        rope = rope_angles(seqs.position, self.head_dim, self.rope_theta)
        for layer in self.layers:
            x_TD = layer(x_TD, seqs, rope)
        return self.norm(x_TD)
