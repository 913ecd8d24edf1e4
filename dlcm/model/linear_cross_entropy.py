"""The LM head and its cross-entropy fused over row chunks: no ``[T, V]`` logits tensor ever exists.

With a 129K vocabulary a 16K-token micro-batch has 2.1 G logits: 4.2 GB in bf16, and the fp32 log-softmax of an
eager CE writes two more 8.5 GB tensors that the backward reads again (it ran the 2.3B DLCM out of memory on an
80 GB H100). Here the head GEMM runs on ``chunk_rows`` rows at a time; each chunk's logits are reduced to per-row
nats and, when a gradient is wanted, turned straight into their gradient (``s·(softmax − onehot)``) whose two
GEMMs give ``dx`` for those rows and add into ``dW``. The forward thus does the backward's work too (as Liger's
fused kernel does), so the GEMM count stays three and the live logits are one chunk's.

The scalar that carries the gradient is the *sum* of the per-row nats: every row's upstream gradient is then the
same number, which is what lets the gradient be formed before it is known (the backward only scales it). The
per-row nats come along detached, for metrics (validation's bits per byte).

Precision matches the unfused path under bf16 autocast: bf16 GEMMs with fp32 accumulation, log-softmax in fp32,
``dx`` rounded to bf16 once; ``dW`` sums the chunks in fp32 (on CUDA through cuBLAS's bf16 × bf16 → fp32 GEMM).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlcm.model.loss import IGNORE_INDEX

# Logits elements live at once per chunk (2^28: 0.5 GB in bf16, 2,048 rows of a 129K vocabulary).
CHUNK_ELEMENTS = 2**28


@dataclass
class TokenLoss:
    """Cross-entropy of one forward: ``total`` (sum over rows with a target, differentiable) and ``nats_T``
    (per row, 0 where there is no target, detached)."""

    total: torch.Tensor
    nats_T: torch.Tensor


def chunk_rows(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk: ``elements // vocab``, a multiple of 128 (at least 128) so GEMM tiles stay full."""
    return max(128, (elements // vocab) // 128 * 128)


def _chunk_terms(
    logits_cV: torch.Tensor, targets_c: torch.Tensor, scale: float, vocab: int, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row nats of ``scale · logits[:, :vocab]`` in (at least) fp32 and, with ``with_grad``, their gradient
    w.r.t. the unscaled logits ``[c, P]`` in the logits' dtype (0 in pad columns and in rows without a target)."""
    acc = torch.promote_types(logits_cV.dtype, torch.float32)
    z_cV = logits_cV[:, :vocab].to(acc) * scale
    lse_c = torch.logsumexp(z_cV, dim=-1)
    valid_c = targets_c != IGNORE_INDEX
    target_c = targets_c.clamp(min=0)
    nats_c = torch.where(valid_c, lse_c - z_cV.gather(1, target_c[:, None])[:, 0], 0.0)
    if not with_grad:
        return nats_c, None
    columns_V = torch.arange(vocab, device=logits_cV.device)
    onehot_cV = columns_V[None, :] == target_c[:, None]
    grad_cV = (torch.exp(z_cV - lse_c[:, None]) - onehot_cV.to(acc)) * (scale * valid_c.to(acc))[:, None]
    grad_cP = F.pad(grad_cV, (0, logits_cV.shape[1] - vocab)) if logits_cV.shape[1] > vocab else grad_cV
    return nats_c, grad_cP.to(logits_cV.dtype)


@functools.cache
def _compiled_chunk_terms():
    # One fused reduction (row logsumexp) and one fused pointwise pass (gradient) over the bf16 chunk.
    return torch.compile(_chunk_terms, dynamic=None)


def _add_product(acc_PD: torch.Tensor, a_Pc: torch.Tensor, b_cD: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in fp32 and ``a``, ``b`` possibly bf16, without a rounded bf16 partial."""
    if a_Pc.dtype == acc_PD.dtype:
        acc_PD.addmm_(a_Pc, b_cD)
    elif acc_PD.is_cuda:
        torch.ops.aten.addmm.dtype_out(acc_PD, a_Pc, b_cD, acc_PD.dtype, out=acc_PD)
    else:  # CPU has no mixed-dtype GEMM: fp32 operands (CPU runs are fp32 in practice)
        acc_PD.addmm_(a_Pc.to(acc_PD.dtype), b_cD.to(acc_PD.dtype))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_PD, targets_T, scale, vocab, rows, compiled, with_grad):
        terms = _compiled_chunk_terms() if compiled and x_TD.is_cuda else _chunk_terms
        acc = torch.promote_types(x_TD.dtype, torch.float32)
        nats_T = torch.empty(x_TD.shape[0], device=x_TD.device, dtype=acc)
        dx_TD = torch.empty_like(x_TD) if with_grad else None
        dw_PD = torch.zeros(w_PD.shape, device=w_PD.device, dtype=acc) if with_grad else None
        for start in range(0, x_TD.shape[0], rows):
            x_cD = x_TD[start : start + rows]
            nats_c, grad_cP = terms(x_cD @ w_PD.t(), targets_T[start : start + rows], scale, vocab, with_grad)
            nats_T[start : start + rows] = nats_c
            if with_grad:
                torch.mm(grad_cP, w_PD, out=dx_TD[start : start + rows])
                _add_product(dw_PD, grad_cP.t(), x_cD)
        ctx.save_for_backward(dx_TD, dw_PD)
        ctx.w_dtype = w_PD.dtype
        ctx.mark_non_differentiable(nats_T)
        return nats_T.sum(), nats_T

    @staticmethod
    def backward(ctx, grad_total, _grad_nats):
        dx_TD, dw_PD = ctx.saved_tensors
        dx = dx_TD * grad_total.to(dx_TD.dtype) if ctx.needs_input_grad[0] else None
        dw = (dw_PD * grad_total).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None, None, None, None, None


def linear_cross_entropy(
    x_TD: torch.Tensor,
    w_PD: torch.Tensor,
    targets_T: torch.Tensor,
    scale: float = 1.0,
    vocab: int | None = None,
    rows: int | None = None,
    compiled: bool = False,
) -> TokenLoss:
    """CE of ``logits = scale · x Wᵀ`` restricted to the first ``vocab`` of ``W``'s ``P`` rows (the rest are
    alignment padding), computed ``rows`` rows at a time (default :func:`chunk_rows`); ``compiled`` fuses each
    chunk's softmax and gradient into generated kernels on a GPU. ``x`` and ``W`` must share a dtype: cast both to
    the autocast dtype first (the head does)."""
    vocab = w_PD.shape[0] if vocab is None else vocab
    if x_TD.dtype != w_PD.dtype:
        raise ValueError(f"x ({x_TD.dtype}) and W ({w_PD.dtype}) must share a dtype")
    rows = chunk_rows(w_PD.shape[0]) if rows is None else rows
    # Decided here: inside the Function's forward grad mode is always off. Validation under no_grad then skips
    # the two gradient GEMMs.
    with_grad = torch.is_grad_enabled() and (x_TD.requires_grad or w_PD.requires_grad)
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        total, nats_T = _ChunkedLinearCrossEntropy.apply(x_TD, w_PD, targets_T, scale, vocab, rows, compiled, with_grad)
    return TokenLoss(total, nats_T)
