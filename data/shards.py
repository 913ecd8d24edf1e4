"""Tokenized webdataset shards, format "dlcm-shards-v1": writer (atomic, resumable), manifest and reader.

Layout of a shard directory::

    out_dir/
      tokenizer.json            copy of the tokenizer that wrote the shards (its SHA-256 is in the manifest)
      train-000000.tar ...      webdataset tars; one sample per document:
      val-000000.tar ...          <key>.ids.npy    1-D uint32 token ids (no BOS/EOS: the packer adds separators)
                                  <key>.meta.json  {"doc_id", "domain", "n_bytes", "n_tokens"}
      manifest.json             written last; its presence means the build finished
      .progress.json            only while a build is unfinished: completed shards, for resuming

Documents go to ``val`` or ``train`` by a hash of ``(seed, doc_id)``, so the split is per document, independent
of input order and stable when the corpus grows. With ``val_fraction > 0`` the validation split is never empty: a
small corpus whose hashes put no document there gives it the training document of lowest hash.

Shards hold a fixed number of documents per split, which makes shard contents a pure function of the document
stream: a resumed build skips the documents its completed shards already hold (without tokenizing them) and
produces byte-identical files to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm.auto import tqdm

from dlcm.data.sources import Document
from dlcm.data.tokenizer import encode_documents, load_tokenizer, resolve_tokenizer_file, tokenizer_sha256, vocab_size

FORMAT = "dlcm-shards-v1"
SPLITS = ("train", "val")
MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = ".progress.json"
TOKENIZER_FILE = "tokenizer.json"
_REBUILD = "rebuild it with `dlcm data build`"
# Documents per encode_batch call: enough to keep the Rust thread pool busy, few enough that shards (and progress)
# are written as the input streams by, and capped in characters so huge documents do not pile up in memory.
_ENCODE_BATCH = 256
_ENCODE_BATCH_CHARS = 32 << 20
# Two zero blocks end every tar; tarfile silently stops at a missing or cut header, so a shard cut at a member
# boundary would otherwise read as a shorter valid one.
_TAR_END = bytes(1024)


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard file and what it holds."""

    name: str
    docs: int
    tokens: int
    bytes: int


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
    """The validated ``manifest.json`` of a finished shard directory."""

    directory: Path
    tokenizer_sha256: str
    vocab_size: int
    seed: int
    val_fraction: float
    docs_per_shard: int
    domains: tuple[str, ...]
    splits: dict[str, SplitInfo]
    tokenizer_file: str = TOKENIZER_FILE

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / self.tokenizer_file

    def shard_paths(self, split: str) -> list[Path]:
        """Paths of the split's shards in build order."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; the shards hold {sorted(self.splits)}")
        return [self.directory / s.name for s in self.splits[split].shards]

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
    def load(cls, directory: str | os.PathLike, check_tokenizer: bool = True) -> Manifest:
        """Read and validate ``directory/manifest.json``: format, totals, and that every file it lists exists."""
        directory = Path(directory)
        path = directory / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {directory} holds no finished shard build; run `dlcm data build` "
                "(or `dlcm data default-corpus`) to create one"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("format") != FORMAT:
                raise ValueError(f"format is {raw.get('format')!r}, expected {FORMAT!r}")
            tok = raw["tokenizer"]
            splits = {
                name: SplitInfo(
                    int(s["docs"]),
                    int(s["tokens"]),
                    int(s["bytes"]),
                    tuple(
                        ShardInfo(str(x["name"]), int(x["docs"]), int(x["tokens"]), int(x["bytes"]))
                        for x in s["shards"]
                    ),
                )
                for name, s in raw["splits"].items()
            }
            manifest = cls(
                directory=directory,
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
        for name in SPLITS:
            for shard_path in manifest.shard_paths(name):
                if not shard_path.is_file():
                    raise FileNotFoundError(f"shard {shard_path} listed in {path} is missing; {_REBUILD}")
        if not manifest.tokenizer_path.is_file():
            raise FileNotFoundError(f"tokenizer {manifest.tokenizer_path} listed in {path} is missing; {_REBUILD}")
        if check_tokenizer and tokenizer_sha256(manifest.tokenizer_path) != manifest.tokenizer_sha256:
            raise ValueError(
                f"{manifest.tokenizer_path} does not match the SHA-256 recorded in {path}: the tokenizer was "
                f"replaced after the shards were written; {_REBUILD}"
            )
        return manifest


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

    def add(self, doc: Document, ids: list[int]) -> bool:
        """Buffer one document; True when a shard was written (so progress must be saved)."""
        ids_T = np.asarray(ids, dtype=np.uint32)
        n_bytes = len(doc.text.encode("utf-8"))
        meta = {"doc_id": doc.doc_id, "domain": doc.domain, "n_bytes": n_bytes, "n_tokens": len(ids)}
        npy = io.BytesIO()
        np.save(npy, ids_T, allow_pickle=False)
        self.buffer.append((_sample_key(self.seen, doc.doc_id), npy.getvalue(), json.dumps(meta).encode("utf-8")))
        self.inputs_hash.update(_fingerprint(doc))
        self.tokens += len(ids)
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
        path = self.out_dir / name
        tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                # mtime fixed so that a shard's bytes depend only on its documents (resume == fresh build).
                with wds.TarWriter(f, encoder=False, mtime=0) as writer:
                    for key, npy, meta in self.buffer:
                        writer.write({"__key__": key, "ids.npy": npy, "meta.json": meta})
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.done.append(
            {
                "name": name,
                "docs": len(self.buffer),
                "tokens": self.tokens,
                "bytes": self.bytes,
                "inputs_sha256": self.inputs_hash.hexdigest(),
            }
        )
        self.buffer, self.tokens, self.bytes, self.inputs_hash = [], 0, 0, hashlib.sha256()

    def info(self) -> SplitInfo:
        return SplitInfo.from_shards(ShardInfo(s["name"], s["docs"], s["tokens"], s["bytes"]) for s in self.done)


def _our_files(out_dir: Path) -> list[Path]:
    patterns = ("train-*.tar", "val-*.tar", ".*.tmp-*", MANIFEST_FILE, PROGRESS_FILE, TOKENIZER_FILE)
    return [p for pattern in patterns for p in out_dir.glob(pattern)]


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


def build_shards(
    documents: Iterable[Document],
    tokenizer_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.01,
    docs_per_shard: int = 2048,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> Manifest:
    """Tokenize ``documents`` into train/val webdataset shards in ``out_dir`` and write ``manifest.json`` last.

    Re-running after an interruption with the same documents and settings resumes from the last completed shard.
    A directory holding a finished build, or an unfinished one with other settings (e.g. another tokenizer), is an
    error unless ``overwrite=True``, which first deletes the shard files, progress and manifest found there.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if docs_per_shard < 1:
        raise ValueError(f"docs_per_shard={docs_per_shard} must be at least 1")
    tokenizer_file = resolve_tokenizer_file(tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_file)
    sha = tokenizer_sha256(tokenizer_file)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = {
        "format": FORMAT,
        "tokenizer_sha256": sha,
        "seed": seed,
        "val_fraction": val_fraction,
        "docs_per_shard": docs_per_shard,
    }
    previous = _previous_shards(out, params, overwrite)
    tok_copy = out / TOKENIZER_FILE
    if not tok_copy.is_file() or tokenizer_sha256(tok_copy) != sha:
        _atomic_write_bytes(tok_copy, tokenizer_file.read_bytes())
    writers = {name: _SplitWriter(out, name, docs_per_shard, done=previous[name]) for name in SPLITS}

    def save_progress() -> None:
        _atomic_write_json(out / PROGRESS_FILE, {"params": params, "shards": {n: w.done for n, w in writers.items()}})

    save_progress()  # records the settings at once, so a conflicting re-run fails even before the first shard
    domains: set[str] = set()
    pending: list[tuple[str, Document]] = []
    pending_chars = 0
    batch_docs = min(_ENCODE_BATCH, docs_per_shard)
    new_tokens = 0
    bar = tqdm(desc=f"sharding into {out}", unit=" docs", disable=not progress)

    def encode_pending() -> None:
        nonlocal new_tokens, pending_chars
        ids = encode_documents(tokenizer, [doc.text for _, doc in pending])
        wrote = False
        for (name, doc), doc_ids in zip(pending, ids, strict=True):
            wrote |= writers[name].add(doc, doc_ids)
        if wrote:
            save_progress()
        new_tokens += sum(len(x) for x in ids)
        bar.set_postfix(new_tokens=new_tokens, refresh=False)
        bar.update(len(pending))
        pending.clear()
        pending_chars = 0

    try:
        for doc in documents:
            domains.add(doc.domain)
            writer = writers[assign_split(doc.doc_id, seed, val_fraction)]
            # While a split's completed shards are being skipped none of its documents is pending, so `seen` alone
            # tells whether this document is already on disk.
            if writer.seen < writer.done_docs:
                writer.skip(doc)
                bar.update(1)
                continue
            pending.append((writer.split, doc))
            pending_chars += len(doc.text)
            if len(pending) >= batch_docs or pending_chars >= _ENCODE_BATCH_CHARS:
                encode_pending()
        if pending:
            encode_pending()
        if val_fraction > 0:
            _hold_out_one(writers, seed)
        for writer in writers.values():
            if writer.seen < writer.done_docs:
                raise ValueError(
                    f"cannot resume the build in {out}: the inputs hold {writer.seen} {writer.split} documents but "
                    f"its completed shards already hold {writer.done_docs}; the inputs changed since the "
                    "interrupted build, so rebuild with overwrite=True (--overwrite)"
                )
            writer.flush()
        save_progress()
    finally:
        bar.close()
    manifest = Manifest(
        directory=out,
        tokenizer_sha256=sha,
        vocab_size=vocab_size(tokenizer),
        seed=seed,
        val_fraction=val_fraction,
        docs_per_shard=docs_per_shard,
        domains=tuple(sorted(domains)),
        splits={name: w.info() for name, w in writers.items()},
    )
    _atomic_write_json(out / MANIFEST_FILE, manifest.to_json())
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    return manifest


