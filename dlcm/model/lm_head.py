"""Untied LM head with the μP output multiplier (paper Eq. 21): logits × 1/s_token, s_token = d_token/d_base."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlcm.model.linear import Linear
from dlcm.model.linear_cross_entropy import TokenLoss, linear_cross_entropy

# GEMMs whose output rows are not a multiple of 8 elements miss cuBLAS's tensor-core kernels: with the DeepSeek-V3
# vocabulary (128,815) the head ran 7× slower than its FLOPs allow on an H200 (bench/train_throughput.py).
VOCAB_ALIGN = 128
# Padding copies the V × D weight per call: worth it for training's thousands of rows, not for decoding's few (a
# batch-1 decode step would copy the 400 MB head to save nothing on a memory-bound matrix-vector product).
ALIGN_MIN_ROWS = 1024


def aligned(w_VD: torch.Tensor) -> torch.Tensor:
    """``W`` zero-padded to a multiple of :data:`VOCAB_ALIGN` rows (a copy; ``W`` itself when already aligned)."""
    pad = -w_VD.shape[0] % VOCAB_ALIGN
    return F.pad(w_VD, (0, 0, 0, pad)) if pad else w_VD


class LMHead(nn.Module):
    """Readout ``W_head x / s_token``; with ``d_base = d_token`` (standard parametrisation) the multiplier is 1.

    ``forward(x)`` returns logits; ``forward(x, targets_T)`` returns the cross-entropy (:class:`TokenLoss`) through
    :func:`~dlcm.model.linear_cross_entropy.linear_cross_entropy`, never holding the ``[T, V]`` logits. The loss
    goes through ``forward`` so that FSDP2's hooks gather the weight for it. ``compile_loss`` (set by the
    execution layer with ``compile_blocks``) fuses each chunk's softmax on a GPU.
    """

    def __init__(self, d_token: int, vocab_size: int, std: float, d_base: int | None) -> None:
        super().__init__()
        self.proj = Linear(d_token, vocab_size, std)
        self.logit_scale = 1.0 if d_base is None else d_base / d_token
        self.compile_loss = False

    def forward(self, x_TD: torch.Tensor, targets_T: torch.Tensor | None = None) -> torch.Tensor | TokenLoss:
        if targets_T is not None:
            return self._loss(x_TD, targets_T)
        vocab = self.proj.out_features
        # Multiply on a zero-padded copy of the weight, then view the real columns: the parameters (and
        # checkpoints) keep the true vocabulary size, the GEMMs (forward and both backward) run aligned.
        many_rows = x_TD.numel() >= ALIGN_MIN_ROWS * x_TD.shape[-1]
        w_PD = aligned(self.proj.weight) if many_rows else self.proj.weight
        logits_TP = F.linear(x_TD, w_PD)
        if self.logit_scale != 1.0:  # skip a pass over T × V logits under standard parametrisation
            logits_TP = logits_TP * self.logit_scale
        return logits_TP[..., :vocab] if w_PD.shape[0] != vocab else logits_TP

    def _loss(self, x_TD: torch.Tensor, targets_T: torch.Tensor) -> TokenLoss:
        device = x_TD.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_TD.dtype
        w_PD = aligned(self.proj.weight.to(dtype))
        return linear_cross_entropy(
            x_TD.to(dtype), w_PD, targets_T, self.logit_scale, self.proj.out_features, compiled=self.compile_loss
        )
