"""Tokenizing chunks of documents in worker processes, results in input order.

Tokenization is the costly part of a build (about a megabyte of text per second per core for a byte-level BPE),
while reading, splitting and writing shards is cheap. So the build reads the document stream and writes shards in
one process, and only the encoding fans out: chunks go to ``workers`` processes and come back in the order they
were sent, which makes the output independent of the number of workers. Each worker encodes on one thread (the
``tokenizers`` thread pool is turned off), so ``workers`` is the number of cores used.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")
# Chunks in flight per worker: enough to keep every worker busy while the reader fills the next one.
_IN_FLIGHT_PER_WORKER = 2

_tokenizer = None


def _init_worker(tokenizer_file: str) -> None:
    global _tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it stops the pool)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    from dlcm.data.tokenizer import load_tokenizer

    _tokenizer = load_tokenizer(tokenizer_file)


def encode_chunk(texts: Sequence[str], tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``texts`` as one concatenated uint32 array and the per-text lengths (cheap to pickle)."""
    from dlcm.data.tokenizer import encode_documents

    ids = encode_documents(tokenizer if tokenizer is not None else _tokenizer, texts)
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    arrays = [np.asarray(x, dtype=np.uint32) for x in ids]
    return (np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint32)), lengths


def split_ids(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """The per-text arrays of :func:`encode_chunk`'s result."""
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def encode_in_order(
    tokenizer_file: Path, chunks: Iterator[tuple[T, list[str]]], workers: int
) -> Iterator[tuple[T, list[np.ndarray]]]:
    """``(tag, token ids of each text)`` for every ``(tag, texts)`` chunk, in input order.

    ``workers == 1`` encodes in this process; more start a pool of that many processes (``forkserver``: no
    thread or file state of this process is inherited), stopped when the iterator is closed.
    """
    if workers < 1:
        raise ValueError(f"workers={workers} is not allowed: at least 1 process")
    if workers == 1:
        from dlcm.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_file)
        for tag, texts in chunks:
            yield tag, split_ids(*encode_chunk(texts, tokenizer))
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "dlcm.data.tokenizer"])  # imported once, inherited by every worker
    # CTRL-C reaches the whole process group. The forkserver imports its preload before it ignores SIGINT, and a
    # worker runs before its initializer does: started while this process ignores SIGINT, both inherit that (an
    # ignored signal stays ignored across exec), so only this process reports the interrupt, in one line.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pool = context.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_file),))
    finally:
        signal.signal(signal.SIGINT, previous)
    with pool:
        pending: deque = deque()
        for tag, texts in chunks:
            pending.append((tag, pool.apply_async(encode_chunk, (texts,))))
            while len(pending) >= _IN_FLIGHT_PER_WORKER * workers:
                done_tag, result = pending.popleft()
                yield done_tag, split_ids(*result.get())
        while pending:
            done_tag, result = pending.popleft()
            yield done_tag, split_ids(*result.get())
