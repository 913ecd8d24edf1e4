"""Tokenized webdataset shards, format "dlcm-shards-v2": writer (parallel, atomic, resumable, locked), manifest,
integrity checks and reader.

Layout of a shard directory::

    out_dir/
      tokenizer.json            copy of the tokenizer that wrote the shards (its SHA-256 is in the manifest)
      train-000000.tar ...      webdataset tars; one sample per document:
      val-000000.tar ...          <key>.ids.npy    1-D uint32 token ids (no BOS/EOS: the packer adds separators)
                                  <key>.meta.json  {"doc_id", "domain", "n_bytes", "n_tokens"}
      manifest.json             written last; its presence means the build finished. Per shard: documents, tokens,
                                text bytes, file size and SHA-256
      .progress.json            only while a build is unfinished: completed shards, for resuming
      .lock                     held (flock) by the build writing the directory

Documents go to ``val`` or ``train`` by a hash of ``(seed, doc_id)``, so the split is per document, independent
of input order and stable when the corpus grows. Shards hold a fixed number of documents per split, which makes
shard contents a pure function of the document stream: a resumed build skips the documents its completed shards
already hold (without tokenizing them) and produces byte-identical files to an uninterrupted one, and so does a
build with any number of tokenizing worker processes (:mod:`dlcm.data.encode_pool`). With ``val_fraction > 0``
the validation split is never empty: a small corpus whose hashes put no document there gives it the training
document of lowest hash (and a build that cannot, e.g. of one document, stops with an error).

Integrity: loading a manifest checks that every shard has the recorded size (one ``stat`` each, or one listing of
a remote directory), so a truncated or foreign shard is named before training starts; :func:`verify_shards` (``dlcm
data verify``) also compares SHA-256 checksums. The reader counts each shard's documents against the manifest and,
given the manifest's SHA-256, hashes the bytes it reads, so a shard damaged in place (same size) is named when it is
first read, before a document of it is trained on.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import socket
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import webdataset as wds
from tqdm.auto import tqdm

from dlcm.data import storage
from dlcm.data.encode_pool import encode_in_order
from dlcm.data.sources import Document
from dlcm.data.tokenizer import (
    default_cache_root,
    load_tokenizer,
    resolve_tokenizer_file,
    tokenizer_sha256,
    vocab_size,
)

FORMAT = "dlcm-shards-v2"
SPLITS = ("train", "val")
MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = ".progress.json"
TOKENIZER_FILE = "tokenizer.json"
LOCK_FILE = ".lock"
_REBUILD = "rebuild it with `dlcm data build`"
# Documents per encode call: enough to keep a worker busy, few enough that shards (and progress) are written as the
# input streams by, and capped in characters so huge documents do not pile up in memory.
_ENCODE_BATCH = 256
_ENCODE_BATCH_CHARS = 32 << 20


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard file and what it holds: documents, tokens, UTF-8 text bytes, file size and SHA-256."""

    name: str
    docs: int
    tokens: int
    bytes: int
    size: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    """Totals of one split and its shards in order."""

    docs: int
    tokens: int
    bytes: int
    shards: tuple[ShardInfo, ...]

    @classmethod
    def from_shards(cls, shards: Iterable[ShardInfo]) -> SplitInfo:
        shards = tuple(shards)
        return cls(sum(s.docs for s in shards), sum(s.tokens for s in shards), sum(s.bytes for s in shards), shards)


