"""``dlcm data …``: build shards, train a tokenizer, or build/locate the embedded default corpus.

    dlcm data train-tokenizer corpus/*.txt src/ --vocab-size 32000 --out tok/tokenizer.json
    dlcm data build corpus/*.txt notes.jsonl 'src/**/*.py' --domain code --tokenizer tok/tokenizer.json --out shards/
    dlcm data build docs.jsonl --tokenizer deepseek-v3 --out shards-ds3/
    dlcm data default-corpus

User errors (a missing path, a malformed record, a conflicting output directory) print one paragraph and exit 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from dlcm.data.corpus import DEFAULT_MAX_BYTES_PER_DOMAIN, ensure_default_corpus
from dlcm.data.shards import Manifest, build_shards
from dlcm.data.sources import iter_documents
from dlcm.data.tokenizer import deepseek_v3_tokenizer_path, tokenizer_sha256, train_bpe

_INPUTS_HELP = (
    "text files (one document each), .jsonl files (one {'text', 'id'?, 'domain'?} per line), directories or globs"
)


def _tokenizer_arg(value: str) -> Path:
    # A short name for the one published tokenizer the docs name; everything else is a path.
    return deepseek_v3_tokenizer_path() if value == "deepseek-v3" else Path(value)


def _cmd_build(args: argparse.Namespace) -> int:
    manifest = build_shards(
        iter_documents(args.inputs, domain=args.domain),
        _tokenizer_arg(args.tokenizer),
        args.out,
        val_fraction=args.val_fraction,
        docs_per_shard=args.docs_per_shard,
        seed=args.seed,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.out}: {manifest.summary()}; domains {', '.join(manifest.domains)}")
    return 0


def _cmd_train_tokenizer(args: argparse.Namespace) -> int:
    def texts() -> Iterator[str]:
        budget = args.max_bytes
        for doc in iter_documents(args.inputs, domain=args.domain):
            yield doc.text
            if budget is not None:
                budget -= len(doc.text.encode("utf-8"))
                if budget <= 0:
                    return

    tokenizer = train_bpe(texts(), args.vocab_size, args.out)
    sha = tokenizer_sha256(args.out)
    print(f"wrote {args.out}: byte-level BPE, {tokenizer.get_vocab_size(with_added_tokens=True)} ids, sha256 {sha}")
    return 0


def _cmd_default_corpus(args: argparse.Namespace) -> int:
    out = ensure_default_corpus(
        cache_dir=args.cache_dir,
        vocab_size=args.vocab_size,
        max_bytes_per_domain=args.max_bytes_per_domain,
        progress=not args.quiet,
    )
    manifest = Manifest.load(out)
    print(out)
    print(f"{manifest.summary()}; domains {', '.join(manifest.domains)}; vocab {manifest.vocab_size}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``dlcm data`` argument parser (exposed so docs and tests can render its help)."""
    parser = argparse.ArgumentParser(prog="dlcm data", description="Prepare tokenized shards for DLCM training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,train-tokenizer,default-corpus}")

    build = sub.add_parser("build", help="tokenize documents into train/val webdataset shards")
    build.add_argument("inputs", nargs="+", help=_INPUTS_HELP)
    build.add_argument("--tokenizer", required=True, help="tokenizer.json (or its directory), or 'deepseek-v3'")
    build.add_argument("--out", required=True, type=Path, help="output directory (resumes an interrupted build)")
    build.add_argument("--domain", help="domain of documents that carry none (default: prose/code by file type)")
    build.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    build.add_argument("--docs-per-shard", type=int, default=2048, help="documents per shard file (default 2048)")
    build.add_argument("--seed", type=int, default=0, help="seed of the document-level train/val split")
    build.add_argument("--overwrite", action="store_true", help="replace a finished or conflicting build in --out")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(run=_cmd_build)

    train = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer.json")
    train.add_argument("inputs", nargs="+", help=_INPUTS_HELP)
    train.add_argument("--vocab-size", type=int, required=True, help="ids including <|endoftext|> (>= 257)")
    train.add_argument("--out", required=True, type=Path, help="path of the tokenizer.json to write")
    train.add_argument("--domain", help="domain label for documents (only affects JSONL defaults)")
    train.add_argument("--max-bytes", type=int, help="stop reading inputs after this many UTF-8 bytes")
    train.set_defaults(run=_cmd_train_tokenizer)

    corpus = sub.add_parser("default-corpus", help="build (first time) or locate the embedded KJV + stdlib corpus")
    corpus.add_argument("--cache-dir", type=Path, help="cache root (default $DLCM_CACHE or ~/.cache/dlcm)")
    corpus.add_argument("--vocab-size", type=int, default=4096, help="BPE ids (default 4096)")
    corpus.add_argument(
        "--max-bytes-per-domain",
        type=int,
        default=DEFAULT_MAX_BYTES_PER_DOMAIN,
        help=f"UTF-8 bytes of prose and of code (default {DEFAULT_MAX_BYTES_PER_DOMAIN:,})",
    )
    corpus.add_argument("--quiet", action="store_true", help="no progress output")
    corpus.set_defaults(run=_cmd_default_corpus)
    return parser


def main(argv: list[str]) -> int:
    """Run ``dlcm data <argv>``; returns the exit status (argparse's 2 for bad usage, 1 for user errors)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help and usage errors; callers want a status, not an exception
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.run(args)
    except (ValueError, OSError) as err:  # FileNotFoundError, and permission or disk-full errors on the output
        print(f"dlcm data {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command == "build":
            print(
                f"dlcm data build: interrupted; run the same command again to resume into {args.out}", file=sys.stderr
            )
        return 130
