"""The head's chunked linear cross-entropy equals the plain ``cross_entropy(scale · x Wᵀ)`` in value and in the
gradients of ``x`` and ``W``: fp64 on the CPU, over chunk sizes that do and do not divide the rows, an unaligned
vocabulary with padded weight rows, the μP multiplier and ignored positions (the bf16 GPU form runs in
tests/model/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dlcm.model.baseline import DenseBaseline
from dlcm.model.linear_cross_entropy import chunk_rows, linear_cross_entropy
from dlcm.model.lm_head import VOCAB_ALIGN, LMHead
from dlcm.model.loss import IGNORE_INDEX, next_token_targets
from dlcm.model.presets import tiny_baseline


def reference_nats(x_TD: torch.Tensor, w_VD: torch.Tensor, targets_T: torch.Tensor, scale: float) -> torch.Tensor:
    return F.cross_entropy(x_TD @ w_VD.T * scale, targets_T, ignore_index=IGNORE_INDEX, reduction="none")


@pytest.mark.parametrize("rows", [5, 16, 64])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_chunked_ce_equals_the_plain_ce_in_value_and_gradient(rows: int, scale: float) -> None:
    torch.manual_seed(0)
    vocab, padded = 37, 48
    x_TD = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    w_VD = torch.randn(vocab, 8, dtype=torch.float64, requires_grad=True)
    targets_T = torch.randint(0, vocab, (23,))
    targets_T[::4] = IGNORE_INDEX
    w_PD = F.pad(w_VD, (0, 0, 0, padded - vocab))  # the head's alignment padding: never a class
    got = linear_cross_entropy(x_TD, w_PD, targets_T, scale, vocab, rows)
    want_T = reference_nats(x_TD, w_VD, targets_T, scale)
    torch.testing.assert_close(got.nats_T, want_T, atol=1e-12, rtol=0)
    torch.testing.assert_close(got.total, want_T.sum(), atol=1e-12, rtol=0)
    assert not got.nats_T.requires_grad and bool((got.nats_T[::4] == 0).all())
    # The upstream gradient of the sum is one number; the backward scales the precomputed gradients by it.
    got_grads = torch.autograd.grad(got.total * 0.3, (x_TD, w_VD))
    want_grads = torch.autograd.grad(want_T.sum() * 0.3, (x_TD, w_VD))
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def test_without_grad_only_the_nats_are_computed() -> None:
    torch.manual_seed(1)
    x_TD, w_VD = torch.randn(9, 4, dtype=torch.float64), torch.randn(11, 4, dtype=torch.float64)
    targets_T = torch.randint(0, 11, (9,))
    got = linear_cross_entropy(x_TD, w_VD, targets_T, rows=4)
    torch.testing.assert_close(got.nats_T, reference_nats(x_TD, w_VD, targets_T, 1.0), atol=1e-12, rtol=0)
    assert not got.total.requires_grad


def test_mixed_dtypes_are_refused() -> None:
    with pytest.raises(ValueError, match="must share a dtype"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(3, 4, dtype=torch.float64), torch.zeros(2).long())


def test_chunk_rows_fill_gemm_tiles() -> None:
    assert chunk_rows(128_815) == 2048  # 2^28 elements of the DeepSeek-V3 vocabulary, rounded down to 128 rows
    assert chunk_rows(10**9) == 128


@pytest.mark.parametrize("d_base", [None, 8])
def test_head_loss_equals_the_ce_of_its_logits(d_base: int | None) -> None:
    torch.manual_seed(2)
    vocab = VOCAB_ALIGN + 9
    head = LMHead(16, vocab, std=0.5, d_base=d_base).double()
    x_TD = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    targets_T = torch.randint(0, vocab, (40,))
    got = head(x_TD, targets_T)
    want_T = F.cross_entropy(head(x_TD), targets_T, reduction="none")
    torch.testing.assert_close(got.nats_T, want_T, atol=1e-12, rtol=0)
    got_grads = torch.autograd.grad(got.total, (x_TD, head.proj.weight))
    want_grads = torch.autograd.grad(want_T.sum(), (x_TD, head.proj.weight))
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def test_network_given_targets_returns_the_ce_of_its_logits() -> None:
    torch.manual_seed(3)
    model = DenseBaseline(tiny_baseline(vocab_size=64)).double()
    ids_T = torch.randint(0, model.cfg.vocab_size, (24,))
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    targets_T = next_token_targets(ids_T, cu)
    want_T = F.cross_entropy(model(ids_T, cu), targets_T, ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(model(ids_T, cu, None, targets_T).nats_T, want_T, atol=1e-12, rtol=0)


def test_under_no_grad_no_gradient_is_formed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation runs the loss under no_grad on parameters that require grad: the gradient GEMMs are skipped."""
    calls = []
    monkeypatch.setattr(torch, "mm", lambda *args, **kwargs: calls.append(args))
    w_VD = torch.randn(11, 4, requires_grad=True)
    with torch.no_grad():
        got = linear_cross_entropy(torch.randn(9, 4), w_VD, torch.randint(0, 11, (9,)), rows=4)
    assert not calls and not got.total.requires_grad
