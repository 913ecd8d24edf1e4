"""Document sources, the dlcm-shards-v2 writer/reader and `dlcm data` end to end.

Shards must round-trip (decoded ids == the tokenizer's ids of each input document), split per document, resume to
byte-identical files, and fail loudly, naming the file, when anything is missing, damaged or mismatched.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dlcm.data.build_cli import main as data_main
from dlcm.data.shards import SPLITS, Manifest, assign_split, build_shards, iter_shard_documents
from dlcm.data.sources import Document, iter_documents
from dlcm.data.tokenizer import encode_documents, load_tokenizer, train_bpe

WORDS = ["in", "the", "beginning", "was", "word", "and", "def", "return", "self", "import", "ünï", "中文", "🤖"]


def synthetic_docs(n: int, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) + rng.choice(["", "\n", "\n\n  x"])
        docs.append(Document(f"doc/{i:04d}.txt", text, rng.choice(["prose", "code"])))
    return docs


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe((d.text for d in synthetic_docs(300, seed=99)), 320, path)
    return path


@pytest.fixture(scope="module")
def other_tok_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok2") / "tokenizer.json"
    train_bpe((d.text for d in synthetic_docs(300, seed=98)), 290, path)
    return path


def read_all(manifest: Manifest) -> dict[str, list[tuple[list[int], dict]]]:
    return {
        split: [(ids.tolist(), meta) for p in manifest.shard_paths(split) for ids, meta in iter_shard_documents(p)]
        for split in SPLITS
    }


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


# --- sources ---


def test_sources_files_jsonl_dirs_globs(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello prose")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "d.jsonl").write_text(
        '{"text": "one", "id": "x1"}\n\n{"text": "two", "domain": "math"}\n{"text": ""}\n', encoding="utf-8"
    )
    src = tmp_path / "src" / "pkg"
    src.mkdir(parents=True)
    (src / "b.py").write_text("import os\n")
    (src / "a.py").write_text("x = 1\n")
    (src / "blob.bin").write_bytes(b"\xff\xfe\x00")  # not UTF-8: skipped inside a directory walk
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "a.txt").write_text("cache")
    inputs = [tmp_path / "a.txt", tmp_path / "empty.txt", tmp_path / "d.jsonl", tmp_path / "src"]
    docs = list(iter_documents(inputs, domain_field="domain"))
    assert [(d.doc_id.rsplit("/", 1)[-1], d.text, d.domain) for d in docs] == [
        ("a.txt", "hello prose", "prose"),
        ("x1", "one", "prose"),
        ("d.jsonl:3", "two", "math"),
        ("a.py", "x = 1\n", "code"),
        ("b.py", "import os\n", "code"),
    ]
    assert [d.domain for d in iter_documents([tmp_path / "d.jsonl"])] == ["prose", "prose"]  # the field is opt-in
    globbed = list(iter_documents([str(tmp_path / "src" / "**" / "*.py")], domain="python"))
    assert [d.text for d in globbed] == ["x = 1\n", "import os\n"] and {d.domain for d in globbed} == {"python"}


def test_sources_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "unterminated\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: malformed JSONL"):
        list(iter_documents([bad]))
    bad.write_text('{"id": 3}\n')
    with pytest.raises(
        ValueError, match=r"bad\.jsonl, line 1: no 'text' field \(fields: id\); pass the text field with --text-field"
    ):
        list(iter_documents([bad]))
    with pytest.raises(FileNotFoundError, match=r"missing\.txt.*does not exist"):
        iter_documents([tmp_path / "missing.txt"])  # checked before any document is read
    with pytest.raises(FileNotFoundError, match="matches no files"):
        iter_documents([str(tmp_path / "*.nothing")])


# --- shards ---


def test_round_trip_and_split(tok_path: Path, tmp_path: Path) -> None:
    docs = synthetic_docs(300)
    manifest = build_shards(docs, tok_path, tmp_path / "out", val_fraction=0.2, docs_per_shard=32, progress=False)
    tok = load_tokenizer(tok_path)
    expected = dict(zip((d.doc_id for d in docs), encode_documents(tok, [d.text for d in docs]), strict=True))
    by_id = {d.doc_id: d for d in docs}
    got = read_all(Manifest.load(tmp_path / "out"))
    seen = {split: {meta["doc_id"] for _, meta in got[split]} for split in SPLITS}
    assert not seen["train"] & seen["val"] and seen["train"] | seen["val"] == set(by_id)
    assert 0.1 < len(seen["val"]) / len(docs) < 0.3
    for split in SPLITS:
        for ids, meta in got[split]:
            doc = by_id[meta["doc_id"]]
            assert ids == expected[doc.doc_id] and tok.decode(ids) == doc.text
            assert meta == {
                "doc_id": doc.doc_id,
                "domain": doc.domain,
                "n_bytes": len(doc.text.encode()),
                "n_tokens": len(ids),
            }
            assert assign_split(doc.doc_id, 0, 0.2) == split
        info = manifest.splits[split]
        assert info.docs == len(got[split]) and info.tokens == sum(len(ids) for ids, _ in got[split])
        assert all(s.docs == 32 for s in info.shards[:-1])
    raw = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert raw["format"] == "dlcm-shards-v2" and raw["domains"] == ["code", "prose"]
    assert raw["tokenizer"]["file"] == "tokenizer.json" and (tmp_path / "out" / "tokenizer.json").is_file()
    assert not (tmp_path / "out" / ".progress.json").exists()


def interrupted(docs: list[Document], after: int) -> Iterator[Document]:
    for i, doc in enumerate(docs):
        if i == after:
            raise KeyboardInterrupt
        yield doc


@pytest.mark.parametrize("stops", [[150], [40, 41, 230]])
def test_resume_is_byte_identical(tok_path: Path, tmp_path: Path, stops: list[int]) -> None:
    docs = synthetic_docs(300)
    kwargs = dict(val_fraction=0.2, docs_per_shard=16, progress=False)
    build_shards(docs, tok_path, tmp_path / "fresh", **kwargs)
    for after in stops:
        with pytest.raises(KeyboardInterrupt):
            build_shards(interrupted(docs, after), tok_path, tmp_path / "resumed", **kwargs)
        assert not (tmp_path / "resumed" / "manifest.json").exists()
        assert (tmp_path / "resumed" / ".progress.json").exists()
    assert any((tmp_path / "resumed").glob("train-*.tar"))
    build_shards(docs, tok_path, tmp_path / "resumed", **kwargs)
    assert dir_bytes(tmp_path / "resumed") == dir_bytes(tmp_path / "fresh")


def test_resume_with_changed_inputs_fails(tok_path: Path, tmp_path: Path) -> None:
    docs = synthetic_docs(300)
    with pytest.raises(KeyboardInterrupt):
        build_shards(interrupted(docs, 200), tok_path, tmp_path / "out", docs_per_shard=16, progress=False)
    with pytest.raises(ValueError, match="inputs changed"):
        build_shards(synthetic_docs(300, seed=5), tok_path, tmp_path / "out", docs_per_shard=16, progress=False)


def test_finished_build_needs_overwrite(tok_path: Path, tmp_path: Path) -> None:
    docs = synthetic_docs(50)
    build_shards(docs, tok_path, tmp_path / "out", val_fraction=0.2, progress=False)
    with pytest.raises(ValueError, match=r"already holds a finished shard build.*overwrite"):
        build_shards(docs, tok_path, tmp_path / "out", val_fraction=0.2, progress=False)
    manifest = build_shards(docs[:10], tok_path, tmp_path / "out", val_fraction=0.3, progress=False, overwrite=True)
    assert manifest.splits["train"].docs + manifest.splits["val"].docs == 10


def test_tokenizer_mismatch_fails(tok_path: Path, other_tok_path: Path, tmp_path: Path) -> None:
    docs = synthetic_docs(100)
    build_shards(docs, tok_path, tmp_path / "done", val_fraction=0.2, progress=False)
    with pytest.raises(ValueError, match="built with another tokenizer"):
        build_shards(docs, other_tok_path, tmp_path / "done", val_fraction=0.2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_shards(
            interrupted(docs, 50), tok_path, tmp_path / "partial", val_fraction=0.2, docs_per_shard=8, progress=False
        )
    with pytest.raises(ValueError, match="unfinished build with tokenizer SHA-256"):
        build_shards(docs, other_tok_path, tmp_path / "partial", val_fraction=0.2, progress=False)
    manifest = build_shards(
        docs, other_tok_path, tmp_path / "partial", val_fraction=0.2, progress=False, overwrite=True
    )
    assert manifest.tokenizer_sha256 == Manifest.load(tmp_path / "partial").tokenizer_sha256


def test_truncated_shard_is_reported(tok_path: Path, tmp_path: Path) -> None:
    manifest = build_shards(
        synthetic_docs(100), tok_path, tmp_path / "out", val_fraction=0.2, docs_per_shard=64, progress=False
    )
    shard = manifest.shard_paths("train")[0]
    data = shard.read_bytes()
    docs = manifest.splits["train"].shards[0].docs
    for cut in (len(data) // 2, 512 * 6, 512 * 7 + 100):  # mid-member data, and cuts at/inside member headers
        shard.write_bytes(data[:cut])
        # The size check names it before any training starts; the reader, counting documents, while reading.
        with pytest.raises(ValueError, match=rf"shard .*{shard.name} is {cut:,} bytes but the manifest records"):
            Manifest.load(tmp_path / "out")
        with pytest.raises(
            ValueError, match=rf"shard .*{shard.name} (is corrupt|holds \d+ documents but).*dlcm data build"
        ):
            list(iter_shard_documents(shard, docs))


def garble_in_place(shard: Path) -> None:
    """Overwrite 8 bytes of token ids in the middle member's ``ids.npy`` payload: same size, tar structure intact."""
    with tarfile.open(shard) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".ids.npy") and m.size >= 136]
    member = members[len(members) // 2]
    data = bytearray(shard.read_bytes())
    at = member.offset_data + member.size - 8
    data[at : at + 8] = bytes(255 - b for b in data[at : at + 8])
    shard.write_bytes(bytes(data))


def test_shard_garbled_in_place_is_named_by_its_checksum(tok_path: Path, tmp_path: Path) -> None:
    manifest = build_shards(synthetic_docs(100), tok_path, tmp_path / "out", val_fraction=0.2, progress=False)
    shard, info = manifest.shard_paths("train")[0], manifest.splits["train"].shards[0]
    intact = [ids.tolist() for ids, _ in iter_shard_documents(shard, info.docs, info.sha256)]
    garble_in_place(shard)
    Manifest.load(tmp_path / "out")  # the size check cannot see it
    assert [ids.tolist() for ids, _ in iter_shard_documents(shard, info.docs)] != intact  # nor can the tar reader
    with pytest.raises(ValueError, match=rf"shard .*{shard.name} does not match its SHA-256.*dlcm data build"):
        list(iter_shard_documents(shard, info.docs, info.sha256))


def test_sample_without_ids_is_reported(tmp_path: Path) -> None:
    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard, "w") as tar:
        meta = json.dumps({"doc_id": "a", "domain": "prose", "n_bytes": 1, "n_tokens": 1}).encode()
        info = tarfile.TarInfo("000000000-a.meta.json")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    with pytest.raises(ValueError, match=r"train-000000\.tar is corrupt: sample '000000000-a' has no ids\.npy"):
        list(iter_shard_documents(shard))