@dataclass(frozen=True)
class Manifest:
    """The validated ``manifest.json`` of a finished shard directory (a local path or an fsspec URL)."""

    location: str
    tokenizer_sha256: str
    vocab_size: int
    seed: int
    val_fraction: float
    docs_per_shard: int
    domains: tuple[str, ...]
    splits: dict[str, SplitInfo]
    tokenizer_file: str = TOKENIZER_FILE

    @property
    def directory(self) -> Path:
        """The local shard directory (URL manifests have none: use :meth:`shard_urls`)."""
        if storage.is_url(self.location):
            raise ValueError(f"{self.location} is a URL, not a local directory")
        return Path(self.location)

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer file; for a URL manifest, a local copy in the dlcm cache (named by its SHA-256)."""
        if not storage.is_url(self.location):
            return Path(self.location) / self.tokenizer_file
        copy = default_cache_root() / "tokenizers" / self.tokenizer_sha256 / TOKENIZER_FILE
        if not copy.is_file():
            copy.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write_bytes(copy, storage.read_bytes(storage.join(self.location, self.tokenizer_file)))
        return copy

    def shard_urls(self, split: str) -> list[str]:
        """Paths or URLs of the split's shards in build order."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; the shards hold {sorted(self.splits)}")
        return [storage.join(self.location, s.name) for s in self.splits[split].shards]

    def shard_paths(self, split: str) -> list[Path]:
        """Local paths of the split's shards in build order."""
        return [self.directory / Path(url).name for url in self.shard_urls(split)]

    def summary(self) -> str:
        """One line per split: documents, tokens and UTF-8 bytes."""
        return "; ".join(
            f"{name}: {s.docs:,} docs, {s.tokens:,} tokens, {s.bytes:,} bytes in {len(s.shards)} shards"
            for name, s in self.splits.items()
        )

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "tokenizer": {"sha256": self.tokenizer_sha256, "vocab_size": self.vocab_size, "file": self.tokenizer_file},
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "docs_per_shard": self.docs_per_shard,
            "domains": list(self.domains),
            "splits": {
                name: {
                    "docs": s.docs,
                    "tokens": s.tokens,
                    "bytes": s.bytes,
                    "shards": [asdict(shard) for shard in s.shards],
                }
                for name, s in self.splits.items()
            },
        }

    @classmethod
    def load(cls, directory: str | os.PathLike, check_tokenizer: bool = True, check_sizes: bool = True) -> Manifest:
        """Read and validate ``directory/manifest.json``: format, totals, and that every file it lists exists with
        the recorded size (``check_sizes``; fast: no shard is read). ``directory`` may be an fsspec URL."""
        location = os.fspath(directory)
        path = storage.join(location, MANIFEST_FILE)
        try:
            text = storage.read_bytes(path).decode("utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} not found: {location} holds no finished shard build; run `dlcm data build` "
                "(or `dlcm data default-corpus`) to create one"
            ) from None
        try:
            raw = json.loads(text)
            if raw.get("format") == "dlcm-shards-v1":
                raise ValueError(
                    "it was written by an older dlcm (format dlcm-shards-v1, without shard sizes and checksums); "
                    "rebuild it with `dlcm data build --overwrite`"
                )
            if raw.get("format") != FORMAT:
                raise ValueError(f"format is {raw.get('format')!r}, expected {FORMAT!r}")
            tok = raw["tokenizer"]
            splits = {
                name: SplitInfo(
                    int(s["docs"]),
                    int(s["tokens"]),
                    int(s["bytes"]),
                    tuple(
                        ShardInfo(
                            str(x["name"]),
                            int(x["docs"]),
                            int(x["tokens"]),
                            int(x["bytes"]),
                            int(x["size"]),
                            str(x["sha256"]),
                        )
                        for x in s["shards"]
                    ),
                )
                for name, s in raw["splits"].items()
            }
            manifest = cls(
                location=location,
                tokenizer_sha256=str(tok["sha256"]),
                vocab_size=int(tok["vocab_size"]),
                seed=int(raw["seed"]),
                val_fraction=float(raw["val_fraction"]),
                docs_per_shard=int(raw["docs_per_shard"]),
                domains=tuple(raw["domains"]),
                splits=splits,
                tokenizer_file=str(tok["file"]),
            )
            for name in SPLITS:
                split = splits[name]
                if split != SplitInfo.from_shards(split.shards):
                    raise ValueError(f"split {name!r} totals do not match the sum of its shards")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            detail = f"missing key {err}" if isinstance(err, KeyError) else str(err)
            raise ValueError(f"{path} is corrupt ({detail}); rebuild the directory with `dlcm data build`") from err
        if check_sizes:
            for problem in manifest.size_problems().values():
                raise problem
        tokenizer_url = storage.join(location, manifest.tokenizer_file)
        if not storage.exists(tokenizer_url):
            raise FileNotFoundError(f"tokenizer {tokenizer_url} listed in {path} is missing; {_REBUILD}")
        if (
            check_tokenizer
            and hashlib.sha256(storage.read_bytes(tokenizer_url)).hexdigest() != manifest.tokenizer_sha256
        ):
            raise ValueError(
                f"{tokenizer_url} does not match the SHA-256 recorded in {path}: the tokenizer was "
                f"replaced after the shards were written; {_REBUILD}"
            )
        return manifest

    def size_problems(self) -> dict[str, OSError | ValueError]:
        """``{shard URL: error}`` for every shard that is missing (``FileNotFoundError``) or not of the recorded
        size (``ValueError``)."""
        shards = [shard for split in SPLITS for shard in self.splits[split].shards]
        sizes = storage.file_sizes(self.location, [shard.name for shard in shards])
        problems: dict[str, OSError | ValueError] = {}
        for shard in shards:
            url, size = storage.join(self.location, shard.name), sizes[shard.name]
            if size is None:
                listed = storage.join(self.location, MANIFEST_FILE)
                problems[url] = FileNotFoundError(f"shard {url} listed in {listed} is missing; {_REBUILD}")
            elif size != shard.size:
                problems[url] = ValueError(
                    f"shard {url} is {size:,} bytes but the manifest records {shard.size:,}: it was damaged or "
                    f"replaced after the build; {_REBUILD}"
                )
        return problems


