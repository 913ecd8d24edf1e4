"""What a build will produce and cost, estimated from a sample before anything is written (``--dry-run``).

The sample is the first documents of files spread evenly over the inputs. From it come the text bytes per stored
byte (compression), tokens per text byte, shard bytes per token (ids, tar and metadata overhead) and the
tokenizer's speed on one core; the estimate scales them to the inputs' stored size and to the document or token
budget. Reading and writing are assumed not to be the bottleneck (they are not at a few dozen workers: see
``docs/data.md``).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from dlcm.data.formats import record_format
from dlcm.data.sources import DocumentSource
from dlcm.data.storage import open_raw
from dlcm.data.tokenizer import load_tokenizer

# Files sampled (spread evenly over the inputs) and text bytes taken from each.
SAMPLE_FILES = 8
SAMPLE_BYTES_PER_FILE = 2 << 20


@dataclass(frozen=True)
class BuildEstimate:
    """Estimated totals of a build (``sample_*`` say what they were scaled from)."""

    documents: int
    tokens: int
    shard_bytes: int
    seconds: float
    workers: int
    sample_files: int
    sample_documents: int
    sample_tokens: int

    def summary(self) -> str:
        hours = self.seconds / 3600
        duration = f"{hours:,.1f} h" if hours >= 1 else f"{self.seconds / 60:,.1f} min"
        return (
            f"estimated: {self.documents:,} documents, {self.tokens:,} tokens, {self.shard_bytes / 1e9:,.2f} GB "
            f"of shards, {duration} with {self.workers} worker{'s' if self.workers > 1 else ''} "
            f"({hours * self.workers:,.2f} core-hours); from a sample of {self.sample_documents:,} documents "
            f"({self.sample_tokens:,} tokens) in {self.sample_files} of the input files; nothing was written"
        )


def _stored_bytes_read(url: str, size: int, source: DocumentSource, docs: int) -> int:
    """Stored bytes behind the first ``docs`` documents of a file: all of it when it was read to the end; for
    Parquet (read footer first, then row groups) the share of its rows; else the raw stream's offset (read-ahead
    makes that an over-estimate for small samples, i.e. a conservative text-per-stored-byte ratio)."""
    if source.files_done:
        return size
    if record_format(url) == "parquet":
        import pyarrow.parquet as pq

        with open_raw(url) as raw:
            rows = pq.ParquetFile(raw).metadata.num_rows
        return round(size * docs / max(rows, 1))
    return source.bytes_read or size


def estimate_build(
    source: DocumentSource,
    tokenizer_file: Path,
    workers: int = 1,
    max_docs: int | None = None,
    max_tokens: int | None = None,
) -> BuildEstimate:
    """Estimate the build of ``source`` with the tokenizer ``tokenizer_file`` (reads only the sample)."""
    tokenizer = load_tokenizer(tokenizer_file)
    step = max(1, len(source.files) // SAMPLE_FILES)
    picked = source.files[::step][:SAMPLE_FILES]
    texts: list[str] = []
    stored = text_bytes = 0
    for file in picked:
        one = DocumentSource([file.url], source.domain, source.text_field, source.id_field, source.domain_field)
        taken = docs = 0
        for doc in one:
            texts.append(doc.text)
            taken += len(doc.text.encode("utf-8"))
            docs += 1
            if taken >= SAMPLE_BYTES_PER_FILE:
                break
        stored += _stored_bytes_read(file.url, file.size, one, docs)
        text_bytes += taken
    if not texts:
        raise ValueError("the sampled input files hold no documents (every file or record is empty or blank)")
    start = time.perf_counter()
    ids = [tokenizer.encode(text, add_special_tokens=False).ids for text in texts]  # one core, one text at a time
    seconds_per_token = (time.perf_counter() - start) / max(1, sum(map(len, ids)))
    sample_tokens = sum(map(len, ids))
    shard = io.BytesIO()
    with wds.TarWriter(shard, encoder=False, mtime=0) as writer:
        for i, doc_ids in enumerate(ids):
            npy = io.BytesIO()
            np.save(npy, np.asarray(doc_ids, dtype=np.uint32), allow_pickle=False)
            meta = b'{"doc_id": "%d", "domain": "prose", "n_bytes": 0, "n_tokens": 0}' % i
            writer.write({"__key__": f"{i:09d}-sample", "ids.npy": npy.getvalue(), "meta.json": meta})
    text_per_stored = text_bytes / max(stored, 1)
    total_text = source.total_bytes * text_per_stored
    documents = round(len(texts) * total_text / max(text_bytes, 1))
    tokens = round(sample_tokens * total_text / max(text_bytes, 1))
    if max_docs is not None and max_docs < documents:
        tokens, documents = round(tokens * max_docs / documents), max_docs
    if max_tokens is not None and max_tokens < tokens:
        documents, tokens = round(documents * max_tokens / tokens), max_tokens
    shard_bytes = round(len(shard.getvalue()) * tokens / max(sample_tokens, 1))
    return BuildEstimate(
        documents=documents,
        tokens=tokens,
        shard_bytes=shard_bytes,
        seconds=tokens * seconds_per_token / workers,
        workers=workers,
        sample_files=len(picked),
        sample_documents=len(texts),
        sample_tokens=sample_tokens,
    )
