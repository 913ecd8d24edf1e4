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
import torch.nn.functional as F
from torch import nn

from dlcm.model.pooling import ConceptLayout

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

    @staticmethod
    def keep_weights(start_prob_C: torch.Tensor, doc_start_C: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        """``P_k``: the clamped, detached ``p`` at each concept's first token; 1 on a document's first concept."""
        keep_C = start_prob_C.detach().to(acc).clamp(P_MIN, 1.0 - P_MIN)
        return torch.where(doc_start_C, torch.ones_like(keep_C), keep_C)

    def forward(self, z_CD: torch.Tensor, prob_T: torch.Tensor, layout: ConceptLayout) -> torch.Tensor:
        if self.kind == "identity":
            return z_CD
        acc = torch.promote_types(z_CD.dtype, torch.float32)
        keep_C = self.keep_weights(prob_T[layout.start_C], layout.seqs.position == 0, acc)
        smoothed = ema_scan(z_CD.to(acc), keep_C, 1.0 - keep_C, layout.seqs.max_seqlen)
        return smoothed.to(z_CD.dtype)

    def resume(
        self, state_BD: torch.Tensor, z_BMD: torch.Tensor, start_prob_BM: torch.Tensor, doc_start_BM: torch.Tensor
    ) -> torch.Tensor:
        """Smooth ``M`` further concepts of each of ``B`` documents, continuing from ``z̃`` of their last concept.

        Decoding's form of :meth:`forward`: ``state_BD`` (in the accumulation dtype, ignored where a row is a
        document's first concept) is put in front of each document's rows as a row that the scan passes through
        unchanged (keep 1, decay 0). Returns ``[B, M, D]`` in the accumulation dtype (the next state is a row of it).
        """
        acc = state_BD.dtype
        if self.kind == "identity":
            return z_BMD.to(acc)
        b, m, d = z_BMD.shape
        keep_BM = self.keep_weights(start_prob_BM, doc_start_BM, acc)
        rows_BM1D = torch.cat([state_BD[:, None], z_BMD.to(acc)], dim=1)
        keep_BM1 = F.pad(keep_BM, (1, 0), value=1.0)
        decay_BM1 = F.pad(1.0 - keep_BM, (1, 0), value=0.0)
        smoothed = ema_scan(rows_BM1D.reshape(-1, d), keep_BM1.reshape(-1), decay_BM1.reshape(-1), m + 1)
        return smoothed.view(b, m + 1, d)[:, 1:]