def sha256_mismatch(url: str) -> str:
    """The one line naming a shard whose bytes differ from the build's."""
    return (
        f"shard {url} does not match its SHA-256 in the manifest: it was damaged or replaced after the build; "
        f"{_REBUILD}"
    )


def verify_shards(directory: str | os.PathLike, progress: bool = False) -> tuple[Manifest, list[str]]:
    """The manifest and every problem of a shard directory: missing shards, wrong sizes, SHA-256 mismatches (each
    shard read once), a replaced tokenizer. An empty list means every byte is as built."""
    manifest = Manifest.load(directory, check_tokenizer=False, check_sizes=False)
    bad = manifest.size_problems()
    problems = [str(err) for err in bad.values()]
    shards = [shard for split in SPLITS for shard in manifest.splits[split].shards]
    with tqdm(total=sum(s.size for s in shards), unit="B", unit_scale=True, disable=not progress) as bar:
        for shard in shards:
            url = storage.join(manifest.location, shard.name)
            if url in bad:
                continue
            digest = hashlib.sha256()
            with storage.open_raw(url) as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(chunk)
                    bar.update(len(chunk))
            if digest.hexdigest() != shard.sha256:
                problems.append(sha256_mismatch(url))
    tokenizer_url = storage.join(manifest.location, manifest.tokenizer_file)
    try:
        if hashlib.sha256(storage.read_bytes(tokenizer_url)).hexdigest() != manifest.tokenizer_sha256:
            problems.append(f"{tokenizer_url} does not match the tokenizer SHA-256 in the manifest; {_REBUILD}")
    except FileNotFoundError:
        problems.append(f"tokenizer {tokenizer_url} listed in the manifest is missing; {_REBUILD}")
    return manifest, problems


def split_hash(doc_id: str, seed: int) -> int:
    """A document's position in [0, 2**64) for the train/val split (a seeded SHA-256 of its id)."""
    digest = hashlib.sha256(f"{seed}\x00{doc_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big")


def assign_split(doc_id: str, seed: int, val_fraction: float) -> str:
    """ "val" for a ``val_fraction`` share of document ids (by a seeded SHA-256 of the id), else "train"."""
    return "val" if split_hash(doc_id, seed) < val_fraction * 2**64 else "train"


