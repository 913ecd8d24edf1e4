"""Per-layer KV cache of a batch of documents run incrementally through a :class:`~dlcm.model.block.TransformerStack`.

The stack's own ``forward`` takes a whole packed stream; decoding instead feeds a few new rows per document at a
time (a prompt, one token, or the concepts that just completed for the backbone). :class:`StackCache` replays the
block's pre-norm computation on those rows with the stack's weights and keeps every layer's rotated keys and values
in padded buffers ``[B, capacity, K, H]``, one row of the batch per document, with each document's length on the
host. Positions continue from that length: the token position for the encoder/decoder/baseline, the concept index
for the backbone (the same RoPE positions as a full forward of the document).

New rows come padded, ``x_BnD`` with ``counts[b] ≤ n`` real rows for document ``b``:

    document   length   counts   cache index written          keys read by new row i
    0          5        3        5 6 7 (+ padding row 8)      0 … 5 + i
    1          2        1        2     (+ padding rows 3, 4)  0 … 2 + i

A padding row is computed and written like a real one, but past the document's new length: nothing reads it
(every key index a real row reads is at most its own position) and the document's next rows overwrite it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dlcm.model.block import TransformerStack
from dlcm.model.rope import rope_angles

# SDPA kernels with no per-shape set-up cost (every backend but cuDNN's), in PyTorch's order of preference.
SHAPE_STABLE_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def hosts_to_device(lists: Sequence[Sequence[int]], device: torch.device) -> list[torch.Tensor]:
    """int64 tensors of host integer lists on ``device``, in one copy that does not wait for queued device work.

    A plain ``torch.tensor(values, device='cuda')`` synchronises the stream; a copy from pinned memory with
    ``non_blocking=True`` does not (the caching host allocator keeps the pinned block alive until the copy ran).
    Decoding is bound by host work per step, so a step's lists travel together and are split on the device.
    """
    host = torch.tensor([v for values in lists for v in values], dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
    return list(host.to(device, non_blocking=True).split([len(values) for values in lists]))


def host_to_device(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """One list's :func:`hosts_to_device`."""
    return hosts_to_device([values], device)[0]


