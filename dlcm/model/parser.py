"""The global parser's boundary scorer and discretiser (paper §3.3.1, Eqs. 5–6).

Boundary convention: ``b_t = 1`` means token ``t`` *starts* a concept. The score compares neighbours,

    q_t = W_q h_t,  k_t = W_k h_t,  p_t = clamp((1 − cos(q_{t−1}, k_t)) / 2, 0, 1),

so ``b_t`` depends on ``h_{t−1}`` and ``h_t`` only (causal). The first token of every packed document is a
forced boundary (``p = b = 1``), which keeps concepts inside documents. Training samples
``b_t ~ Bernoulli(σ(logit(p_t)/α))``; evaluation thresholds ``p_t ≥ 0.5`` (the α → 0 limit of the same rule).
The projections are identity-initialised and run in (at least) fp32 whatever the autocast or parameter dtype.

Gradient paths (docs/design.md): with ``router_grad='aux'`` the discrete decision is decoupled from the LM loss, so
W_q/W_k learn only from the ratio loss through ``p``. With ``'ste'`` the parser also returns an H-Net style
confidence ``c_t = p_t if b_t else 1 − p_t`` made to read 1 in the forward pass; the cross-attention scales its
output by it, which routes the LM gradient into ``p``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlcm.model.config import ParserConfig
from dlcm.model.linear import Linear
from dlcm.model.packing import PackedSeqs


@dataclass
class ParserOutput:
    """What one parser pass decided; the ratio loss and the logging callbacks read it, nothing recomputes it."""

    prob_T: torch.Tensor  # fp32 p_t, differentiable (1 at document starts)
    boundary_T: torch.Tensor  # bool b_t used for pooling in this pass (sampled or thresholded)
    threshold_T: torch.Tensor  # bool [p_t ≥ 0.5] (document starts forced), for train/inference comparison
    confidence_T: torch.Tensor | None  # router_grad='ste' only: value 1, gradient into p_t


def sharpen(prob_T: torch.Tensor, alpha: float) -> torch.Tensor:
    """``σ(logit(p)/α)``: α < 1 pushes probabilities towards 0/1, α = 1 is the identity."""
    return torch.sigmoid(torch.logit(prob_T, eps=1e-6) / alpha)


class GlobalParser(nn.Module):
    """Scores, and decides, concept boundaries between neighbouring encoder states."""

    def __init__(self, d_token: int, cfg: ParserConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d_scan = cfg.d_scan or d_token
        # std is unused with identity init; kept for the μP group table.
        self.wq = Linear(d_token, d_scan, std=0.0, identity_init=True)
        self.wk = Linear(d_token, d_scan, std=0.0, identity_init=True)

    def scan_projections(self, h_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q = W_q h`` and ``k = W_k h`` in (at least) fp32, for rows of any leading shape (decoding reuses it)."""
        with torch.autocast(device_type=h_TD.device.type, enabled=False):
            acc = torch.promote_types(h_TD.dtype, torch.float32)
            return F.linear(h_TD.to(acc), self.wq.weight.to(acc)), F.linear(h_TD.to(acc), self.wk.weight.to(acc))

    @staticmethod
    def neighbour_prob(prev_q_TS: torch.Tensor, k_TS: torch.Tensor) -> torch.Tensor:
        """``p = clamp((1 − cos(q_{t−1}, k_t)) / 2, 0, 1)`` for aligned rows of previous queries and keys (Eq. 5)."""
        with torch.autocast(device_type=k_TS.device.type, enabled=False):
            cos_T = F.cosine_similarity(prev_q_TS, k_TS, dim=-1, eps=1e-8)
            return ((1.0 - cos_T) / 2.0).clamp(0.0, 1.0)

    @staticmethod
    def confidence(prob_T: torch.Tensor, boundary_T: torch.Tensor) -> torch.Tensor:
        """H-Net's ``c = p if b else 1 − p``, made to read 1 in the forward pass with its gradient into ``p``."""
        chosen_T = torch.where(boundary_T, prob_T, 1.0 - prob_T)
        return chosen_T + (1.0 - chosen_T).detach()

    def boundary_prob(self, h_TD: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
        q_TS, k_TS = self.scan_projections(h_TD)
        prob_T = F.pad(self.neighbour_prob(q_TS[:-1], k_TS[1:]), (1, 0), value=1.0)
        return torch.where(seqs.position == 0, torch.ones_like(prob_T), prob_T)

    def forward(
        self, h_TD: torch.Tensor, seqs: PackedSeqs, sample: bool, generator: torch.Generator | None = None
    ) -> ParserOutput:
        prob_T = self.boundary_prob(h_TD, seqs)
        doc_start_T = seqs.position == 0
        threshold_T = (prob_T.detach() >= 0.5) | doc_start_T
        if sample:
            uniform_T = torch.rand(prob_T.shape, generator=generator, device=prob_T.device)
            boundary_T = (uniform_T < sharpen(prob_T.detach(), self.cfg.sharpen_alpha)) | doc_start_T
        else:
            boundary_T = threshold_T
        confidence_T = self.confidence(prob_T, boundary_T) if self.cfg.router_grad == "ste" else None
        return ParserOutput(prob_T, boundary_T, threshold_T, confidence_T)
