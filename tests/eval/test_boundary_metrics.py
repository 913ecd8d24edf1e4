"""Boundary precision/recall (dlcm/eval/boundary_metrics.py): hand-built cases, the greedy matching against a maximum
bipartite matching, and the chance reference."""

from __future__ import annotations

import pytest
import torch

from dlcm.eval.boundary_metrics import BoundaryScores, boundary_scores, chance_boundaries


def flags(n: int, positions: list[int]) -> torch.Tensor:
    out = torch.zeros(n, dtype=torch.bool)
    out[positions] = True
    return out


def test_docstring_example() -> None:
    cu = torch.tensor([0, 10], dtype=torch.int32)
    true, pred = flags(10, [0, 2, 5, 8]), flags(10, [0, 2, 3, 6])
    exact = boundary_scores(pred, true, cu, 0)
    assert (exact.true_positives, exact.predicted, exact.actual) == (1, 3, 3)
    assert exact.precision == pytest.approx(1 / 3) and exact.recall == pytest.approx(1 / 3)
    near = boundary_scores(pred, true, cu, 1)
    assert (near.true_positives, near.precision, near.recall) == (2, pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert near.f1 == pytest.approx(2 / 3)


def test_document_starts_do_not_count_and_matches_stay_inside_documents() -> None:
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    # Both mark only the document starts: nothing to score.
    starts = flags(8, [0, 4])
    none = boundary_scores(starts, starts, cu, 1)
    assert (none.true_positives, none.predicted, none.actual) == (0, 0, 0)
    assert (none.precision, none.recall, none.f1) == (0.0, 0.0, 0.0)
    # A prediction at the last token of document 0 must not match a true boundary at token 5 of document 1
    # (distance 2, and across a document), nor at tolerance 2.
    true, pred = flags(8, [0, 4, 5]), flags(8, [0, 3, 4])
    assert boundary_scores(pred, true, cu, 2).true_positives == 0


def test_one_to_one_and_perfect() -> None:
    cu = torch.tensor([0, 12], dtype=torch.int32)
    true = flags(12, [0, 5])
    pred = flags(12, [0, 4, 5, 6])  # three candidates for one true boundary at ±1
    s = boundary_scores(pred, true, cu, 1)
    assert (s.true_positives, s.predicted, s.actual) == (1, 3, 1)
    perfect = boundary_scores(true, true, cu, 0)
    assert (perfect.precision, perfect.recall, perfect.f1) == (1.0, 1.0, 1.0)


def max_matching(pred: list[int], true: list[int], tolerance: int) -> int:
    """Kuhn's augmenting paths: the reference maximum matching of predictions to true boundaries."""
    owner: dict[int, int] = {}

    def augment(p: int, seen: set[int]) -> bool:
        for t in true:
            if abs(t - p) <= tolerance and t not in seen:
                seen.add(t)
                if t not in owner or augment(owner[t], seen):
                    owner[t] = p
                    return True
        return False

    return sum(augment(p, set()) for p in pred)


@pytest.mark.parametrize("tolerance", [0, 1, 2, 3])
def test_greedy_matching_is_maximum(tolerance: int) -> None:
    g = torch.Generator().manual_seed(tolerance)
    for _ in range(200):
        n = int(torch.randint(2, 40, (1,), generator=g))
        cu = torch.tensor([0, n], dtype=torch.int32)
        pred = torch.rand(n, generator=g) < 0.3
        true = torch.rand(n, generator=g) < 0.3
        pred[0] = true[0] = True
        got = boundary_scores(pred, true, cu, tolerance).true_positives
        p = torch.nonzero(pred[1:]).flatten().add(1).tolist()
        t = torch.nonzero(true[1:]).flatten().add(1).tolist()
        assert got == max_matching(p, t, tolerance)


def test_scores_add_up_over_batches_and_errors() -> None:
    a, b = BoundaryScores(1, 2, 4, 5), BoundaryScores(1, 1, 2, 3)
    total = a + b
    assert (total.true_positives, total.predicted, total.actual) == (3, 6, 8)
    with pytest.raises(ValueError, match="tolerance 1 and 0"):
        a + BoundaryScores(0, 0, 0, 0)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="tolerance=-1"):
        boundary_scores(flags(4, [0]), flags(4, [0]), cu, -1)
    with pytest.raises(ValueError, match="equal-length"):
        boundary_scores(flags(4, [0]), flags(5, [0]), cu)
    with pytest.raises(ValueError, match="cu_seqlens ends at 4"):
        boundary_scores(flags(5, [0]), flags(5, [0]), cu)


def test_chance_keeps_counts_per_document() -> None:
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    pred = flags(30, [0, 3, 4, 10, 12, 20, 25])
    g = torch.Generator().manual_seed(0)
    ref = chance_boundaries(pred, cu, g)
    assert ref[0] and ref[10]
    assert int(ref[1:10].sum()) == 2 and int(ref[11:30].sum()) == 3