def _hold_out_one(writers: dict[str, _SplitWriter], seed: int) -> None:
    """Give an empty validation split the training document of lowest split hash (a small corpus at a small
    ``val_fraction`` would otherwise get none, and training would have nothing to validate on).

    Only documents still buffered — the last, unwritten training shard — can move, so the choice is made the same
    way in an interrupted and resumed build; a corpus large enough to fill training shards has validation documents
    at any useful ``val_fraction``.
    """
    val, train = writers["val"], writers["train"]
    if val.seen or not train.buffer or train.done_docs + len(train.buffer) < 2:
        return
    lowest = min(range(len(train.buffer)), key=lambda i: split_hash(json.loads(train.buffer[i][2])["doc_id"], seed))
    _, npy, meta_json = train.buffer.pop(lowest)
    meta = json.loads(meta_json)
    train.tokens -= meta["n_tokens"]
    train.bytes -= meta["n_bytes"]
    val.buffer.append((_sample_key(val.seen, meta["doc_id"]), npy, meta_json))
    val.tokens += meta["n_tokens"]
    val.bytes += meta["n_bytes"]
    val.seen += 1


def _sample_key(index: int, doc_id: str) -> str:
    # webdataset groups tar members by the name up to the first dot, so keys carry no dots (nor slashes); the
    # index makes them unique, the tail of the id keeps them readable.
    return f"{index:09d}-{re.sub(r'[^A-Za-z0-9_-]+', '_', doc_id)[-48:]}"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write_json(path: Path, obj: dict) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def _fingerprint(doc: Document) -> bytes:
    # JSON keeps the fields unambiguous (no separator can be forged by a text) and accepts lone surrogates.
    return json.dumps([doc.doc_id, doc.domain, doc.text]).encode()


@dataclass
class _SplitWriter:
    """Fills one split's shards ``docs_per_shard`` documents at a time; ``done`` are shards already on disk."""

    out_dir: Path
    split: str
    docs_per_shard: int
    # ShardInfo fields + "inputs_sha256", a hash of the shard's documents that lets a resume verify its inputs.
    done: list[dict] = field(default_factory=list)
    seen: int = 0  # documents of this split met in the input stream so far
    buffer: list[tuple[str, bytes, bytes]] = field(default_factory=list)
    tokens: int = 0
    bytes: int = 0
    inputs_hash: hashlib._Hash = field(default_factory=hashlib.sha256)

    @property
    def done_docs(self) -> int:
        return sum(s["docs"] for s in self.done)

    @property
    def docs(self) -> int:
        """Documents of this split so far: in completed shards, skipped on resume, or buffered."""
        return max(self.seen, self.done_docs)

    def skip(self, doc: Document) -> None:
        """Account for a document that a completed shard already holds, checking the input did not change."""
        self.inputs_hash.update(_fingerprint(doc))
        self.seen += 1
        start = 0
        for shard in self.done:
            start += shard["docs"]
            if self.seen == start:  # the last document of a completed shard: its documents must be the same
                if self.inputs_hash.hexdigest() != shard["inputs_sha256"]:
                    raise ValueError(
                        f"cannot resume the build in {self.out_dir}: the documents of {shard['name']} differ from "
                        "the inputs read now (the inputs changed since the interrupted build); rebuild with "
                        "overwrite=True (--overwrite)"
                    )
                self.inputs_hash = hashlib.sha256()
                break

    def add(self, doc: Document, ids_T: np.ndarray) -> bool:
        """Buffer one document (uint32 ids); True when a shard was written (so progress must be saved)."""
        n_bytes = len(doc.text.encode("utf-8"))
        meta = {"doc_id": doc.doc_id, "domain": doc.domain, "n_bytes": n_bytes, "n_tokens": len(ids_T)}
        npy = io.BytesIO()
        np.save(npy, np.asarray(ids_T, dtype=np.uint32), allow_pickle=False)
        self.buffer.append((_sample_key(self.seen, doc.doc_id), npy.getvalue(), json.dumps(meta).encode("utf-8")))
        self.inputs_hash.update(_fingerprint(doc))
        self.tokens += len(ids_T)
        self.bytes += n_bytes
        self.seen += 1
        if len(self.buffer) == self.docs_per_shard:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        """Write the buffered documents as the next shard (atomically)."""
        if not self.buffer:
            return
        name = f"{self.split}-{len(self.done):06d}.tar"
        tar = io.BytesIO()
        # mtime fixed so that a shard's bytes depend only on its documents (resume == fresh build).
        with wds.TarWriter(tar, encoder=False, mtime=0) as writer:
            for key, npy, meta in self.buffer:
                writer.write({"__key__": key, "ids.npy": npy, "meta.json": meta})
        data = tar.getvalue()
        _atomic_write_bytes(self.out_dir / name, data)
        self.done.append(
            {
                "name": name,
                "docs": len(self.buffer),
                "tokens": self.tokens,
                "bytes": self.bytes,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "inputs_sha256": self.inputs_hash.hexdigest(),
            }
        )
        self.buffer, self.tokens, self.bytes, self.inputs_hash = [], 0, 0, hashlib.sha256()

    def info(self) -> SplitInfo:
        return SplitInfo.from_shards(
            ShardInfo(**{k: v for k, v in s.items() if k != "inputs_sha256"}) for s in self.done
        )


