"""Next-token targets for packed documents and the reference cross-entropy, computed in fp32 (training and
validation use the LM head's fused form, :mod:`dlcm.model.linear_cross_entropy`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_targets(input_ids_T: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``target[t] = input_ids[t+1]`` inside a document; the last token of each document has no target."""
    targets_T = torch.roll(input_ids_T, shifts=-1)
    doc_end_T = torch.zeros_like(input_ids_T, dtype=torch.bool)
    doc_end_T[cu_seqlens[1:].long() - 1] = True
    return targets_T.masked_fill(doc_end_T, IGNORE_INDEX)


def cross_entropy(logits_TV: torch.Tensor, targets_T: torch.Tensor) -> torch.Tensor:
    """Mean CE over positions with a target, computed in fp32."""
    return F.cross_entropy(logits_TV.float(), targets_T, ignore_index=IGNORE_INDEX)
