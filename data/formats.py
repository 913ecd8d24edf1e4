"""Corpus files as they are published → records: JSON Lines (plain, gzip, zstd), Parquet, Arrow.

Public pre-training corpora ship as compressed JSON Lines (``.jsonl.gz``, ``.jsonl.zst``/``.zstd``), Parquet, or
Hugging Face ``datasets`` saved to disk (a directory of Arrow IPC stream files listed in ``state.json``). Each
reader yields ``(row label, record)`` where the label (1-based line or row number) names the record in errors and
in default document ids. Files are opened through fsspec when named by a URL (``s3://…``, ``https://…``,
``file://…``), so a corpus can be read where it is published. Columnar files read only the columns asked for.

Every failure — bytes that are not UTF-8, a cut compressed stream, an unreadable Parquet footer, a missing
column — is one ``ValueError`` naming the file (and the line), raised while building, before anything is final.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import fsspec

from dlcm.data.storage import Position, open_raw

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
RECORD_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
# Rows per Arrow record batch read from Parquet: large enough to amortise the per-batch cost, small enough that a
# batch of long documents stays a few MB.
_PARQUET_BATCH_ROWS = 1024


def record_format(name: str) -> str | None:
    """ "jsonl", "parquet" or "arrow" by the file name's suffix; None for a plain text (or source) file."""
    lower = name.lower()
    for fmt, suffixes in (("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES), ("arrow", ARROW_SUFFIXES)):
        if lower.endswith(suffixes):
            return fmt
    return None


def _decompressed(raw: BinaryIO, url: str) -> BinaryIO:
    lower = url.lower()
    if lower.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if lower.endswith((".zst", ".zstd")):
        import zstandard

        # Published .zst files are often several concatenated frames (parallel compressors write them).
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    return raw


def _stream_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    return (OSError, EOFError, zstandard.ZstdError)


def iter_jsonl_lines(url: str, position: Position | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of every non-blank line of a (possibly gzip/zstd compressed) JSON Lines file."""
    with open_raw(url, position) as raw:
        stream = _decompressed(raw, url)
        line_no = 0
        try:
            for line_no, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as err:
                    raise ValueError(f"{url}, line {line_no}: not UTF-8 ({err.reason} at byte {err.start})") from None
                except ValueError as err:
                    raise ValueError(f"{url}, line {line_no}: malformed JSONL record ({err})") from None
                if not isinstance(obj, dict):
                    raise ValueError(
                        f"{url}, line {line_no}: malformed JSONL record (expected a JSON object, got "
                        f"{type(obj).__name__})"
                    )
                yield line_no, obj
        except _stream_errors() as err:
            raise ValueError(f"{url}: cannot decompress or read it after line {line_no} ({err})") from None


def _columns(url: str, names: Sequence[str], wanted: Sequence[str | None], text_field: str) -> list[str]:
    if text_field not in names:
        raise ValueError(
            f"{url} has no {text_field!r} column (columns: {', '.join(names)}); pass the text column with --text-field"
        )
    return [c for c in dict.fromkeys(wanted) if c is not None and c in names]


def _rows(batches: Iterator[Any], columns: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    row = 0
    for batch in batches:
        values = [batch.column(name).to_pylist() for name in columns]
        for cells in zip(*values, strict=True):
            row += 1
            yield row, dict(zip(columns, cells, strict=True))


def iter_parquet_rows(
    url: str, fields: Sequence[str | None], text_field: str, position: Position | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row number, {column: value})`` of a Parquet file, reading only ``fields`` (those the file has)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open_raw(url, position) as raw:
        try:
            parquet = pq.ParquetFile(raw)
            columns = _columns(url, parquet.schema_arrow.names, fields, text_field)
            yield from _rows(parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns), columns)
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{url} is not a readable Parquet file ({err})") from None


def iter_arrow_rows(
    url: str, fields: Sequence[str | None], text_field: str, position: Position | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row number, {column: value})`` of an Arrow IPC file: the stream format ``datasets`` writes, or the
    random-access file format."""
    import pyarrow as pa

    with open_raw(url, position) as raw:
        try:
            try:
                reader = pa.ipc.open_stream(raw)
                batches: Iterator[Any] = iter(reader)
                names = reader.schema.names
            except pa.ArrowInvalid:
                raw.seek(0)
                file_reader = pa.ipc.open_file(raw)
                batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
                names = file_reader.schema.names
            columns = _columns(url, names, fields, text_field)
            yield from _rows((batch.select(columns) for batch in batches), columns)
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{url} is not a readable Arrow file ({err})") from None


def dataset_files(directory: str, fs: fsspec.AbstractFileSystem) -> list[str] | None:
    """The Arrow files of a ``datasets`` ``save_to_disk`` directory, in row order (from its ``state.json``);
    None when ``directory`` is not one. A ``DatasetDict`` directory is an error naming its splits."""
    if fs.isfile(f"{directory}/dataset_dict.json"):
        splits = json.loads(fs.cat_file(f"{directory}/dataset_dict.json")).get("splits", [])
        raise ValueError(
            f"{directory} holds a datasets DatasetDict with splits {', '.join(splits)}; pass one split's directory "
            f"(e.g. {directory}/{splits[0] if splits else 'train'})"
        )
    state = f"{directory}/state.json"
    if not fs.isfile(state):
        return None
    try:
        files = [entry["filename"] for entry in json.loads(fs.cat_file(state))["_data_files"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{state} is not a datasets state file ({err})") from None
    return [f"{directory}/{name}" for name in files]
