"""A weighted mixture of shard directories read as one packed stream (the paper's pre-training data mix, §5).

Layout: ``data_dir`` holds one ``dlcm data build`` directory per source, named by the mixture's keys (symlinks
are fine), all built with the same tokenizer::

    data_dir/nemotron_cc/manifest.json, train-000000.tar, …
    data_dir/map_cc/…

Weights are **token shares** (the paper's Table 1 gives tokens per source) and must sum to 1.

Sampling. Inside each slot (rank × DataLoader worker, as in :mod:`dlcm.data.datamodule`) every source is its own
packed stream — that module's order, seeded per source — and each micro-batch comes whole from one source: the
one furthest below its share of the batches the slot has delivered (``argmin delivered_i / w_i``, ties to the
first source). Since every batch holds exactly ``tokens_per_batch`` tokens, batch shares are token shares: every
slot matches the weights to within two batches per source, and an optimizer step (many micro-batches over ranks and
accumulation) mixes all sources at their shares. The schedule uses no random draw and no document length, so
which source the k-th batch comes from, and how many batches each source has delivered before it, follow from
``k`` alone. A resume therefore starts each source's stream at its own position, passing over whole shards
unread: it reads one or two shards per source wherever it falls in a trillion-token run, instead of replaying the
stream. Every source cycles (new order per cycle) instead of running out, so the data module's equal batch count
per rank holds. webdataset's ``RandomMix`` does not fit: it draws from the process-global ``random`` state
(neither seeded per stream nor restorable) and mixes samples, i.e. documents, not tokens.

Epochs. An epoch has as many batches as all sources' training tokens fill (the data module's rule over their union):
a source weighted above its share of that total repeats within the epoch, one weighted below is partly read.
Validation applies the same rule to the validation splits, unshuffled: the pass is the mixture's loss, and a
source whose validation split is small for its weight repeats documents within one pass.

Batches label their pieces' ``domain`` with the source's index in ``domains`` (the mixture's keys), so the
per-domain statistics (tokens per concept, paper Table 5) come per source.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dlcm.data import storage
from dlcm.data.datamodule import PackedStream, StreamSpec
from dlcm.data.packing import pack_documents
from dlcm.data.shards import Manifest, SplitInfo

# Weights must add up to 1 this closely: a typo (0.5 / 0.25 / 0.15 / 0.01) must not silently renormalise.
WEIGHT_SUM_TOLERANCE = 1e-6


@dataclass(frozen=True)
class MixtureSource:
    """One shard directory of a mixture and its token share."""

    name: str
    weight: float
    manifest: Manifest


@dataclass(frozen=True)
class Mixture:
    """Validated mixture sources. Offers the part of :class:`~dlcm.data.shards.Manifest` the data module reads
    (tokenizer, vocabulary, domains, split totals, shard paths) over the union of the sources."""

    directory: Path | str  # a URL stays a string
    sources: tuple[MixtureSource, ...]

    @classmethod
    def load(cls, data_dir: str | Path | None, weights: dict[str, float]) -> Mixture:
        """Read ``data_dir/<name>`` for every ``name`` in ``weights``; errors name the bad weight or directory."""
        if data_dir is None:
            raise ValueError(
                "data.mixture needs data.data_dir: the directory holding one shard directory per mixture source"
            )
        if not weights:
            raise ValueError("data.mixture={} is not allowed: give at least one {source directory: token share}")
        directory = data_dir if storage.is_url(str(data_dir)) else Path(data_dir)
        for name, weight in weights.items():
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not math.isfinite(weight)
                or weight <= 0
            ):
                raise ValueError(f"data.mixture.{name}={weight!r} is not allowed: a token share > 0")
            if not name or Path(name).name != name or name in (".", ".."):
                raise ValueError(
                    f"data.mixture key {name!r} is not allowed: the name of a directory directly inside "
                    f"data.data_dir={directory}"
                )
        total = sum(weights.values())
        if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
            raise ValueError(
                f"data.mixture weights sum to {total:.6g}, not 1: they are token shares "
                f"({', '.join(f'{n}={w}' for n, w in weights.items())})"
            )
        sources = []
        for name, weight in weights.items():
            path = storage.join(str(directory), name) if isinstance(directory, str) else directory / name
            if isinstance(path, Path) and not path.is_dir():
                present = sorted(p.name for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []
                raise FileNotFoundError(
                    f"data.mixture source {name!r}: {path} is not a directory "
                    f"({'directories there: ' + ', '.join(present) if present else f'{directory} holds none'}); "
                    "build it with `dlcm data build … --out` that path"
                )
            try:
                manifest = Manifest.load(path)
            except (FileNotFoundError, ValueError) as err:
                raise type(err)(f"data.mixture source {name!r}: {err}") from err
            sources.append(MixtureSource(name, float(weight), manifest))
        first = sources[0].manifest
        other = [s.name for s in sources if s.manifest.tokenizer_sha256 != first.tokenizer_sha256]
        if other:
            raise ValueError(
                f"data.mixture sources {', '.join(other)} were built with another tokenizer than "
                f"{sources[0].name!r} (SHA-256 {first.tokenizer_sha256[:12]}…): rebuild them with the same tokenizer"
            )
        return cls(directory, tuple(sources))

    @property
    def tokenizer_path(self) -> Path:
        return self.sources[0].manifest.tokenizer_path

    @property
    def tokenizer_sha256(self) -> str:
        return self.sources[0].manifest.tokenizer_sha256  # every source's (checked in load)

    @property
    def vocab_size(self) -> int:
        return self.sources[0].manifest.vocab_size

    @property
    def domains(self) -> tuple[str, ...]:
        """Domain labels of the batches: the source names, in mixture order."""
        return tuple(s.name for s in self.sources)

    @property
    def weights(self) -> dict[str, float]:
        return {s.name: s.weight for s in self.sources}

    @property
    def splits(self) -> dict[str, SplitInfo]:
        """Totals over all sources; shard names are relative to the mixture directory."""
        return {
            split: SplitInfo.from_shards(
                replace(shard, name=f"{s.name}/{shard.name}")
                for s in self.sources
                for shard in s.manifest.splits[split].shards
            )
            for split in self.sources[0].manifest.splits
        }

    def shard_paths(self, split: str) -> list[Path]:
        """Every source's local shards of ``split``, source by source."""
        return [path for s in self.sources for path in s.manifest.shard_paths(split)]

    def shard_urls(self, split: str) -> list[str]:
        """Every source's shards of ``split`` (paths or URLs), source by source."""
        return [url for s in self.sources for url in s.manifest.shard_urls(split)]

    def stream_sources(self, split: str) -> tuple[MixtureSourceShards, ...]:
        """Each source's shards of ``split`` with the manifest's counts: what :class:`MixtureStream` needs."""
        return tuple(
            MixtureSourceShards(
                s.name,
                s.weight,
                tuple(s.manifest.shard_urls(split)),
                tuple(x.tokens for x in s.manifest.splits[split].shards),
                tuple(x.docs for x in s.manifest.splits[split].shards),
                tuple(x.sha256 for x in s.manifest.splits[split].shards),
            )
            for s in self.sources
        )


