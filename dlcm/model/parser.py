"""The global parser's boundary scorer and discretiser (paper §3.3.1, Eqs. 5–6).

Boundary convention: ``b_t = 1`` means token ``t`` *starts* a concept. The score compares neighbours,

    q_t = W_q h_t,  k_t = W_k h_t,  p_t = clamp((1 − cos(q_{t−1}, k_t)) / 2, 0, 1),

so ``b_t`` depends on ``h_{t−1}`` and ``h_t`` only (causal). The first token of every packed document is a
forced boundary (``p = b = 1``), which keeps concepts inside documents. Training samples
``b_t ~ Bernoulli(σ(logit(p_t)/α))`` and the ratio loss holds that sampled rate at 1/R; inference keeps
``p_t ≥ τ``. τ is a buffer (saved with the weights): fixed (0.5, the α → 0 limit of the sampling rule), or
calibrated on training batches so that thresholding realises the target ratio
(:mod:`dlcm.model.threshold_calibration`). A training forward only reports its batch's estimate
(``ParserOutput.threshold_estimate``); τ moves when the training loop folds an optimizer step's estimates in
(:meth:`GlobalParser.fold_threshold`), so no forward — ``torch.no_grad()`` or not — changes it. A calibrated τ only
observes training — sampling stays centred on 0.5 —
so it cannot feed back into the rate the ratio loss controls (a second controller on the same rate oscillates).
The projections are identity-initialised and run in (at least) fp32 whatever the autocast or parameter dtype.
``predictor='rule'`` drops them: ``p`` is the cosine dissimilarity of the encoder states themselves, thresholded
in training too (the paper's §8.1 rule-based ablation). Thresholded training of the learned router
(``boundary_mode='threshold'``) decides at the configured ``parser.threshold``, so there too a calibrated τ changes
only inference; the rule with a calibrated τ decides at the running τ in training as well (nothing else holds its
ratio), which is how it is compared at a learned parser's realised ratio.

Gradient paths: with ``router_grad='aux'`` the discrete decision is decoupled from the LM loss, so W_q/W_k learn
only from the ratio loss through ``p``. With ``'ste'`` the parser also returns an H-Net style confidence
``c_t = p_t if b_t else 1 − p_t`` made to read 1 in the forward pass; the cross-attention scales its output by
it, which routes the LM gradient into ``p``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dlcm.model.config import ParserConfig
from dlcm.model.linear import Linear
from dlcm.model.packing import PackedSeqs
from dlcm.model.threshold_calibration import ratio_threshold


@dataclass
class ParserOutput:
    """What one parser pass decided; the ratio loss and the logging callbacks read it, nothing recomputes it."""

    prob_T: torch.Tensor  # fp32 p_t, differentiable (1 at document starts)
    boundary_T: torch.Tensor  # bool b_t used for pooling in this pass (sampled or thresholded)
    threshold_T: torch.Tensor  # bool [p_t ≥ τ] (document starts forced): what inference decides
    confidence_T: torch.Tensor | None  # router_grad='ste' only: value 1, gradient into p_t
    # training with a calibrated τ only: the τ realising R on this micro-batch (fp32 scalar, no gradient), for the
    # optimizer step to fold into the running τ (GlobalParser.fold_threshold)
    threshold_estimate: torch.Tensor | None = None


def sharpen(prob_T: torch.Tensor, alpha: float) -> torch.Tensor:
    """``σ(logit(p)/α)``: α < 1 pushes probabilities towards 0/1, α = 1 is the identity, α = 0 is ``[p ≥ 0.5]``."""
    if alpha == 0:
        return (prob_T >= 0.5).to(prob_T.dtype)
    return torch.sigmoid(torch.logit(prob_T, eps=1e-6) / alpha)


def decision_disagreement(prob_T: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per token, the chance that the sampled training decision differs from the thresholded one at 0.5:
    ``P(b ≠ [p ≥ 0.5]) = σ(−|logit p| / α)`` (0.5 at p = 0.5, → 0 as p leaves a band of width ≈ α/4 around it;
    0 for α = 0). Differentiable in ``p``: minimising it moves only the probabilities whose decision is fragile,
    each away from the cut on its own side, so it leaves the thresholded rate unchanged to first order."""
    if alpha == 0:
        return torch.zeros_like(prob_T)
    return torch.sigmoid(-torch.logit(prob_T, eps=1e-6).abs() / alpha)