def _decode_sample(path: Path, key: str, fields: dict[str, bytes]) -> tuple[np.ndarray, dict]:
    missing = [f for f in ("ids.npy", "meta.json") if f not in fields]
    if missing:
        raise ValueError(f"shard {path} is corrupt: sample {key!r} has no {', '.join(missing)}; {_REBUILD}")
    try:
        ids = np.load(io.BytesIO(fields["ids.npy"]), allow_pickle=False)
        meta = json.loads(fields["meta.json"])
        if ids.dtype != np.uint32 or ids.ndim != 1:
            raise ValueError(f"ids.npy is {ids.dtype} of shape {ids.shape}, expected 1-D uint32")
        if meta["n_tokens"] != len(ids):
            raise ValueError(f"meta.json says {meta['n_tokens']} tokens, ids.npy holds {len(ids)}")
    except (ValueError, KeyError, TypeError, EOFError) as err:
        raise ValueError(f"shard {path} is corrupt at sample {key!r} ({err}); {_REBUILD}") from err
    return ids, meta


def iter_shard_documents(shard_path: str | os.PathLike) -> Iterator[tuple[np.ndarray, dict]]:
    """``(ids uint32 [n_tokens], meta)`` for each document of one shard, in order.

    Any damage (a cut or garbled tar, a sample without ``ids.npy``) raises ``ValueError`` naming the shard and the
    sample, rather than silently yielding fewer documents.
    """
    path = Path(shard_path)
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} does not exist; {_REBUILD}")
    key: str | None = None
    fields: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                sample, _, ext = member.name.partition(".")
                if sample != key:
                    if key is not None:
                        yield _decode_sample(path, key, fields)
                    key, fields = sample, {}
                fields[ext] = tar.extractfile(member).read()
            end = tar.offset
    except (tarfile.TarError, EOFError, OSError) as err:
        where = f"sample {key!r}" if key is not None else "its first sample"
        raise ValueError(f"shard {path} is corrupt or truncated at {where} ({err}); {_REBUILD}") from err
    with open(path, "rb") as f:
        f.seek(end)
        tail = f.read()
    if len(tail) < len(_TAR_END) or tail.strip(b"\0"):
        where = f"after sample {key!r}" if key is not None else "before its first sample"
        raise ValueError(f"shard {path} is truncated {where} (no end-of-archive marker); {_REBUILD}")
    if key is not None:
        yield _decode_sample(path, key, fields)
