"""End-to-end learning: on a phrase language, a tiny DLCM learns and its parser holds the target ratio."""

from __future__ import annotations

import torch

from dlcm.data.synthetic import PhraseLanguage
from dlcm.model.loss import cross_entropy, next_token_targets
from dlcm.model.presets import build_model, tiny_dlcm

TARGET_RATIO = 4.0
STEPS = 250
TOKENS, DOC_LEN = 256, 64


def test_ratio_converges_to_target_and_loss_falls() -> None:
    torch.manual_seed(0)
    data_rng = torch.Generator().manual_seed(0)
    language = PhraseLanguage(vocab_size=64, n_phrases=48, seed=0)
    cfg = tiny_dlcm(vocab_size=64, target_ratio=TARGET_RATIO)
    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    ce_curve, boundary_rates = [], []
    for _ in range(STEPS):
        batch = language.batch(TOKENS, DOC_LEN, data_rng)
        out = model(batch.input_ids_T, batch.cu_seqlens, max_seqlen_tok=DOC_LEN)
        ce = cross_entropy(out.logits_TV, next_token_targets(batch.input_ids_T, out.tokens.cu_seqlens))
        optimizer.zero_grad()
        (ce + cfg.parser.aux_weight * out.aux_loss).backward()
        optimizer.step()
        ce_curve.append(ce.item())
        boundary_rates.append(out.ratio.boundary_rate.item())

    # Realised ratio (tokens per concept, sampled boundaries as trained) over the last 100 steps.
    realised_ratio = 1.0 / (sum(boundary_rates[-100:]) / 100)
    assert abs(realised_ratio - TARGET_RATIO) <= 0.1 * TARGET_RATIO, realised_ratio
    # Initial rate is far from the target (identity router on random states gives p ≈ 0.5).
    assert 1.0 / boundary_rates[0] < 0.75 * TARGET_RATIO
    first, last = sum(ce_curve[:10]) / 10, sum(ce_curve[-20:]) / 20
    assert last < 0.5 * first, (first, last)
