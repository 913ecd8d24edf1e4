"""The per-token CE read through the LM head's padded GEMM output equals the CE of the plain product, in value and
in the gradients of the head's input and weight (the compiled form of both runs in tests/model/test_gpu.py)."""

from __future__ import annotations

import torch

from dlcm.model.lm_head import ALIGN_MIN_ROWS, VOCAB_ALIGN, LMHead
from dlcm.model.loss import IGNORE_INDEX, _nats, _padded_nats, padded_logits


def test_padded_logits_finds_the_heads_aligned_output_only() -> None:
    head = LMHead(8, VOCAB_ALIGN + 3, std=0.02, d_base=None)
    wide = head(torch.randn(ALIGN_MIN_ROWS, 8))  # enough rows: the aligned GEMM on a padded weight
    assert padded_logits(wide).shape == (ALIGN_MIN_ROWS, 2 * VOCAB_ALIGN)
    assert padded_logits(head(torch.randn(3, 8))) is None  # decoding's plain GEMM
    assert padded_logits(torch.randn(4, 16)[:, 2:10]) is None  # a view that does not start the row
    assert padded_logits(torch.randn(4, 16)[::2]) is None


def test_ce_through_the_padded_output_equals_the_plain_product() -> None:
    torch.manual_seed(0)
    vocab = 2 * VOCAB_ALIGN + 5
    head = LMHead(8, vocab, std=0.5, d_base=4).double()
    x_TD = torch.randn(ALIGN_MIN_ROWS, 8, dtype=torch.float64, requires_grad=True)
    targets_T = torch.randint(0, vocab, (ALIGN_MIN_ROWS,))
    targets_T[::5] = IGNORE_INDEX
    weight_T = torch.rand(ALIGN_MIN_ROWS, dtype=torch.float64)
    logits_TV = head(x_TD)
    got_T = _padded_nats(padded_logits(logits_TV), targets_T, vocab)
    want_T = _nats(x_TD @ head.proj.weight.T * (4 / 8), targets_T)
    torch.testing.assert_close(got_T, want_T, atol=1e-12, rtol=0)
    got = torch.autograd.grad((got_T * weight_T).sum(), (x_TD, head.proj.weight))
    want = torch.autograd.grad((want_T * weight_T).sum(), (x_TD, head.proj.weight))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)
