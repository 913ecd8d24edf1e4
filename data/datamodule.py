"""Streaming webdataset shards into packed micro-batches, deterministically and resumably.

Order. For epoch ``e`` the shard order is a permutation drawn from ``(seed, e)``; the documents of a shard are cut
into pieces of ``max_seq_len`` tokens (where packing cuts them) and the shard's pieces shuffled by a generator of
``(seed, e, shard)``, so a long document (a large source file) is spread over the batches of its shard instead of
filling a run of consecutive batches with one domain; a stream that runs out cycles with a new permutation. Validation
reads in manifest order, unshuffled. Nothing depends on wall-clock or worker timing, so a run is a function of
``(seed, epoch, batch index)``.

Splitting. Every (rank, worker) pair is a *slot*. With at least as many shards as slots, slot ``s`` reads
shards ``s, s + slots, …`` of the epoch's permutation; with fewer shards every slot reads all of them and keeps
every ``slots``-th piece. Batch ``b`` of a rank comes from that rank's logical worker ``b mod num_workers``, so
the sequence does not depend on how many batches were skipped.

Equal counts. Each rank yields exactly ``batches_per_epoch = train_tokens // (tokens_per_batch · world)`` batches
per epoch (at least 1), cycling its slot's documents if needed, so no rank waits for another in a collective.
Validation reads every ``world``-th document per rank (in the training process, no workers) and all ranks run
``min_r(tokens_r // tokens_per_batch)`` batches: the split once, less at most one partial batch per rank.

Resume. The position (epoch, batches processed in it) is saved in the checkpoint through the data module's
``state_dict``, with the layout that defines the order (world size, ``num_workers``, ``tokens_per_batch``,
``max_seq_len``, ``seed``, and the version of the ordering rule itself); the next training iterator skips exactly
those batches. A checkpoint saved with another layout is refused with an error naming the difference: the slots'
streams would continue with other data, so resuming on another number of GPUs or workers would silently shift the
data order. Skipping builds no batch: every batch holds exactly ``tokens_per_batch`` tokens, so a slot's k-th batch
starts k · ``tokens_per_batch`` tokens into its document stream, and the stream is started there (the document the
cut falls in split where packing would have cut it). Whole shards before that point are not read — their tokens come
from the manifest and their piece shuffle has its own seed — so a resume reads one or two shards per slot wherever
it falls.

Mixtures. With ``mixture`` each batch comes from one source, chosen by a deterministic schedule of the token
shares (:mod:`dlcm.data.mixture`); every source's position follows from the batch index, so a mixture resumes
just as cheaply, and everything above holds for it unchanged.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dlcm.data.packing import pack_documents
from dlcm.data.storage import is_url

# The ordering rule's version, saved with the position: 1 shuffled whole documents inside a shard (checkpoints
# without the key), 2 shuffles their max_seq_len pieces.
ORDER_VERSION = 2


@dataclass(frozen=True)
class StreamSpec:
    """Everything one rank's stream needs; copied into each DataLoader worker."""

    shards: tuple[str, ...]  # paths or URLs
    domains: dict[str, int]
    token_bytes: np.ndarray
    vocab_size: int
    tokens_per_batch: int
    max_seq_len: int
    seed: int
    shuffle: bool
    rank: int
    world_size: int
    num_workers: int
    batches: int  # per rank per epoch
    by_document: bool = False  # split documents (not shards) across slots, as validation does
    split: str = "train"
    epoch: int = 0
    skip: int = 0  # batches of this epoch already consumed
    # Per shard, from the manifest (same order as ``shards``): a resume passes over whole shards unread, and the
    # reader checks each shard's document count.
    shard_tokens: tuple[int, ...] = ()
    shard_docs: tuple[int, ...] = ()
    shard_sha256: tuple[str, ...] = ()  # the reader hashes each shard it reads against these


