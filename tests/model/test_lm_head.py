"""The LM head's aligned GEMM (weight zero-padded to a multiple of VOCAB_ALIGN rows, for training's many rows) and
its plain one (decoding's few rows) compute ``x W^T / s_token`` with the true vocabulary, forward and backward."""

from __future__ import annotations

import pytest
import torch

from dlcm.model.lm_head import ALIGN_MIN_ROWS, VOCAB_ALIGN, LMHead


@pytest.mark.parametrize("rows", [1, 7, ALIGN_MIN_ROWS, ALIGN_MIN_ROWS + 3])
@pytest.mark.parametrize("d_base", [None, 8])
def test_head_equals_the_plain_product_on_both_paths(rows: int, d_base: int | None) -> None:
    torch.manual_seed(0)
    vocab = 3 * VOCAB_ALIGN + 5  # unaligned, as the DeepSeek-V3 vocabulary
    head = LMHead(16, vocab, std=0.02, d_base=d_base).double()
    x = torch.randn(rows, 16, dtype=torch.float64, requires_grad=True)
    logits = head(x)
    expected = x @ head.proj.weight.T * (1.0 if d_base is None else d_base / 16)
    assert logits.shape == (rows, vocab)
    torch.testing.assert_close(logits, expected, atol=1e-12, rtol=0)
    grad = torch.randn_like(logits)
    got = torch.autograd.grad(logits, (x, head.proj.weight), grad)
    want = torch.autograd.grad(expected, (x, head.proj.weight), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)