@dataclass(frozen=True)
class MixtureSourceShards:
    """One source's shards of a split (paths or URLs) with their token and document counts and SHA-256s
    (picklable)."""

    name: str
    weight: float
    shards: tuple[str, ...]
    tokens: tuple[int, ...]
    docs: tuple[int, ...]
    sha256: tuple[str, ...]


def source_seed(seed: int, name: str) -> int:
    """A per-source data-order seed, so sources with as many shards do not share one permutation."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{name}".encode()).digest()[:8], "big")


def next_source(weights: Sequence[float], delivered: Sequence[int]) -> int:
    """The source of the next batch: the one furthest below its share (``argmin delivered_i / w_i``, ties first)."""
    return min(range(len(weights)), key=lambda i: delivered[i] / weights[i])


def delivered_batches(weights: Sequence[float], batches: int) -> list[int]:
    """Batches each source has delivered after the slot's first ``batches``: the schedule replayed as integers
    (about a microsecond per batch, no data read)."""
    delivered = [0] * len(weights)
    for _ in range(batches):
        delivered[next_source(weights, delivered)] += 1
    return delivered


class MixtureStream(PackedStream):
    """:class:`PackedStream` whose batches come from the sources by the deficit schedule (module docstring)."""

    def __init__(self, spec: StreamSpec, sources: tuple[MixtureSourceShards, ...]) -> None:
        super().__init__(spec)
        self.sources = sources
        self.source_specs = []
        for source in sources:
            if not source.shards:
                raise ValueError(
                    f"data.mixture source {source.name!r} has no shards in the {spec.split} split; rebuild it with "
                    "`dlcm data build` (a validation split needs --val-fraction > 0)"
                )
            # domains={} labels every document 0 inside the source stream; batches are relabelled by source.
            self.source_specs.append(
                replace(
                    spec,
                    shards=source.shards,
                    shard_tokens=source.tokens,
                    shard_docs=source.docs,
                    shard_sha256=source.sha256,
                    domains={},
                    seed=source_seed(spec.seed, source.name),
                )
            )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec, at = self.spec, self.position()
        weights = [s.weight for s in self.sources]
        delivered = delivered_batches(weights, at.done)
        # Each source's packed stream starts where its delivered batches end; made when first needed, so a resume
        # reads only the shards the batches it serves come from.
        streams: list[Iterator[dict[str, Any]] | None] = [None] * len(self.sources)
        for k in itertools.count(at.done):
            if at.logical + k * at.workers >= spec.batches:
                return
            i = next_source(weights, delivered)
            if streams[i] is None:
                source_spec = self.source_specs[i]
                documents = PackedStream(source_spec).documents(at.slot, at.slots, delivered[i] * spec.tokens_per_batch)
                streams[i] = pack_documents(documents, spec.tokens_per_batch, spec.max_seq_len, spec.token_bytes)
            try:
                batch = next(streams[i])
            except ValueError as err:
                raise ValueError(f"data.mixture source {self.sources[i].name!r}: {err}") from err
            batch["domain"] = torch.full_like(batch["domain"], i)
            delivered[i] += 1
            yield batch
