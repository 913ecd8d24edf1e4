"""The LLaMA-style dense baseline, built from the same embedding, stack and head as DLCM."""

from __future__ import annotations

import torch
from torch import nn

from dlcm.model.block import TransformerStack
from dlcm.model.config import BaselineConfig
from dlcm.model.linear import Embedding, mup_std
from dlcm.model.linear_cross_entropy import TokenLoss
from dlcm.model.lm_head import LMHead
from dlcm.model.packing import PackedSeqs


class DenseBaseline(nn.Module):
    """Embedding → ``n_layers`` causal blocks → final RMSNorm → untied μP head; given ``targets_T`` it returns the
    head's fused cross-entropy instead of logits."""

    def __init__(self, cfg: BaselineConfig) -> None:
        super().__init__()
        self.cfg = cfg
        std = mup_std(cfg.init_std, cfg.d_token, cfg.d_base)
        self.embed = Embedding(cfg.vocab_size, cfg.d_token, cfg.init_std)
        self.stack = TransformerStack(cfg.stack, std, cfg.norm_eps, cfg.attn_backend)
        self.head = LMHead(cfg.d_token, cfg.vocab_size, cfg.init_std, cfg.d_base)

    def forward(
        self,
        input_ids_T: torch.Tensor,
        cu_seqlens_tok: torch.Tensor,
        max_seqlen_tok: int | None = None,
        targets_T: torch.Tensor | None = None,
    ) -> torch.Tensor | TokenLoss:
        tok = PackedSeqs.from_cu_seqlens(cu_seqlens_tok, input_ids_T.shape[0], max_seqlen_tok)
        return self.head(self.stack(self.embed(input_ids_T), tok), targets_T)