def _our_files(out_dir: Path) -> list[Path]:
    patterns = ("train-*.tar", "val-*.tar", ".*.tmp-*", MANIFEST_FILE, PROGRESS_FILE, TOKENIZER_FILE)
    return [p for pattern in patterns for p in out_dir.glob(pattern)]


@contextlib.contextmanager
def build_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir/.lock`` for the duration of a build; a second builder gets a clear error at once.

    An ``flock`` is released by the kernel when its holder dies, so a killed build never leaves the directory
    locked (the file itself stays, which is harmless)."""
    with open(out_dir / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise ValueError(
                f"{out_dir} is being written by another `dlcm data build` ({holder}); wait for it to finish, or "
                "write to another --out"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        yield


def _previous_shards(out_dir: Path, params: dict, overwrite: bool) -> dict[str, list[dict]]:
    """Completed shards of an interrupted build with the same parameters; errors for any other prior build."""
    if overwrite:
        for p in _our_files(out_dir):
            p.unlink()
        return {name: [] for name in SPLITS}
    for p in out_dir.glob(".*.tmp-*"):  # leftovers of a write that was cut short
        p.unlink()
    manifest_path, progress_path = out_dir / MANIFEST_FILE, out_dir / PROGRESS_FILE
    if manifest_path.is_file():
        try:
            old_sha = json.loads(manifest_path.read_text(encoding="utf-8"))["tokenizer"]["sha256"]
        except (ValueError, KeyError, TypeError):
            old_sha = None
        if old_sha is not None and old_sha != params["tokenizer_sha256"]:
            raise ValueError(
                f"{out_dir} already holds shards built with another tokenizer (SHA-256 {old_sha[:12]}…, this one is "
                f"{params['tokenizer_sha256'][:12]}…); choose another output directory or pass overwrite=True "
                "(--overwrite) to replace them"
            )
        raise ValueError(
            f"{out_dir} already holds a finished shard build ({manifest_path}); choose another output directory "
            "or pass overwrite=True (--overwrite) to rebuild it"
        )
    if not progress_path.is_file():
        return {name: [] for name in SPLITS}
    try:
        progress = json.loads(progress_path.read_text(encoding="utf-8"))
        old_params, shards = progress["params"], progress["shards"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{progress_path} is corrupt ({err}); pass overwrite=True (--overwrite) to start the build afresh"
        ) from err
    for key, value in params.items():
        if old_params.get(key) != value:
            what = "tokenizer SHA-256" if key == "tokenizer_sha256" else key
            raise ValueError(
                f"{out_dir} holds an unfinished build with {what} {old_params.get(key)!r}, not {value!r}; resume it "
                "with the same settings, or pass overwrite=True (--overwrite) to start afresh"
            )
    for split_shards in shards.values():
        for shard in split_shards:
            if not (out_dir / shard["name"]).is_file():
                raise FileNotFoundError(
                    f"{out_dir / shard['name']} recorded in {progress_path} is missing; pass overwrite=True "
                    "(--overwrite) to start the build afresh"
                )
    return {name: list(shards.get(name, [])) for name in SPLITS}


class _BuildProgress:
    """A progress bar over the inputs' stored bytes (or the document/token budget) with docs/s, tokens/s, ETA."""

    def __init__(
        self, documents: Iterable[Document], out: Path, max_docs: int | None, max_tokens: int | None, on: bool
    ):
        self.source = documents
        self.start = time.perf_counter()
        self.docs = self.tokens = 0
        if max_tokens is not None:
            self.unit, total = "tokens", max_tokens
        elif max_docs is not None:
            self.unit, total = "docs", max_docs
        elif hasattr(documents, "total_bytes"):
            self.unit, total = "bytes", documents.total_bytes
        else:
            self.unit, total = "docs", None
        units = {"bytes": ("B", True), "tokens": (" tokens", True), "docs": (" docs", False)}
        unit, scale = units[self.unit]
        self.bar = tqdm(desc=f"building {out}", total=total, unit=unit, unit_scale=scale, disable=not on)

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if self.unit == "bytes":
            self.bar.update(self.source.bytes_read - self.bar.n)
        else:
            self.bar.update(tokens if self.unit == "tokens" else docs)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(
            f"{self.docs / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tokens/s", refresh=False
        )

    def close(self) -> None:
        self.bar.close()


