"""Causal self-attention over packed documents behind one function, with interchangeable kernels.

Every backend computes the same function: row ``i`` attends to rows ``j ≤ i`` of its own document.

- ``sdpa``: ``scaled_dot_product_attention`` with an explicit block-causal ``[T, T]`` mask, or on a padded
  ``[docs, max_seqlen]`` batch when that scores fewer pairs. The CPU path and the reference every other backend
  is tested against (itself tested against a per-document loop).
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 inside PyTorch), CUDA, fp16/bf16.
- ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` of the FlashAttention 2/3 package (``pip install
  flash-attn``), when importable with the arguments used here.
- ``flash_attn_cute``: FlashAttention-4, ``flash_attn.cute.flash_attn_varlen_func`` (``pip install flash-attn-4``:
  CuTe DSL kernels, SM90 and newer), likewise checked.
- ``flex``: FlexAttention with a document-causal block mask (compiled on CUDA, eager on CPU).
- ``auto``: for half-precision CUDA tensors ``flash_attn_cute`` on Hopper and newer (SM90+) when importable (on an
  H100 it ran the recipes' documents 1.4–1.8× faster than ``varlen``), else ``flash_attn`` (only if its varlen
  entry is there: a FlashAttention-4-only install provides the ``flash_attn`` namespace without it), else
  ``varlen``; ``sdpa`` otherwise.

Layout: ``q_TNH`` is ``[T, heads, head_dim]``, ``k_TKH``/``v_TKH`` have ``K`` KV heads dividing ``N`` (GQA).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dlcm.model.packing import PackedSeqs

BACKENDS = ("sdpa", "varlen", "flash_attn", "flash_attn_cute", "flex")
# Module of each FlashAttention backend's ``flash_attn_varlen_func``, and the keyword arguments it is called with.
FLASH_MODULES = {"flash_attn": "flash_attn", "flash_attn_cute": "flash_attn.cute"}
VARLEN_ARGUMENTS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "causal")


@functools.cache
def flash_varlen_entry(backend: str = "flash_attn") -> Callable | None:
    """The ``flash_attn_varlen_func`` a FlashAttention backend calls, or None when its module is missing, fails to
    import, or has no such function taking :data:`VARLEN_ARGUMENTS` (another build's API)."""
    try:
        func = getattr(importlib.import_module(FLASH_MODULES[backend]), "flash_attn_varlen_func", None)
    except (ImportError, OSError, RuntimeError):  # absent, or a build against another CUDA / torch
        return None
    if not callable(func):
        return None
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # no introspectable signature (a compiled function): trust the name
        return func
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return func if takes_any or all(name in params for name in VARLEN_ARGUMENTS) else None


def flash_attn_available(backend: str = "flash_attn") -> bool:
    """Whether ``backend`` (``flash_attn`` or ``flash_attn_cute``) finds the varlen entry it needs."""
    return flash_varlen_entry(backend) is not None


@functools.cache
def _sm90_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """Turn ``auto`` into a concrete backend for this tensor; reject names no backend answers to."""
    if backend == "auto":
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            if flash_attn_available("flash_attn_cute") and _sm90_or_newer(q.device.index or 0):
                return "flash_attn_cute"
            return "flash_attn" if flash_attn_available() else "varlen"
        return "sdpa"
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend={backend!r} is not allowed: expected 'auto' or one of {BACKENDS}")
    return backend


def causal_attention(
    q_TNH: torch.Tensor, k_TKH: torch.Tensor, v_TKH: torch.Tensor, seqs: PackedSeqs, backend: str = "auto"
) -> torch.Tensor:
    """Document-causal attention of packed rows; returns ``[T, N, H]``."""
    name = resolve_backend(backend, q_TNH)
    if name == "sdpa":
        return _sdpa(q_TNH, k_TKH, v_TKH, seqs)
    if name == "flex":
        return _flex(q_TNH, k_TKH, v_TKH, seqs)
    if not q_TNH.is_cuda or q_TNH.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"attn_backend={name!r} needs fp16/bf16 CUDA tensors, got {q_TNH.dtype} on {q_TNH.device}; "
            "use 'sdpa' or 'flex' (or 'auto') here"
        )
    if name == "varlen":
        return _varlen(q_TNH, k_TKH, v_TKH, seqs)
    return _flash_attn(q_TNH, k_TKH, v_TKH, seqs, name)


