"""The token→concept cross-attention block Ψ (paper Eqs. 12–17) with the leak-free causality rule.

Q = RMSNorm(H W_Q) from the encoder states; K = RMSNorm(Z' W_K), V = Z' W_V from the smoothed concepts shifted
right by one inside each document, a learned null concept first; output ``H + W_O·attn`` (Eq. 14), then the
block's own pre-norm SwiGLU FFN (Table 3 "Interm. size (cross)"). No RoPE: queries and keys live on different
axes (tokens vs concepts) and the concept order is already encoded by the backbone.

Causality (docs/design.md): a token in concept ``j`` may read concepts ``0 … j−1`` only — concept ``j`` is a mean
over tokens that include the token's own next-token target. Shifting makes key row ``j`` hold concept ``j−1``
(null for a document's first concept), so "rows ``≤ j``" is exactly "completed concepts". Continuing the example
of :mod:`dlcm.model.pooling` (documents A = tokens 0–4, B = tokens 5–7):

    token t           0      1      2        3        4        5      6        7
    concept_id_T      0      0      1        1        1        2      3        3
    key row j holds   ∅A     ∅A     z0       z0       z0       ∅B     z2       z2
    reads             ∅A     ∅A     ∅A,z0    ∅A,z0    ∅A,z0    ∅B     ∅B,z2    ∅B,z2
    replication n     1      2      2,1      2,2      2,3      1      1,1      1,2

Concept replication (Eq. 17, ``impl='replicate'``): K/V are computed once on the C concept rows, gathered to
token positions by ``concept_id_T`` and run through the ordinary causal varlen kernel with ``cu_seqlens_tok``. A
key row repeated ``n`` times inside a token's causal window therefore carries a ``+log n`` logit bias (last row:
``n`` of each key read by that token). That is the model's definition. ``impl='exact'`` computes the same
function on the C unique rows with the bias made explicit (L×C): FlexAttention with a block mask derived from
concept offsets on CUDA (:mod:`dlcm.model.concept_attention`), a dense ``[T, C]`` SDPA reference on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlcm.model.attention_backends import causal_attention
from dlcm.model.concept_attention import flex_concept_attention
from dlcm.model.config import CrossConfig, resolve_cross_impl
from dlcm.model.ffn import SwiGLU
from dlcm.model.linear import Linear
from dlcm.model.norm import RMSNorm
from dlcm.model.packing import PackedSeqs
from dlcm.model.pooling import ConceptLayout


def shift_concepts(z_CD: torch.Tensor, null_D: torch.Tensor, layout: ConceptLayout) -> torch.Tensor:
    """Row ``c`` ← concept ``c−1`` of the same document, or the null concept on a document's first concept."""
    prev_C = (torch.arange(z_CD.shape[0], device=z_CD.device) - 1).clamp(min=0)
    doc_start_C = layout.seqs.position == 0
    return torch.where(doc_start_C[:, None], null_D.to(z_CD.dtype)[None, :], z_CD[prev_C])


def concept_bias(layout: ConceptLayout, tok: PackedSeqs) -> torch.Tensor:
    """``[T, C]`` additive bias of the exact L×C form: ``log n_c(t)`` where readable, ``−inf`` elsewhere.

    ``n_c(t)`` counts token positions ``s ≤ t`` of t's document with ``concept_id[s] = c``: the whole segment for
    earlier concepts, ``t − start + 1`` for t's own row.
    """
    rows_T = torch.arange(tok.total, device=tok.doc_id.device)
    cid_T = layout.concept_id_T
    cols_C = torch.arange(layout.num_concepts, device=cid_T.device)
    readable_TC = (layout.seqs.doc_id[None, :] == tok.doc_id[:, None]) & (cols_C[None, :] <= cid_T[:, None])
    return log_count_bias(
        cols_C[None, :], cid_T[:, None], rows_T[:, None], layout.start_C[None, :], layout.length_C[None, :], readable_TC
    )


def log_count_bias(
    col: torch.Tensor,
    own: torch.Tensor,
    position: torch.Tensor,
    start: torch.Tensor,
    length: torch.Tensor,
    readable: torch.Tensor,
) -> torch.Tensor:
    """fp64 ``log n`` where ``readable``, else ``−inf`` (arguments broadcast; decoding shares it with the forward).

    Key row ``col`` is replicated at every token of concept ``col``, which starts at ``start`` and has ``length``
    tokens; a query at ``position`` in concept ``own`` sees all of them for ``col < own``, and ``position − start +
    1`` of them on its own row.
    """
    count = torch.where(col < own, length, position - start + 1)
    return torch.where(readable, count.clamp(min=1).double().log(), float("-inf"))


