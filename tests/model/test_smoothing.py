"""Causal EMA smoothing against the sequential recurrence, including very long documents."""

from __future__ import annotations

import torch

from dlcm.model.packing import PackedSeqs
from dlcm.model.pooling import concept_layout
from dlcm.model.smoothing import P_MIN, ConceptSmoothing
from tests.conftest import random_boundaries, random_cu_seqlens


def sequential_ema(z_CD: torch.Tensor, keep_C: torch.Tensor, doc_start_C: torch.Tensor) -> torch.Tensor:
    out, prev = [], None
    for k in range(z_CD.shape[0]):
        prev = z_CD[k] if doc_start_C[k] else keep_C[k] * z_CD[k] + (1 - keep_C[k]) * prev
        out.append(prev)
    return torch.stack(out)


def smooth_case(doc_lengths: list[int], rate: float, seed: int, prob_range: tuple[float, float] = (0.0, 1.0)):
    g = torch.Generator().manual_seed(seed)
    cu = random_cu_seqlens(doc_lengths)
    total = int(cu[-1])
    boundary_T = random_boundaries(cu, rate, g)
    lo, hi = prob_range
    prob_T = lo + (hi - lo) * torch.rand(total, generator=g, dtype=torch.float64)
    layout = concept_layout(boundary_T, PackedSeqs.from_cu_seqlens(cu, total))
    z_CD = torch.randn(layout.num_concepts, 4, generator=g, dtype=torch.float64)
    keep_C = prob_T[layout.start_C].clamp(P_MIN, 1 - P_MIN)
    expected = sequential_ema(z_CD, keep_C, layout.seqs.position == 0)
    return ConceptSmoothing("ema")(z_CD, prob_T, layout), expected, layout


def test_ema_matches_sequential_recurrence_across_documents() -> None:
    out, expected, _ = smooth_case([7, 1, 40, 13, 64], rate=0.5, seed=0)
    torch.testing.assert_close(out, expected)


def test_ema_is_stable_on_a_long_document_with_tiny_update_rates() -> None:
    # 3000 concepts whose P sits at the clamp floor: an exp(-cumsum) formulation would underflow to 0/0 here.
    out, expected, layout = smooth_case([3000], rate=1.0, seed=1, prob_range=(0.0, 1e-6))
    assert layout.num_concepts == 3000
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected)


def test_documents_do_not_mix() -> None:
    g = torch.Generator().manual_seed(2)
    cu = random_cu_seqlens([9, 6])
    layout = concept_layout(random_boundaries(cu, 0.6, g), PackedSeqs.from_cu_seqlens(cu, 15))
    prob_T = torch.rand(15, generator=g, dtype=torch.float64)
    z_CD = torch.randn(layout.num_concepts, 4, generator=g, dtype=torch.float64)
    in_first_doc = layout.seqs.doc_id == 0
    perturbed = z_CD + 10.0 * in_first_doc[:, None]
    smooth = ConceptSmoothing("ema")
    second = ~in_first_doc
    torch.testing.assert_close(smooth(perturbed, prob_T, layout)[second], smooth(z_CD, prob_T, layout)[second])
    # …and a document's first smoothed concept is its raw concept.
    first_rows = layout.seqs.position == 0
    torch.testing.assert_close(smooth(z_CD, prob_T, layout)[first_rows], z_CD[first_rows])


def test_identity_smoothing_returns_its_input() -> None:
    z_CD = torch.randn(5, 3)
    assert ConceptSmoothing("identity")(z_CD, torch.zeros(9), None) is z_CD
