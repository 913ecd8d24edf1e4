"""A synthetic phrase language with known concept boundaries, for tests and parser experiments.

A fixed inventory of phrases (random token strings of 2–6 tokens) is sampled with replacement and concatenated:
inside a phrase the next token is determined by the previous ones, at a phrase start it is uniformly uncertain.
A good parser should therefore place boundaries at phrase starts, and the mean phrase length sets the natural
compression ratio. Streams come packed into fixed-size documents, with the true phrase-start mask alongside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PhraseBatch:
    """One packed micro-batch: token ids, document offsets and the true phrase starts."""

    input_ids_T: torch.Tensor  # int64 [T]
    cu_seqlens: torch.Tensor  # int32 [docs + 1]
    phrase_start_T: torch.Tensor  # bool [T]


class PhraseLanguage:
    """Random phrase inventory over ``vocab_size`` tokens; deterministic given ``seed``."""

    def __init__(self, vocab_size: int, n_phrases: int, min_len: int = 2, max_len: int = 6, seed: int = 0) -> None:
        if not 1 <= min_len <= max_len:
            raise ValueError(f"phrase lengths min_len={min_len}, max_len={max_len}: need 1 <= min_len <= max_len")
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(min_len, max_len + 1, (n_phrases,), generator=g)
        self.phrases = [torch.randint(0, vocab_size, (int(n),), generator=g) for n in lengths]
        self.vocab_size = vocab_size

    @property
    def mean_phrase_length(self) -> float:
        return sum(len(p) for p in self.phrases) / len(self.phrases)

    def batch(self, total_tokens: int, doc_len: int, generator: torch.Generator) -> PhraseBatch:
        """``total_tokens`` tokens cut into documents of ``doc_len`` (the last may be shorter)."""
        ids, starts, n = [], [], 0
        while n < total_tokens:
            phrase = self.phrases[int(torch.randint(0, len(self.phrases), (1,), generator=generator))]
            ids.append(phrase)
            starts.append(torch.arange(len(phrase)) == 0)
            n += len(phrase)
        offsets = [*range(0, total_tokens, doc_len), total_tokens]
        return PhraseBatch(
            torch.cat(ids)[:total_tokens],
            torch.tensor(offsets, dtype=torch.int32),
            torch.cat(starts)[:total_tokens],
        )
