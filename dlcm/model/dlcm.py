"""The four-stage DLCM network (paper Eqs. 1–4 and 11–15), on packed token streams."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dlcm.model.block import TransformerStack
from dlcm.model.config import DLCMConfig, ParserConfig
from dlcm.model.cross_attention import CrossAttentionBlock
from dlcm.model.linear import Embedding, mup_std
from dlcm.model.linear_cross_entropy import TokenLoss
from dlcm.model.lm_head import LMHead
from dlcm.model.packing import PackedSeqs
from dlcm.model.parser import GlobalParser, ParserOutput, decision_disagreement
from dlcm.model.pooling import ConceptLayout, ConceptPooling, concept_layout
from dlcm.model.ratio_loss import RatioLoss, RatioStats
from dlcm.model.smoothing import ConceptSmoothing


@dataclass
class DLCMOutput:
    """Logits (or, given targets, the fused cross-entropy) plus everything the losses and the logging callbacks
    need from the same forward pass."""

    logits_TV: torch.Tensor | None  # None when the forward was given targets
    aux_loss: torch.Tensor  # L_aux (Eq. 10), unweighted; the total loss adds aux_weight · aux_loss
    midpoint_loss: torch.Tensor  # mean 4p(1 − p) over non-forced tokens, unweighted (parser.midpoint_weight)
    # mean P(sampled b ≠ thresholded b) over non-forced tokens, unweighted (parser.consistency_weight)
    consistency_loss: torch.Tensor
    ratio: RatioStats
    parser: ParserOutput
    layout: ConceptLayout
    tokens: PackedSeqs
    lm_loss: TokenLoss | None = None  # the head's fused CE, when the forward was given targets


class DLCM(nn.Module):
    """Encoder E → global parser → mean pooling + W_up → concept backbone M → smoothing S → Ψ → decoder D.

    ``forward(input_ids_T, cu_seqlens_tok)`` takes one packed stream of ``T`` tokens. In training mode with
    ``parser.boundary_mode='sample'`` boundaries are sampled (pass a ``generator`` for reproducible draws);
    otherwise, and always in eval mode, they are thresholded at ``p ≥ τ``. With ``parser.threshold_mode=
    'calibrated'`` every training forward reports the τ that realises R on its batch
    (``parser.threshold_estimate``); a forward never moves τ: the training loop passes an optimizer step's
    estimates to :meth:`fold_threshold` once per step. Given ``targets_T`` the head returns the cross-entropy
    fused with its GEMM (``lm_loss``) instead of ``[T, V]`` logits.
    """

    def __init__(self, cfg: DLCMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d_tok, d_cpt = cfg.d_token, cfg.d_concept
        std_tok = mup_std(cfg.init_std, d_tok, cfg.d_base)
        std_cpt = mup_std(cfg.init_std, d_cpt, cfg.d_base)
        eps, backend = cfg.norm_eps, cfg.attn_backend
        self.embed = Embedding(cfg.vocab_size, d_tok, cfg.init_std)
        self.encoder = TransformerStack(cfg.encoder, std_tok, eps, backend)
        self.parser = GlobalParser(d_tok, cfg.parser)
        self.pooling = ConceptPooling(d_tok, d_cpt, std_tok)
        self.backbone = TransformerStack(cfg.backbone, std_cpt, eps, backend)
        self.smoothing = ConceptSmoothing(cfg.smoothing)
        self.cross = CrossAttentionBlock(d_tok, d_cpt, cfg.cross, std_tok, std_cpt, cfg.init_std, eps, backend)
        self.decoder = TransformerStack(cfg.decoder, std_tok, eps, backend)
        self.head = LMHead(d_tok, cfg.vocab_size, cfg.init_std, cfg.d_base)
        self.ratio_loss = RatioLoss(cfg.parser.target_ratio, cfg.parser.ratio_scope)

    def forward(
        self,
        input_ids_T: torch.Tensor,
        cu_seqlens_tok: torch.Tensor,
        max_seqlen_tok: int | None = None,
        generator: torch.Generator | None = None,
        targets_T: torch.Tensor | None = None,
    ) -> DLCMOutput:
        tok = PackedSeqs.from_cu_seqlens(cu_seqlens_tok, input_ids_T.shape[0], max_seqlen_tok)
        h_TD = self.encoder(self.embed(input_ids_T), tok)
        sample = self.training and self.cfg.parser.boundary_mode == "sample"
        estimate = self.training and self.cfg.parser.threshold_mode == "calibrated"
        parsed = self.parser(h_TD, tok, sample=sample, generator=generator, estimate_threshold=estimate)
        layout = concept_layout(parsed.boundary_T, tok)
        z_CD = self.backbone(self.pooling(h_TD, layout), layout.seqs)
        z_CD = self.smoothing(z_CD, parsed.prob_T, layout)
        x_TD = self.cross(h_TD, z_CD, layout, tok, parsed.confidence_T)
        head_out = self.head(self.decoder(x_TD, tok), targets_T)
        logits_TV, lm_loss = (None, head_out) if targets_T is not None else (head_out, None)
        ratio = self.ratio_loss(parsed.prob_T, parsed.boundary_T, tok)
        midpoint = midpoint_loss(parsed.prob_T, tok)
        consistency = interior_mean(decision_disagreement(parsed.prob_T, self.parser.alpha), tok)
        return DLCMOutput(logits_TV, ratio.loss, midpoint, consistency, ratio, parsed, layout, tok, lm_loss)

    def fold_threshold(self, estimates: Sequence[torch.Tensor | None]) -> None:
        """After an optimizer step: fold its micro-batches' ``parser.threshold_estimate`` values into τ (averaged
        over the data-parallel ranks the ratio loss reduces over). Training loops call it once per step."""
        self.parser.fold_threshold(estimates, self.ratio_loss.process_group)


def parser_loss(cfg: ParserConfig, out: DLCMOutput) -> torch.Tensor:
    """The parser's terms of the total loss: ``λ·L_aux`` (Eq. 15) plus the optional boundary penalties."""
    loss = cfg.aux_weight * out.aux_loss
    if cfg.midpoint_weight:
        loss = loss + cfg.midpoint_weight * out.midpoint_loss
    if cfg.consistency_weight:
        loss = loss + cfg.consistency_weight * out.consistency_loss
    return loss


def interior_mean(value_T: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
    """Mean of a per-token value over the tokens whose boundary is not forced (document starts excluded)."""
    interior_T = (seqs.position != 0).to(value_T.dtype)
    return (value_T * interior_T).sum() / interior_T.sum().clamp(min=1.0)


def midpoint_loss(prob_T: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
    """``mean 4p(1 − p)`` over the tokens whose boundary is not forced: 1 at p = 0.5, 0 at p ∈ {0, 1}. Weighted by
    ``parser.midpoint_weight`` it pushes probabilities away from the undecided middle."""
    return interior_mean(4.0 * prob_T * (1.0 - prob_T), seqs)
