"""Global parser: Eq. 6 scores, forced document starts, sampling vs threshold, and its gradient paths."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dlcm.model.config import ParserConfig
from dlcm.model.loss import cross_entropy, next_token_targets
from dlcm.model.packing import PackedSeqs
from dlcm.model.parser import GlobalParser, sharpen
from dlcm.model.presets import build_model, tiny_dlcm
from tests.conftest import random_cu_seqlens


def test_probability_is_eq6_with_forced_document_starts() -> None:
    g = torch.Generator().manual_seed(0)
    cu = random_cu_seqlens([4, 1, 6])
    h_TD = torch.randn(11, 8, generator=g, dtype=torch.float64)
    parser = GlobalParser(8, ParserConfig(d_scan=5)).double()
    torch.nn.init.normal_(parser.wq.weight, generator=g)
    torch.nn.init.normal_(parser.wk.weight, generator=g)
    seqs = PackedSeqs.from_cu_seqlens(cu, 11)
    prob_T = parser.boundary_prob(h_TD, seqs)
    q, k = h_TD @ parser.wq.weight.T, h_TD @ parser.wk.weight.T
    for t in range(11):
        if t in (0, 4, 5):
            assert prob_T[t] == 1.0
        else:
            expected = (1 - F.cosine_similarity(q[t - 1], k[t], dim=0)) / 2
            torch.testing.assert_close(prob_T[t], expected)


def test_identity_init_scores_adjacent_cosine_and_runs_in_fp32_under_bf16() -> None:
    h_TD = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]).bfloat16()
    parser = GlobalParser(2, ParserConfig())
    prob_T = parser.boundary_prob(h_TD, PackedSeqs.from_cu_seqlens(random_cu_seqlens([4]), 4))
    assert prob_T.dtype == torch.float32
    torch.testing.assert_close(prob_T, torch.tensor([1.0, 0.0, 0.5, 0.5]))


def test_threshold_mode_is_p_at_least_half_and_sampling_tracks_sharpened_p() -> None:
    cu = random_cu_seqlens([20000])
    seqs = PackedSeqs.from_cu_seqlens(cu, 20000)
    parser = GlobalParser(4, ParserConfig(sharpen_alpha=0.5))
    h_TD = torch.randn(20000, 4, generator=torch.Generator().manual_seed(1))
    out = parser(h_TD, seqs, sample=False)
    assert torch.equal(out.boundary_T[1:], out.prob_T[1:] >= 0.5)
    assert out.boundary_T[0]
    sampled = parser(h_TD, seqs, sample=True, generator=torch.Generator().manual_seed(2))
    expected_rate = sharpen(sampled.prob_T[1:], 0.5).mean()
    assert abs(sampled.boundary_T[1:].float().mean() - expected_rate) < 0.02
    assert sampled.boundary_T[0]


def test_sharpen_limits() -> None:
    p = torch.tensor([0.1, 0.4, 0.5, 0.6, 0.9])
    torch.testing.assert_close(sharpen(p, 1.0), p)
    assert torch.equal(sharpen(p, 1e-3) > 0.5, p > 0.5)


@pytest.mark.parametrize("router_grad", ["aux", "ste"])
def test_lm_loss_reaches_the_router_only_with_ste(router_grad: str) -> None:
    torch.manual_seed(0)
    cfg = tiny_dlcm(64)
    # A fixed τ: a calibrated one can make the sampled rate exactly 1/R on this small batch, zeroing L_aux's gradient.
    parser = dataclasses.replace(cfg.parser, router_grad=router_grad, threshold_mode="fixed")
    model = build_model(dataclasses.replace(cfg, parser=parser)).train()
    ids_T = torch.randint(0, 64, (48,))
    out = model(ids_T, random_cu_seqlens([30, 18]), generator=torch.Generator().manual_seed(0))
    ce = cross_entropy(out.logits_TV, next_token_targets(ids_T, out.tokens.cu_seqlens))
    router = [model.parser.wq.weight, model.parser.wk.weight]
    ce_grads = torch.autograd.grad(ce, router, retain_graph=True, allow_unused=True)
    if router_grad == "aux":
        assert all(g is None or torch.count_nonzero(g) == 0 for g in ce_grads)
    else:
        assert all(g is not None and torch.count_nonzero(g) > 0 for g in ce_grads)
    aux_grads = torch.autograd.grad(out.aux_loss, router, retain_graph=True)
    assert all(torch.count_nonzero(g) > 0 for g in aux_grads)
    # The encoder learns from both losses.
    enc = model.encoder.layers[0].ffn.w_up.weight
    assert torch.count_nonzero(torch.autograd.grad(ce, enc, retain_graph=True)[0]) > 0
    assert torch.count_nonzero(torch.autograd.grad(out.aux_loss, enc, retain_graph=True)[0]) > 0