def _sdpa(q_TNH: torch.Tensor, k_TKH: torch.Tensor, v_TKH: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
    # Two exact layouts: one [T, T] block-causal mask, or documents scattered into a padded [docs, max_seqlen]
    # batch, whichever scores fewer query-key pairs (many short documents: padded; few long ones: dense).
    if seqs.num_docs * seqs.max_seqlen**2 < seqs.total**2:
        return _sdpa_padded(q_TNH, k_TKH, v_TKH, seqs)
    mask_TT = seqs.cache.get("sdpa_mask")
    if mask_TT is None:
        rows = torch.arange(seqs.total, device=seqs.doc_id.device)
        mask_TT = (seqs.doc_id[:, None] == seqs.doc_id[None, :]) & (rows[:, None] >= rows[None, :])
        seqs.cache["sdpa_mask"] = mask_TT
    out_NTH = F.scaled_dot_product_attention(
        q_TNH.transpose(0, 1), k_TKH.transpose(0, 1), v_TKH.transpose(0, 1), attn_mask=mask_TT, enable_gqa=True
    )
    return out_NTH.transpose(0, 1)


def _sdpa_padded(q_TNH: torch.Tensor, k_TKH: torch.Tensor, v_TKH: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
    docs, width = seqs.num_docs, seqs.max_seqlen

    def to_padded(x_TNH: torch.Tensor) -> torch.Tensor:
        padded = x_TNH.new_zeros(docs, width, *x_TNH.shape[1:])
        return padded.index_put((seqs.doc_id, seqs.position), x_TNH).transpose(1, 2)  # [docs, N, width, H]

    # Causal inside each padded row; padding keys sit after every real query, so causality already hides them.
    out_BNLH = F.scaled_dot_product_attention(
        to_padded(q_TNH), to_padded(k_TKH), to_padded(v_TKH), is_causal=True, enable_gqa=True
    )
    return out_BNLH.transpose(1, 2)[seqs.doc_id, seqs.position]


@functools.cache
def _varlen_takes_gqa() -> bool:
    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def _varlen(q_TNH: torch.Tensor, k_TKH: torch.Tensor, v_TKH: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu, m = seqs.cu_seqlens, seqs.max_seqlen
    if q_TNH.shape[1] == k_TKH.shape[1]:
        return varlen_attn(q_TNH, k_TKH, v_TKH, cu, cu, m, m, window_size=(-1, 0))
    if _varlen_takes_gqa():
        return varlen_attn(q_TNH, k_TKH, v_TKH, cu, cu, m, m, window_size=(-1, 0), enable_gqa=True)
    # torch 2.11's varlen_attn has no GQA flag; the FlashAttention-2 entry it wraps takes KV heads dividing the
    # query heads natively (differentiable, with a meta kernel for compile), so K/V are not expanded per layer.
    out_TNH, *_ = torch.ops.aten._flash_attention_forward(q_TNH, k_TKH, v_TKH, cu, cu, m, m, 0.0, True, False)
    return out_TNH


def _flash_attn(
    q_TNH: torch.Tensor, k_TKH: torch.Tensor, v_TKH: torch.Tensor, seqs: PackedSeqs, backend: str
) -> torch.Tensor:
    func = flash_varlen_entry(backend)
    if func is None:
        raise ValueError(
            f"attn_backend={backend!r} needs {FLASH_MODULES[backend]}.flash_attn_varlen_func taking "
            f"{', '.join(VARLEN_ARGUMENTS)}, which is not importable here; install "
            f"{'flash-attn' if backend == 'flash_attn' else 'flash-attn-4'} or use 'varlen', 'flex' or 'auto'"
        )
    cu, m = seqs.cu_seqlens, seqs.max_seqlen
    out = func(q_TNH, k_TKH, v_TKH, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m, max_seqlen_k=m, causal=True)
    return out[0] if isinstance(out, tuple) else out  # FlashAttention-4 returns (out, lse)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # One process-wide compiled kernel and mask builder (compiling per module would multiply compile time by the
    # layer count); eager create_block_mask materialises a dense [T, T] mask, compiled it does not.
    return torch.compile(flex_attention, dynamic=False), torch.compile(create_block_mask, dynamic=False)


def _flex(q_TNH: torch.Tensor, k_TKH: torch.Tensor, v_TKH: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    kernel, make_mask = _compiled_flex() if q_TNH.is_cuda else (flex_attention, create_block_mask)
    block_mask = seqs.cache.get("flex_mask")
    if block_mask is None:
        doc_id = seqs.doc_id

        def document_causal(b, h, q_idx, kv_idx):
            return (doc_id[q_idx] == doc_id[kv_idx]) & (q_idx >= kv_idx)

        block_mask = make_mask(document_causal, None, None, seqs.total, seqs.total, device=doc_id.device)
        seqs.cache["flex_mask"] = block_mask
    out_1NTH = kernel(
        q_TNH.transpose(0, 1)[None],
        k_TKH.transpose(0, 1)[None],
        v_TKH.transpose(0, 1)[None],
        block_mask=block_mask,
        enable_gqa=True,
    )
    return out_1NTH[0].transpose(0, 1)
