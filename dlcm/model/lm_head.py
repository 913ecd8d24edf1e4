"""Untied LM head with the μP output multiplier (paper Eq. 21): logits × 1/s_token, s_token = d_token/d_base."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlcm.model.linear import Linear

# GEMMs whose output rows are not a multiple of 8 elements miss cuBLAS's tensor-core kernels: with the DeepSeek-V3
# vocabulary (128,815) the head ran 7× slower than its FLOPs allow on an H200 (bench/train_throughput.py).
VOCAB_ALIGN = 128
# Padding copies the V × D weight per call: worth it for training's thousands of rows, not for decoding's few (a
# batch-1 decode step would copy the 400 MB head to save nothing on a memory-bound matrix-vector product).
ALIGN_MIN_ROWS = 1024


class LMHead(nn.Module):
    """Readout ``W_head x / s_token``; with ``d_base = d_token`` (standard parametrisation) the multiplier is 1."""

    def __init__(self, d_token: int, vocab_size: int, std: float, d_base: int | None) -> None:
        super().__init__()
        self.proj = Linear(d_token, vocab_size, std)
        self.logit_scale = 1.0 if d_base is None else d_base / d_token

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        vocab = self.proj.out_features
        # Multiply on a zero-padded copy of the weight, then view the real columns: the parameters (and
        # checkpoints) keep the true vocabulary size, the GEMMs (forward and both backward) run aligned.
        pad = -vocab % VOCAB_ALIGN if x_TD.numel() >= ALIGN_MIN_ROWS * x_TD.shape[-1] else 0
        w_PD = F.pad(self.proj.weight, (0, 0, 0, pad)) if pad else self.proj.weight
        logits_TP = F.linear(x_TD, w_PD)
        if self.logit_scale != 1.0:  # skip a pass over T × V logits under standard parametrisation
            logits_TP = logits_TP * self.logit_scale
        return logits_TP[..., :vocab] if pad else logits_TP