def build_shards(
    documents: Iterable[Document],
    tokenizer_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.01,
    docs_per_shard: int = 2048,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    workers: int = 1,
    max_docs: int | None = None,
    max_tokens: int | None = None,
) -> Manifest:
    """Tokenize ``documents`` into train/val webdataset shards in ``out_dir`` and write ``manifest.json`` last.

    ``workers`` processes tokenize (the output is byte-identical for any number). ``max_docs`` keeps the first
    that many documents of the stream; ``max_tokens`` stops after the document that brings the total (both
    splits) to at least that many tokens — a subset of a corpus larger than its share of a mixture.

    Re-running after an interruption with the same documents and settings resumes from the last completed shard.
    A directory holding a finished build, or an unfinished one with other settings (e.g. another tokenizer), is an
    error unless ``overwrite=True``, which first deletes the shard files, progress and manifest found there. A
    directory another build is writing is an error. Bad input (an unreadable file, a record without text, no
    documents at all, an empty validation split) is an error that leaves nothing of a fresh build behind.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} is not allowed: a share in [0, 1)")
    if docs_per_shard < 1:
        raise ValueError(f"docs_per_shard={docs_per_shard} is not allowed: at least 1")
    if workers < 1:
        raise ValueError(f"workers={workers} is not allowed: at least 1 process")
    for name, value in (("max_docs", max_docs), ("max_tokens", max_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} is not allowed: None (no limit) or at least 1")
    tokenizer_file = resolve_tokenizer_file(tokenizer_path)
    sha = tokenizer_sha256(tokenizer_file)
    n_ids = vocab_size(load_tokenizer(tokenizer_file))
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    params = {
        "format": FORMAT,
        "tokenizer_sha256": sha,
        "seed": seed,
        "val_fraction": val_fraction,
        "docs_per_shard": docs_per_shard,
        "max_docs": max_docs,
        "max_tokens": max_tokens,
    }
    try:
        with build_lock(out):
            previous = _previous_shards(out, params, overwrite)
            fresh = not any(previous.values())
            try:
                splits, domains = _write_shards(documents, tokenizer_file, out, params, previous, workers, progress)
            except ValueError:
                if fresh:  # nothing to resume from: leave no partial build behind
                    for p in _our_files(out):
                        p.unlink()
                raise
            manifest = Manifest(
                location=os.fspath(out),
                tokenizer_sha256=sha,
                vocab_size=n_ids,
                seed=seed,
                val_fraction=val_fraction,
                docs_per_shard=docs_per_shard,
                domains=tuple(sorted(domains)),
                splits=splits,
            )
            _atomic_write_json(out / MANIFEST_FILE, manifest.to_json())
            (out / PROGRESS_FILE).unlink(missing_ok=True)
    except ValueError:
        if created and not any(p.name != LOCK_FILE for p in out.iterdir()):  # the directory this call made
            (out / LOCK_FILE).unlink(missing_ok=True)
            out.rmdir()
        raise
    return manifest


def _write_shards(
    documents: Iterable[Document],
    tokenizer_file: Path,
    out: Path,
    params: dict,
    previous: dict[str, list[dict]],
    workers: int,
    progress: bool,
) -> tuple[dict[str, SplitInfo], set[str]]:
    """The build itself, inside the lock: returns the split infos and domains of the finished shards."""
    seed, val_fraction, docs_per_shard = params["seed"], params["val_fraction"], params["docs_per_shard"]
    max_docs, max_tokens = params["max_docs"], params["max_tokens"]
    tok_copy = out / TOKENIZER_FILE
    if not tok_copy.is_file() or tokenizer_sha256(tok_copy) != params["tokenizer_sha256"]:
        _atomic_write_bytes(tok_copy, tokenizer_file.read_bytes())
    writers = {name: _SplitWriter(out, name, docs_per_shard, done=previous[name]) for name in SPLITS}
    # Tokens already in completed shards: with them, a resumed max_tokens cut falls where the first run's would.
    done_tokens = sum(s["tokens"] for shards in previous.values() for s in shards)

    def save_progress() -> None:
        _atomic_write_json(out / PROGRESS_FILE, {"params": params, "shards": {n: w.done for n, w in writers.items()}})

    save_progress()  # records the settings at once, so a conflicting re-run fails even before the first shard
    domains: set[str] = set()
    bar = _BuildProgress(documents, out, max_docs, max_tokens, progress)

    def chunks() -> Iterator[tuple[list[tuple[str, Document, bool]], list[str]]]:
        """Documents to tokenize in chunks, each tagged (split, document, past the resume point); documents that
        completed shards hold are accounted for here, untokenized."""
        pending: list[tuple[str, Document, bool]] = []
        chars = 0
        for index, doc in enumerate(documents):
            if max_docs is not None and index >= max_docs:
                break
            writer = writers[assign_split(doc.doc_id, seed, val_fraction)]
            # Once a split has a document in flight none of its later documents is on disk, so `seen` alone
            # tells whether this one is already in a completed shard.
            if writer.seen < writer.done_docs:
                writer.skip(doc)
                domains.add(doc.domain)
                bar.update(1, 0)
                continue
            past_resume = all(w.seen >= w.done_docs for w in writers.values())
            pending.append((writer.split, doc, past_resume))
            chars += len(doc.text)
            if len(pending) >= min(_ENCODE_BATCH, docs_per_shard) or chars >= _ENCODE_BATCH_CHARS:
                yield pending, [d.text for _, d, _ in pending]
                pending, chars = [], 0
        if pending:
            yield pending, [d.text for _, d, _ in pending]

    new_tokens = 0
    try:
        for chunk, ids in encode_in_order(tokenizer_file, chunks(), workers):
            wrote = budget_spent = False
            for (split, doc, past_resume), doc_ids in zip(chunk, ids, strict=True):
                wrote |= writers[split].add(doc, doc_ids)
                domains.add(doc.domain)
                new_tokens += len(doc_ids)
                bar.update(1, len(doc_ids))
                if max_tokens is not None and past_resume and done_tokens + new_tokens >= max_tokens:
                    budget_spent = True
                    break
            if wrote:
                save_progress()
            if budget_spent:
                break
    finally:
        bar.close()
    for writer in writers.values():
        if writer.seen < writer.done_docs:
            raise ValueError(
                f"cannot resume the build in {out}: the inputs hold {writer.seen} {writer.split} documents but "
                f"its completed shards already hold {writer.done_docs}; the inputs changed since the "
                "interrupted build, so rebuild with overwrite=True (--overwrite)"
            )
    if val_fraction > 0:
        _hold_out_one(writers, seed)
    train, val = writers["train"].docs, writers["val"].docs
    if train + val == 0:
        raise ValueError(
            "the inputs hold no documents (every file or record is empty or blank, or none has text); nothing was "
            "written"
        )
    if val_fraction > 0 and val == 0:
        raise ValueError(
            f"the validation split is empty: none of the {train:,} documents fell in val_fraction={val_fraction}; "
            "raise --val-fraction, add documents, or pass --val-fraction 0 to build without validation"
        )
    if train == 0:
        raise ValueError(
            f"the train split is empty: all {val:,} documents fell in val_fraction={val_fraction}; lower "
            "--val-fraction or add documents"
        )
    for writer in writers.values():
        writer.flush()
    save_progress()
    return {name: w.info() for name, w in writers.items()}, domains


def _decode_sample(url: str, sample: dict) -> tuple[np.ndarray, dict]:
    key = sample.get("__key__")
    missing = [f for f in ("ids.npy", "meta.json") if f not in sample]
    if missing:
        raise ValueError(f"shard {url} is corrupt: sample {key!r} has no {', '.join(missing)}; {_REBUILD}")
    try:
        ids = np.load(io.BytesIO(sample["ids.npy"]), allow_pickle=False)
        meta = json.loads(sample["meta.json"])
        if ids.dtype != np.uint32 or ids.ndim != 1:
            raise ValueError(f"ids.npy is {ids.dtype} of shape {ids.shape}, expected 1-D uint32")
        if meta["n_tokens"] != len(ids):
            raise ValueError(f"meta.json says {meta['n_tokens']} tokens, ids.npy holds {len(ids)}")
    except (ValueError, KeyError, TypeError, EOFError) as err:
        raise ValueError(f"shard {url} is corrupt at sample {key!r} ({err}); {_REBUILD}") from err
    return ids, meta


class Sha256Reader:
    """A binary stream that hashes every byte read through it (the tar reader reads a shard front to back once)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        return data

    def finish(self) -> str:
        """The SHA-256 of the whole stream: what the tar reader left unread (end-of-archive padding) is read too."""
        while self.read(1 << 20):
            pass
        self.raw.close()
        return self.digest.hexdigest()


