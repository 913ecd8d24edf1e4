"""Document sources: text files, JSONL files, and directories or globs of source files → ``Document`` stream.

A document is the unit of the train/val split and of packing (the model never attends across documents), so each
source says what one document is: a whole text or source file, or one JSONL line. Order is deterministic (inputs
in the order given, files within a directory or glob sorted) so a rebuild, or a resumed build, sees the same stream.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

R = TypeVar("R")

PROSE_SUFFIXES = frozenset({".txt", ".md", ".rst", ""})
JSONL_SUFFIXES = frozenset({".jsonl"})
# Directory walks skip version-control metadata and bytecode caches; they are never documents.
_SKIP_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", ".tox", ".venv", "node_modules"})


@dataclass(frozen=True)
class Document:
    """One document: a stable id (drives the train/val split), its text, and its domain (e.g. "prose", "code")."""

    doc_id: str
    text: str
    domain: str


def _read_utf8(path: Path) -> str | None:
    """File text, or None when the file is not UTF-8 (binary files inside a walked directory)."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


def iter_text_file(path: str | os.PathLike, domain: str | None = None) -> Iterator[Document]:
    """The whole file as one document; domain defaults to "prose" for .txt/.md/.rst, else "code"."""
    p = Path(path)
    text = _read_utf8(p)
    if text is None:
        raise ValueError(f"{p} is not UTF-8 text; only UTF-8 text, JSONL and source files can be sharded")
    if text.strip():
        yield Document(p.as_posix(), text, domain or ("prose" if p.suffix in PROSE_SUFFIXES else "code"))


def iter_jsonl_records(path: str | os.PathLike, parse: Callable[[int, dict[str, Any]], R | None]) -> Iterator[R]:
    """``parse(line_number, object)`` of every non-blank line (``None`` results are skipped). Any error — bad JSON,
    not an object, a missing field, a bad value — stops with one message naming the file and the line."""
    p = Path(path)
    with open(p, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                record = parse(line_no, obj)
            except KeyError as err:
                raise ValueError(f"{p}, line {line_no}: malformed JSONL record (missing the {err} field)") from None
            except (ValueError, TypeError, IndexError, UnicodeEncodeError) as err:
                raise ValueError(f"{p}, line {line_no}: malformed JSONL record ({err})") from err
            if record is not None:
                yield record


def iter_jsonl(path: str | os.PathLike, domain: str | None = None) -> Iterator[Document]:
    """One document per line ``{"text": ..., "id"?: ..., "domain"?: ...}``; ``domain`` is the default for lines
    without a domain field ("prose" if None). Lines without an id get ``<path>:<line number>``."""
    p = Path(path)

    def document(line_no: int, obj: dict[str, Any]) -> Document | None:
        text = obj["text"]
        if not isinstance(text, str):
            raise ValueError(f'"text" must be a string, got {type(text).__name__}')
        text.encode("utf-8")  # lone surrogates ("\ud800") parse as JSON but cannot be tokenized or counted
        if not text.strip():
            return None
        doc_id = str(obj.get("id", f"{p.as_posix()}:{line_no}"))
        return Document(doc_id, text, str(obj.get("domain") or domain or "prose"))

    return iter_jsonl_records(p, document)


def _iter_file(path: Path, domain: str | None) -> Iterator[Document]:
    if path.suffix in JSONL_SUFFIXES:
        yield from iter_jsonl(path, domain)
    else:
        yield from iter_text_file(path, domain)


def _walk(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        files += [Path(dirpath, name) for name in filenames if not name.startswith(".")]
    return sorted(files)


def iter_source_files(files: Sequence[Path], domain: str | None = None) -> Iterator[Document]:
    """One document per UTF-8 file, domain ``domain`` or "code" (``.jsonl`` files expand to their lines).

    Files that are not UTF-8 are skipped: a walked directory or a broad glob routinely contains binaries.
    """
    for path in files:
        if path.suffix in JSONL_SUFFIXES:
            yield from iter_jsonl(path, domain)
            continue
        text = _read_utf8(path)
        if text is not None and text.strip():
            yield Document(path.as_posix(), text, domain or "code")


def iter_documents(inputs: Sequence[str | os.PathLike], domain: str | None = None) -> Iterator[Document]:
    """Documents from each input in turn: a file, a directory (walked recursively) or a glob such as ``src/**/*.py``.

    ``domain`` applies to every document that does not carry its own (JSONL ``domain`` fields win). Without it,
    single text files are "prose" or "code" by suffix and files found in directories or globs are "code".
    Document ids are paths as reached from the input, so the same command line gives the same ids and split.
    Inputs are checked here, before any is read, so a mistyped path fails before a build touches its output.
    """
    resolved: list[tuple[str, list[Path]]] = []
    for item in inputs:
        spec = os.fspath(item)
        if glob.has_magic(spec):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True) if os.path.isfile(m))
            if not matches:
                raise FileNotFoundError(f"the pattern {spec!r} matches no files")
            resolved.append(("files", matches))
        elif os.path.isdir(spec):
            resolved.append(("dir", [Path(spec)]))
        elif os.path.isfile(spec):
            resolved.append(("file", [Path(spec)]))
        else:
            raise FileNotFoundError(f"input {spec!r} does not exist (expected a file, a directory or a glob pattern)")
    return _generate(resolved, domain)


def _generate(resolved: list[tuple[str, list[Path]]], domain: str | None) -> Iterator[Document]:
    for kind, paths in resolved:
        if kind == "files":
            yield from iter_source_files(paths, domain)
        elif kind == "dir":
            yield from iter_source_files(_walk(paths[0]), domain)
        else:
            yield from _iter_file(paths[0], domain)