class GlobalParser(nn.Module):
    """Scores, and decides, concept boundaries between neighbouring encoder states."""

    def __init__(self, d_token: int, cfg: ParserConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.learned = cfg.predictor == "learned"
        self.d_scan = (cfg.d_scan or d_token) if self.learned else d_token
        if self.learned:
            # std is unused with identity init; kept for the μP group table.
            self.wq = Linear(d_token, self.d_scan, std=0.0, identity_init=True)
            self.wk = Linear(d_token, self.d_scan, std=0.0, identity_init=True)
        # τ and the number of batch values averaged into it: state, not parameters (no gradient, no optimizer).
        self.register_buffer("threshold", torch.empty((), dtype=torch.float32))
        self.register_buffer("threshold_updates", torch.empty((), dtype=torch.int64))
        self.alpha = cfg.sharpen_alpha  # the current α; set_progress anneals it
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reset τ to its configured start (the parser's own state; the projections reset themselves)."""
        self.threshold.fill_(self.cfg.threshold)
        self.threshold_updates.zero_()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Checkpoints written before τ was saved decided at the configured τ (0.5): load them as such.
        for name in ("threshold", "threshold_updates"):
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_progress(self, progress: float) -> None:
        """Fraction of training done (0–1): sets α along ``parser.alpha_final``'s annealing schedule."""
        self.alpha = self.cfg.alpha_at(progress)

    def scan_projections(self, h_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q = W_q h`` and ``k = W_k h`` in (at least) fp32, for rows of any leading shape (decoding reuses it);
        ``q = k = h`` for the rule predictor."""
        with torch.autocast(device_type=h_TD.device.type, enabled=False):
            acc = torch.promote_types(h_TD.dtype, torch.float32)
            if not self.learned:
                return h_TD.to(acc), h_TD.to(acc)
            return F.linear(h_TD.to(acc), self.wq.weight.to(acc)), F.linear(h_TD.to(acc), self.wk.weight.to(acc))

    @staticmethod
    def neighbour_prob(prev_q_TS: torch.Tensor, k_TS: torch.Tensor) -> torch.Tensor:
        """``p = clamp((1 − cos(q_{t−1}, k_t)) / 2, 0, 1)`` for aligned rows of previous queries and keys (Eq. 5)."""
        with torch.autocast(device_type=k_TS.device.type, enabled=False):
            cos_T = F.cosine_similarity(prev_q_TS, k_TS, dim=-1, eps=1e-8)
            return ((1.0 - cos_T) / 2.0).clamp(0.0, 1.0)

    def training_threshold(self) -> float | torch.Tensor:
        """τ of thresholded training: the configured one, so that a calibrated τ only observes a learned router —
        except for the rule predictor with a calibrated τ, which has no router for the ratio loss to steer: there
        the running τ (of earlier optimizer steps) is what holds the ratio, in training as at inference."""
        if not self.learned and self.cfg.threshold_mode == "calibrated":
            return self.threshold
        return self.cfg.threshold

    def decide(self, prob: torch.Tensor) -> torch.Tensor:
        """Inference-mode decision ``p ≥ τ`` (document starts are the caller's to force)."""
        return prob >= self.threshold

    @staticmethod
    def confidence(prob_T: torch.Tensor, boundary_T: torch.Tensor) -> torch.Tensor:
        """H-Net's ``c = p if b else 1 − p``, made to read 1 in the forward pass with its gradient into ``p``."""
        chosen_T = torch.where(boundary_T, prob_T, 1.0 - prob_T)
        return chosen_T + (1.0 - chosen_T).detach()

    def boundary_prob(self, h_TD: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
        q_TS, k_TS = self.scan_projections(h_TD)
        prob_T = F.pad(self.neighbour_prob(q_TS[:-1], k_TS[1:]), (1, 0), value=1.0)
        return torch.where(seqs.position == 0, torch.ones_like(prob_T), prob_T)

    @torch.no_grad()
    def fold_threshold(self, estimates: Sequence[torch.Tensor | None], group: dist.ProcessGroup | None = None) -> None:
        """Fold one optimizer step's micro-batch estimates (``ParserOutput.threshold_estimate``) into the running τ:
        their mean, averaged over ``group``'s ranks in one all-reduce so every rank keeps the same τ, enters a plain
        mean for the first ``1/calibration_momentum`` steps, then an EMA. ``None`` entries (a fixed τ) are skipped;
        with none left this is a no-op (every rank of ``group`` must agree on that, as they run the same steps)."""
        kept = [e for e in estimates if e is not None]
        if not kept:
            return
        step_tau = torch.stack(kept).float().mean()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(step_tau, group=group)
            step_tau /= dist.get_world_size(group)
        self.threshold_updates += 1
        weight = self.threshold_updates.reciprocal().clamp(min=self.cfg.calibration_momentum)
        self.threshold.lerp_(step_tau.to(self.threshold.dtype), weight.to(self.threshold.dtype))

    def forward(
        self,
        h_TD: torch.Tensor,
        seqs: PackedSeqs,
        sample: bool,
        generator: torch.Generator | None = None,
        estimate_threshold: bool = False,
    ) -> ParserOutput:
        """Probabilities and decisions of one pass; ``estimate_threshold`` also reports the τ that would realise R
        on this batch (training). τ itself never moves here: the batch is decided with the τ of earlier optimizer
        steps, and its own quantile would let later tokens move τ, and with it the decisions at earlier positions
        (a leak)."""
        prob_T = self.boundary_prob(h_TD, seqs)
        doc_start_T = seqs.position == 0
        threshold_T = self.decide(prob_T.detach()) | doc_start_T
        if sample and self.learned:
            uniform_T = torch.rand(prob_T.shape, generator=generator, device=prob_T.device)
            boundary_T = (uniform_T < sharpen(prob_T.detach(), self.alpha)) | doc_start_T
        elif self.training:
            boundary_T = (prob_T.detach() >= self.training_threshold()) | doc_start_T
        else:
            boundary_T = threshold_T
        confidence_T = self.confidence(prob_T, boundary_T) if self.cfg.router_grad == "ste" else None
        estimate = ratio_threshold(prob_T, seqs, self.cfg.target_ratio) if estimate_threshold else None
        return ParserOutput(prob_T, boundary_T, threshold_T, confidence_T, estimate)