def cached_attention(
    q_BnNH: torch.Tensor, k_BLKH: torch.Tensor, v_BLKH: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """SDPA of ``n`` new rows per document over cached keys/values with ``K`` heads dividing ``N`` under ``mask``,
    or causal (row ``i`` reads keys ``0 … i``) with ``mask=None``; returns ``[B, N, n, H]``.

    SDPA's fused CUDA kernels that take a mask take no fewer KV heads: a GQA call falls back to the math kernel,
    which writes ``[B, N, n, L]`` fp32 scores (51 GB for 32 prompts of 4096 tokens at 24 heads). For a chunk, K/V
    are copied to the query heads instead; a single-token step (n = 1) keeps the fewer heads, where the scores
    are small and a copy of the whole cache per layer would cost more than it saves. The causal form needs no
    mask, so the flash kernel runs it with the fewer heads.

    cuDNN's kernel is left out: it builds an execution plan per new shape, and decoding's shapes (concepts a
    prompt completes, Ψ rows, prompt lengths) change from call to call. On an H100 a small DLCM's prefill spent
    97.7 ms of host time in 17 cuDNN attention calls that ran 0.13 ms on the GPU.
    """
    heads, kv_heads = q_BnNH.shape[2], k_BLKH.shape[2]
    if mask is not None and q_BnNH.shape[1] > 1 and kv_heads != heads:
        k_BLKH, v_BLKH = (x.repeat_interleave(heads // kv_heads, dim=2) for x in (k_BLKH, v_BLKH))
    with sdpa_kernel(SHAPE_STABLE_KERNELS):
        return F.scaled_dot_product_attention(
            q_BnNH.transpose(1, 2),
            k_BLKH.transpose(1, 2),
            v_BLKH.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=True,
        )


class _Call(NamedTuple):
    """What every layer of one ``extend`` call shares."""

    rope: tuple[torch.Tensor, torch.Tensor]
    rows: torch.Tensor  # batch rows of the cache the call's documents occupy
    position_Bn: torch.Tensor  # cache index (= RoPE position) of every new row
    mask_B1nL: torch.Tensor | None  # None: plain causal (every document's cache was empty)
    span: int  # cache rows read
    whole_batch: bool


class StackCache:
    """KV cache of ``batch`` documents through one stack: ``extend(x, counts)`` runs new rows, returns their outputs.

    ``docs`` restricts a call to some documents (the backbone steps only those whose concept just completed);
    ``lengths`` (host integers) is each document's number of cached rows, ``length_B`` its device copy, which
    :meth:`step` reads and advances and :meth:`extend` leaves stale (the decoder refreshes it before a step).
    """

    def __init__(
        self, stack: TransformerStack, batch: int, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.stack = stack
        first = stack.layers[0].attn if len(stack.layers) else None
        heads = (first.n_kv_heads, first.head_dim) if first is not None else (0, 0)
        self.keys = [torch.zeros(batch, capacity, *heads, device=device, dtype=dtype) for _ in stack.layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.lengths = [0] * batch
        self.length_B = torch.zeros(batch, dtype=torch.int64, device=device)
        self.capacity = capacity
        self.all_docs = torch.arange(batch, device=device)

    def reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        grow = max(needed, 2 * self.capacity) - self.capacity
        pad = (0, 0, 0, 0, 0, grow)
        self.keys = [F.pad(k, pad) for k in self.keys]
        self.values = [F.pad(v, pad) for v in self.values]
        self.capacity += grow

    def extend(
        self,
        x_BnD: torch.Tensor,
        counts: Sequence[int],
        docs: Sequence[int] | None = None,
        docs_S: torch.Tensor | None = None,
        position_Bn: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Outputs ``[B', n, D]`` of the new rows (``B'`` = ``len(docs)``, or the whole batch when ``docs`` is None).

        A caller that already holds ``docs`` or the rows' positions (cached length + offset) on the device passes them
        as ``docs_S`` / ``position_Bn`` and saves their copies."""
        b, n = x_BnD.shape[:2]
        device = x_BnD.device
        chosen = range(len(self.lengths)) if docs is None else docs
        before = [self.lengths[d] for d in chosen]
        if len(before) != b or len(counts) != b:
            raise ValueError(f"x has {b} documents but counts has {len(counts)} and docs {len(before)}")
        span = max(before) + n  # cache rows the new rows may read (and padding rows may write)
        self.reserve(span)
        rows = self.all_docs if docs is None else docs_S
        if rows is None:
            rows = host_to_device(docs, device)
        if position_Bn is None:
            position_Bn = host_to_device(before, device)[:, None] + torch.arange(n, device=device)[None, :]
        rope = rope_angles(position_Bn.flatten(), self.stack.head_dim, self.stack.rope_theta)
        # Key index s is visible to new row i when s ≤ its position (causal; older rows are all this document's).
        # With every cache empty (prompts) the positions are 0 … n−1 and that is plain causal attention: no mask.
        mask_B1nL = None
        if max(before) > 0:
            mask_B1nL = (torch.arange(span, device=device)[None, None, :] <= position_Bn[:, :, None])[:, None]
        call = _Call(rope, rows, position_Bn, mask_B1nL, span, docs is None)
        for i, layer in enumerate(self.stack.layers):
            x_BnD = layer.residual(x_BnD, lambda h_BnD, i=i: self._attend(i, h_BnD, call))
        for d, count in zip(chosen, counts, strict=True):
            self.lengths[d] += count
        return self.stack.norm(x_BnD)

    def step(self, x_BD: torch.Tensor, commit_B: torch.Tensor | None = None) -> torch.Tensor:
        """Output ``[B, D]`` of one new row per document at its device length ``length_B``, for every document.

        Nothing here depends on host values (each row reads the whole capacity under a causal mask), so a CUDA
        graph can capture it. Documents where ``commit_B`` (bool) is false write their row past their length,
        where nothing reads it and their next row overwrites it. Host ``lengths`` are the caller's to advance.
        """
        device = x_BD.device
        position_B1 = self.length_B[:, None]
        rope = rope_angles(self.length_B, self.stack.head_dim, self.stack.rope_theta)
        mask_B11L = (torch.arange(self.capacity, device=device)[None, :] <= position_B1)[:, None, None]
        call = _Call(rope, self.all_docs, position_B1, mask_B11L, self.capacity, True)
        x_B1D = x_BD[:, None]
        for i, layer in enumerate(self.stack.layers):
            x_B1D = layer.residual(x_B1D, lambda h_B1D, i=i: self._attend(i, h_B1D, call))
        self.length_B.add_(1 if commit_B is None else commit_B.long())  # queued after every read of position_B1
        return self.stack.norm(x_B1D)[:, 0]

    def _attend(self, i: int, h_BnD: torch.Tensor, call: _Call) -> torch.Tensor:
        """Layer ``i``'s attention of the new (normed) rows: write their keys/values, read the cache."""
        b, n = h_BnD.shape[:2]
        attn, keys, values, rows = self.stack.layers[i].attn, self.keys[i], self.values[i], call.rows
        q_TNH, k_TKH, v_TKH = attn.project(h_BnD.flatten(0, 1), call.rope)
        keys[rows[:, None], call.position_Bn] = k_TKH.unflatten(0, (b, n))
        values[rows[:, None], call.position_Bn] = v_TKH.unflatten(0, (b, n))
        # The whole batch reads a view; a subset gathers its documents' rows (a copy of what attention reads anyway).
        k_BLKH = keys[:, : call.span] if call.whole_batch else keys[rows, : call.span]
        v_BLKH = values[:, : call.span] if call.whole_batch else values[rows, : call.span]
        out_BNnH = cached_attention(q_TNH.unflatten(0, (b, n)), k_BLKH, v_BLKH, call.mask_B1nL)
        return attn.wo(out_BNnH.transpose(1, 2).flatten(2))
