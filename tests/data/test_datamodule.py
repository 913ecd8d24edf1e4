"""The packed, resumable data module on real (tiny) shard directories.

A run must be a function of ``(seed, epoch, batch index)``: the same batches twice, other batches for another
epoch or seed, every rank the same number of batches (no rank waits in a collective), ranks reading disjoint data,
and a resumed stream continuing exactly where the saved position left it, with or without DataLoader workers.
Documents carry a ``<index>`` marker so that the documents a stream read can be recovered by decoding its tokens.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from dlcm.data.datamodule import PackedDataModule, PackedStream, StreamSpec
from dlcm.data.shards import Manifest, build_shards, iter_shard_documents
from dlcm.data.sources import Document
from dlcm.data.tokenizer import train_bpe

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
TOKENS_PER_BATCH = 48
MAX_SEQ_LEN = 16
MARKER = re.compile(r"<(\d+)>")


def marked_docs(n: int) -> list[Document]:
    rng = random.Random(0)
    words = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40))) for _ in range(n))
    return [Document(f"doc{i}", f"<{i}> {text}", "code" if i % 3 == 1 else "prose") for i, text in enumerate(words)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Tokenizer]:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return path, train_bpe((d.text for d in marked_docs(240)), 300, path)


@pytest.fixture(scope="module")
def many_shards(tokenizer: tuple[Path, Tokenizer], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 train and 5 val shards of <= 12 documents: at least as many shards as slots (shard-level split)."""
    out = tmp_path_factory.mktemp("many")
    build_shards(marked_docs(240), tokenizer[0], out, val_fraction=0.25, docs_per_shard=12, progress=False)
    return out


