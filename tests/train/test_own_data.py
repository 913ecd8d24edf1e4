"""A user's own corpus through the front door: `dlcm data build` with its defaults, then the tiny recipe with only
`--data.data_dir` changed (plus test-size settings), on a corpus whose epoch is shorter than the validation
interval and whose default 1 % validation share would hold no document."""

from __future__ import annotations

import math
from pathlib import Path

from dlcm.cli import main
from dlcm.data.shards import Manifest, assign_split, build_shards
from dlcm.data.sources import Document
from dlcm.data.tokenizer import train_bpe
from tests.train.test_cli import FAST, scalars

RECIPE = str(Path(__file__).parents[2] / "recipes" / "dlcm_tiny_r4_defaultcorpus_cpu.yaml")
WORDS = ("in", "the", "beginning", "was", "word", "and", "light", "def", "main", "return", "self", "value")


def write_corpus(directory: Path, n_docs: int) -> list[Path]:
    directory.mkdir()
    files = []
    for i in range(n_docs):
        path = directory / f"note{i:03d}.txt"
        path.write_text(" ".join(WORDS[(i + 5 * j) % len(WORDS)] for j in range(12 + i % 9)) + "\n")
        files.append(path)
    return files


def test_fifty_documents_train_and_validate_with_the_tiny_recipe(tmp_path: Path, monkeypatch) -> None:
    files = write_corpus(tmp_path / "corpus", 50)
    # A validation fraction that the hash split meets with no document (the default 1 % does on 50 documents with
    # probability 0.6, depending on the paths): the build holds one out anyway.
    assert not any(assign_split(str(f), 0, 1e-9) == "val" for f in files)
    tok, shards = tmp_path / "tok.json", tmp_path / "shards"
    assert main(["data", "train-tokenizer", *map(str, files), "--vocab-size", "300", "--out", str(tok)]) == 0
    build = ["data", "build", *map(str, files), "--tokenizer", str(tok), "--out", str(shards), "--quiet"]
    assert main([*build, "--val-fraction", "1e-9"]) == 0
    manifest = Manifest.load(shards)
    assert manifest.splits["val"].docs == 1 and manifest.splits["train"].docs == 49
    monkeypatch.chdir(tmp_path)
    # An epoch here is two or three 512-token batches; validating every 4 batches must cross an epoch boundary.
    status = main(
        [
            "fit",
            f"--config={RECIPE}",
            f"--data.data_dir={shards}",
            *FAST,
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=4",
        ]
    )
    assert status == 0
    (log_dir,) = (tmp_path / "runs").glob("*/version_*")
    logged = scalars(log_dir)
    assert len(logged["val/loss"]) == 1 and all(math.isfinite(v) for v in logged["val/loss"])


def test_validation_split_gets_the_lowest_hash_document_only_when_empty(tmp_path: Path) -> None:
    docs = [Document(f"d{i}", f"text number {i}", "prose") for i in range(20)]
    tok = tmp_path / "tok.json"
    train_bpe((d.text for d in docs), 280, tok)
    small = build_shards(docs, tok, tmp_path / "small", val_fraction=0.01, progress=False)
    assert small.splits["val"].docs == 1 and small.splits["train"].docs == 19
    none = build_shards(docs, tok, tmp_path / "none", val_fraction=0.0, progress=False)
    assert none.splits["val"].docs == 0  # no validation asked for: none made
    usual = build_shards(docs, tok, tmp_path / "usual", val_fraction=0.3, progress=False)
    expected = sum(assign_split(d.doc_id, 0, 0.3) == "val" for d in docs)
    assert expected > 0 and usual.splits["val"].docs == expected
