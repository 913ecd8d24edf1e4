"""Concept layout from boundaries, mean pooling of token states, and the up-projection (paper Eq. 7).

A concept is a maximal run of tokens starting at a boundary. From the boolean ``boundary_T``:

    concept_id_T   = cumsum(b_T) − 1                      (global concept index of every token)
    cu_seqlens_cpt = [0] + cumsum(b_T)[doc_end_T]         (concept offsets at document ends)

Example, two packed documents (``|`` = boundary):

    token t         0  1  2  3  4 | 5  6  7
    b_t             1  0  1  0  0 | 1  1  0
    concept_id_T    0  0  1  1  1   2  3  3
    cu_seqlens_cpt  [0, 2, 4]

The concept count (and the longest document in concepts) is read back to the host once per forward: it sizes the
concept stream. That is the only device→host synchronisation of a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlcm.model.linear import Linear
from dlcm.model.packing import PackedSeqs


@dataclass
class ConceptLayout:
    """Where every concept sits in the token stream, plus the concept stream's own packed layout."""

    concept_id_T: torch.Tensor  # int64 [T]
    start_C: torch.Tensor  # int64 [C], first token of each concept
    length_C: torch.Tensor  # int64 [C], tokens per concept
    seqs: PackedSeqs  # concept stream: cu_seqlens_cpt, doc_id_C, concept index within its document

    @property
    def num_concepts(self) -> int:
        return self.seqs.total


def concept_layout(boundary_T: torch.Tensor, tok: PackedSeqs) -> ConceptLayout:
    """Derive concept ids and offsets; ``boundary_T`` must be set at every document start."""
    cum_T = torch.cumsum(boundary_T.to(torch.int64), dim=0)
    concept_id_T = cum_T - 1
    cu_seqlens_cpt = F.pad(cum_T[tok.cu_seqlens[1:].long() - 1], (1, 0))
    num_concepts, max_concepts = torch.stack([cu_seqlens_cpt[-1], cu_seqlens_cpt.diff().max()]).tolist()
    rows_T = torch.arange(boundary_T.shape[0], device=boundary_T.device)
    start_C = torch.zeros(num_concepts, dtype=torch.int64, device=rows_T.device).scatter_reduce_(
        0, concept_id_T, rows_T, reduce="amin", include_self=False
    )
    length_C = torch.zeros_like(start_C).index_add_(0, concept_id_T, torch.ones_like(rows_T))
    doc_id_C = tok.doc_id[start_C]
    position_C = torch.arange(num_concepts, device=rows_T.device) - cu_seqlens_cpt[doc_id_C]
    seqs = PackedSeqs(cu_seqlens_cpt.to(torch.int32), max_concepts, doc_id_C, position_C)
    return ConceptLayout(concept_id_T, start_C, length_C, seqs)


def mean_pool(h_TD: torch.Tensor, concept_id_T: torch.Tensor, length_C: torch.Tensor) -> torch.Tensor:
    """Mean of each concept's token states, accumulated in (at least) fp32; returns ``[C, D]`` in h's dtype."""
    acc_dtype = torch.promote_types(h_TD.dtype, torch.float32)
    sum_CD = torch.zeros(length_C.shape[0], h_TD.shape[1], dtype=acc_dtype, device=h_TD.device)
    sum_CD = sum_CD.index_add(0, concept_id_T, h_TD.to(acc_dtype))
    return (sum_CD / length_C[:, None].to(acc_dtype)).to(h_TD.dtype)


class ConceptPooling(nn.Module):
    """Mean-pool tokens into concepts and up-project ``d_token → d_concept`` (no bias, as in Eq. 7)."""

    def __init__(self, d_token: int, d_concept: int, std: float) -> None:
        super().__init__()
        self.w_up = Linear(d_token, d_concept, std)

    def forward(self, h_TD: torch.Tensor, layout: ConceptLayout) -> torch.Tensor:
        return self.w_up(mean_pool(h_TD, layout.concept_id_T, layout.length_C))
