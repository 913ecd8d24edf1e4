"""Building shards from corpora as they are published, in parallel, safely.

The same records stored as JSON Lines (plain, gzip, zstd), Parquet, a ``datasets`` directory and an Arrow file
must give byte-identical shard directories, and so must 1 and 4 tokenizing workers; a second builder on the same
directory is refused while the first one's result verifies; bad input is one error naming the file, with nothing
left behind; damaged shards are named before training (size) or by ``dlcm data verify`` (checksum).
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import random
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from dlcm.data.build_cli import main as data_main
from dlcm.data.datamodule import PackedDataModule
from dlcm.data.shards import Manifest, build_shards, iter_shard_documents, verify_shards
from dlcm.data.sources import iter_documents
from dlcm.data.tokenizer import train_bpe

WORDS = ["the", "corpus", "was", "read", "as", "published", "def", "return", "ünï", "中文", "∑", "🤖"]


def records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 50)))
        out.append({"id": f"rec-{i:05d}", "text": text, "url": f"https://example.org/{i}"})
    if n > 7:
        out[7]["text"] = "   "  # blank: filtered in every format alike
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe((r["text"] for r in records(300, seed=1)), 300, path)
    return path


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def write_formats(rows: list[dict], root: Path) -> dict[str, Path]:
    """The same rows in every supported format (what the corpora ship as)."""
    import datasets

    root.mkdir(parents=True, exist_ok=True)
    data = jsonl_bytes(rows)
    paths = {
        "jsonl": root / "part.jsonl",
        "gz": root / "part.jsonl.gz",
        "zst": root / "part.jsonl.zst",
        "parquet": root / "part.parquet",
        "arrow": root / "part.arrow",
        "dataset": root / "saved_dataset",
    }
    paths["jsonl"].write_bytes(data)
    paths["gz"].write_bytes(gzip.compress(data))
    # Two concatenated frames, as parallel compressors write them.
    half = data.index(b"\n", len(data) // 2) + 1
    compressor = zstandard.ZstdCompressor()
    paths["zst"].write_bytes(compressor.compress(data[:half]) + compressor.compress(data[half:]))
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, paths["parquet"], row_group_size=64)
    with pa.OSFile(str(paths["arrow"]), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=50)
    datasets.Dataset.from_list(rows).save_to_disk(str(paths["dataset"]), max_shard_size="20KB")
    return paths


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file() and p.name != ".lock"}


# --- formats ---


def test_every_format_gives_identical_shards(tok: Path, tmp_path: Path) -> None:
    rows = records(240)
    paths = write_formats(rows, tmp_path / "corpus")
    assert len(list((paths["dataset"]).glob("*.arrow"))) > 1  # several files, read in the dataset's row order
    outputs = {}
    for fmt, path in paths.items():
        out = tmp_path / f"shards-{fmt}"
        build_shards(iter_documents([path]), tok, out, val_fraction=0.2, docs_per_shard=32, progress=False)
        outputs[fmt] = dir_bytes(out)
    reference = outputs.pop("jsonl")
    assert len([n for n in reference if n.endswith(".tar")]) > 4
    for fmt, files in outputs.items():
        assert files == reference, fmt
    manifest = Manifest.load(tmp_path / "shards-parquet")
    assert manifest.splits["train"].docs + manifest.splits["val"].docs == len(rows) - 1  # the blank one filtered
    ids = {
        meta["doc_id"]
        for split in ("train", "val")
        for p in manifest.shard_paths(split)
        for _, meta in iter_shard_documents(p)
    }
    assert ids == {r["id"] for r in rows} - {"rec-00007"}  # the records' own ids


def test_text_id_and_domain_fields(tmp_path: Path) -> None:
    rows = [{"content": "alpha", "doc": 1, "lang": "math"}, {"content": "beta", "doc": 2}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    docs = list(iter_documents([tmp_path / "x.parquet"], text_field="content", id_field="doc", domain_field="lang"))
    assert [(d.doc_id, d.text, d.domain) for d in docs] == [("1", "alpha", "math"), ("2", "beta", "prose")]
    docs = list(iter_documents([tmp_path / "x.parquet"], text_field="content", id_field="none", domain="web"))
    assert [(d.doc_id, d.domain) for d in docs] == [
        (f"{tmp_path / 'x.parquet'}:1", "web"),
        (f"{tmp_path / 'x.parquet'}:2", "web"),
    ]


def test_domain_does_not_depend_on_shell_globbing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("notes").mkdir()
    for name, text in (("a.txt", "prose text"), ("b.md", "more prose"), ("c.py", "x = 1\n")):
        Path("notes", name).write_text(text)
    expanded = [(d.doc_id, d.domain) for d in iter_documents(["notes/a.txt", "notes/b.md", "notes/c.py"])]
    quoted = [(d.doc_id, d.domain) for d in iter_documents(["notes/*"])]
    walked = [(d.doc_id, d.domain) for d in iter_documents(["notes"])]
    assert expanded == quoted == walked == [("notes/a.txt", "prose"), ("notes/b.md", "prose"), ("notes/c.py", "code")]


def test_inputs_from_fsspec_urls(tok: Path, tmp_path: Path) -> None:
    rows = records(120)
    paths = write_formats(rows, tmp_path / "corpus")
    local = [(d.text, d.domain) for d in iter_documents([paths["zst"]])]
    for spec in (paths["zst"].as_uri(), (tmp_path / "corpus").as_uri() + "/*.jsonl.zst"):
        assert [(d.text, d.domain) for d in iter_documents([spec])] == local
    source = iter_documents([paths["dataset"].as_uri()])
    assert [d.text for d in source] == [r["text"] for r in rows if r["text"].strip()]
    assert source.bytes_read == source.total_bytes > 0


# --- parallel, resumable, budgets ---


def test_one_and_four_workers_are_byte_identical(tok: Path, tmp_path: Path) -> None:
    rows = records(700)
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(rows)))
    kwargs = dict(val_fraction=0.1, docs_per_shard=24, progress=False)
    one = build_shards(iter_documents([path]), tok, tmp_path / "one", workers=1, **kwargs)
    four = build_shards(iter_documents([path]), tok, tmp_path / "four", workers=4, **kwargs)
    assert dir_bytes(tmp_path / "one") == dir_bytes(tmp_path / "four")
    assert one.splits == four.splits and len(one.splits["train"].shards) > 20


def test_budgets_cut_the_stream_and_resume_identically(tok: Path, tmp_path: Path) -> None:
    rows = records(400)
    path = tmp_path / "c.jsonl"
    path.write_bytes(jsonl_bytes(rows))
    kwargs = dict(val_fraction=0.2, docs_per_shard=16, progress=False)
    docs = build_shards(iter_documents([path]), tok, tmp_path / "docs", max_docs=100, **kwargs)
    assert docs.splits["train"].docs + docs.splits["val"].docs == 100
    full = build_shards(iter_documents([path]), tok, tmp_path / "full", **kwargs)
    budget = full.splits["train"].tokens // 2
    cut = build_shards(iter_documents([path]), tok, tmp_path / "cut", max_tokens=budget, workers=2, **kwargs)
    total = cut.splits["train"].tokens + cut.splits["val"].tokens
    longest = max(len(r["text"]) for r in rows)  # a byte-level BPE never has more tokens than characters
    assert budget <= total < budget + longest
    # Interrupted twice, then resumed: the same cut, byte for byte.
    for stop in (90, 170):
        source = iter_documents([path])

        def interrupted(source=source, stop=stop):
            for i, doc in enumerate(source):
                if i == stop:
                    raise KeyboardInterrupt
                yield doc

        with pytest.raises(KeyboardInterrupt):
            build_shards(interrupted(), tok, tmp_path / "resumed", max_tokens=budget, **kwargs)
    build_shards(iter_documents([path]), tok, tmp_path / "resumed", max_tokens=budget, **kwargs)
    assert dir_bytes(tmp_path / "resumed") == dir_bytes(tmp_path / "cut")
    with pytest.raises(ValueError, match=r"unfinished build with max_tokens|already holds a finished"):
        build_shards(iter_documents([path]), tok, tmp_path / "resumed", max_tokens=budget + 1, **kwargs)


# --- two builders ---


def _slow_builder(tok: str, corpus: str, out: str, started: str, block_at: int = 10, workers: int = 1) -> None:
    """A builder that stops reading at document ``block_at`` (holding the lock) until the test lets it go on."""
    from dlcm.data.shards import build_shards
    from dlcm.data.sources import iter_documents

    def documents():
        for i, doc in enumerate(iter_documents([corpus])):
            if i == block_at:
                Path(started).touch()
                while not Path(started + ".go").exists():
                    time.sleep(0.05)
            yield doc

    build_shards(documents(), tok, out, val_fraction=0.2, docs_per_shard=16, progress=False, workers=workers)


def start_builder(*args: object) -> multiprocessing.Process:
    """A builder in its own process, returned once it is blocked (``args[3]`` exists)."""
    process = multiprocessing.get_context("spawn").Process(target=_slow_builder, args=args)
    process.start()
    deadline = time.monotonic() + 120
    while not Path(str(args[3])).exists():
        assert process.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    return process


def test_a_second_builder_is_refused_and_the_first_result_verifies(
    tok: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "a.jsonl"
    corpus.write_bytes(jsonl_bytes(records(200)))
    other = tmp_path / "b.jsonl"
    other.write_bytes(jsonl_bytes(records(150, seed=9)))
    out, started = tmp_path / "shards", tmp_path / "started"
    first = start_builder(str(tok), str(corpus), str(out), str(started))
    try:
        argv = ["build", str(other), "--tokenizer", str(tok), "--out", str(out), "--quiet", "--val-fraction", "0.2"]
        assert data_main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("dlcm data build: error:") and "is being written by another `dlcm data build` (pid" in err
        assert len(err.splitlines()) == 1
        Path(str(started) + ".go").touch()
        first.join(120)
        assert first.exitcode == 0
    finally:
        if first.is_alive():
            first.kill()
    manifest, problems = verify_shards(out)
    assert problems == [] and manifest.splits["train"].docs + manifest.splits["val"].docs == 199
    assert data_main(["verify", str(out), "--quiet"]) == 0


def test_a_killed_parallel_build_resumes_byte_identical(tok: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "a.jsonl.zst"
    corpus.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(records(300))))
    build_shards(iter_documents([corpus]), tok, tmp_path / "fresh", val_fraction=0.2, docs_per_shard=16, progress=False)
    out, started = tmp_path / "killed", tmp_path / "started"
    builder = start_builder(str(tok), str(corpus), str(out), str(started), 200, 2)
    time.sleep(1.0)  # let the workers finish the chunks in flight
    builder.kill()  # SIGKILL: no cleanup runs; the kernel releases the lock
    builder.join(60)
    progress = json.loads((out / ".progress.json").read_text())
    assert sum(len(shards) for shards in progress["shards"].values()) >= 5 and not (out / "manifest.json").exists()
    build_shards(iter_documents([corpus]), tok, out, val_fraction=0.2, docs_per_shard=16, progress=False, workers=2)
    assert dir_bytes(out) == dir_bytes(tmp_path / "fresh")


# --- integrity ---


def small_build(tok: Path, tmp_path: Path, out: Path) -> Manifest:
    """200 JSON Lines records built into ``out``: 20 % validation, 32 documents per shard."""
    path = tmp_path / "c.jsonl"
    path.write_bytes(jsonl_bytes(records(200)))
    return build_shards(iter_documents([path]), tok, out, val_fraction=0.2, docs_per_shard=32, progress=False)


def test_damaged_and_foreign_shards_are_named_before_training(tok: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    manifest = small_build(tok, tmp_path, out)
    shard = manifest.shard_paths("train")[2]
    good = shard.read_bytes()
    # A flipped byte keeps the size: training starts (the fast check passes), `verify` names the shard.
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    Manifest.load(out)
    _, problems = verify_shards(out)
    assert len(problems) == 1 and f"{shard} does not match its SHA-256" in problems[0]
    assert data_main(["verify", str(out), "--quiet"]) == 1
    # A foreign shard (another size) stops the data module before any step.
    shard.write_bytes(manifest.shard_paths("train")[0].read_bytes()[:-1024])
    with pytest.raises(ValueError, match=rf"shard {shard} is [\d,]+ bytes but the manifest records {len(good):,}"):
        PackedDataModule(data_dir=str(out), tokens_per_batch=64, max_seq_len=32)
    shard.write_bytes(good)
    assert verify_shards(out)[1] == []


def test_shards_stream_through_urls_and_pipes(tok: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    manifest = small_build(tok, tmp_path, out)
    shard = manifest.shard_paths("train")[0]
    local = [(ids.tolist(), meta) for ids, meta in iter_shard_documents(shard)]
    for url in (shard.as_uri(), f"pipe:cat {shard}"):
        assert [(ids.tolist(), meta) for ids, meta in iter_shard_documents(url, 32)] == local
    kwargs = dict(tokens_per_batch=64, max_seq_len=32)
    from_url = PackedDataModule(data_dir=out.as_uri(), **kwargs)
    assert all(u.startswith("file://") for u in from_url.stream_spec("train").shards)
    from tests.data.test_datamodule import assert_same

    assert_same(
        list(from_url.train_dataloader()), list(PackedDataModule(data_dir=str(out), **kwargs).train_dataloader())
    )
    assert verify_shards(out.as_uri())[1] == []


# --- bad input: one line naming the file, nothing left behind ---


def bad_inputs(tmp_path: Path) -> list[tuple[str, list[Path], dict, str]]:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "empty.jsonl").write_bytes(b"")
    (d / "blank.jsonl").write_bytes(b'{"text": "  "}\n{"text": ""}\n')
    (d / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (d / "latin1.txt").write_bytes(b"caf\xe9 au lait")
    (d / "notparquet.parquet").write_bytes(b"PAR1 this is not a parquet file")
    pq.write_table(pa.Table.from_pylist([{"body": "x"}]), d / "nofield.parquet")
    (d / "nofield.jsonl").write_bytes(b'{"body": "x"}\n')
    (d / "cut.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(records(50)))[:-40])
    (d / "one.jsonl").write_bytes(jsonl_bytes(records(1)))  # too few to hold one out for validation
    return [
        ("empty", [d / "empty.jsonl"], {}, r"the inputs hold no documents"),
        ("all filtered", [d / "blank.jsonl"], {}, r"the inputs hold no documents"),
        ("undecodable line", [d / "latin1.jsonl"], {}, rf"{d / 'latin1.jsonl'}, line 2: not UTF-8"),
        ("undecodable file", [d / "latin1.txt"], {}, rf"{d / 'latin1.txt'} is not UTF-8 text"),
        (
            "unreadable parquet",
            [d / "notparquet.parquet"],
            {},
            rf"{d / 'notparquet.parquet'} is not a readable Parquet",
        ),
        (
            "missing column",
            [d / "nofield.parquet"],
            {},
            rf"{d / 'nofield.parquet'} has no 'text' column \(columns: body\)",
        ),
        ("missing field", [d / "nofield.jsonl"], {}, rf"{d / 'nofield.jsonl'}, line 1: no 'text' field"),
        ("cut gzip", [d / "cut.jsonl.gz"], {}, rf"{d / 'cut.jsonl.gz'}: cannot decompress or read it"),
        ("empty val split", [d / "one.jsonl"], {"val_fraction": 0.01}, r"the validation split is empty: none of the 1"),
    ]


def test_bad_input_is_one_line_naming_the_file_and_leaves_nothing(tok: Path, tmp_path: Path) -> None:
    for what, inputs, kwargs, message in bad_inputs(tmp_path):
        out = tmp_path / "out" / what.replace(" ", "_")
        with pytest.raises(ValueError, match=message) as err:
            build_shards(iter_documents(inputs), tok, out, docs_per_shard=2, progress=False, **kwargs)
        assert "\n" not in str(err.value), what
        assert not out.exists(), what  # not even the directory


def test_cli_build_options_dry_run_and_errors(tok: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"content": r["text"], "key": r["id"]} for r in records(300)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    out = tmp_path / "shards"
    base = ["build", str(tmp_path / "a.parquet"), "--tokenizer", str(tok), "--out", str(out), "--quiet"]
    fields = ["--text-field", "content", "--id-field", "key", "--domain", "web", "--val-fraction", "0.1"]
    assert data_main([*base, *fields, "--dry-run"]) == 0
    report = capsys.readouterr().out
    assert "estimated: " in report and "tokens" in report and "GB of shards" in report and not out.exists()
    assert data_main([*base[:-1], *fields, "--workers", "2", "--max-tokens", "2e3", "--docs-per-shard", "50"]) == 0
    progress = capsys.readouterr().err
    assert "docs/s" in progress and "tokens/s" in progress
    manifest = Manifest.load(out)
    assert manifest.domains == ("web",) and manifest.splits["train"].tokens + manifest.splits["val"].tokens >= 2000
    assert data_main([*base[:-1], "--text-field", "body", "--out", str(tmp_path / "x"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no 'body' column (columns: content, key)" in err
    assert not (tmp_path / "x").exists()
    assert data_main([*base, "--max-tokens", "1.5"]) == 2  # argparse: not a whole number


@pytest.mark.slow
def test_cli_end_to_end_in_a_subprocess(tok: Path, tmp_path: Path) -> None:
    """`dlcm data build` as a user runs it: parallel workers from the installed entry point, then verify."""
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_bytes(records(300))))
    out = tmp_path / "shards"
    dlcm = str(Path(sys.executable).parent / "dlcm")
    cmd = [dlcm, "data", "build", str(path), "--tokenizer", str(tok), "--out", str(out)]
    done = subprocess.run(
        [*cmd, "--workers", "2", "--val-fraction", "0.1"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "docs/s" in done.stderr and "tokens/s" in done.stderr  # the progress bar
    verified = subprocess.run([dlcm, "data", "verify", str(out)], capture_output=True, text=True, timeout=300)
    assert verified.returncode == 0 and "match their sizes and SHA-256" in verified.stdout
