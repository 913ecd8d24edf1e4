"""A weighted mixture of shard directories read as one packed stream (the paper's pre-training data mix, §5).

Layout: ``data_dir`` holds one ``dlcm data build`` directory per source, named by the mixture's keys (symlinks
are fine), all built with the same tokenizer::

    data_dir/nemotron_cc/manifest.json, train-000000.tar, …
    data_dir/map_cc/…

Weights are **token shares** (the paper's Table 1 gives tokens per source) and must sum to 1.

Sampling. Inside each slot (rank × DataLoader worker, as in :mod:`dlcm.data.datamodule`) every source is its own
document stream — that module's order, seeded per source — and the next document always comes from the source
furthest below its share of the tokens the slot has delivered (``argmin delivered_i / w_i``, ties to the first
source). Every slot's token shares therefore match the weights to within a few documents' tokens, with no random
draw: the stream stays a function of ``(seed, epoch, batch index)``, so the data module's saved position (epoch,
batches done) resumes it exactly, and its equal batch count per rank holds because every source cycles (new order
per cycle) instead of running out. webdataset's ``RandomMix`` does not fit: it draws from the process-global
``random`` state (neither seeded per stream nor restorable) and mixes samples, i.e. documents, not tokens.

Epochs. An epoch has as many batches as all sources' training tokens fill (the data module's rule over their union):
a source weighted above its share of that total repeats within the epoch, one weighted below is partly read.
Validation applies the same rule to the validation splits, unshuffled: the pass is the mixture's loss, and a
source whose validation split is small for its weight repeats documents within one pass.

Batches label each piece's ``domain`` with its source's index in ``domains`` (the mixture's keys), so the per-domain
statistics (tokens per concept, paper Table 5) come per source.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dlcm.data.datamodule import PackedStream, StreamSpec, resume_pieces
from dlcm.data.shards import Manifest, ShardInfo, SplitInfo

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

    directory: Path
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
        directory = Path(data_dir)
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
            path = directory / name
            if not path.is_dir():
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
                ShardInfo(f"{s.name}/{shard.name}", shard.docs, shard.tokens, shard.bytes)
                for s in self.sources
                for shard in s.manifest.splits[split].shards
            )
            for split in self.sources[0].manifest.splits
        }

    def shard_paths(self, split: str) -> list[Path]:
        """Every source's shards of ``split``, source by source."""
        return [path for s in self.sources for path in s.manifest.shard_paths(split)]

    def stream_sources(self) -> tuple[tuple[str, Path, float], ...]:
        """``(name, directory, weight)`` of each source, what :class:`MixtureStream` needs (picklable)."""
        return tuple((s.name, s.manifest.directory, s.weight) for s in self.sources)


def source_seed(seed: int, name: str) -> int:
    """A per-source data-order seed, so sources with as many shards do not share one permutation."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{name}".encode()).digest()[:8], "big")


class MixtureStream(PackedStream):
    """:class:`PackedStream` whose documents interleave the sources by token deficit (see the module docstring).

    ``spec.shards`` is the union of the sources' shards of one split; each source keeps those inside its directory.
    """

    def __init__(self, spec: StreamSpec, sources: tuple[tuple[str, Path, float], ...]) -> None:
        super().__init__(spec)
        self.sources = sources
        self.source_specs = []
        for name, directory, _ in sources:
            shards = tuple(p for p in spec.shards if p.parent == directory)
            if not shards:
                raise ValueError(
                    f"data.mixture source {name!r} has no shards in this split ({directory}); rebuild it with "
                    "`dlcm data build` (a validation split needs --val-fraction > 0)"
                )
            # domains={} labels every document 0 inside the source stream; documents() relabels by source. No
            # per-shard counts: a source is always read from its start (a resume skips on the interleaved stream).
            seed = source_seed(spec.seed, name)
            source = replace(spec, shards=shards, shard_tokens=(), shard_docs=(), domains={}, seed=seed)
            self.source_specs.append(source)

    def documents(self, slot: int, slots: int, skip_tokens: int = 0) -> Iterator[tuple[np.ndarray, int]]:
        # Which source comes next depends on the length of every earlier document, so a resume reads the sources
        # up to the resume point (building no batch); only a single directory's stream passes over whole shards.
        streams = [PackedStream(spec).documents(slot, slots) for spec in self.source_specs]
        weights = [w for _, _, w in self.sources]
        delivered = [0] * len(streams)
        while True:
            i = min(range(len(streams)), key=lambda k: delivered[k] / weights[k])
            try:
                ids, _ = next(streams[i])
            except ValueError as err:
                raise ValueError(f"data.mixture source {self.sources[i][0]!r}: {err}") from err
            delivered[i] += len(ids)
            pieces, skip_tokens = resume_pieces(ids, skip_tokens, self.spec.max_seq_len)
            for piece in pieces:
                yield piece, i