def test_manifest_errors(tok_path: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"manifest\.json not found.*dlcm data build"):
        Manifest.load(tmp_path)
    manifest = build_shards(
        synthetic_docs(100), tok_path, tmp_path / "out", val_fraction=0.2, docs_per_shard=64, progress=False
    )
    path = tmp_path / "out" / "manifest.json"
    good = path.read_text()
    path.write_text(good[:50])
    with pytest.raises(ValueError, match=r"manifest\.json is corrupt.*dlcm data build"):
        Manifest.load(tmp_path / "out")
    path.write_text(good.replace('"dlcm-shards-v2"', '"dlcm-shards-v1"'))
    with pytest.raises(ValueError, match=r"written by an older dlcm \(format dlcm-shards-v1.*--overwrite"):
        Manifest.load(tmp_path / "out")
    path.write_text(good)
    manifest.shard_paths("train")[-1].unlink()
    with pytest.raises(FileNotFoundError, match=r"train-000001\.tar listed in .*manifest\.json is missing"):
        Manifest.load(tmp_path / "out")


# --- dlcm data ---


def test_cli_train_tokenizer_and_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "pkg").mkdir(parents=True)
    (corpus / "book.txt").write_text("In the beginning was the word. " * 20)
    lines = [json.dumps({"text": d.text, "id": d.doc_id}) for d in synthetic_docs(120)]
    (corpus / "docs.jsonl").write_text("\n".join(lines) + "\n")
    for i in range(30):
        (corpus / "pkg" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n")
    inputs = [str(corpus / "book.txt"), str(corpus / "docs.jsonl"), str(corpus / "pkg")]
    tok = tmp_path / "tok" / "tokenizer.json"
    assert data_main(["train-tokenizer", *inputs, "--vocab-size", "300", "--out", str(tok)]) == 0
    out = tmp_path / "shards"
    argv = ["build", *inputs, "--tokenizer", str(tok), "--out", str(out), "--val-fraction", "0.1", "--quiet"]
    assert data_main([*argv, "--docs-per-shard", "40"]) == 0
    manifest = Manifest.load(out)
    assert manifest.domains == ("code", "prose") and manifest.splits["train"].docs + manifest.splits["val"].docs == 151
    assert "wrote" in capsys.readouterr().out
    # User errors: one message, non-zero status, no traceback.
    assert data_main([*argv, "--docs-per-shard", "40"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dlcm data build: error:") and "overwrite" in err and "Traceback" not in err
    assert data_main(["build", str(tmp_path / "nothing.txt"), "--tokenizer", str(tok), "--out", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert data_main(["build", "--out", str(out)]) == 2  # argparse usage error
