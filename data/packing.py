"""Greedy packing of token documents into fixed-size micro-batches with ``cu_seqlens``.

Every micro-batch holds exactly ``tokens_per_batch`` tokens, so encoder, decoder and head shapes are static and
every data-parallel rank does the same work. Documents longer than ``max_seq_len`` are cut into pieces of at
most ``max_seq_len``; a piece that does not fit in the current batch is split and its rest opens the next batch.
Each piece is its own packed document (positions restart, attention never crosses it). A partly filled batch at
the end of a finite stream is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch


def make_batch(pieces: list[tuple[np.ndarray, int]], token_bytes: np.ndarray) -> dict[str, Any]:
    ids = np.concatenate([p for p, _ in pieces]).astype(np.int64)
    lengths = np.array([len(p) for p, _ in pieces], dtype=np.int64)
    cu_seqlens = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return {
        "input_ids": torch.from_numpy(ids),
        "cu_seqlens": torch.from_numpy(cu_seqlens),
        "max_seqlen": int(lengths.max()),  # known on the host here: no device sync needed downstream
        "token_bytes": torch.from_numpy(token_bytes[ids].astype(np.int32)),
        "domain": torch.tensor([d for _, d in pieces], dtype=torch.int64),
    }


def pack_documents(
    documents: Iterable[tuple[np.ndarray, int]], tokens_per_batch: int, max_seq_len: int, token_bytes: np.ndarray
) -> Iterator[dict[str, Any]]:
    """Yield packed batches from ``(token ids, domain index)`` documents, in order."""
    if tokens_per_batch < 2:
        raise ValueError(
            f"tokens_per_batch={tokens_per_batch} is not allowed: a micro-batch needs at least 2 tokens "
            "(one input and its next-token target)"
        )
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len={max_seq_len} is not allowed: documents must be cut into pieces of >= 2")
    pieces: list[tuple[np.ndarray, int]] = []
    filled = 0
    for ids, domain in documents:
        for start in range(0, len(ids), max_seq_len):
            piece = ids[start : start + max_seq_len]
            while len(piece):
                take = piece[: tokens_per_batch - filled]
                pieces.append((take, domain))
                filled += len(take)
                piece = piece[len(take) :]
                if filled == tokens_per_batch:
                    yield make_batch(pieces, token_bytes)
                    pieces, filled = [], 0
