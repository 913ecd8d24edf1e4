"""Exact token→concept attention on the C unique concept rows, as fast as the concept layout allows.

Concept replication (paper Eq. 17) defines Ψ: key row ``c`` repeated at every token of concept ``c``, under the
ordinary causal mask. Over unique rows that is, for a token ``t`` of concept ``j = concept_id[t]`` in a document
whose concept rows start at ``first``:

    readable rows   first ≤ c ≤ j
    logit bias      log n_c(t),   n_c(t) = length_C[c] for c < j,   t − start_C[j] + 1 for c = j

This module computes it with FlexAttention over ``[T, C]`` instead of ``[T, T]``. Nothing is built by evaluating
a mask: the readable range of every query is one contiguous run of rows whose ends are monotone in ``t``, so for a
query block the touched key blocks are ``[first(q0), j(q1)]`` and the fully readable ones ``[first(q1), j(q0)]``.
The block tables come from O(T/B · C/B) integer arithmetic on the device (no host sync, no ``create_block_mask``).
Key rows are padded to a multiple of ``ROW_BUCKET`` so a compiled kernel sees few distinct shapes (rows past the
real ``C`` are never readable, since ``j < C``).
"""

from __future__ import annotations

import functools
import math

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from dlcm.packing import PackedSeqs
from dlcm.pooling import ConceptLayout

BLOCK = 128
ROW_BUCKET = 256


def _first_sorted(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``flags [Q, K]``: how many are set, and their column indices first in ascending order."""
    count = flags.sum(dim=1, dtype=torch.int32)
    order = torch.argsort((~flags).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return count[None, None], order[None, None]


def concept_block_mask(
    layout: ConceptLayout, tok: PackedSeqs, rows: int, block: int = BLOCK
) -> tuple[BlockMask, torch.Tensor, torch.Tensor]:
    """Block mask of the readable ``[T, rows]`` pairs; also returns per-query ``first`` and ``j`` rows."""
    device = layout.concept_id_T.device
    t = tok.total
    j_T = layout.concept_id_T
    first_T = layout.seqs.cu_seqlens.long()[tok.doc_id]
    q_blocks, kv_blocks = math.ceil(t / block), math.ceil(rows / block)
    q0 = torch.arange(q_blocks, device=device) * block
    q1 = (q0 + block).clamp(max=t) - 1
    kv = torch.arange(kv_blocks, device=device)[None, :]
    kv_start, kv_end = kv * block, kv * block + block - 1
    # Touched: the block intersects [first(q0), j(q1)]. Full: the block lies inside [first(q1), j(q0)].
    touched = (kv_end >= first_T[q0, None]) & (kv_start <= j_T[q1, None])
    full = (kv_start >= first_T[q1, None]) & (kv_end <= j_T[q0, None])
    partial_count, partial_idx = _first_sorted(touched & ~full)
    full_count, full_idx = _first_sorted(full)

    def readable(b, h, q_idx, kv_idx):
        return (kv_idx >= first_T[q_idx]) & (kv_idx <= j_T[q_idx])

    mask = BlockMask.from_kv_blocks(
        partial_count, partial_idx, full_count, full_idx, BLOCK_SIZE=block, mask_mod=readable, seq_lengths=(t, rows)
    )
    return mask, first_T, j_T


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def flex_concept_attention(
    q_TNH: torch.Tensor, k_CKH: torch.Tensor, v_CKH: torch.Tensor, layout: ConceptLayout, tok: PackedSeqs
) -> torch.Tensor:
    """Ψ's attention over unique concept rows with the replication log-count bias; returns ``[T, N, H]``."""
    c = k_CKH.shape[0]
    rows = math.ceil(c / ROW_BUCKET) * ROW_BUCKET
    pad = (0, 0, 0, 0, 0, rows - c)
    k_RKH, v_RKH = torch.nn.functional.pad(k_CKH, pad), torch.nn.functional.pad(v_CKH, pad)
    block_mask, _, j_T = concept_block_mask(layout, tok, rows)
    start_R = torch.nn.functional.pad(layout.start_C, (0, rows - c))
    log_len_R = torch.nn.functional.pad(layout.length_C.float().log(), (0, rows - c))

    def log_count(score, b, h, q_idx, kv_idx):
        own = (q_idx - start_R[kv_idx] + 1).to(torch.float32).log()
        return score + torch.where(kv_idx == j_T[q_idx], own, log_len_R[kv_idx])

    kernel = _compiled_flex() if q_TNH.is_cuda else flex_attention
    out_1NTH = kernel(
        q_TNH.transpose(0, 1)[None],
        k_RKH.transpose(0, 1)[None],
        v_RKH.transpose(0, 1)[None],
        score_mod=log_count,
        block_mask=block_mask,
        enable_gqa=True,
    )
    return out_1NTH[0].transpose(0, 1)