def iter_shard_documents(
    shard: str | os.PathLike, expected_docs: int | None = None, expected_sha256: str | None = None
) -> Iterator[tuple[np.ndarray, dict]]:
    """``(ids uint32 [n_tokens], meta)`` for each document of one shard, in order, read through webdataset's
    pipeline (local path, fsspec URL or ``pipe:`` command).

    Any damage (a cut or garbled tar, a sample without ``ids.npy``, fewer or more documents than
    ``expected_docs``, the manifest's count) raises ``ValueError`` naming the shard, rather than silently yielding
    fewer documents. With ``expected_sha256`` (the manifest's) the bytes read are hashed on the way, and a shard
    changed in place (same size, so the manifest's size check passes) raises after its last document: readers that
    train on a shard only once it is read whole (the data module's) never use a byte of it.
    """
    url = os.fspath(shard)
    if not storage.is_url(url) and not url.startswith("pipe:") and not os.path.isfile(url):
        raise FileNotFoundError(f"shard {url} does not exist; {_REBUILD}")
    reader: list[Sha256Reader] = []

    def open_stream(sources: Iterable[dict]) -> Iterator[dict]:
        # webdataset stage: ``{"url"}`` → ``{"url", "stream"}`` (fsspec URLs, local paths and ``pipe:`` commands).
        for source in sources:
            reader.append(Sha256Reader(storage.open_shard_stream(source["url"])))
            yield {**source, "stream": reader[-1]}

    pipeline = wds.DataPipeline(
        wds.SimpleShardList([url]),
        open_stream,
        wds.tariterators.tar_file_expander,
        wds.tariterators.group_by_keys,
    )
    count = 0
    try:
        for sample in pipeline:
            count += 1
            yield _decode_sample(url, sample)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(
            f"shard {url} is corrupt or truncated after {count} documents ({err.args[0] if err.args else err}); "
            f"{_REBUILD}"
        ) from None
    if expected_docs is not None and count != expected_docs:
        raise ValueError(
            f"shard {url} holds {count} documents but the manifest records {expected_docs}: it was truncated or "
            f"replaced after the build; {_REBUILD}"
        )
    if expected_sha256 is not None and reader and reader[0].finish() != expected_sha256:
        raise ValueError(sha256_mismatch(url))
