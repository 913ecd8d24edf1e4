"""The embedded default corpus: KJV chapters + standard-library sources, capped deterministically, cached."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from dlcm.data import corpus
from dlcm.data.corpus import (
    CORPUS_VERSION,
    default_corpus_dir,
    default_corpus_documents,
    ensure_default_corpus,
    kjv_chapters,
)
from dlcm.data.shards import Manifest, iter_shard_documents
from dlcm.data.tokenizer import load_tokenizer


def test_kjv_chapters_are_clean_prose() -> None:
    chapters = list(kjv_chapters())
    assert len(chapters) == 1189  # chapters of the 66 books
    first = chapters[0]
    assert first.domain == "prose" and first.text.startswith("Genesis 1\n\nIn the beginning God created")
    assert not any(ch.isdigit() for ch in first.text.split("\n", 1)[1])  # verse numbers removed
    assert len({c.doc_id for c in chapters}) == len(chapters)


def test_capped_corpus_is_deterministic_and_mixed() -> None:
    cap = 50_000
    docs = list(default_corpus_documents(cap))
    assert docs == list(default_corpus_documents(cap))
    sizes = Counter()
    for d in docs:
        sizes[d.domain] += len(d.text.encode())
    assert set(sizes) == {"prose", "code"}
    largest = {dom: max(len(d.text.encode()) for d in docs if d.domain == dom) for dom in sizes}
    assert all(cap <= sizes[dom] < cap + largest[dom] for dom in sizes)  # stops at the first document past the cap
    code = [d for d in docs if d.domain == "code"]
    assert not any("/test/" in d.doc_id or "/tests/" in d.doc_id or "site-packages" in d.doc_id for d in code)
    assert {d.domain for d in docs[:4]} == {"prose", "code"}  # interleaved, not one domain after the other
    # Merged in proportion to the domains' sizes: walking the stream, the share of its own domain a document
    # reaches (at its midpoint) never goes back, whichever domain it is from — both domains run to the end.
    done, shares = Counter(), []
    for d in docs:
        n = len(d.text.encode())
        shares.append((done[d.domain] + n / 2) / sizes[d.domain])
        done[d.domain] += n
    assert shares == sorted(shares)


def test_cache_dir_follows_dlcm_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLCM_CACHE", str(tmp_path))
    path = default_corpus_dir(vocab_size=300)
    assert path.parent == tmp_path and path.name.startswith(f"default-corpus-v{CORPUS_VERSION}-")
    assert path != default_corpus_dir(vocab_size=301)


def test_tiny_default_corpus_build_and_cache_hit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = ensure_default_corpus(tmp_path, vocab_size=300, max_bytes_per_domain=150_000, progress=False)
    manifest = Manifest.load(out)
    assert manifest.domains == ("code", "prose") and manifest.vocab_size == 300
    assert manifest.splits["val"].docs > 0 and manifest.splits["train"].docs > manifest.splits["val"].docs
    tok = load_tokenizer(manifest.tokenizer_path)
    ids, meta = next(iter_shard_documents(manifest.shard_paths("val")[0]))
    assert len(tok.decode(ids.tolist()).encode()) == meta["n_bytes"]
    assert not (out / "trained-tokenizer.json").exists()

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached corpus must not be rebuilt")

    monkeypatch.setattr(corpus, "build_shards", no_rebuild)
    start = time.perf_counter()
    assert ensure_default_corpus(tmp_path, vocab_size=300, max_bytes_per_domain=150_000, progress=False) == out
    assert time.perf_counter() - start < 1.0


def test_full_default_corpus(tmp_path: Path) -> None:
    # ~5 s on 2 cores, so it stays in the default suite; the bound is the budget the defaults were chosen for.
    start = time.perf_counter()
    manifest = Manifest.load(ensure_default_corpus(tmp_path, progress=False))
    assert time.perf_counter() - start < 120
    assert manifest.splits["train"].tokens > 2_000_000 and manifest.splits["val"].tokens > 50_000
