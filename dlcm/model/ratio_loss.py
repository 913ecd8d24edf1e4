"""The compression-ratio loss of the global parser (paper Eq. 10) and its statistics scopes.

    L_aux = R/(R−1)·[(R−1)·F·G + (1−F)(1−G)] − 1 = (1 − R·F)(1 − R·G)/(R − 1),

with ``F`` the mean hard boundary (no gradient) and ``G`` the mean boundary probability (gradient). It is 0 at
``F = G = 1/R``; its gradient in ``G``, ``−R(1 − R·F)/(R − 1)``, pushes ``p`` down when boundaries are too
frequent and up when too rare.

Scopes (``ratio_scope``):

- ``global`` (the paper's Global Parser): ``F`` over every token of the optimizer step — all data-parallel ranks
  (all-reduced counts) and the micro-batches of the step seen so far (a running ``F`` that equals the step's ``F``
  on its last micro-batch). Because ``L_aux`` is linear in ``G`` for fixed ``F``, each rank uses
  ``G_r = W·Σ_local p / N_micro`` where ``N_micro`` is the micro-batch's token count over all ``W`` ranks: the
  data-parallel mean of the rank losses (what DDP/FSDP gradient averaging and Lightning's accumulation compute)
  then has exactly the gradient of ``L_aux`` on the union batch. Exact across micro-batches when they hold equal
  token counts, which fixed token budgets guarantee.
- ``batch``: ``F`` and ``G`` of this micro-batch on this rank (H-Net's choice).
- ``sequence``: ``L_aux`` per document, averaged over documents (the paper's "Normal" ablation, Table 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dlcm.model.packing import PackedSeqs


@dataclass
class RatioStats:
    """Loss value and the statistics it was built from (all detached except ``loss``)."""

    loss: torch.Tensor
    boundary_rate: torch.Tensor  # F as used by the loss (running step value for the global scope)
    prob_mean: torch.Tensor  # G of this micro-batch on this rank
    local_boundary_rate: torch.Tensor  # F of this micro-batch on this rank


def ratio_loss_value(boundary_rate: torch.Tensor, prob_mean: torch.Tensor, target_ratio: float) -> torch.Tensor:
    """Eq. 10 in its factored form; works element-wise (per document for the sequence scope)."""
    r = target_ratio
    return (1.0 - r * boundary_rate) * (1.0 - r * prob_mean) / (r - 1.0)


class RatioLoss(nn.Module):
    """Eq. 10 with the running optimizer-step statistics the global scope needs (no parameters).

    ``micro_batches_per_step`` (set from the trainer's gradient accumulation) makes the running ``F`` restart on
    its own at each optimizer step; ``start_step()`` restarts it explicitly. ``process_group`` is the
    data-parallel group to all-reduce over (``None``: the default group when distributed is initialised).
    """

    def __init__(self, target_ratio: float, scope: str) -> None:
        super().__init__()
        self.target_ratio = target_ratio
        self.scope = scope
        self.micro_batches_per_step = 1
        self.process_group: dist.ProcessGroup | None = None
        self.start_step()

    def start_step(self) -> None:
        self._step_boundaries = 0.0
        self._step_tokens = 0.0
        self._micro_batches_seen = 0

    def _data_parallel_size(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.process_group)
        return 1

    def forward(self, prob_T: torch.Tensor, boundary_T: torch.Tensor, seqs: PackedSeqs) -> RatioStats:
        acc = torch.promote_types(prob_T.dtype, torch.float32)
        b_T = boundary_T.to(acc)
        local_f = b_T.mean()
        prob_mean = prob_T.detach().mean()
        if self.scope == "sequence":
            docs, doc_id = seqs.num_docs, seqs.doc_id
            count_S = torch.zeros(docs, dtype=acc, device=b_T.device).index_add_(0, doc_id, torch.ones_like(b_T))
            f_S = torch.zeros_like(count_S).index_add_(0, doc_id, b_T) / count_S
            g_S = torch.zeros_like(count_S).index_add(0, doc_id, prob_T.to(acc)) / count_S
            loss = ratio_loss_value(f_S, g_S, self.target_ratio).mean()
            return RatioStats(loss, local_f, prob_mean, local_f)
        if self.scope == "batch" or not self.training:
            loss = ratio_loss_value(local_f, prob_T.to(acc).mean(), self.target_ratio)
            return RatioStats(loss, local_f, prob_mean, local_f)

        # Global scope: one small all-reduce of (boundaries, tokens) per micro-batch, in float64 so counts of
        # many-million-token steps stay exact.
        counts = torch.stack([b_T.sum().double(), torch.full((), b_T.numel(), dtype=torch.float64, device=b_T.device)])
        world = self._data_parallel_size()
        if world > 1:
            dist.all_reduce(counts, group=self.process_group)
        if self._micro_batches_seen >= self.micro_batches_per_step:
            self.start_step()
        self._micro_batches_seen += 1
        self._step_boundaries = counts[0] + self._step_boundaries
        self._step_tokens = counts[1] + self._step_tokens
        step_f = (self._step_boundaries / self._step_tokens).to(acc)
        rank_g = prob_T.to(acc).sum() * (world / counts[1]).to(acc)
        loss = ratio_loss_value(step_f, rank_g, self.target_ratio)
        return RatioStats(loss, step_f, prob_mean, local_f)
