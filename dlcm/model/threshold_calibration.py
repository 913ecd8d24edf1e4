"""The inference threshold τ that realises the target compression ratio on a batch.

Inference keeps token ``t`` as a concept start when ``p_t ≥ τ``. For a packed batch of ``T`` tokens in ``D``
documents (whose first tokens are forced boundaries) the ratio is ``T / (D + #{interior t: p_t ≥ τ})``, so it equals
R exactly when ``k = round(T/R) − D`` interior tokens clear τ: τ is put halfway between the ``k``-th and the
``(k+1)``-th largest interior probability. The parser averages these batch values over training, once per
optimizer step (:meth:`dlcm.model.parser.GlobalParser.fold_threshold`); a quantile of ``p``, not a trained
quantity, so it follows the router wherever the ratio loss leaves its probabilities.
"""

from __future__ import annotations

import torch

from dlcm.model.packing import PackedSeqs

# τ when no interior token may start a concept (documents shorter than R): above every probability (p ≤ 1).
ABOVE_ALL = 1.0 + 1e-6


def ratio_threshold(prob_T: torch.Tensor, seqs: PackedSeqs, target_ratio: float) -> torch.Tensor:
    """Scalar fp32 τ at which thresholding ``prob_T`` gives ``T / R`` concepts (see the module docstring).

    Ties at the cut are counted on the ``≥`` side. No host synchronisation: the counts are host integers.
    """
    total, docs = prob_T.numel(), seqs.num_docs
    interior = total - docs
    wanted = min(max(round(total / target_ratio) - docs, 0), interior)
    prob_T = prob_T.detach().float()
    if wanted == 0:
        return torch.full((), ABOVE_ALL, device=prob_T.device)
    # Document starts (p = 1 by construction) sorted below every interior probability, so order statistics of the
    # whole stream are those of the interior tokens.
    ranked_T = torch.where(seqs.position == 0, torch.full_like(prob_T, -1.0), prob_T)
    upper = torch.kthvalue(ranked_T, total - wanted + 1).values  # the wanted-th largest
    if wanted == interior:
        return upper
    lower = torch.kthvalue(ranked_T, total - wanted).values
    return (lower + upper) / 2
