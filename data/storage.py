"""Where corpus files and shards live: local paths, fsspec URLs (``s3://``, ``gs://``, ``https://``, ``file://``) and,
for reading shards, webdataset's ``pipe:`` commands.

Local paths are opened directly (no fsspec layer on the hot path); anything with ``://`` goes through fsspec, so a
shard directory or a corpus can stay in object storage. Names are kept as typed: a relative path stays relative
(document ids, and hence the train/val split, must not depend on the working directory).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import BinaryIO

import fsspec


def is_url(spec: str) -> bool:
    """True for fsspec URLs (``s3://bucket/x``, ``file:///x``); False for local paths and ``pipe:`` commands."""
    return "://" in spec


def join(location: str, name: str) -> str:
    """``location/name`` for a local directory or a URL prefix."""
    return f"{location.rstrip('/')}/{name}" if is_url(location) else os.path.join(location, name)


def read_bytes(url: str) -> bytes:
    """A whole (small) file: a manifest, a tokenizer."""
    if is_url(url):
        with fsspec.open(url, "rb") as f:
            return f.read()
    with open(url, "rb") as f:
        return f.read()


def exists(url: str) -> bool:
    if is_url(url):
        fs, path = fsspec.core.url_to_fs(url)
        return fs.isfile(path)
    return os.path.isfile(url)


def file_sizes(location: str, names: list[str]) -> dict[str, int | None]:
    """Stored size of each named file in the directory ``location`` (None if absent): one listing for a URL (one
    request, not one per shard), one ``stat`` per file locally."""
    if is_url(location):
        fs, path = fsspec.core.url_to_fs(location)
        listed = {info["name"].rstrip("/").rsplit("/", 1)[-1]: info.get("size") for info in fs.ls(path, detail=True)}
        return {name: listed.get(name) for name in names}
    sizes: dict[str, int | None] = {}
    for name in names:
        try:
            sizes[name] = os.stat(os.path.join(location, name)).st_size
        except FileNotFoundError:
            sizes[name] = None
    return sizes


class Position:
    """Bytes of the file being read so far (for progress and ETA): its raw stream's offset, read on demand."""

    def __init__(self) -> None:
        self.stream: BinaryIO | None = None

    def offset(self) -> int:
        if self.stream is None:
            return 0
        with contextlib.suppress(OSError, ValueError):  # closed or unseekable: report nothing rather than fail
            return self.stream.tell()
        return 0


@contextlib.contextmanager
def open_raw(url: str, position: Position | None = None) -> Iterator[BinaryIO]:
    """The file's bytes as stored (not decompressed), local or through fsspec."""
    with fsspec.open(url, "rb") if is_url(url) else open(url, "rb") as raw:
        if position is not None:
            position.stream = raw
        try:
            yield raw
        finally:
            if position is not None:
                position.stream = None


def open_shard_stream(url: str) -> BinaryIO:
    """A shard's bytes for webdataset's tar reader: fsspec for ``://`` URLs, webdataset's own ``gopen`` for local
    paths and ``pipe:`` commands (``pipe:aws s3 cp s3://b/train-000000.tar -``)."""
    if is_url(url):
        return fsspec.open(url, "rb").open()
    import webdataset as wds

    return wds.gopen(url)
