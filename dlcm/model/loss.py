"""Next-token targets for packed documents and the cross-entropy over them, computed in fp32."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_targets(input_ids_T: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``target[t] = input_ids[t+1]`` inside a document; the last token of each document has no target."""
    targets_T = torch.roll(input_ids_T, shifts=-1)
    doc_end_T = torch.zeros_like(input_ids_T, dtype=torch.bool)
    doc_end_T[cu_seqlens[1:].long() - 1] = True
    return targets_T.masked_fill(doc_end_T, IGNORE_INDEX)


def _nats(logits_TV: torch.Tensor, targets_T: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_TV.float(), targets_T, ignore_index=IGNORE_INDEX, reduction="none")


def _padded_nats(logits_TP: torch.Tensor, targets_T: torch.Tensor, vocab: int) -> torch.Tensor:
    return _nats(logits_TP[:, :vocab], targets_T)


@functools.cache
def _compiled_nats():
    # Eager, the fp32 upcast and the log-softmax each write a T × V fp32 tensor (8.4 GB per 16K tokens with the
    # DeepSeek-V3 vocabulary) that the backward reads again; compiled, the upcast, the row logsumexp and the
    # gradient are fused passes over the bf16 logits.
    return torch.compile(_nats), torch.compile(_padded_nats)


def padded_logits(logits_TV: torch.Tensor) -> torch.Tensor | None:
    """The ``[T, P ≥ V]`` tensor whose first V columns ``logits_TV`` is (the LM head's aligned GEMM), else None."""
    base = logits_TV._base
    if base is None or base.dim() != 2 or logits_TV.dim() != 2 or base.shape[0] != logits_TV.shape[0]:
        return None
    same_start = base.storage_offset() == logits_TV.storage_offset() and base.stride() == logits_TV.stride()
    return base if same_start and base.is_contiguous() else None


def token_nats(logits_TV: torch.Tensor, targets_T: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """Per-position CE in nats, computed in fp32 (0 where there is no target); ``compiled`` fuses it into
    generated kernels on a GPU (the same function).

    Compiled, logits that are the real columns of the head's padded GEMM output are read through that output: the
    gradient is then written at the padded width inside the fused kernel (pad columns 0), where autograd's
    backward of the column view would fill a zero ``[T, P]`` tensor and copy the ``[T, V]`` gradient into it.
    """
    if not (compiled and logits_TV.is_cuda):
        return _nats(logits_TV, targets_T)
    plain, padded = _compiled_nats()
    logits_TP = padded_logits(logits_TV)
    return plain(logits_TV, targets_T) if logits_TP is None else padded(logits_TP, targets_T, logits_TV.shape[1])


def cross_entropy(logits_TV: torch.Tensor, targets_T: torch.Tensor) -> torch.Tensor:
    """Mean CE over positions with a target, computed in fp32."""
    return F.cross_entropy(logits_TV.float(), targets_T, ignore_index=IGNORE_INDEX)
