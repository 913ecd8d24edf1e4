"""Greedy packing of documents into fixed-size micro-batches with ``cu_seqlens``.

Every batch must hold exactly ``tokens_per_batch`` tokens (static shapes, equal work per rank), its pieces must
reproduce the input stream in order, and no piece may cross a document boundary or exceed ``max_seq_len``, since
the model restarts positions and masks attention at every piece.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch

from dlcm.data.packing import pack_documents

VOCAB = 500
N_DOMAINS = 3


def make_documents(max_seq_len: int, tokens_per_batch: int, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """Random documents plus the edge lengths: empty, 1 token, exactly and just over max_seq_len / a batch."""
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in rng.integers(1, 3 * max_seq_len + 2, size=40)]
    lengths += [0, 1, max_seq_len, max_seq_len + 1, 3 * max_seq_len, tokens_per_batch, tokens_per_batch + 1, 2]
    rng.shuffle(lengths)
    return [(rng.integers(0, VOCAB, size=n).astype(np.uint32), int(rng.integers(N_DOMAINS))) for n in lengths]


def check_batch(batch: dict[str, Any], tokens_per_batch: int, max_seq_len: int, token_bytes: np.ndarray) -> None:
    ids_T, cu = batch["input_ids"], batch["cu_seqlens"]
    assert ids_T.dtype == torch.int64 and ids_T.shape == (tokens_per_batch,)
    assert cu.dtype == torch.int32  # varlen attention kernels take int32 offsets
    assert cu[0] == 0 and cu[-1] == tokens_per_batch
    lengths = cu.diff()
    assert bool((lengths > 0).all()) and bool((lengths <= max_seq_len).all())
    assert batch["max_seqlen"] == int(lengths.max()) and isinstance(batch["max_seqlen"], int)
    assert torch.equal(batch["token_bytes"], torch.from_numpy(token_bytes[ids_T.numpy()]))
    assert batch["domain"].dtype == torch.int64 and batch["domain"].shape == (len(lengths),)


@pytest.mark.parametrize(
    ("tokens_per_batch", "max_seq_len"),
    [(64, 16), (37, 50), (100, 7), (2, 2), (16, 16)],
)
def test_batches_tile_the_document_stream(tokens_per_batch: int, max_seq_len: int) -> None:
    docs = make_documents(max_seq_len, tokens_per_batch)
    token_bytes = np.random.default_rng(1).integers(0, 9, size=VOCAB).astype(np.int32)
    batches = list(pack_documents(iter(docs), tokens_per_batch, max_seq_len, token_bytes))
    for batch in batches:
        check_batch(batch, tokens_per_batch, max_seq_len, token_bytes)

    # The pieces, in order, are the documents, in order, minus a partial last batch (< tokens_per_batch dropped).
    stream = np.concatenate([ids for ids, _ in docs]).astype(np.int64)
    assert len(batches) == len(stream) // tokens_per_batch
    packed = torch.cat([b["input_ids"] for b in batches]).numpy()
    np.testing.assert_array_equal(packed, stream[: len(packed)])

    # Global offsets of every piece start, and of every document.
    doc_end = np.cumsum([len(ids) for ids, _ in docs])
    doc_start = doc_end - [len(ids) for ids, _ in docs]
    piece_start = np.concatenate([b * tokens_per_batch + x["cu_seqlens"][:-1].numpy() for b, x in enumerate(batches)])
    piece_len = np.concatenate([x["cu_seqlens"].diff().numpy() for x in batches])
    piece_domain = torch.cat([x["domain"] for x in batches]).numpy()
    assert piece_len.sum() == len(packed)
    # Every document start inside the packed range opens a piece.
    assert set(doc_start[doc_start < len(packed)].tolist()) <= set(piece_start.tolist())
    for start, n, domain in zip(piece_start.tolist(), piece_len.tolist(), piece_domain.tolist(), strict=True):
        doc = int(np.searchsorted(doc_end, start, side="right"))  # skips empty documents ending at `start`
        offset = start - int(doc_start[doc])
        assert start + n <= doc_end[doc], "a piece spans two documents"
        assert offset // max_seq_len == (offset + n - 1) // max_seq_len, "a piece crosses a max_seq_len cut"
        assert domain == docs[doc][1]
        # Greedy: a piece starts only at a document start, a max_seq_len cut or a batch boundary.
        assert offset % max_seq_len == 0 or start % tokens_per_batch == 0


def test_streams_lazily_from_an_endless_source() -> None:
    # The data module feeds an endless (cycling) document stream and stops after a fixed number of batches.
    doc = (np.arange(10, dtype=np.uint32), 1)
    token_bytes = np.ones(VOCAB, dtype=np.int32)
    batches = list(itertools.islice(pack_documents(itertools.repeat(doc), 24, 8, token_bytes), 3))
    assert len(batches) == 3
    # 10-token documents cut at 8: pieces 8, 2, 8, 2, ... wrapped at 24-token batch boundaries.
    assert batches[0]["cu_seqlens"].tolist() == [0, 8, 10, 18, 20, 24]
    assert batches[1]["cu_seqlens"].tolist() == [0, 4, 6, 14, 16, 24]
    # The 8-token piece cut by the first batch boundary continues as its own 4-token piece.
    assert batches[1]["input_ids"][:6].tolist() == [4, 5, 6, 7, 8, 9]


def test_no_batch_from_too_few_tokens() -> None:
    token_bytes = np.ones(VOCAB, dtype=np.int32)
    docs = [(np.arange(5, dtype=np.uint32), 0), (np.arange(4, dtype=np.uint32), 0)]
    assert list(pack_documents(docs, 10, 8, token_bytes)) == []
    assert list(pack_documents([], 10, 8, token_bytes)) == []


@pytest.mark.parametrize(
    ("name", "tokens_per_batch", "max_seq_len"), [("tokens_per_batch", 1, 8), ("max_seq_len", 8, 1)]
)
def test_rejects_sizes_below_two(name: str, tokens_per_batch: int, max_seq_len: int) -> None:
    # pack_documents is a generator: arguments are checked when the first batch is requested.
    batches = pack_documents([(np.arange(20, dtype=np.uint32), 0)], tokens_per_batch, max_seq_len, np.ones(VOCAB))
    with pytest.raises(ValueError, match=rf"{name}=1 is not allowed"):
        next(batches)
