"""Document sources: corpus files, directories and globs (local or fsspec URLs) → ``Document`` stream.

A document is the unit of the train/val split and of packing (the model never attends across documents), so each
source says what one document is: one record of a JSON Lines / Parquet / Arrow file (:mod:`dlcm.data.formats`), or
a whole text or source file. Order is deterministic (inputs in the order given, files within a directory or glob
sorted) so a rebuild, or a resumed build, sees the same stream.

Domains are explicit: ``domain`` labels every document (a record's own ``domain_field`` wins when asked for);
without it a file's documents are "prose" for record formats and .txt/.md/.rst, "code" for other files — decided
by the file alone, so a file gets the same label whether it was named, matched by a glob (quoted or expanded by
the shell) or found in a directory. Only a directory walk skips files that are not UTF-8 (binaries in a source
tree); anything named or globbed that cannot be read is an error.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import fsspec

from dlcm.data.formats import dataset_files, iter_arrow_rows, iter_jsonl_lines, iter_parquet_rows, record_format
from dlcm.data.storage import Position, is_url, open_raw

R = TypeVar("R")

PROSE_SUFFIXES = frozenset({".txt", ".md", ".rst", ""})
# Directory walks skip version-control metadata and bytecode caches; they are never documents.
_SKIP_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", ".tox", ".venv", "node_modules"})


@dataclass(frozen=True)
class Document:
    """One document: a stable id (drives the train/val split), its text, and its domain (e.g. "prose", "code")."""

    doc_id: str
    text: str
    domain: str


@dataclass(frozen=True)
class InputFile:
    """One file to read: its path or URL as reached from the input, its stored size, how it was reached."""

    url: str
    size: int
    walked: bool = False  # found by walking a directory: skipped (not an error) when it is not UTF-8 text


def iter_jsonl_records(path: str | os.PathLike, parse: Callable[[int, dict[str, Any]], R | None]) -> Iterator[R]:
    """``parse(line_number, object)`` of every non-blank line (``None`` results are skipped). Any error — bad JSON,
    not an object, a missing field, a bad value — stops with one message naming the file and the line."""
    url = os.fspath(path)
    for line_no, obj in iter_jsonl_lines(url):
        try:
            record = parse(line_no, obj)
        except KeyError as err:
            raise ValueError(f"{url}, line {line_no}: malformed JSONL record (missing the {err} field)") from None
        except (ValueError, TypeError, IndexError, UnicodeEncodeError) as err:
            raise ValueError(f"{url}, line {line_no}: malformed JSONL record ({err})") from err
        if record is not None:
            yield record


def default_domain(url: str) -> str:
    """The domain of a file's documents when none is given: "prose" for records and prose suffixes, else "code"."""
    if record_format(url) is not None or Path(url.rsplit("/", 1)[-1]).suffix in PROSE_SUFFIXES:
        return "prose"
    return "code"


