"""A weighted mixture of shard directories: token shares, interleaving, determinism, resume, equal counts, errors.

Three tiny sources whose documents carry a ``<source><index>`` marker. The reference for the interleaving is the
single-directory machinery itself: the pieces a mixture labels with source ``i``, in order, must be exactly the
documents source ``i``'s own stream yields, and the labels must match the markers.
"""

from __future__ import annotations

import json
import math
import random
import re
import warnings
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
from dlcm.data.mixture import Mixture, MixtureStream, delivered_batches, next_source, source_seed
from dlcm.data.shards import Manifest, build_shards
from dlcm.data.sources import Document
from dlcm.data.tokenizer import train_bpe
from tests.data.test_datamodule import assert_same

SOURCES = {"web": 150, "code": 80, "math": 50}  # documents per source
WEIGHTS = {"web": 0.5, "code": 0.3, "math": 0.2}
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
TOKENS_PER_BATCH = 64
MAX_SEQ_LEN = 32
MARKER = re.compile(r"<([a-z]+)(\d+)>")


def source_docs(name: str, n: int) -> list[Document]:
    rng = random.Random(name)
    texts = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))) for _ in range(n))
    return [Document(f"{name}{i}", f"<{name}{i}> {text}", name) for i, text in enumerate(texts)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Tokenizer]:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = (d.text for name, n in SOURCES.items() for d in source_docs(name, n))
    return path, train_bpe(texts, 300, path)


