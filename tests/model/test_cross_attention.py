"""Cross-attention Ψ: shift-by-one with a null concept, replication vs explicit references, exact L×C form."""

from __future__ import annotations

import math

import pytest
import torch

from dlcm.model.config import CrossConfig
from dlcm.model.cross_attention import CrossAttentionBlock, shift_concepts
from dlcm.model.packing import PackedSeqs
from dlcm.model.pooling import concept_layout
from tests.conftest import random_boundaries, random_cu_seqlens

D_TOKEN, D_CONCEPT = 16, 24


def make_case(seed: int, doc_lengths: list[int], rate: float, impl: str = "replicate", kv_heads: int = 2):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    cu = random_cu_seqlens(doc_lengths)
    total = int(cu[-1])
    tok = PackedSeqs.from_cu_seqlens(cu, total)
    layout = concept_layout(random_boundaries(cu, rate, g), tok)
    block = CrossAttentionBlock(
        D_TOKEN, D_CONCEPT, CrossConfig(4, kv_heads, 32, impl), 0.3, 0.3, 1.0, 1e-6, "sdpa"
    ).double()
    h_TD = torch.randn(total, D_TOKEN, generator=g, dtype=torch.float64)
    z_CD = torch.randn(layout.num_concepts, D_CONCEPT, generator=g, dtype=torch.float64)
    return block, h_TD, z_CD, layout, tok


def projections(block: CrossAttentionBlock, h_TD, z_CD, layout):
    keys_CD = shift_concepts(z_CD, block.null_concept, layout)
    t, c, hd = h_TD.shape[0], z_CD.shape[0], block.head_dim
    q = block.q_norm(block.wq(h_TD).view(t, block.n_heads, hd))
    k = block.k_norm(block.wk(keys_CD).view(c, block.n_kv_heads, hd))
    v = block.wv(keys_CD).view(c, block.n_kv_heads, hd)
    groups = block.n_heads // block.n_kv_heads
    return q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)


def replicated_reference(block, h_TD, z_CD, layout, tok):
    """Eq. 17 literally: key slot s holds row concept_id[s]; token t softmaxes over slots start(doc)..t."""
    q, k, v = projections(block, h_TD, z_CD, layout)
    cid = layout.concept_id_T.tolist()
    out = torch.zeros_like(q)
    for t in range(h_TD.shape[0]):
        slots = [cid[s] for s in range(int(tok.cu_seqlens[tok.doc_id[t]]), t + 1)]
        scores = torch.einsum("nh,snh->ns", q[t], k[slots]) / math.sqrt(q.shape[-1])
        out[t] = torch.einsum("ns,snh->nh", scores.softmax(-1), v[slots])
    return out


def unique_concept_reference(block, h_TD, z_CD, layout, tok):
    """The same function over unique rows: token t in concept j reads rows first(doc)..j with +log n bias."""
    q, k, v = projections(block, h_TD, z_CD, layout)
    cid = layout.concept_id_T.tolist()
    out = torch.zeros_like(q)
    for t in range(h_TD.shape[0]):
        doc_start = int(tok.cu_seqlens[tok.doc_id[t]])
        rows = sorted(set(cid[doc_start : t + 1]))
        counts = torch.tensor([cid[doc_start : t + 1].count(r) for r in rows], dtype=torch.float64)
        scores = torch.einsum("nh,rnh->nr", q[t], k[rows]) / math.sqrt(q.shape[-1]) + counts.log()
        out[t] = torch.einsum("nr,rnh->nh", scores.softmax(-1), v[rows])
    return out


def test_shift_puts_null_first_and_previous_concept_after() -> None:
    cu = random_cu_seqlens([5, 3])
    tok = PackedSeqs.from_cu_seqlens(cu, 8)
    layout = concept_layout(torch.tensor([1, 0, 1, 0, 0, 1, 1, 0], dtype=torch.bool), tok)
    z_CD = torch.arange(4.0)[:, None].expand(4, 3)
    null_D = torch.full((3,), -1.0)
    # Rows: [∅A, z0, ∅B, z2] as in the worked example of dlcm/model/cross_attention.py.
    assert shift_concepts(z_CD, null_D, layout)[:, 0].tolist() == [-1.0, 0.0, -1.0, 2.0]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_replication_equals_explicit_per_token_references(kv_heads: int) -> None:
    block, h_TD, z_CD, layout, tok = make_case(0, [11, 1, 23, 6], rate=0.35, kv_heads=kv_heads)
    out = block.attend(h_TD, z_CD, layout, tok)
    torch.testing.assert_close(out, replicated_reference(block, h_TD, z_CD, layout, tok))
    torch.testing.assert_close(out, unique_concept_reference(block, h_TD, z_CD, layout, tok))


