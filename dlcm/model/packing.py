"""Packed varlen layout: one flat stream of rows (tokens or concepts) cut into documents by ``cu_seqlens``.

Nothing in the model is padded. A micro-batch is ``T`` tokens from whole or cut documents, described by
``cu_seqlens`` (int32, ``docs + 1`` offsets, ``[0, …, T]``). Per-row document ids and in-document positions are
derived on the device without host synchronisation; ``max_seqlen`` is a host integer that only needs to be an
upper bound (kernels size their grids by it), so the row count is a valid default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class PackedSeqs:
    """Document structure of a packed stream of ``total`` rows.

    Example: ``cu_seqlens = [0, 3, 5]`` → ``doc_id = [0, 0, 0, 1, 1]``, ``position = [0, 1, 2, 0, 1]``.
    """

    cu_seqlens: torch.Tensor  # int32 [docs + 1]
    max_seqlen: int  # host-side upper bound on any document's length
    doc_id: torch.Tensor  # int64 [total]
    position: torch.Tensor  # int64 [total], position within the document
    # Masks derived once per stream and shared by every layer of a stack (dense SDPA mask, Flex block mask).
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, total: int, max_seqlen: int | None = None) -> PackedSeqs:
        check_cu_seqlens(cu_seqlens, total)
        cu = cu_seqlens.to(torch.int32)
        rows = torch.arange(total, device=cu.device)
        doc_id = torch.searchsorted(cu[1:].long(), rows, right=True)
        position = rows - cu.long()[doc_id]
        return cls(cu, total if max_seqlen is None else max_seqlen, doc_id, position)

    @property
    def total(self) -> int:
        return self.doc_id.shape[0]

    @property
    def num_docs(self) -> int:
        return self.cu_seqlens.shape[0] - 1


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """Reject malformed offsets with a message naming the problem.

    Shape and dtype are always checked; values only for CPU tensors, where checking costs no device sync.
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D tensor [0, …, total] with at least 2 entries, got shape "
            f"{tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device.type == "cpu":
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != total:
            raise ValueError(f"cu_seqlens must start at 0 and end at the row count {total}, got {first}…{last}")
        if bool((cu_seqlens[1:] <= cu_seqlens[:-1]).any()):
            raise ValueError(f"cu_seqlens must be strictly increasing (no empty documents): {cu_seqlens.tolist()}")
