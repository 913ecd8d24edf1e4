"""``dlcm data …``: build shards, verify them, train a tokenizer, or build/locate the embedded default corpus.

    dlcm data train-tokenizer corpus/*.txt src/ --vocab-size 32000 --out tok/tokenizer.json
    dlcm data build corpus/*.txt notes.jsonl 'src/**/*.py' --domain code --tokenizer tok/tokenizer.json --out shards/
    dlcm data build 'megamath/*.parquet' --tokenizer deepseek-v3 --workers 16 --max-tokens 100e9 --out mix/megamath_web
    dlcm data verify mix/megamath_web
    dlcm data default-corpus

User errors (a missing path, a malformed record, a conflicting or locked output directory, a damaged shard) print
one line and exit 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

# Only what the parser needs is imported up front: the shard writer and the tokenizer load torch (seconds), so
# each command imports them when it runs and `dlcm data … --help` answers without them.
from dlcm.data.corpus_defaults import DEFAULT_MAX_BYTES_PER_DOMAIN
from dlcm.data.sources import DocumentSource, iter_documents

_INPUTS_HELP = (
    "files, directories or globs, local or fsspec URLs (s3://, gs://, https://): JSON Lines (.jsonl, .jsonl.gz, "
    ".jsonl.zst; one record per document), .parquet, .arrow and `datasets` save_to_disk directories (one row per "
    "document), other files one document each"
)


def _count(value: str) -> int:
    # Corpus budgets are written 100e9 or 100_000_000_000 as often as 100000000000.
    try:
        number = float(value.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number.is_integer() or number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not allowed: a whole number >= 1")
    return int(number)


def _tokenizer_arg(value: str) -> Path:
    # A short name for the one published tokenizer the docs name; everything else is a path.
    from dlcm.data.tokenizer import deepseek_v3_tokenizer_path

    return deepseek_v3_tokenizer_path() if value == "deepseek-v3" else Path(value)


def _documents(args: argparse.Namespace) -> DocumentSource:
    return iter_documents(
        args.inputs,
        domain=args.domain,
        text_field=args.text_field,
        id_field=args.id_field,
        domain_field=args.domain_field,
    )


def _cmd_build(args: argparse.Namespace) -> int:
    from dlcm.data.shards import build_shards
    from dlcm.data.tokenizer import resolve_tokenizer_file

    documents = _documents(args)
    if args.dry_run:
        from dlcm.data.estimate import estimate_build

        tokenizer = resolve_tokenizer_file(_tokenizer_arg(args.tokenizer))
        estimate = estimate_build(documents, tokenizer, args.workers, args.max_docs, args.max_tokens)
        print(f"{len(documents.files):,} input files, {documents.total_bytes / 1e9:,.3f} GB stored")
        print(estimate.summary())
        return 0
    manifest = build_shards(
        documents,
        _tokenizer_arg(args.tokenizer),
        args.out,
        val_fraction=args.val_fraction,
        docs_per_shard=args.docs_per_shard,
        seed=args.seed,
        progress=not args.quiet,
        overwrite=args.overwrite,
        workers=args.workers,
        max_docs=args.max_docs,
        max_tokens=args.max_tokens,
    )
    print(f"wrote {args.out}: {manifest.summary()}; domains {', '.join(manifest.domains)}")
    if documents.skipped:
        print(f"skipped {len(documents.skipped):,} files that are not UTF-8 text (found in directory walks)")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from dlcm.data.shards import verify_shards

    manifest, problems = verify_shards(args.directory, progress=not args.quiet)
    for problem in problems:
        print(f"dlcm data verify: {problem}", file=sys.stderr)
    if problems:
        print(f"dlcm data verify: error: {len(problems)} problem(s) in {args.directory}", file=sys.stderr)
        return 1
    shards = sum(len(s.shards) for s in manifest.splits.values())
    print(f"verified {args.directory}: {shards} shards match their sizes and SHA-256; {manifest.summary()}")
    return 0


def _cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from dlcm.data.tokenizer import tokenizer_sha256, train_bpe

    def texts() -> Iterator[str]:
        budget = args.max_bytes
        for doc in _documents(args):
            yield doc.text
            if budget is not None:
                budget -= len(doc.text.encode("utf-8"))
                if budget <= 0:
                    return

    tokenizer = train_bpe(texts(), args.vocab_size, args.out)
    sha = tokenizer_sha256(args.out)
    ids = tokenizer.get_vocab_size(with_added_tokens=True)
    print(f"wrote {args.out}: byte-level BPE, {ids} ids, sha256 {sha}")
    if ids < args.vocab_size:  # BPE stops when no pair of tokens occurs twice: the corpus has no more merges
        print(
            f"note: {ids} ids, not the {args.vocab_size} asked: the corpus has no more pairs to merge (give it more "
            "text for a larger vocabulary)",
            file=sys.stderr,
        )
    return 0


def _cmd_default_corpus(args: argparse.Namespace) -> int:
    from dlcm.data.corpus import ensure_default_corpus
    from dlcm.data.shards import Manifest

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
    commands = "{build,verify,train-tokenizer,default-corpus}"
    sub = parser.add_subparsers(dest="command", required=True, metavar=commands)

    def add_source_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("inputs", nargs="+", help=_INPUTS_HELP)
        p.add_argument(
            "--domain", help="domain of every document (default: prose for records and .txt/.md/.rst, else code)"
        )
        p.add_argument("--text-field", default="text", help="record field (JSON key or column) holding the text")
        p.add_argument("--id-field", default="id", help="record field with a stable document id (default: id)")
        p.add_argument("--domain-field", help="record field whose value, where present, is the document's domain")

    build = sub.add_parser("build", help="tokenize documents into train/val webdataset shards")
    add_source_arguments(build)
    build.add_argument("--tokenizer", required=True, help="tokenizer.json (or its directory), or 'deepseek-v3'")
    build.add_argument("--out", required=True, type=Path, help="output directory (resumes an interrupted build)")
    build.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    build.add_argument("--docs-per-shard", type=int, default=2048, help="documents per shard file (default 2048)")
    build.add_argument("--seed", type=int, default=0, help="seed of the document-level train/val split")
    build.add_argument("--workers", type=int, default=1, help="tokenizing processes (same output for any number)")
    build.add_argument("--max-docs", type=_count, help="keep only the first N documents of the inputs")
    build.add_argument("--max-tokens", type=_count, help="stop once the shards hold N tokens (e.g. 100e9)")
    build.add_argument(
        "--dry-run", action="store_true", help="estimate tokens, disk and time from a sample; write nothing"
    )
    build.add_argument("--overwrite", action="store_true", help="replace a finished or conflicting build in --out")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(run=_cmd_build)

    verify = sub.add_parser("verify", help="check every shard's size and SHA-256 against the manifest")
    verify.add_argument("directory", help="shard directory (local path or fsspec URL)")
    verify.add_argument("--quiet", action="store_true", help="no progress bar")
    verify.set_defaults(run=_cmd_verify)

    train = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer.json")
    add_source_arguments(train)
    train.add_argument("--vocab-size", type=int, required=True, help="ids including <|endoftext|> (>= 257)")
    train.add_argument("--out", required=True, type=Path, help="path of the tokenizer.json to write")
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
        # An OSError as "No such file or directory: <path>", not Python's "[Errno 2] …: '<path>'".
        message = f"{err.strerror}: {err.filename}" if isinstance(err, OSError) and err.filename else err
        print(f"dlcm data {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command == "build":
            print(
                f"dlcm data build: interrupted; run the same command again to resume into {args.out}", file=sys.stderr
            )
        return 130