class DocumentSource:
    """The documents of ``inputs`` (files, directories, globs; local paths or fsspec URLs), in order.

    Inputs are resolved when the source is made — a mistyped path fails before a build touches its output — and
    ``files``/``total_bytes`` tell a progress bar how much there is; ``bytes_read`` how much has been read.

    Args:
        inputs: what to read.
        domain: label of every document (default: by file type, see the module docstring).
        text_field: the record field (JSON key or column) holding the text.
        id_field: the record field holding a stable document id; records without one get ``<file>:<row>``.
        domain_field: a record field whose value, where present, is the document's domain (None: not read).
    """

    def __init__(
        self,
        inputs: Sequence[str | os.PathLike],
        domain: str | None = None,
        text_field: str = "text",
        id_field: str = "id",
        domain_field: str | None = None,
    ) -> None:
        if not inputs:
            raise ValueError("no inputs given: name at least one file, directory or glob")
        if not text_field:
            raise ValueError("text_field='' is not allowed: name the record field that holds the text")
        self.domain, self.text_field, self.id_field, self.domain_field = domain, text_field, id_field, domain_field
        self.files = [f for item in inputs for f in _resolve(os.fspath(item))]
        self.total_bytes = sum(f.size for f in self.files)
        self.files_done = 0
        self.skipped: list[str] = []  # walked files that are not UTF-8 text
        self._bytes_done = 0
        self._position = Position()

    @property
    def bytes_read(self) -> int:
        """Stored bytes of the inputs read so far (compressed bytes for compressed files)."""
        return self._bytes_done + self._position.offset()

    def __iter__(self) -> Iterator[Document]:
        for file in self.files:
            yield from self._documents(file)
            self._bytes_done += file.size
            self.files_done += 1

    def _documents(self, file: InputFile) -> Iterator[Document]:
        fmt = record_format(file.url)
        if fmt is None:
            yield from self._text_file(file)
            return
        fields = (self.text_field, self.id_field, self.domain_field)
        if fmt == "jsonl":
            rows = iter_jsonl_lines(file.url, self._position)
            what = "line"
        elif fmt == "parquet":
            rows, what = iter_parquet_rows(file.url, fields, self.text_field, self._position), "row"
        else:
            rows, what = iter_arrow_rows(file.url, fields, self.text_field, self._position), "row"
        fallback_domain = self.domain or default_domain(file.url)
        for label, record in rows:
            doc = self._record_document(file.url, what, label, record, fallback_domain)
            if doc is not None:
                yield doc

    def _record_document(
        self, url: str, what: str, label: int, record: dict[str, Any], fallback_domain: str
    ) -> Document | None:
        where = f"{url}, {what} {label}"
        if self.text_field not in record:
            raise ValueError(
                f"{where}: no {self.text_field!r} field (fields: {', '.join(record) or 'none'}); pass the text "
                "field with --text-field"
            )
        text = record[self.text_field]
        if not isinstance(text, str):
            raise ValueError(f"{where}: {self.text_field!r} must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")  # lone surrogates ("\ud800") parse as JSON but cannot be tokenized or counted
        except UnicodeEncodeError as err:
            raise ValueError(f"{where}: {self.text_field!r} holds an unpaired surrogate ({err.reason})") from None
        if not text.strip():
            return None
        doc_id = record.get(self.id_field) if self.id_field else None
        domain = record.get(self.domain_field) if self.domain_field else None
        return Document(str(doc_id) if doc_id is not None else f"{url}:{label}", text, str(domain or fallback_domain))

    def _text_file(self, file: InputFile) -> Iterator[Document]:
        with open_raw(file.url, self._position) as raw:
            data = raw.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            if file.walked:
                self.skipped.append(file.url)
                return
            raise ValueError(
                f"{file.url} is not UTF-8 text ({err.reason} at byte {err.start}); only UTF-8 text, JSON Lines, "
                "Parquet and Arrow files can be sharded"
            ) from None
        if text.strip():
            yield Document(file.url, text, self.domain or default_domain(file.url))


def iter_documents(
    inputs: Sequence[str | os.PathLike],
    domain: str | None = None,
    text_field: str = "text",
    id_field: str = "id",
    domain_field: str | None = None,
) -> DocumentSource:
    """The documents of ``inputs`` (see :class:`DocumentSource`); inputs are checked here, before any is read."""
    return DocumentSource(inputs, domain, text_field, id_field, domain_field)


def _resolve(spec: str) -> list[InputFile]:
    """The files an input names: itself, a glob's matches (sorted), a directory's files (walked, sorted), or an
    Arrow dataset directory's files in row order. Names keep the form typed: URLs stay URLs, relative paths
    relative (document ids, hence the split, must not depend on the working directory)."""
    url_input = is_url(spec)
    fs, path = fsspec.core.url_to_fs(spec) if url_input else (fsspec.filesystem("file"), spec)
    name: Callable[[str], str] = fs.unstrip_protocol if url_input else str

    if glob.has_magic(spec):
        if url_input:
            matches = sorted(p for p, info in fs.glob(path, detail=True).items() if info["type"] == "file")
        else:
            matches = sorted(m for m in glob.glob(spec, recursive=True) if os.path.isfile(m))
        if not matches:
            raise FileNotFoundError(f"the pattern {spec!r} matches no files")
        return [InputFile(name(m), fs.size(m)) for m in matches]
    if fs.isdir(path):
        return _walk(fs, path.rstrip("/") or path, name, url_input)
    if fs.isfile(path):
        return [InputFile(name(path), fs.size(path))]
    raise FileNotFoundError(
        f"input {spec!r} does not exist (expected a file, a directory, a glob pattern or an fsspec URL)"
    )


def _walk(fs: fsspec.AbstractFileSystem, root: str, name: Callable[[str], str], url_input: bool) -> list[InputFile]:
    """Files under ``root`` sorted by path, without hidden or tool directories; an Arrow dataset directory (the root
    or one inside it) contributes its files in row order at its place in that sort."""
    groups: list[tuple[str, list[InputFile]]] = []
    for dirpath, dirnames, filenames in fs.walk(root) if url_input else os.walk(root):
        dirpath = dirpath.rstrip("/")
        arrow_files = dataset_files(dirpath, fs)
        if arrow_files is not None:
            groups.append((dirpath, [InputFile(name(p), fs.size(p)) for p in arrow_files]))
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        for filename in filenames:
            if not filename.startswith("."):
                p = f"{dirpath}/{filename}"
                groups.append((p, [InputFile(name(p), fs.size(p), walked=True)]))
    return [f for _, files in sorted(groups, key=lambda g: g[0]) for f in files]
