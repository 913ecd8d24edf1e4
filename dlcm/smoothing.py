"""Concept smoothing S (paper Eq. 11), whose form the paper leaves open: causal EMA (default) or identity.

    z̃_k = P_k z_k + (1 − P_k) z̃_{k−1},   P_k = p at concept k's first token, clamped to [1e-4, 1 − 1e-4], detached,

restarting at every document (``z̃ = z`` on a document's first concept), so it mixes in earlier concepts of the
same document only. The recurrence is evaluated by a Hillis–Steele scan over affine maps, ``⌈log2 C_doc⌉``
elementwise passes: only products of factors in (0, 1) appear, never ``exp(−cumsum(log …))``, so long documents
neither overflow nor lose precision. Computed in (at least) fp32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dlcm.pooling import ConceptLayout

P_MIN = 1e-4


def ema_scan(z_CD: torch.Tensor, keep_C: torch.Tensor, decay_C: torch.Tensor, max_len: int) -> torch.Tensor:
    """Solve ``y_k = keep_k·z_k + decay_k·y_{k−1}`` (``decay = 0`` where a sequence starts)."""
    b_CD = keep_C[:, None] * z_CD
    a_C = decay_C
    span = 1
    for _ in range(math.ceil(math.log2(max(max_len, 1)))):
        # Compose each element's map with the one `span` rows back; rows < span are already final.
        b_CD = torch.cat([b_CD[:span], b_CD[span:] + a_C[span:, None] * b_CD[:-span]])
        a_C = torch.cat([a_C[:span], a_C[span:] * a_C[:-span]])
        span *= 2
    return b_CD


class ConceptSmoothing(nn.Module):
    """Causal EMA over each document's concepts, or the identity (``kind='identity'``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, z_CD: torch.Tensor, prob_T: torch.Tensor, layout: ConceptLayout) -> torch.Tensor:
        if self.kind == "identity":
            return z_CD
        doc_start_C = layout.seqs.position == 0
        acc = torch.promote_types(z_CD.dtype, torch.float32)
        keep_C = prob_T.detach()[layout.start_C].to(acc).clamp(P_MIN, 1.0 - P_MIN)
        keep_C = torch.where(doc_start_C, torch.ones_like(keep_C), keep_C)
        smoothed = ema_scan(z_CD.to(acc), keep_C, 1.0 - keep_C, layout.seqs.max_seqlen)
        return smoothed.to(z_CD.dtype)
