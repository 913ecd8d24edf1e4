"""Leak-freedom of the whole network: perturbing the future never changes logits at earlier positions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dlcm.model.config import ParserConfig
from dlcm.model.presets import build_model, tiny_baseline, tiny_dlcm
from tests.conftest import random_cu_seqlens

DOCS = [14, 25, 9]
VOCAB = 64


def logits_of(model, ids_T: torch.Tensor, cu: torch.Tensor, seed: int) -> torch.Tensor:
    if hasattr(model, "parser"):
        # Every call draws the same uniforms at every position: the sampled boundaries at ≤ t see the same draws
        # (τ stays put: only the training loop's fold moves it).
        return model(ids_T, cu, generator=torch.Generator().manual_seed(seed)).logits_TV
    return model(ids_T, cu)


@pytest.mark.parametrize("family", ["dlcm-sample", "dlcm-threshold", "dlcm-ste", "baseline"])
def test_future_tokens_do_not_change_past_logits(family: str) -> None:
    torch.manual_seed(0)
    if family == "baseline":
        model = build_model(tiny_baseline(VOCAB)).double()
    else:
        cfg = tiny_dlcm(VOCAB)
        mode = "threshold" if family == "dlcm-threshold" else "sample"
        grad = "ste" if family == "dlcm-ste" else "aux"
        parser = ParserConfig(boundary_mode=mode, router_grad=grad)
        model = build_model(dataclasses.replace(cfg, parser=parser)).double()
    model.train()
    cu = random_cu_seqlens(DOCS)
    total = int(cu[-1])
    g = torch.Generator().manual_seed(1)
    ids_T = torch.randint(0, VOCAB, (total,), generator=g)
    base = logits_of(model, ids_T, cu, seed=7)
    for t in [0, 3, 13, 14, 20, 30, 38, total - 2]:
        perturbed = ids_T.clone()
        perturbed[t + 1 :] = torch.randint(0, VOCAB, (total - t - 1,), generator=g)
        out = logits_of(model, perturbed, cu, seed=7)
        torch.testing.assert_close(out[: t + 1], base[: t + 1], rtol=1e-9, atol=1e-9)
        assert not torch.allclose(out[t + 1 :], base[t + 1 :])


@pytest.mark.parametrize("family", ["dlcm", "baseline"])
def test_documents_never_see_each_other(family: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_dlcm(VOCAB) if family == "dlcm" else tiny_baseline(VOCAB)).double().eval()
    cu = random_cu_seqlens(DOCS)
    total = int(cu[-1])
    g = torch.Generator().manual_seed(2)
    ids_T = torch.randint(0, VOCAB, (total,), generator=g)
    base = logits_of(model, ids_T, cu, seed=0)
    # Replace the first and last documents entirely: the middle one must not notice.
    a, b = int(cu[1]), int(cu[2])
    perturbed = ids_T.clone()
    perturbed[:a] = torch.randint(0, VOCAB, (a,), generator=g)
    perturbed[b:] = torch.randint(0, VOCAB, (total - b,), generator=g)
    torch.testing.assert_close(logits_of(model, perturbed, cu, seed=0)[a:b], base[a:b], rtol=1e-9, atol=1e-9)
    # And a document alone gives the same logits as inside the pack.
    alone = logits_of(model, ids_T[a:b], random_cu_seqlens([b - a]), seed=0)
    torch.testing.assert_close(alone, base[a:b], rtol=1e-9, atol=1e-9)