@pytest.fixture(scope="module")
def one_shard(tokenizer: tuple[Path, Tokenizer], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One shard per split: fewer shards than slots (document-level split)."""
    out = tmp_path_factory.mktemp("one")
    build_shards(marked_docs(240), tokenizer[0], out, val_fraction=0.25, docs_per_shard=1000, progress=False)
    return out


def module(data_dir: Path, **kwargs: Any) -> PackedDataModule:
    kwargs = {"tokens_per_batch": TOKENS_PER_BATCH, "max_seq_len": MAX_SEQ_LEN, "seed": 0, **kwargs}
    return PackedDataModule(data_dir=str(data_dir), **kwargs)


def run(spec: StreamSpec) -> list[dict[str, Any]]:
    """What PackedLoader iterates: the stream itself, or a real DataLoader over it with spec.num_workers."""
    stream = PackedStream(spec)
    if spec.num_workers == 0:
        return list(stream)
    return list(DataLoader(stream, batch_size=None, num_workers=spec.num_workers))


def assert_same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]) if isinstance(x[key], torch.Tensor) else x[key] == y[key], key


def token_stream(batches: list[dict[str, Any]]) -> torch.Tensor:
    return torch.cat([b["input_ids"] for b in batches]) if batches else torch.zeros(0, dtype=torch.int64)


def markers(tok: Tokenizer, batches: list[dict[str, Any]]) -> list[int]:
    """Indices of the documents whose marker a contiguous token stream (one slot's batches) contains, in order."""
    return [int(m) for m in MARKER.findall(tok.decode(token_stream(batches).tolist()))]


def split_documents(data_dir: Path, split: str) -> list[list[tuple[np.ndarray, dict]]]:
    return [list(iter_shard_documents(p)) for p in Manifest.load(data_dir).shard_paths(split)]


# --- determinism ---


def test_order_is_a_function_of_seed_and_epoch(many_shards: Path) -> None:
    dm = module(many_shards)
    first = list(dm.train_dataloader())
    assert len(first) == len(dm.train_dataloader()) == dm.stream_spec("train").batches > 10
    assert_same(first, list(dm.train_dataloader()))
    spec = dm.stream_spec("train")
    assert_same(first, run(spec))
    epoch1 = run(replace(spec, epoch=1))
    other_seed = run(module(many_shards, seed=1).stream_spec("train"))
    for other in (epoch1, other_seed):
        assert len(other) == len(first)
        assert not torch.equal(token_stream(other), token_stream(first))


def test_documents_are_shuffled_within_a_shard(one_shard: Path, tokenizer: tuple[Path, Tokenizer]) -> None:
    # With a single shard the shard permutation is trivial, so any reordering comes from the document shuffle.
    (docs,) = split_documents(one_shard, "train")
    in_shard = [int(meta["doc_id"][3:]) for _, meta in docs]
    seen = markers(tokenizer[1], run(module(one_shard).stream_spec("train")))
    assert len(seen) > len(in_shard) // 2 and len(set(seen)) == len(seen)  # most of one pass, no repeat
    assert set(seen) <= set(in_shard) and seen != in_shard[: len(seen)]


# --- splitting across ranks ---


def attach_trainer(dm: PackedDataModule, rank: int, world: int, epoch: int = 0, processed: int = 0) -> None:
    """Give the data module the few trainer attributes it reads (rank, world, epoch, progress), without a Trainer."""
    progress = SimpleNamespace(current=SimpleNamespace(processed=processed))
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=epoch, fit_loop=loop)


def rank_specs(data_dir: Path, world: int, **kwargs: Any) -> list[StreamSpec]:
    specs = []
    for rank in range(world):
        dm = module(data_dir, **kwargs)
        attach_trainer(dm, rank, world)
        specs.append(dm.stream_spec("train"))
    assert [(s.rank, s.world_size) for s in specs] == [(r, world) for r in range(world)]
    return specs


def slot_streams(runs: list[list[dict[str, Any]]], num_workers: int) -> list[list[dict[str, Any]]]:
    """Each (rank, worker) slot's batches, in order: batch b of a rank comes from its worker b mod num_workers."""
    workers = max(num_workers, 1)
    return [r[w::workers] for r in runs for w in range(workers)]


def assert_disjoint(sets: list[set[int]], what: str) -> None:
    for a in range(len(sets)):
        assert sets[a]
        for b in range(a):
            assert not sets[a] & sets[b], f"slots {a} and {b} read the same {what}"


@pytest.mark.parametrize(("world", "num_workers"), [(2, 0), (3, 0), (3, 2)])
def test_shard_level_split_equal_counts_disjoint_shards(
    many_shards: Path, tokenizer: tuple[Path, Tokenizer], world: int, num_workers: int
) -> None:
    train = Manifest.load(many_shards).splits["train"]
    slots = world * max(num_workers, 1)
    assert len(train.shards) >= slots  # shard-level split
    expected = train.tokens // (TOKENS_PER_BATCH * world)
    specs = rank_specs(many_shards, world, num_workers=num_workers)
    runs = [run(spec) for spec in specs]
    assert [s.batches for s in specs] == [len(r) for r in runs] == [expected] * world
    # A slot's first pass holds >= floor(shards / slots) whole shards; within that many tokens it cannot have
    # cycled into another slot's shards, so the shards touched so far must be disjoint.
    prefix = len(train.shards) // slots * min(s.tokens for s in train.shards) // TOKENS_PER_BATCH
    assert prefix >= 5
    shard_of = {
        int(meta["doc_id"][3:]): s for s, docs in enumerate(split_documents(many_shards, "train")) for _, meta in docs
    }
    streams = slot_streams(runs, num_workers)
    assert_disjoint([{shard_of[i] for i in markers(tokenizer[1], b[:prefix])} for b in streams], "shard")


@pytest.mark.parametrize(("world", "num_workers"), [(2, 0), (3, 0), (2, 2)])
def test_document_level_split_equal_counts_disjoint_documents(
    one_shard: Path, tokenizer: tuple[Path, Tokenizer], world: int, num_workers: int
) -> None:
    (docs,) = split_documents(one_shard, "train")
    expected = Manifest.load(one_shard).splits["train"].tokens // (TOKENS_PER_BATCH * world)
    specs = rank_specs(one_shard, world, num_workers=num_workers)
    runs = [run(spec) for spec in specs]
    assert [s.batches for s in specs] == [len(r) for r in runs] == [expected] * world
    prefix = len(docs) // (world * max(num_workers, 1)) * min(len(ids) for ids, _ in docs) // TOKENS_PER_BATCH
    assert prefix >= 3
    streams = slot_streams(runs, num_workers)
    assert_disjoint([set(markers(tokenizer[1], b[:prefix])) for b in streams], "document")


# --- resume ---


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_yields_exactly_the_suffix(many_shards: Path, num_workers: int) -> None:
    dm = module(many_shards, tokens_per_batch=160, max_seq_len=32, num_workers=num_workers)
    spec = dm.stream_spec("train")
    full = run(spec)
    assert len(full) == spec.batches >= 8
    assert all(type(b["max_seqlen"]) is int for b in full)  # still a host int after the DataLoader's conversion
    for k in (1, 2, 3, 5, spec.batches - 1, spec.batches):
        assert_same(run(replace(spec, skip=k)), full[k:])


@pytest.mark.parametrize(("fixture", "world", "num_workers"), [("many_shards", 2, 2), ("one_shard", 1, 0)])
def test_skip_is_exact_across_cycles_and_document_cuts(
    request: pytest.FixtureRequest, fixture: str, world: int, num_workers: int
) -> None:
    """Resuming at every batch of a stream that cycles its shards about three times over (pieces cut by
    max_seq_len and by batch ends, shard- and document-level splits, ranks and workers) gives exactly the suffix."""
    dm = module(request.getfixturevalue(fixture), tokens_per_batch=40, max_seq_len=12, num_workers=num_workers)
    attach_trainer(dm, world - 1, world)
    spec = dm.stream_spec("train")
    spec = replace(spec, batches=3 * spec.batches)
    full = run(spec)
    for k in range(0, spec.batches + 1, 7 if num_workers else 1):
        assert_same(run(replace(spec, skip=k)), full[k:])


def test_resume_passes_over_whole_shards_unread(many_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume reads only the shard its position falls in and those after it, also in a later cycle."""
    import dlcm.data.shards as shards

    dm = module(many_shards)
    spec = replace(dm.stream_spec("train"), batches=10_000)
    reads: list[str] = []
    real = shards.iter_shard_documents

    def counted(path, *expected):
        reads.append(Path(path).name)
        return real(path, *expected)

    monkeypatch.setattr(shards, "iter_shard_documents", counted)
    per_cycle = sum(spec.shard_tokens) // spec.tokens_per_batch  # batches one pass over the 16 shards fills
    skip = 2 * per_cycle + per_cycle // 2  # half-way through the third cycle
    first = next(iter(PackedStream(replace(spec, skip=skip))))
    assert len(reads) <= 2  # the shard holding the cut, and the next one if the batch runs past its end
    monkeypatch.setattr(shards, "iter_shard_documents", real)
    full = PackedStream(spec)
    assert_same([first], [next(itertools.islice(iter(full), skip, None))])


def test_restored_position_is_consumed_once(many_shards: Path) -> None:
    dm = module(many_shards)
    assert dm.state_dict() == {}  # no trainer: nothing to save
    assert dm.consume_position() == (0, 0)
    dm.load_state_dict({"epoch": 0, "batches_done": 3})
    assert dm.consume_position() == (0, 3)
    assert dm.consume_position() == (0, 0)
    dm.load_state_dict({"epoch": 1, "batches_done": 3})  # saved in another epoch than the one starting
    assert dm.consume_position() == (0, 0)
    assert dm.consume_position() == (0, 0)
    dm.load_state_dict({})
    assert dm.consume_position() == (0, 0)


def test_saved_position_round_trip(many_shards: Path) -> None:
    saving, loading = module(many_shards), module(many_shards)
    attach_trainer(saving, 0, 1, epoch=2, processed=5)
    attach_trainer(loading, 0, 1, epoch=2)
    loading.load_state_dict(saving.state_dict())
    assert loading.consume_position() == (2, 5)
    assert loading.consume_position() == (2, 0)


def test_loader_resumes_from_loaded_state(many_shards: Path) -> None:
    dm = module(many_shards)
    full = list(dm.train_dataloader())
    dm.load_state_dict({"epoch": 0, "batches_done": 3})
    loader = dm.train_dataloader()
    iter(loader)  # Lightning probes iterability first; that must not consume the position
    assert_same(list(loader), full[3:])
    assert_same(list(loader), full)  # the next epoch-0 iterator starts from the beginning


# --- validation ---


def test_validation_reads_the_split_in_order(many_shards: Path) -> None:
    dm = module(many_shards)
    spec = dm.stream_spec("val")
    assert not spec.shuffle
    assert spec.batches == dm.manifest.splits["val"].tokens // TOKENS_PER_BATCH
    batches = run(spec)
    assert len(batches) == spec.batches
    assert_same(batches, run(replace(spec, epoch=3)))
    assert_same(batches, list(dm.val_dataloader()))
    # Manifest order, documents unshuffled, each piece labelled with its document's domain.
    docs = [doc for shard in split_documents(many_shards, "val") for doc in shard]
    stream = np.concatenate([ids for ids, _ in docs]).astype(np.int64)
    packed = token_stream(batches).numpy()
    np.testing.assert_array_equal(packed, stream[: len(packed)])
    doc_end = np.cumsum([len(ids) for ids, _ in docs])
    starts = np.concatenate([b * TOKENS_PER_BATCH + x["cu_seqlens"][:-1].numpy() for b, x in enumerate(batches)])
    domains = torch.cat([x["domain"] for x in batches]).tolist()
    for start, domain in zip(starts.tolist(), domains, strict=True):
        meta = docs[int(np.searchsorted(doc_end, start, side="right"))][1]
        assert dm.manifest.domains[domain] == meta["domain"]


def test_validation_reads_each_document_at_most_once_across_ranks(
    many_shards: Path, tokenizer: tuple[Path, Tokenizer]
) -> None:
    seen = []
    for rank in range(2):
        dm = module(many_shards)
        attach_trainer(dm, rank, 2)
        seen += markers(tokenizer[1], run(dm.stream_spec("val")))
    assert len(seen) == len(set(seen))


def test_there_is_no_test_split(many_shards: Path) -> None:
    with pytest.raises(ValueError, match=r"split='test' is not allowed: expected 'train' or 'val'"):
        module(many_shards).stream_spec("test")


def test_val_batches_limits_the_count(many_shards: Path) -> None:
    full = run(module(many_shards).stream_spec("val"))
    dm = module(many_shards, val_batches=2)
    assert dm.stream_spec("val").batches == len(dm.val_dataloader()) == 2
    assert_same(list(dm.val_dataloader()), full[:2])
    assert dm.stream_spec("train").batches == module(many_shards).stream_spec("train").batches


def test_val_batches_above_the_split_is_one_pass(many_shards: Path) -> None:
    natural = module(many_shards).stream_spec("val").batches
    assert module(many_shards, val_batches=natural + 100).stream_spec("val").batches == natural


# --- errors ---


def test_missing_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-shards-here"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        PackedDataModule(data_dir=str(missing))


@pytest.mark.parametrize(
    ("field", "value"),
    [("tokens_per_batch", 1), ("max_seq_len", 1), ("num_workers", -1), ("val_batches", 0)],
)
def test_bad_settings_name_the_field(many_shards: Path, field: str, value: int) -> None:
    with pytest.raises(ValueError, match=rf"data\.{field}={value} is not allowed"):
        module(many_shards, **{field: value})


def test_shards_of_another_tokenizer_are_rejected(many_shards: Path) -> None:
    spec = module(many_shards).stream_spec("train")
    with pytest.raises(ValueError, match=r"shard .*train-\d+\.tar holds token id .*built with another tokenizer"):
        run(replace(spec, vocab_size=10))


def test_empty_validation_split_and_starved_slot(tokenizer: tuple[Path, Tokenizer], tmp_path: Path) -> None:
    build_shards(marked_docs(3), tokenizer[0], tmp_path, val_fraction=0.0, progress=False)
    dm = module(tmp_path, max_seq_len=256)  # each document is one piece
    with pytest.raises(ValueError, match=r"the val split of .* is empty"):
        dm.stream_spec("val")
    # 3 documents cannot feed 4 ranks: the rank left without one fails instead of hanging.
    spec = replace(dm.stream_spec("train"), rank=3, world_size=4)
    with pytest.raises(ValueError, match=r"data slot 3 of 4 .* received no document"):
        run(spec)


def test_a_long_document_is_spread_over_its_shard_not_packed_into_consecutive_batches(
    tokenizer: tuple[Path, Tokenizer], tmp_path: Path
) -> None:
    """One code document of about 60 pieces among 60 one-piece prose documents, in one shard: training shuffles pieces,
    so no run of consecutive pieces stays inside the long document for long and most batches mix both domains."""
    rng = random.Random(1)
    prose = [Document(f"p{i}", " ".join(rng.choice(WORDS) for _ in range(6)), "prose") for i in range(60)]
    long_code = Document("code", " ".join(rng.choice(WORDS) for _ in range(900)), "code")
    build_shards([long_code, *prose], tokenizer[0], tmp_path, val_fraction=0.0, docs_per_shard=100, progress=False)
    dm = module(tmp_path)
    code = dm.manifest.domains.index("code")
    batches = list(itertools.islice(run(dm.stream_spec("train")), 20))
    domains = np.concatenate([b["domain"].numpy() for b in batches])
    runs = [len(list(group)) for value, group in itertools.groupby(domains) if value == code]
    assert max(runs) < 12  # in document order the long document's pieces would sit back to back
    assert sum(len(set(b["domain"].tolist())) == 2 for b in batches) >= 15
