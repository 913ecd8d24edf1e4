"""Precision, recall and F1 of predicted concept boundaries against known ones (e.g. the phrase starts of
:mod:`dlcm.data.synthetic`), exactly and within a tolerance of ``±k`` tokens.

Document starts are boundaries by construction in both the parser's output and any reference, so they are left
out: counting them would reward a parser for what it cannot get wrong. With a tolerance, predicted and true
boundaries are matched one to one inside a document (a true boundary can validate only one prediction); scanning
both sorted lists left to right and matching each prediction to the earliest unmatched true boundary within reach
gives a maximum matching, because every match window is an interval of the same width.

Example (one document of 10 tokens, document start 0 excluded)::

    true       . . T . . T . . T .        positions 2, 5, 8
    predicted  . . P P . . P . . .        positions 2, 3, 6
    exact:  tp = 1 (2)              precision 1/3, recall 1/3
    ±1:     tp = 2 (2↔2, 6↔5; 3 finds 2 already taken)     precision 2/3, recall 2/3

A *chance* reference (:func:`chance_boundaries`) places the same number of boundaries per document uniformly at
random, so a parser that only learned the rate scores like it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BoundaryScores:
    """Matched, predicted and true boundary counts (document starts excluded) and the rates they give."""

    tolerance: int
    true_positives: int
    predicted: int
    actual: int

    @property
    def precision(self) -> float:
        return self.true_positives / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.actual if self.actual else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def __add__(self, other: BoundaryScores) -> BoundaryScores:
        if other.tolerance != self.tolerance:
            raise ValueError(f"cannot add scores at tolerance {self.tolerance} and {other.tolerance}")
        return BoundaryScores(
            self.tolerance,
            self.true_positives + other.true_positives,
            self.predicted + other.predicted,
            self.actual + other.actual,
        )

    def to_dict(self) -> dict[str, float | int]:
        return {
            "tolerance": self.tolerance,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "true_positives": self.true_positives,
            "predicted": self.predicted,
            "actual": self.actual,
        }


def _interior_positions(boundary_T: torch.Tensor, cu_seqlens: torch.Tensor) -> list[list[int]]:
    """Sorted boundary positions of each document, document starts removed."""
    flags = boundary_T.detach().bool().cpu().clone()
    offsets = cu_seqlens.detach().cpu().tolist()
    flags[torch.tensor(offsets[:-1], dtype=torch.long)] = False
    return [torch.nonzero(flags[a:b]).flatten().tolist() for a, b in itertools.pairwise(offsets)]


def _matches(predicted: list[int], actual: list[int], tolerance: int) -> int:
    matched, j = 0, 0
    for p in predicted:
        while j < len(actual) and actual[j] < p - tolerance:
            j += 1  # true boundaries left of every remaining prediction's window can never match
        if j < len(actual) and actual[j] <= p + tolerance:
            matched += 1
            j += 1
    return matched


def boundary_scores(
    predicted_T: torch.Tensor, actual_T: torch.Tensor, cu_seqlens: torch.Tensor, tolerance: int = 0
) -> BoundaryScores:
    """Scores of boolean boundary flags ``predicted_T`` against ``actual_T`` (both ``[T]``, concept starts) in the
    documents ``cu_seqlens``; a prediction within ``tolerance`` tokens of an unmatched true boundary counts."""
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance} is not allowed: a number of tokens >= 0")
    if predicted_T.shape != actual_T.shape or predicted_T.dim() != 1:
        raise ValueError(
            f"predicted_T {tuple(predicted_T.shape)} and actual_T {tuple(actual_T.shape)} must be equal-length 1-D"
        )
    if int(cu_seqlens[-1]) != predicted_T.shape[0]:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the flags cover {predicted_T.shape[0]} tokens")
    tp = n_pred = n_true = 0
    for pred, true in zip(
        _interior_positions(predicted_T, cu_seqlens), _interior_positions(actual_T, cu_seqlens), strict=True
    ):
        tp += _matches(pred, true, tolerance)
        n_pred += len(pred)
        n_true += len(true)
    return BoundaryScores(tolerance, tp, n_pred, n_true)


def chance_boundaries(predicted_T: torch.Tensor, cu_seqlens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """As many boundaries per document as ``predicted_T`` has (starts kept), at uniformly random interior spots."""
    out = torch.zeros_like(predicted_T, dtype=torch.bool, device="cpu")
    offsets = cu_seqlens.detach().cpu().tolist()
    counts = [len(p) for p in _interior_positions(predicted_T, cu_seqlens)]
    for a, b, count in zip(offsets[:-1], offsets[1:], counts, strict=True):
        out[a] = True
        if count and b - a > 1:
            out[a + 1 + torch.randperm(b - a - 1, generator=generator)[:count]] = True
    return out.to(predicted_T.device)