def test_exact_lxc_form_equals_replication_forward_and_backward() -> None:
    block, h_TD, z_CD, layout, tok = make_case(1, [19, 2, 31], rate=0.3)
    exact = CrossAttentionBlock(D_TOKEN, D_CONCEPT, CrossConfig(4, 2, 32, "exact"), 0.3, 0.3, 1.0, 1e-6, "sdpa")
    exact = exact.double()
    exact.load_state_dict(block.state_dict())
    h_TD.requires_grad_()
    z_CD.requires_grad_()
    rep, ext = block(h_TD, z_CD, layout, tok), exact(h_TD, z_CD, layout, tok)
    torch.testing.assert_close(ext, rep)
    grads_rep = torch.autograd.grad(rep.square().sum(), (h_TD, z_CD, *block.parameters()))
    grads_ext = torch.autograd.grad(ext.square().sum(), (h_TD, z_CD, *exact.parameters()))
    for a, b in zip(grads_ext, grads_rep, strict=True):
        torch.testing.assert_close(a, b)


def test_token_never_reads_its_own_or_later_concepts() -> None:
    block, h_TD, z_CD, layout, tok = make_case(2, [17, 9], rate=0.4)
    base = block.attend(h_TD, z_CD, layout, tok)
    for j in range(layout.num_concepts):
        perturbed = z_CD.clone()
        perturbed[j:] += 5.0
        out = block.attend(h_TD, perturbed, layout, tok)
        # Tokens of concepts ≤ j read rows ≤ j, which hold concepts < j (or null): unchanged.
        reads_before_j = layout.concept_id_T <= j
        torch.testing.assert_close(out[reads_before_j], base[reads_before_j])


def test_flex_backend_replication_matches_sdpa() -> None:
    block, h_TD, z_CD, layout, tok = make_case(3, [13, 20], rate=0.3)
    block = block.float()
    ref = block.attend(h_TD.float(), z_CD.float(), layout, tok)
    block.backend = "flex"
    with torch.no_grad():
        torch.testing.assert_close(block.attend(h_TD.float(), z_CD.float(), layout, tok), ref, rtol=1e-5, atol=1e-6)


def test_flex_concept_attention_matches_dense_reference_and_its_blocks_are_exact() -> None:
    from dlcm.model.concept_attention import ROW_BUCKET, flex_concept_attention, readable_block_mask, readable_rows
    from dlcm.model.cross_attention import exact_concept_attention

    g = torch.Generator().manual_seed(4)
    cu = random_cu_seqlens([300, 5, 700, 1, 400])
    total = int(cu[-1])
    tok = PackedSeqs.from_cu_seqlens(cu, total)
    layout = concept_layout(random_boundaries(cu, 0.17, g), tok)
    c = layout.num_concepts
    q = torch.randn(total, 4, 16, generator=g)
    k, v = torch.randn(c, 2, 16, generator=g), torch.randn(c, 2, 16, generator=g)
    with torch.no_grad():  # eager FlexAttention: forward only on CPU (the gpu tests cover backward)
        torch.testing.assert_close(
            flex_concept_attention(q, k, v, layout, tok), exact_concept_attention(q, k, v, layout, tok)
        )
    rows = -(-c // ROW_BUCKET) * ROW_BUCKET
    first_T, j_T = readable_rows(layout, tok)
    mask = readable_block_mask(first_T, j_T, rows)
    cols = torch.arange(rows)
    readable = (cols[None] >= first_T[:, None]) & (cols[None] <= j_T[:, None])
    pad = -total % 128
    tiles = torch.nn.functional.pad(readable, (0, 0, 0, pad)).view(-1, 128, rows // 128, 128)
    any_readable = tiles.any(3).any(1)
    # Padded query rows of the last block are not real queries: judge "full" on real rows only.
    real = torch.nn.functional.pad(torch.ones(total, dtype=torch.bool), (0, pad)).view(-1, 128)
    all_readable = (tiles | ~real[:, :, None, None]).all(3).all(1)
    partial = torch.zeros_like(any_readable)
    full = torch.zeros_like(any_readable)
    for qb in range(any_readable.shape[0]):
        partial[qb, mask.kv_indices[0, 0, qb, : mask.kv_num_blocks[0, 0, qb]].long()] = True
        full[qb, mask.full_kv_indices[0, 0, qb, : mask.full_kv_num_blocks[0, 0, qb]].long()] = True
    assert torch.equal(partial | full, any_readable)  # every touched tile is listed, nothing else
    assert not (partial & full).any()
    assert torch.equal(full, full & all_readable)  # a "full" tile really is fully readable
