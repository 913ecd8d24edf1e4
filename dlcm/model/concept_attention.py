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
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from dlcm.model.packing import PackedSeqs
from dlcm.model.pooling import ConceptLayout

BLOCK = 128
ROW_BUCKET = 256
# Flex's default launch configuration leaves the bias gathers latency-bound: with 8 warps per program the biased
# kernel ran as fast as the unbiased one (H200, head dim 64, 16K tokens: 3.9 vs 7.5 ms fwd+bwd,
# bench/results/cross_attention_launch_h200.json). Only measured head dims are listed; others keep the defaults.
LAUNCH_BY_HEAD_DIM: dict[int, dict] = {64: {"num_warps": 8}}


def _first_sorted(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``flags [Q, K]``: how many are set, and their column indices first in ascending order."""
    count = flags.sum(dim=1, dtype=torch.int32)
    order = torch.argsort((~flags).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return count[None, None], order[None, None]


def block_tables(
    first_T: torch.Tensor, j_T: torch.Tensor, rows: int, block: int = BLOCK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(partial count, partial indices, full count, full indices) of the readable ``[T, rows]`` tiles."""
    t = first_T.shape[0]
    q_blocks, kv_blocks = -(-t // block), -(-rows // block)
    q0 = torch.arange(q_blocks, device=first_T.device) * block
    q1 = (q0 + block).clamp(max=t) - 1
    kv = torch.arange(kv_blocks, device=first_T.device)[None, :]
    kv_start, kv_end = kv * block, kv * block + block - 1
    # Touched: the tile intersects [first(q0), j(q1)]. Full: it lies inside [first(q1), j(q0)].
    touched = (kv_end >= first_T[q0, None]) & (kv_start <= j_T[q1, None])
    full = (kv_start >= first_T[q1, None]) & (kv_end <= j_T[q0, None])
    return (*_first_sorted(touched & ~full), *_first_sorted(full))


def readable_block_mask(first_T: torch.Tensor, j_T: torch.Tensor, rows: int, block: int = BLOCK) -> BlockMask:
    """Block mask of the readable ``[T, rows]`` pairs: query ``t`` reads rows ``first_T[t] … j_T[t]``."""
    tables = block_tables(first_T, j_T, rows, block)

    def readable(b, h, q_idx, kv_idx):
        return (kv_idx >= first_T[q_idx]) & (kv_idx <= j_T[q_idx])

    return BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=block, mask_mod=readable, seq_lengths=(first_T.shape[0], rows))


def readable_rows(layout: ConceptLayout, tok: PackedSeqs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query token, the first and the last key row it reads: its document's first row and its own ``j``."""
    return layout.seqs.cu_seqlens.long()[tok.doc_id], layout.concept_id_T


def biased_concept_attention(
    q_1NTH: torch.Tensor,
    k_1KRH: torch.Tensor,
    v_1KRH: torch.Tensor,
    first_T: torch.Tensor,
    j_T: torch.Tensor,
    start_T: torch.Tensor,
    log_len_R: torch.Tensor,
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """All of one step's work — block tables, mask, bias tables, attention — so that compiled it is one graph.

    Run eagerly, the per-step cost at 2K–8K tokens was host-side (dozens of small launches and the
    ``BlockMask`` transposition), not the attention itself; one compiled graph removes it.
    """
    t, rows = q_1NTH.shape[2], k_1KRH.shape[2]
    block_mask = readable_block_mask(first_T, j_T, rows)
    # The only per-query bias is on the token's own row: precompute it so the kernel gathers, never takes logs.
    own_log_T = (torch.arange(t, device=j_T.device) - start_T + 1).float().log()

    def log_count(score, b, h, q_idx, kv_idx):
        return score + torch.where(kv_idx == j_T[q_idx], own_log_T[q_idx], log_len_R[kv_idx])

    return flex_attention(
        q_1NTH,
        k_1KRH,
        v_1KRH,
        score_mod=log_count,
        block_mask=block_mask,
        enable_gqa=True,
        kernel_options=kernel_options,
    )


@functools.cache
def _compiled_attention():
    return torch.compile(biased_concept_attention, dynamic=False, fullgraph=True)


def kernel_inputs(
    q_TNH: torch.Tensor, k_CKH: torch.Tensor, v_CKH: torch.Tensor, layout: ConceptLayout, tok: PackedSeqs
) -> tuple[torch.Tensor, ...]:
    """The tensor arguments of :func:`biased_concept_attention`: heads-first q, k, v with the key rows padded to a
    multiple of ``ROW_BUCKET`` (outside the compiled graph, whose shapes are then static per bucket), and the
    per-token row range, own-concept start and per-row log length tables."""
    c = k_CKH.shape[0]
    pad = math.ceil(c / ROW_BUCKET) * ROW_BUCKET - c
    k_RKH, v_RKH = F.pad(k_CKH, (0, 0, 0, 0, 0, pad)), F.pad(v_CKH, (0, 0, 0, 0, 0, pad))
    first_T, j_T = readable_rows(layout, tok)
    log_len_R = F.pad(layout.length_C.float().log(), (0, pad))
    heads_first = [x.transpose(0, 1)[None] for x in (q_TNH, k_RKH, v_RKH)]
    return (*heads_first, first_T, j_T, layout.start_C[j_T], log_len_R)


def flex_concept_attention(
    q_TNH: torch.Tensor,
    k_CKH: torch.Tensor,
    v_CKH: torch.Tensor,
    layout: ConceptLayout,
    tok: PackedSeqs,
    tuned_launch: bool = True,
) -> torch.Tensor:
    """Ψ's attention over unique concept rows with the replication log-count bias; returns ``[T, N, H]``."""
    kernel = _compiled_attention() if q_TNH.is_cuda else biased_concept_attention
    options = LAUNCH_BY_HEAD_DIM.get(q_TNH.shape[-1]) if tuned_launch and q_TNH.is_cuda else None
    return kernel(*kernel_inputs(q_TNH, k_CKH, v_CKH, layout, tok), options)[0].transpose(0, 1)