def exact_concept_attention(
    q_TNH: torch.Tensor, k_CKH: torch.Tensor, v_CKH: torch.Tensor, layout: ConceptLayout, tok: PackedSeqs
) -> torch.Tensor:
    """Attention over the C unique key rows with the explicit log-count bias (dense reference)."""
    bias_TC = concept_bias(layout, tok).to(q_TNH.dtype)
    out_NTH = F.scaled_dot_product_attention(
        q_TNH.transpose(0, 1),
        k_CKH.transpose(0, 1),
        v_CKH.transpose(0, 1),
        attn_mask=bias_TC,
        enable_gqa=True,
    )
    return out_NTH.transpose(0, 1)


class CrossAttentionBlock(nn.Module):
    """Ψ: encoder states H read completed concepts; residual to H, then a SwiGLU FFN."""

    def __init__(
        self,
        d_token: int,
        d_concept: int,
        cfg: CrossConfig,
        std_token: float,
        std_concept: float,
        null_std: float,
        norm_eps: float,
        backend: str,
    ) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = d_token // cfg.n_heads
        self.impl = cfg.impl
        self.backend = backend
        self.null_std = null_std
        # μP: bridge matrices go by fan-in: W_Q, W_O read/write the token stream, W_K, W_V read concepts.
        self.wq = Linear(d_token, cfg.n_heads * self.head_dim, std_token)
        self.wk = Linear(d_concept, cfg.n_kv_heads * self.head_dim, std_concept)
        self.wv = Linear(d_concept, cfg.n_kv_heads * self.head_dim, std_concept)
        self.wo = Linear(cfg.n_heads * self.head_dim, d_token, std_token)
        self.q_norm = RMSNorm(self.head_dim, norm_eps)
        self.k_norm = RMSNorm(self.head_dim, norm_eps)
        self.null_concept = nn.Parameter(torch.empty(d_concept))
        self.ffn_norm = RMSNorm(d_token, norm_eps)
        self.ffn = SwiGLU(d_token, cfg.ffn_hidden, std_token)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.null_concept, mean=0.0, std=self.null_std)

    def queries(self, h_TD: torch.Tensor) -> torch.Tensor:
        """``q_TNH = RMSNorm(H W_Q)`` per head, for rows of any leading shape (decoding reuses it)."""
        return self.q_norm(self.wq(h_TD).unflatten(-1, (self.n_heads, self.head_dim)))

    def keys_values(self, keys_CD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``K = RMSNorm(Z' W_K)`` and ``V = Z' W_V`` per KV head of the (shifted) concept rows."""
        k_CKH = self.k_norm(self.wk(keys_CD).unflatten(-1, (self.n_kv_heads, self.head_dim)))
        return k_CKH, self.wv(keys_CD).unflatten(-1, (self.n_kv_heads, self.head_dim))

    def attend(self, h_TD: torch.Tensor, z_CD: torch.Tensor, layout: ConceptLayout, tok: PackedSeqs) -> torch.Tensor:
        """Multi-head attention output (before W_O) of every token over its readable concepts."""
        q_TNH = self.queries(h_TD)
        k_CKH, v_CKH = self.keys_values(shift_concepts(z_CD, self.null_concept, layout))
        if resolve_cross_impl(self.impl, q_TNH.device.type, tok.max_seqlen) == "exact":
            # FlexAttention has no CPU backward: the dense [T, C] form is the CPU path (and the reference).
            exact = flex_concept_attention if q_TNH.is_cuda else exact_concept_attention
            return exact(q_TNH, k_CKH, v_CKH, layout, tok)
        cid_T = layout.concept_id_T
        return causal_attention(q_TNH, k_CKH[cid_T], v_CKH[cid_T], tok, self.backend)

    def forward(
        self,
        h_TD: torch.Tensor,
        z_CD: torch.Tensor,
        layout: ConceptLayout,
        tok: PackedSeqs,
        confidence_T: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.finish(h_TD, self.attend(h_TD, z_CD, layout, tok), confidence_T)

    def finish(
        self, h_TD: torch.Tensor, attn_TNH: torch.Tensor, confidence_T: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``W_O``, the optional straight-through confidence, the residual to H (Eq. 14) and the FFN."""
        read_TD = self.wo(attn_TNH.flatten(-2))
        if confidence_T is not None:
            read_TD = read_TD * confidence_T[..., None].to(read_TD.dtype)
        x_TD = h_TD + read_TD
        return x_TD + self.ffn(self.ffn_norm(x_TD))
