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
# Below this document length (tokens) the per-step overhead (block tables, padding, launches) outweighs the
# T×T work that replication wastes (H200 bf16, bench/results/cross_attention_h200.json); ``impl='auto'`` uses it.
EXACT_MIN_TOKENS = 16384


def resolve_cross_impl(impl: str, device_type: str, max_seqlen: int) -> str:
    """The Ψ kernel that runs: ``impl`` itself, or for ``'auto'`` the exact kernel on CUDA for long documents."""
    if impl != "auto":
        return impl
    return "exact" if device_type == "cuda" and max_seqlen >= EXACT_MIN_TOKENS else "replicate"


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


@functools.cache
def _compiled_block_tables():
    # A few dozen tiny integer ops: compiled they become one or two kernels instead of a launch each.
    return torch.compile(block_tables, dynamic=False)


def concept_block_mask(
    layout: ConceptLayout, tok: PackedSeqs, rows: int, block: int = BLOCK
) -> tuple[BlockMask, torch.Tensor, torch.Tensor]:
    """Block mask of the readable ``[T, rows]`` pairs; also returns per-query ``first`` and ``j`` rows."""
    j_T = layout.concept_id_T
    first_T = layout.seqs.cu_seqlens.long()[tok.doc_id]
    build = _compiled_block_tables() if j_T.is_cuda else block_tables
    tables = build(first_T, j_T, rows, block)

    def readable(b, h, q_idx, kv_idx):
        return (kv_idx >= first_T[q_idx]) & (kv_idx <= j_T[q_idx])

    mask = BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=block, mask_mod=readable, seq_lengths=(tok.total, rows))
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
    log_len_R = torch.nn.functional.pad(layout.length_C.float().log(), (0, rows - c))
    # The only per-query bias is on the token's own row: precompute it so the kernel gathers, never takes logs.
    rows_T = torch.arange(tok.total, device=j_T.device)
    own_log_T = (rows_T - layout.start_C[j_T] + 1).float().log()

    def log_count(score, b, h, q_idx, kv_idx):
        return score + torch.where(kv_idx == j_T[q_idx], own_log_T[q_idx], log_len_R[kv_idx])

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