@pytest.fixture(scope="module")
def root(tokenizer: tuple[Path, Tokenizer], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One shard directory per source under a common root, several shards each, 20% validation."""
    out = tmp_path_factory.mktemp("mix")
    for name, n in SOURCES.items():
        build_shards(source_docs(name, n), tokenizer[0], out / name, val_fraction=0.2, docs_per_shard=6, progress=False)
    return out


def module(root: Path, **kwargs: Any) -> PackedDataModule:
    kwargs = {"tokens_per_batch": TOKENS_PER_BATCH, "max_seq_len": MAX_SEQ_LEN, "mixture": WEIGHTS, **kwargs}
    return PackedDataModule(data_dir=str(root), **kwargs)


def attach_trainer(dm: PackedDataModule, rank: int, world: int, epoch: int = 0, processed: int = 0) -> None:
    progress = SimpleNamespace(current=SimpleNamespace(processed=processed))
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=epoch, fit_loop=loop)


def run(dm: PackedDataModule, spec: StreamSpec) -> list[dict[str, Any]]:
    stream = dm.stream(spec)
    assert isinstance(stream, MixtureStream)
    if spec.num_workers == 0:
        return list(stream)
    return list(DataLoader(stream, batch_size=None, num_workers=spec.num_workers))


def pieces(batches: list[dict[str, Any]]) -> list[tuple[np.ndarray, int]]:
    """(token ids, source label) of every packed piece, in stream order."""
    out = []
    for b in batches:
        ids, cu = b["input_ids"].numpy(), b["cu_seqlens"].tolist()
        out += [(ids[s:e], int(d)) for s, e, d in zip(cu[:-1], cu[1:], b["domain"].tolist(), strict=True)]
    return out


def source_token_shares(batches: list[dict[str, Any]], n: int) -> np.ndarray:
    tokens = np.zeros(n)
    for ids, label in pieces(batches):
        tokens[label] += len(ids)
    return tokens / tokens.sum()


def max_doc_tokens(root: Path) -> int:
    from dlcm.data.shards import iter_shard_documents

    return max(
        len(ids)
        for name in SOURCES
        for p in Manifest.load(root / name).shard_paths("train")
        for ids, _ in iter_shard_documents(p)
    )


# --- the mixture as a manifest ---


def test_mixture_reads_like_a_manifest_over_its_sources(root: Path) -> None:
    dm = module(root)
    manifests = {name: Manifest.load(root / name) for name in SOURCES}
    assert dm.manifest.domains == tuple(WEIGHTS) and dm.manifest.weights == WEIGHTS
    assert dm.vocab_size == manifests["web"].vocab_size
    assert dm.manifest.tokenizer_sha256 == manifests["code"].tokenizer_sha256
    for split in ("train", "val"):
        assert dm.manifest.splits[split].tokens == sum(m.splits[split].tokens for m in manifests.values())
        assert dm.manifest.shard_paths(split) == [p for m in manifests.values() for p in m.shard_paths(split)]
    world = 2
    attach_trainer(dm, 0, world)
    assert dm.stream_spec("train").batches == dm.manifest.splits["train"].tokens // (TOKENS_PER_BATCH * world)


# --- interleaving and token shares ---


@pytest.mark.parametrize(("world", "num_workers"), [(1, 0), (2, 2)])
def test_each_slot_interleaves_the_source_streams_at_the_weights(
    root: Path, tokenizer: tuple[Path, Tokenizer], world: int, num_workers: int
) -> None:
    names = list(WEIGHTS)
    for rank in range(world):
        dm = module(root, num_workers=num_workers)
        attach_trainer(dm, rank, world)
        spec = dm.stream_spec("train")
        batches = run(dm, spec)
        assert len(batches) == spec.batches
        workers = max(num_workers, 1)
        for worker in range(workers):
            slot_batches = batches[worker::workers]
            slot_pieces = pieces(slot_batches)
            # Every batch is one source's; the deficit schedule keeps each source within two batches of its share.
            assert all(len(set(b["domain"].tolist())) == 1 for b in slot_batches)
            total = sum(len(ids) for ids, _ in slot_pieces)
            shares = source_token_shares(slot_batches, len(names))
            np.testing.assert_allclose(shares, list(WEIGHTS.values()), atol=2 * TOKENS_PER_BATCH / total)
            # Each source's pieces, in order, are exactly the documents of that source's own stream.
            stream = dm.stream(spec)
            slot, slots = rank * workers + worker, world * workers
            for i, source_spec in enumerate(stream.source_specs):
                mine = np.concatenate([ids for ids, label in slot_pieces if label == i])
                reference = PackedStream(source_spec).documents(slot, slots)
                expected = []
                while sum(map(len, expected)) < len(mine):
                    expected.append(next(reference)[0])
                np.testing.assert_array_equal(mine, np.concatenate(expected)[: len(mine)])
                # ... and the labels agree with the documents' markers.
                text = tokenizer[1].decode(mine.astype(np.int64).tolist())
                assert {m[0] for m in MARKER.findall(text)} == {names[i]}


def test_shares_follow_the_weights_not_the_source_sizes(root: Path) -> None:
    # math holds ~1/6 of the tokens; at weight 0.6 it must repeat (cycle) within the epoch to keep its share.
    weights = {"web": 0.1, "code": 0.3, "math": 0.6}
    dm = module(root, mixture=weights)
    batches = run(dm, dm.stream_spec("train"))
    total = len(batches) * TOKENS_PER_BATCH
    shares = source_token_shares(batches, 3)
    np.testing.assert_allclose(shares, list(weights.values()), atol=2 * TOKENS_PER_BATCH / total)
    math_train_tokens = Manifest.load(root / "math").splits["train"].tokens
    assert shares[2] * total > 1.5 * math_train_tokens  # read more than once: its stream cycled


def test_the_guarantee_holds_over_long_cycling_streams(root: Path) -> None:
    # After every batch, each source is within two batches of its share; the stream cycles every source many times.
    dm = module(root)
    spec = replace(dm.stream_spec("train"), batches=600)
    weights = np.array(list(WEIGHTS.values()))
    delivered = np.zeros(len(weights))
    for batch in run(dm, spec):
        delivered[int(batch["domain"][0])] += 1
        assert np.all(np.abs(delivered - weights * delivered.sum()) <= 2)
    assert delivered.sum() * TOKENS_PER_BATCH > 3 * Manifest.load(root / "web").splits["train"].tokens
    assert delivered.tolist() == delivered_batches(list(weights), 600)  # the schedule, replayed without data


@pytest.mark.parametrize("seed", range(20))
def test_the_schedule_keeps_any_weights_within_two_batches(seed: int) -> None:
    rng = random.Random(seed)
    weights = [rng.random() + 0.01 for _ in range(rng.randint(2, 6))]
    weights = [w / sum(weights) for w in weights]
    delivered = [0] * len(weights)
    for k in range(1, 2000):
        delivered[next_source(weights, delivered)] += 1
        assert max(abs(d - w * k) for d, w in zip(delivered, weights, strict=True)) <= 2


def test_a_single_source_mixture_is_that_directory_with_the_source_seed(root: Path) -> None:
    mixed = module(root, mixture={"code": 1.0})
    single = PackedDataModule(str(root / "code"), TOKENS_PER_BATCH, MAX_SEQ_LEN, seed=source_seed(0, "code"))
    assert_same(list(single.train_dataloader()), list(mixed.train_dataloader()))


# --- determinism and resume ---


def test_order_is_a_function_of_seed_and_epoch(root: Path) -> None:
    dm = module(root)
    spec = dm.stream_spec("train")
    first = run(dm, spec)
    assert len(first) >= 10
    assert_same(first, run(dm, spec))
    assert_same(first, list(dm.train_dataloader()))
    for other in (
        run(dm, replace(spec, epoch=1)),
        run(module(root, seed=1), module(root, seed=1).stream_spec("train")),
    ):
        assert len(other) == len(first)
        assert not torch.equal(torch.cat([b["input_ids"] for b in other]), torch.cat([b["input_ids"] for b in first]))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_yields_exactly_the_suffix(root: Path, num_workers: int) -> None:
    dm = module(root, num_workers=num_workers)
    spec = dm.stream_spec("train")
    full = run(dm, spec)
    for k in (1, 3, 4, spec.batches - 1, spec.batches):
        assert_same(run(dm, replace(spec, skip=k)), full[k:])


def test_resume_from_the_saved_state(root: Path) -> None:
    saving, loading = module(root), module(root)
    full = list(saving.train_dataloader())
    attach_trainer(saving, 0, 1, processed=5)
    state = saving.state_dict()
    layout = {"world_size": 1, "num_workers": 0, "tokens_per_batch": TOKENS_PER_BATCH, "max_seq_len": MAX_SEQ_LEN}
    assert state == {"epoch": 0, "batches_done": 5, **layout, "seed": 0, "order_version": 2, "mixture": WEIGHTS}
    state = json.loads(json.dumps(state))  # survives a checkpoint's serialisation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loading.load_state_dict(state)
    assert_same(list(loading.train_dataloader()), full[5:])


def count_shard_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Shard reads per source directory from now on (the stream's reader, patched where it is looked up)."""
    import dlcm.data.shards as shards

    reads: dict[str, int] = {}
    real = shards.iter_shard_documents

    def counted(url, *expected):
        source = Path(url).parent.name
        reads[source] = reads.get(source, 0) + 1
        return real(url, *expected)

    monkeypatch.setattr(shards, "iter_shard_documents", counted)
    return reads


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_resume_anywhere_is_the_suffix_and_reads_a_constant_number_of_shards(
    root: Path, monkeypatch: pytest.MonkeyPatch, fraction: float
) -> None:
    """A long stream (every source cycles many times): resuming at 10/50/90 % gives exactly the rest of it, and
    reads no more shards per source than one batch can span plus one, wherever the position falls."""
    dm = module(root)
    spec = replace(dm.stream_spec("train"), batches=900)
    full = run(dm, spec)
    skip = int(fraction * spec.batches)
    min_shard = min(s.tokens for name in SOURCES for s in Manifest.load(root / name).splits["train"].shards)
    per_source = 2 + math.ceil(TOKENS_PER_BATCH / min_shard)  # the shard of the cut, the ones a batch spans
    reads = count_shard_reads(monkeypatch)
    resumed = iter(dm.stream(replace(spec, skip=skip)))
    first = [next(resumed) for _ in range(len(SOURCES) * 2)]  # every source serves at least one of these
    assert {int(b["domain"][0]) for b in first} == set(range(len(SOURCES)))
    assert set(reads) == set(SOURCES) and max(reads.values()) <= per_source, reads
    assert_same(first + list(resumed), full[skip:])
    # What a replay from the start would have read to get there: far more, and growing with the position.
    reads.clear()
    replay = iter(dm.stream(spec))
    for _ in range(skip + len(first)):
        next(replay)
    assert min(reads.values()) > per_source


def saved_state(root: Path, world: int, num_workers: int) -> dict:
    dm = module(root, num_workers=num_workers)
    attach_trainer(dm, 0, world, processed=4)
    return dm.state_dict()


@pytest.mark.parametrize(
    ("saved", "now", "message"),
    [
        ((1, 0), (2, 0), r"world_size=1 → 2"),
        ((2, 2), (2, 4), r"num_workers=2 → 4"),
        ((1, 2), (4, 4), r"world_size=1 → 4, num_workers=2 → 4"),
    ],
)
def test_resuming_on_another_world_size_or_worker_count_is_an_error(
    root: Path, saved: tuple[int, int], now: tuple[int, int], message: str
) -> None:
    """Each (rank × worker) slot reads its own stream, so the same batch index means other data on another
    layout: refused by name, never a silent shift. The same layout resumes."""
    state = saved_state(root, *saved)
    dm = module(root, num_workers=now[1])
    attach_trainer(dm, 0, now[0])
    dm.load_state_dict(state)  # loading is fine (a validation run may load any checkpoint) ...
    with pytest.raises(ValueError, match=rf"cannot resume the data position: .*\({message}\).*data\.num_workers"):
        dm.consume_position()  # ... continuing the training stream on another layout is not
    same = module(root, num_workers=saved[1])
    attach_trainer(same, 0, saved[0])
    same.load_state_dict(state)
    assert same.consume_position() == (0, 4)
    other = module(root, num_workers=saved[1], tokens_per_batch=2 * TOKENS_PER_BATCH)
    attach_trainer(other, 0, saved[0])
    other.load_state_dict(state)
    with pytest.raises(ValueError, match=rf"tokens_per_batch={TOKENS_PER_BATCH} → {2 * TOKENS_PER_BATCH}"):
        other.consume_position()
    # A layout saved before the ordering rule had a version (documents, not pieces, shuffled): another order.
    older = module(root, num_workers=saved[1])
    attach_trainer(older, 0, saved[0])
    older.load_state_dict({k: v for k, v in state.items() if k != "order_version"})
    with pytest.raises(ValueError, match=r"\(order_version=1 → 2\).*checkpoint of an earlier dlcm"):
        older.consume_position()
    # Opting in continues after as many tokens, in the new layout's order, with a warning.
    moved = module(root, num_workers=now[1], resume_on_new_layout=True)
    attach_trainer(moved, 0, now[0])
    moved.load_state_dict(state)
    with pytest.warns(UserWarning, match=rf"resuming the data position on another layout \({message}\)"):
        assert moved.consume_position() == (0, 4 * saved[0] // now[0])


def test_resuming_with_other_weights_warns(root: Path) -> None:
    dm = module(root, mixture={"web": 0.4, "code": 0.4, "math": 0.2})
    with pytest.warns(UserWarning, match=r"saved reading the mixture \{'web': 0.5"):
        dm.load_state_dict({"epoch": 0, "batches_done": 2, "mixture": WEIGHTS})
    single = PackedDataModule(str(root / "web"), tokens_per_batch=TOKENS_PER_BATCH, max_seq_len=MAX_SEQ_LEN)
    with pytest.warns(UserWarning, match="this run reads one shard directory"):
        single.load_state_dict({"epoch": 0, "batches_done": 2, "mixture": WEIGHTS})


# --- equal counts across ranks, validation ---


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_runs_the_same_number_of_batches(root: Path, world: int) -> None:
    for split in ("train", "val"):
        counts = set()
        for rank in range(world):
            dm = module(root)
            attach_trainer(dm, rank, world)
            spec = dm.stream_spec(split)
            counts |= {spec.batches, len(run(dm, spec))}
        assert len(counts) == 1, (split, counts)


def test_validation_is_unshuffled_and_the_same_every_epoch(root: Path) -> None:
    dm = module(root)
    spec = dm.stream_spec("val")
    assert not spec.shuffle and spec.by_document
    batches = run(dm, spec)
    assert len(batches) == spec.batches >= 3
    assert_same(batches, run(dm, replace(spec, epoch=5)))
    assert_same(batches, list(dm.val_dataloader()))
    first = pieces(batches)[0][0]  # the first document of the first source, in manifest order
    from dlcm.data.shards import iter_shard_documents

    ids, _ = next(iter_shard_documents(Manifest.load(root / "web").shard_paths("val")[0]))
    np.testing.assert_array_equal(first, ids[: len(first)])


def test_the_validation_pass_is_sized_without_reading_the_split(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # At pre-training scale a validation split holds billions of tokens; counting them per rank would read it all.
    monkeypatch.setattr(PackedDataModule, "_val_tokens_per_rank", lambda *_: pytest.fail("read the split"))
    dm = module(root)
    assert dm.stream_spec("val").batches == dm.manifest.splits["val"].tokens // TOKENS_PER_BATCH
    assert module(root, val_batches=2).stream_spec("val").batches == 2


# --- errors ---


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({}, r"data.mixture=\{\} is not allowed"),
        ({"web": 0.5, "code": 0.25, "math": 0.15}, r"weights sum to 0.9, not 1"),
        ({"web": 1.2, "code": -0.2}, r"data.mixture.code=-0.2 is not allowed: a token share > 0"),
        ({"web": 1.0, "code": 0.0}, r"data.mixture.code=0.0 is not allowed"),
        ({"web": math.nan}, r"data.mixture.web=nan is not allowed"),
        ({"web": "half"}, r"data.mixture.web='half' is not allowed"),
        ({"web": True}, r"data.mixture.web=True is not allowed"),
        ({"../web": 1.0}, r"key '../web' is not allowed: the name of a directory directly inside"),
        ({"nope": 1.0}, r"source 'nope': .*nope is not a directory \(directories there: code, math, web\)"),
    ],
)
def test_bad_mixtures_are_rejected_by_name(root: Path, weights: dict, message: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        module(root, mixture=weights)


def test_mixture_needs_a_data_dir() -> None:
    with pytest.raises(ValueError, match=r"data\.mixture needs data\.data_dir"):
        PackedDataModule(data_dir=None, mixture={"web": 1.0})


def test_a_source_without_manifest_is_named(root: Path, tmp_path: Path) -> None:
    (tmp_path / "web").symlink_to(root / "web")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"source 'empty': .*manifest.json not found"):
        Mixture.load(tmp_path, {"web": 0.5, "empty": 0.5})


def test_sources_must_share_a_tokenizer(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "tok.json"
    train_bpe((d.text for d in source_docs("web", 40)), 280, other)
    (tmp_path / "web").symlink_to(root / "web")
    build_shards(source_docs("code", 20), other, tmp_path / "code", val_fraction=0.2, progress=False)
    with pytest.raises(ValueError, match=r"sources code were built with another tokenizer than 'web'"):
        Mixture.load(tmp_path, {"web": 0.5, "code": 0.5})


def test_a_source_without_validation_documents_is_named(
    root: Path, tokenizer: tuple[Path, Tokenizer], tmp_path: Path
) -> None:
    (tmp_path / "web").symlink_to(root / "web")
    build_shards(source_docs("code", 20), tokenizer[0], tmp_path / "code", val_fraction=0.0, progress=False)
    dm = PackedDataModule(str(tmp_path), TOKENS_PER_BATCH, MAX_SEQ_LEN, mixture={"web": 0.5, "code": 0.5})
    assert len(list(dm.train_dataloader())) > 0
    with pytest.raises(ValueError, match=r"source 'code' has no shards in the val split"):
        list(dm.val_dataloader())