def resume_pieces(ids: np.ndarray, tokens: int, max_seq_len: int) -> tuple[list[np.ndarray], int]:
    """What a document still adds to a stream whose first ``tokens`` tokens (counted from this document on) are
    already packed, and the count left for the documents after it: nothing if all of it was packed; else the rest of
    the piece the cut falls in, then the remainder, which packing cuts at multiples of ``max_seq_len`` from the
    document's start (empty parts dropped)."""
    if tokens >= len(ids):
        return [], tokens - len(ids)
    boundary = -(-tokens // max_seq_len) * max_seq_len
    return [part for part in (ids[tokens:boundary], ids[boundary:]) if len(part)], 0


@dataclass(frozen=True)
class SlotPosition:
    """A reading process's slot among ``slots`` (rank × worker), its logical worker index of ``workers``, and how
    many of its batches come before the resume point."""

    slot: int
    slots: int
    logical: int
    workers: int
    done: int


class PackedStream(IterableDataset):
    """Iterable of packed batches for one rank (and, inside a DataLoader, one of its workers)."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec

    def documents(self, slot: int, slots: int, skip_tokens: int = 0) -> Iterator[tuple[np.ndarray, int]]:
        """The slot's endless document stream, from ``skip_tokens`` tokens in (see Resume in the module doc)."""
        from dlcm.data.shards import iter_shard_documents

        spec = self.spec
        by_shard = not spec.by_document and len(spec.shards) >= slots
        passable = by_shard and len(spec.shard_tokens) == len(spec.shards)
        expected = spec.shard_docs if len(spec.shard_docs) == len(spec.shards) else (None,) * len(spec.shards)
        sha256 = spec.shard_sha256 if len(spec.shard_sha256) == len(spec.shards) else (None,) * len(spec.shards)
        for cycle in itertools.count():
            order = list(range(len(spec.shards)))
            if spec.shuffle:
                random.Random(f"{spec.seed}/{spec.epoch}/{cycle}").shuffle(order)
            mine = order[slot::slots] if by_shard else order
            yielded = False
            counter = 0
            for shard_index in mine:
                if passable and skip_tokens >= spec.shard_tokens[shard_index] > 0:
                    skip_tokens -= spec.shard_tokens[shard_index]
                    yielded = True
                    continue
                units = list(iter_shard_documents(spec.shards[shard_index], expected[shard_index], sha256[shard_index]))
                if spec.shuffle:  # its own generator: passing over a shard needs no draw
                    msl = spec.max_seq_len
                    units = [(ids[i : i + msl], meta) for ids, meta in units for i in range(0, len(ids), msl)]
                    random.Random(f"{spec.seed}/{spec.epoch}/{cycle}/{shard_index}").shuffle(units)
                for ids, meta in units:
                    counter += 1
                    if not by_shard and (counter - 1) % slots != slot:
                        continue
                    if len(ids) and int(ids.max()) >= spec.vocab_size:
                        raise ValueError(
                            f"shard {spec.shards[shard_index]} holds token id {int(ids.max())} but the tokenizer "
                            f"has {spec.vocab_size} ids: the shards were built with another tokenizer; rebuild "
                            "them with `dlcm data build`"
                        )
                    yielded = True
                    pieces, skip_tokens = resume_pieces(ids, skip_tokens, spec.max_seq_len)
                    for piece in pieces:
                        yield piece, spec.domains.get(meta.get("domain", ""), 0)
            if not yielded:
                raise ValueError(
                    f"data slot {slot} of {slots} (rank × worker) received no document: the split has too few "
                    "documents for this many ranks and workers; lower num_workers or add data"
                )

    def position(self) -> SlotPosition:
        """Where the calling process (this rank, and inside a DataLoader this worker) starts reading."""
        spec = self.spec
        info = get_worker_info()
        workers = max(spec.num_workers, 1)
        logical = (spec.skip + (info.id if info else 0)) % workers
        # This worker's batches k (global index logical + k·workers) that come before the resume point.
        done = max(0, -(-(spec.skip - logical) // workers))
        return SlotPosition(spec.rank * workers + logical, spec.world_size * workers, logical, workers, done)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec, at = self.spec, self.position()
        documents = self.documents(at.slot, at.slots, at.done * spec.tokens_per_batch)
        batches = pack_documents(documents, spec.tokens_per_batch, spec.max_seq_len, spec.token_bytes)
        for k, batch in enumerate(batches, start=at.done):
            if at.logical + k * at.workers >= spec.batches:
                return
            yield batch


class PackedLoader:
    """What Lightning iterates: builds a fresh stream (epoch, skip) at every ``iter``; ``len`` is per epoch."""

    def __init__(self, datamodule: PackedDataModule, split: str) -> None:
        self.datamodule = datamodule
        self.split = split

    def __len__(self) -> int:
        return self.datamodule.stream_spec(self.split).batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # A generator: nothing (not even the resume position) is consumed until the first batch is requested,
        # since Lightning calls iter() once just to check that the loader is iterable.
        spec = self.datamodule.stream_spec(self.split)
        if self.split == "train":
            epoch, skip = self.datamodule.consume_position()
            spec = replace(spec, epoch=epoch, skip=skip)
        stream = self.datamodule.stream(spec)
        if spec.num_workers == 0:
            yield from stream
        else:
            yield from DataLoader(stream, batch_size=None, num_workers=spec.num_workers, persistent_workers=False)


def open_manifest(data_dir: str | Path | None, mixture: dict[str, float] | None) -> tuple[Any, Any]:
    """(directory, manifest) of a data section: the mixture of ``data_dir``'s sources, the shard directory
    ``data_dir`` (a URL stays a string: its shards are streamed), or the embedded default corpus (built on first use).
    A mixture reads like a manifest over its sources (tokenizer, domains, split totals, shard paths)."""
    from dlcm.data.corpus import ensure_default_corpus
    from dlcm.data.shards import Manifest

    if mixture is not None:
        from dlcm.data.mixture import Mixture

        loaded = Mixture.load(data_dir, mixture)
        return loaded.directory, loaded
    if data_dir is None:
        directory: str | Path = ensure_default_corpus()
    else:
        directory = str(data_dir) if is_url(str(data_dir)) else Path(data_dir)
    return directory, Manifest.load(directory)


class PackedDataModule(L.LightningDataModule):
    """Packed micro-batches from a ``dlcm data build`` directory, or the embedded default corpus.

    Args:
        data_dir: shard directory (with ``manifest.json`` and ``tokenizer.json``); ``None`` builds/uses the
            embedded default corpus (KJV prose + Python standard-library code) in the dlcm cache.
        tokens_per_batch: tokens per micro-batch on each rank (every batch is full).
        max_seq_len: longest document piece in tokens (linked from ``model.context_length``).
        seed: data-order seed.
        num_workers: DataLoader worker processes per rank (0: load in the training process).
        val_batches: cap on validation micro-batches per rank; ``None``: the whole validation split once.
        mixture: ``{source: token share}`` (shares sum to 1): read the shard directories ``data_dir/<source>`` as
            one weighted stream (:mod:`dlcm.data.mixture`); ``None``: ``data_dir`` is itself a shard directory.
        resume_on_new_layout: resuming a checkpoint saved with another data layout (world size, workers, batch
            size, sequence length, seed) is an error unless this is set; then the run continues, with a warning,
            after as many tokens as were consumed, in the new layout's order (documents near the position may
            repeat or be skipped).
    """

    def __init__(
        self,
        data_dir: str | None = None,
        tokens_per_batch: int = 4096,
        max_seq_len: int = 2048,
        seed: int = 0,
        num_workers: int = 0,
        val_batches: int | None = None,
        mixture: dict[str, float] | None = None,
        resume_on_new_layout: bool = False,
    ) -> None:
        super().__init__()
        from dlcm.data.tokenizer import load_tokenizer, token_byte_lengths, vocab_size

        for name, value, floor in (("tokens_per_batch", tokens_per_batch, 2), ("max_seq_len", max_seq_len, 2)):
            if value < floor:
                raise ValueError(f"data.{name}={value} is not allowed: at least {floor} tokens")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} is not allowed: 0 or more worker processes")
        if val_batches is not None and val_batches < 1:
            raise ValueError(f"data.val_batches={val_batches} is not allowed: None or at least 1")
        self.data_dir, self.manifest = open_manifest(data_dir, mixture)
        self.mixture = self.manifest if mixture is not None else None
        tokenizer = load_tokenizer(self.manifest.tokenizer_path)
        self.tokenizer = tokenizer  # callbacks decode validation text with it
        self.vocab_size = vocab_size(tokenizer)
        self.token_bytes = token_byte_lengths(tokenizer).numpy()
        self.tokens_per_batch = tokens_per_batch
        self.max_seq_len = max_seq_len
        self.seed = seed
        self.num_workers = num_workers
        self.val_batches = val_batches
        self.resume_on_new_layout = resume_on_new_layout
        self.restored_state: dict[str, Any] | None = None
        self._val_split_tokens: dict[int, list[int]] = {}

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def stream_spec(self, split: str) -> StreamSpec:
        """The stream of ``split`` (``'train'`` or ``'val'``) for this process's rank."""
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} is not allowed: expected 'train' or 'val'")
        info = self.manifest.splits[split]
        if info.docs == 0:
            raise ValueError(
                f"the {split} split of {self.data_dir} is empty; rebuild the shards with a larger --val-fraction"
            )
        rank, world = self._world()
        if split == "val" and self.mixture is None:
            batches = max(min(self._val_tokens_per_rank(world)) // self.tokens_per_batch, 1)
        else:  # a mixture's sources cycle, so its validation pass needs no per-rank count (no read of the split)
            batches = max(info.tokens // (self.tokens_per_batch * world), 1)
        if split == "val" and self.val_batches is not None:
            batches = min(batches, self.val_batches)
        return StreamSpec(
            shards=tuple(self.manifest.shard_urls(split)),
            shard_tokens=tuple(s.tokens for s in info.shards),
            shard_docs=tuple(s.docs for s in info.shards),
            shard_sha256=tuple(s.sha256 for s in info.shards),
            domains={name: i for i, name in enumerate(self.manifest.domains)},
            token_bytes=self.token_bytes,
            vocab_size=self.vocab_size,
            tokens_per_batch=self.tokens_per_batch,
            max_seq_len=self.max_seq_len,
            seed=self.seed,
            shuffle=split == "train",
            rank=rank,
            world_size=world,
            num_workers=self.num_workers if split == "train" else 0,
            batches=batches,
            by_document=split == "val",
            split=split,
        )

    def _val_tokens_per_rank(self, world: int) -> list[int]:
        """Validation tokens each rank receives under the round-robin document split (one pass, cached)."""
        from dlcm.data.shards import iter_shard_documents

        if world not in self._val_split_tokens:
            totals = [0] * world
            index = 0
            shards = self.manifest.splits["val"].shards
            for url, shard in zip(self.manifest.shard_urls("val"), shards, strict=True):
                for ids, _ in iter_shard_documents(url, shard.docs, shard.sha256):
                    totals[index % world] += len(ids)
                    index += 1
            self._val_split_tokens[world] = totals
        return self._val_split_tokens[world]

    def stream(self, spec: StreamSpec) -> PackedStream:
        """The iterable ``spec`` describes: this directory's stream, or the mixture's."""
        if self.mixture is None:
            return PackedStream(spec)
        from dlcm.data.mixture import MixtureStream

        return MixtureStream(spec, self.mixture.stream_sources(spec.split))

    def consume_position(self) -> tuple[int, int]:
        """(epoch, batches to skip) for the training iterator about to start. The saved layout is checked here, when
        training resumes, not when a checkpoint is loaded (validating a checkpoint on any layout is fine)."""
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        restored, self.restored_state = self.restored_state, None
        if restored is None or restored["epoch"] != epoch:
            return epoch, 0
        return epoch, self._resumed_batches(restored)

    def _resumed_batches(self, state: dict[str, Any]) -> int:
        """Batches of the saved epoch to skip on this layout; another layout is an error unless opted in."""
        now = self.layout()
        if "world_size" in state:  # a layout saved before the ordering rule had a version: rule 1
            state = {"order_version": 1, **state}
        changed = [f"{key}={state[key]} → {now[key]}" for key in now if state.get(key, now[key]) != now[key]]
        if not changed:
            return state["batches_done"]
        if not self.resume_on_new_layout:
            raise ValueError(
                f"cannot resume the data position: the checkpoint was saved with another data layout "
                f"({', '.join(changed)}). Each rank × DataLoader worker reads its own stream, so the saved position "
                "would continue with other documents; resume with the saved world size (devices × nodes), "
                "data.num_workers, data.tokens_per_batch, data.max_seq_len and data.seed (an order_version change "
                "means a checkpoint of an earlier dlcm, whose order cannot be reproduced), or set "
                "data.resume_on_new_layout=true to continue in the new layout's order"
            )
        # The same number of tokens consumed over all ranks, counted in the new layout's batches.
        tokens = state["batches_done"] * state.get("tokens_per_batch", now["tokens_per_batch"])
        done = tokens * state.get("world_size", now["world_size"]) // (now["tokens_per_batch"] * now["world_size"])
        rank_zero_warn(
            f"resuming the data position on another layout ({', '.join(changed)}): continuing after {done} batches "
            "per rank (as many tokens as were consumed) in the new layout's order; documents near the position may "
            "repeat or be skipped"
        )
        return done

    def train_dataloader(self) -> PackedLoader:
        return PackedLoader(self, "train")

    def val_dataloader(self) -> PackedLoader:
        return PackedLoader(self, "val")

    def layout(self) -> dict[str, int]:
        """What the data order is a function of, besides the position: saved with it and checked on resume."""
        return {
            "world_size": self._world()[1],
            "num_workers": self.num_workers,
            "tokens_per_batch": self.tokens_per_batch,
            "max_seq_len": self.max_seq_len,
            "seed": self.seed,
            "order_version": ORDER_VERSION,
        }

    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        if trainer is None:
            return {}
        # `processed` counts batches whose optimizer work is done, also when saving inside on_train_batch_end.
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        state = {"epoch": trainer.current_epoch, "batches_done": done, **self.layout()}
        if self.mixture is not None:
            state["mixture"] = self.mixture.weights
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved position for the next training iterator (:meth:`consume_position` checks its layout)."""
        if not state_dict:
            return
        saved, weights = state_dict.get("mixture"), self.mixture.weights if self.mixture is not None else None
        if saved != weights:
            rank_zero_warn(
                f"the checkpoint's data position was saved reading {_describe(saved)}, this run reads "
                f"{_describe(weights)}: training continues from the saved batch index, but not with the data "
                "order the saved run would have seen"
            )
        self.restored_state = dict(state_dict)


def _describe(mixture: dict[str, float] | None) -> str:
    return f"the mixture {mixture}" if mixture is not None else "one shard directory"
