"""Loss by position inside a concept and by concept length (the paper's Figure 7 analysis); ``dlcm analyze``
(:mod:`dlcm.research.concept_analysis_cli`) runs it on trained checkpoints.

A trained DLCM runs in inference mode (boundaries ``p ≥ 0.5``) over validation batches; every token's loss is put
in the bucket of its position within its concept and of its concept's length. Given a dense baseline trained on the
same data, its per-token losses on the *same* batches go into the same buckets (the DLCM's segmentation), which is
the paper's comparison: a U-shape where the concept model gains at concept starts and ends.

Convention: the loss of token ``x_t`` is the cross-entropy of predicting it, computed at position ``t − 1``; it is
credited to ``x_t``'s position (0 = the first token of a concept) and its concept's length. Document-initial tokens
are never predicted, so they contribute nothing. Worked example, one document, boundaries at tokens 0, 2 and 3:

    token t             0    1    2    3    4    5
    concept             0    0    1    2    2    2
    position in concept 0    1    0    0    1    2
    concept length      2    2    1    3    3    3
    loss credited       -    ℓ0   ℓ1   ℓ2   ℓ3   ℓ4      (ℓ_{t−1} = CE at position t−1 of predicting x_t)

so position 0 averages (ℓ1 + ℓ2)/2, position 1 (ℓ0 + ℓ3)/2, position 2 ℓ4; length 1 holds ℓ1, length 2 ℓ0, length 3
(ℓ2 + ℓ3 + ℓ4)/3. Positions at or beyond ``max_position`` share the last bucket, as lengths beyond ``max_length`` do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dlcm.model.packing import PackedSeqs
from dlcm.model.pooling import concept_layout


def concept_positions(boundary_T: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: its position within its concept and the concept's length (``boundary_T`` marks concept starts,
    including every document start)."""
    layout = concept_layout(boundary_T, PackedSeqs.from_cu_seqlens(cu_seqlens, boundary_T.shape[0]))
    rows_T = torch.arange(boundary_T.shape[0], device=boundary_T.device)
    return rows_T - layout.start_C[layout.concept_id_T], layout.length_C[layout.concept_id_T]


@dataclass
class ConceptLossStats:
    """Summed nats and token counts per position-in-concept bucket and per concept-length bucket.

    Bucket ``i`` of ``by_position`` is position ``i`` (the last: ``≥ max_position``); bucket ``i`` of ``by_length``
    is length ``i + 1`` (the last: ``≥ max_length``).
    """

    max_position: int = 20
    max_length: int = 32
    nats_by_position: torch.Tensor = field(init=False)
    count_by_position: torch.Tensor = field(init=False)
    nats_by_length: torch.Tensor = field(init=False)
    count_by_length: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if self.max_position < 1 or self.max_length < 1:
            raise ValueError(f"max_position={self.max_position}, max_length={self.max_length}: both must be at least 1")
        self.nats_by_position = torch.zeros(self.max_position + 1, dtype=torch.float64)
        self.count_by_position = torch.zeros(self.max_position + 1, dtype=torch.int64)
        self.nats_by_length = torch.zeros(self.max_length, dtype=torch.float64)
        self.count_by_length = torch.zeros(self.max_length, dtype=torch.int64)

    def update(
        self, nats_T: torch.Tensor, has_target_T: torch.Tensor, boundary_T: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> None:
        """Add one packed batch: ``nats_T[t]`` is the CE of predicting token ``t + 1`` (valid where
        ``has_target_T``), ``boundary_T`` the concept starts used for the buckets."""
        position_T, length_T = concept_positions(boundary_T, cu_seqlens)
        # The prediction made at t is about token t + 1: credit it to that token's bucket. has_target_T is False at
        # every document's last token, so the wrap-around of roll never lands in a bucket.
        position_T = torch.roll(position_T, -1).clamp(max=self.max_position)
        length_T = torch.roll(length_T, -1).clamp(max=self.max_length) - 1
        keep_T = has_target_T.bool()
        nats = nats_T.detach().to(torch.float64)[keep_T].cpu()
        self.nats_by_position.index_add_(0, position_T[keep_T].cpu(), nats)
        self.count_by_position.index_add_(0, position_T[keep_T].cpu(), torch.ones_like(nats, dtype=torch.int64))
        self.nats_by_length.index_add_(0, length_T[keep_T].cpu(), nats)
        self.count_by_length.index_add_(0, length_T[keep_T].cpu(), torch.ones_like(nats, dtype=torch.int64))

    @staticmethod
    def _means(nats: torch.Tensor, count: torch.Tensor) -> list[float | None]:
        return [float(n / c) if c else None for n, c in zip(nats.tolist(), count.tolist(), strict=True)]

    def to_dict(self) -> dict[str, Any]:
        """Mean nats and token counts per bucket (``None`` for empty buckets), JSON-ready."""
        return {
            "max_position": self.max_position,
            "max_length": self.max_length,
            "position": list(range(self.max_position + 1)),
            "loss_by_position": self._means(self.nats_by_position, self.count_by_position),
            "tokens_by_position": self.count_by_position.tolist(),
            "length": list(range(1, self.max_length + 1)),
            "loss_by_length": self._means(self.nats_by_length, self.count_by_length),
            "tokens_by_length": self.count_by_length.tolist(),
            "mean_loss": float(self.nats_by_position.sum() / max(int(self.count_by_position.sum()), 1)),
        }


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def analyze(
    dlcm_module: Any,
    batches: Any,
    baseline_module: Any | None = None,
    max_position: int = 20,
    max_length: int = 32,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Accumulate per-position and per-length losses of a DLCM (and a baseline) over ``batches``.

    ``dlcm_module`` / ``baseline_module`` are ``dlcm.train.lightning_modules`` modules (their ``lm_terms`` give
    per-token CE); both run in eval mode, the DLCM with inference-mode boundaries, which bucket both.
    """
    device = torch.device(device)
    models = {"dlcm": dlcm_module} | ({"baseline": baseline_module} if baseline_module is not None else {})
    stats = {name: ConceptLossStats(max_position, max_length) for name in models}
    for module in models.values():
        module.to(device).eval()
    # bf16 on CUDA, as trained there; fp32 elsewhere (the reference path).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    tokens, n_batches = 0, 0
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        batch = _to_device(batch, device)
        with autocast:
            lm_loss, has_target_T, out = dlcm_module.lm_terms(batch)
            boundary_T = out.parser.boundary_T
            stats["dlcm"].update(lm_loss.nats_T, has_target_T, boundary_T, batch["cu_seqlens"])
            if baseline_module is not None:
                base_loss, base_has_target_T, _ = baseline_module.lm_terms(batch)
                stats["baseline"].update(base_loss.nats_T, base_has_target_T, boundary_T, batch["cu_seqlens"])
        tokens += int(batch["input_ids"].shape[0])
        n_batches += 1
    if n_batches == 0:
        raise ValueError("no validation batch to analyze")
    return {"batches": n_batches, "tokens": tokens} | {name: s.to_dict() for name, s in stats.items()}
