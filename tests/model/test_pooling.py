"""Concept layout and mean pooling against per-concept Python loops; gradcheck in float64."""

from __future__ import annotations

import torch

from dlcm.model.packing import PackedSeqs
from dlcm.model.pooling import concept_layout, mean_pool
from tests.conftest import random_boundaries, random_cu_seqlens


def loop_layout(boundary_T: torch.Tensor, cu_seqlens: torch.Tensor):
    """Concepts as lists of token indices per document, built one token at a time."""
    docs = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        concepts: list[list[int]] = []
        for t in range(start, end):
            if boundary_T[t]:
                concepts.append([])
            concepts[-1].append(t)
        docs.append(concepts)
    return docs


def test_layout_matches_docstring_example() -> None:
    cu = random_cu_seqlens([5, 3])
    boundary_T = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0], dtype=torch.bool)
    layout = concept_layout(boundary_T, PackedSeqs.from_cu_seqlens(cu, 8))
    assert layout.concept_id_T.tolist() == [0, 0, 1, 1, 1, 2, 3, 3]
    assert layout.seqs.cu_seqlens.tolist() == [0, 2, 4]
    assert layout.start_C.tolist() == [0, 2, 5, 6]
    assert layout.length_C.tolist() == [2, 3, 1, 2]
    assert layout.seqs.position.tolist() == [0, 1, 0, 1]
    assert layout.seqs.max_seqlen == 2


def test_layout_and_pooling_match_python_loop() -> None:
    g = torch.Generator().manual_seed(0)
    cu = random_cu_seqlens([1, 9, 30, 2, 17])
    boundary_T = random_boundaries(cu, 0.3, g)
    h_TD = torch.randn(int(cu[-1]), 6, generator=g, dtype=torch.float64)
    layout = concept_layout(boundary_T, PackedSeqs.from_cu_seqlens(cu, h_TD.shape[0]))
    docs = loop_layout(boundary_T, cu)
    flat = [c for doc in docs for c in doc]
    assert layout.num_concepts == len(flat)
    assert layout.seqs.cu_seqlens.tolist() == [0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()]
    assert layout.start_C.tolist() == [c[0] for c in flat]
    assert layout.length_C.tolist() == [len(c) for c in flat]
    assert layout.seqs.doc_id.tolist() == [i for i, d in enumerate(docs) for _ in d]
    expected_CD = torch.stack([h_TD[c].mean(0) for c in flat])
    torch.testing.assert_close(mean_pool(h_TD, layout.concept_id_T, layout.length_C), expected_CD)


def test_every_token_its_own_concept_is_the_identity() -> None:
    cu = random_cu_seqlens([4, 3])
    h_TD = torch.randn(7, 5)
    layout = concept_layout(torch.ones(7, dtype=torch.bool), PackedSeqs.from_cu_seqlens(cu, 7))
    torch.testing.assert_close(mean_pool(h_TD, layout.concept_id_T, layout.length_C), h_TD)


def test_pooling_accumulates_bf16_in_fp32() -> None:
    h_TD = torch.full((512, 4), 1.0 + 2**-7, dtype=torch.bfloat16)  # bf16 sums of these round badly
    layout = concept_layout(
        torch.tensor([True] + [False] * 511), PackedSeqs.from_cu_seqlens(random_cu_seqlens([512]), 512)
    )
    pooled = mean_pool(h_TD, layout.concept_id_T, layout.length_C)
    assert pooled.dtype == torch.bfloat16
    assert torch.equal(pooled, h_TD[:1])


def test_pooling_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(1)
    cu = random_cu_seqlens([3, 6])
    boundary_T = random_boundaries(cu, 0.4, g)
    layout = concept_layout(boundary_T, PackedSeqs.from_cu_seqlens(cu, 9))
    h_TD = torch.randn(9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: mean_pool(h, layout.concept_id_T, layout.length_C), (h_TD,))
