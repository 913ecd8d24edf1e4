"""Every attention backend computes the same document-causal function as the dense SDPA reference."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from dlcm.model import attention_backends
from dlcm.model.attention_backends import causal_attention, flash_attn_available, resolve_backend
from dlcm.model.packing import PackedSeqs
from tests.conftest import random_cu_seqlens

DOCS = [5, 17, 1, 33, 8]


def per_document_reference(q_TNH, k_TKH, v_TKH, cu_seqlens):
    """Obviously-correct loop: softmax over each document's causal prefix, one query at a time."""
    groups = q_TNH.shape[1] // k_TKH.shape[1]
    k_TNH, v_TNH = k_TKH.repeat_interleave(groups, 1), v_TKH.repeat_interleave(groups, 1)
    out = torch.zeros_like(q_TNH)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        for t in range(start, end):
            scores_NS = torch.einsum("nh,snh->ns", q_TNH[t], k_TNH[start : t + 1]) / math.sqrt(q_TNH.shape[-1])
            out[t] = torch.einsum("ns,snh->nh", scores_NS.softmax(-1), v_TNH[start : t + 1])
    return out


def random_qkv(total: int, heads: int, kv_heads: int, head_dim: int, dtype, device="cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = lambda n: (total, n, head_dim)  # noqa: E731
    return tuple(torch.randn(shape(n), generator=g, dtype=dtype).to(device) for n in (heads, kv_heads, kv_heads))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("layout", ["dense", "padded"])
def test_sdpa_matches_per_document_loop(kv_heads: int, layout: str) -> None:
    docs = DOCS if layout == "dense" else [5, 9, 1, 12, 8, 3, 11, 7]
    cu = random_cu_seqlens(docs)
    q, k, v = random_qkv(int(cu[-1]), 4, kv_heads, 8, torch.float64)
    # A tight max_seqlen makes the padded [docs, max_seqlen] layout the cheaper one; the row count keeps it dense.
    max_seqlen = max(docs) if layout == "padded" else None
    seqs = PackedSeqs.from_cu_seqlens(cu, q.shape[0], max_seqlen)
    out = causal_attention(q, k, v, seqs, "sdpa")
    assert ("sdpa_mask" in seqs.cache) == (layout == "dense")
    torch.testing.assert_close(out, per_document_reference(q, k, v, cu))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_flex_matches_sdpa_fp32(kv_heads: int) -> None:
    # FlexAttention has no CPU backward in torch 2.13: forward here, gradients in the gpu test below.
    cu = random_cu_seqlens(DOCS)
    q, k, v = random_qkv(int(cu[-1]), 4, kv_heads, 16, torch.float32)
    seqs = PackedSeqs.from_cu_seqlens(cu, q.shape[0])
    ref = causal_attention(q, k, v, seqs, "sdpa")
    torch.testing.assert_close(causal_attention(q, k, v, seqs, "flex"), ref, rtol=1e-5, atol=1e-6)


def test_auto_resolves_to_sdpa_on_cpu_and_rejects_unknown_names() -> None:
    assert resolve_backend("auto", torch.zeros(1)) == "sdpa"
    with pytest.raises(ValueError, match=r"attn_backend='flash2' is not allowed"):
        resolve_backend("flash2", torch.zeros(1))


def test_gpu_backends_refuse_cpu_fp32_with_a_clear_error() -> None:
    cu = random_cu_seqlens([4])
    q, k, v = random_qkv(4, 2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match=r"attn_backend='varlen' needs fp16/bf16 CUDA tensors"):
        causal_attention(q, k, v, PackedSeqs.from_cu_seqlens(cu, 4), "varlen")


# All that resolve_backend reads of q.
HALF_CUDA = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cuda", 0))


@pytest.fixture
def fake_flash(monkeypatch):
    """Install fake ``flash_attn`` / ``flash_attn.cute`` modules (``name -> module``) for one test."""
    attention_backends.flash_varlen_entry.cache_clear()

    def install(name: str, func=None) -> None:
        module = types.ModuleType(name)
        if func is not None:
            module.flash_attn_varlen_func = func
        monkeypatch.setitem(sys.modules, name, module)
        attention_backends.flash_varlen_entry.cache_clear()

    yield install
    monkeypatch.undo()
    attention_backends.flash_varlen_entry.cache_clear()


def fa2_signature(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, causal=False):
    raise AssertionError("not called")


def test_auto_skips_a_flash_attn_without_the_varlen_entry(fake_flash) -> None:
    # FlashAttention-4 alone installs the flash_attn namespace with only flash_attn.cute inside.
    fake_flash("flash_attn")
    assert not flash_attn_available() and resolve_backend("auto", HALF_CUDA) == "varlen"
    fake_flash("flash_attn", lambda q, k, v, lengths, causal=False: q)  # another API: no cu_seqlens_q, ...
    assert not flash_attn_available() and resolve_backend("auto", HALF_CUDA) == "varlen"
    fake_flash("flash_attn", fa2_signature)
    assert flash_attn_available() and resolve_backend("auto", HALF_CUDA) == "flash_attn"


@pytest.mark.parametrize(("capability", "expected"), [((9, 0), "flash_attn_cute"), ((8, 0), "flash_attn")])
def test_auto_prefers_flash_attention_4_on_hopper(fake_flash, monkeypatch, capability, expected) -> None:
    fake_flash("flash_attn", fa2_signature)
    fake_flash("flash_attn.cute", fa2_signature)
    attention_backends._sm90_or_newer.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    try:
        assert resolve_backend("auto", HALF_CUDA) == expected
    finally:
        attention_backends._sm90_or_newer.cache_clear()


def test_flash_backends_without_their_entry_fail_with_a_clear_error(fake_flash) -> None:
    fake_flash("flash_attn")
    cu = random_cu_seqlens([4])
    q, k, v = random_qkv(4, 2, 2, 8, torch.float32)
    seqs = PackedSeqs.from_cu_seqlens(cu, 4)
    with pytest.raises(
        ValueError, match=r"attn_backend='flash_attn_cute' needs flash_attn.cute.flash_attn_varlen_func"
    ):
        attention_backends._flash_attn(q, k, v, seqs, "flash_attn_cute")


@pytest.mark.parametrize(("backend", "returns_lse"), [("flash_attn", False), ("flash_attn_cute", True)])
def test_flash_backends_call_the_varlen_entry_with_document_offsets(fake_flash, backend: str, returns_lse: bool):
    cu = random_cu_seqlens(DOCS)
    q, k, v = random_qkv(int(cu[-1]), 4, 2, 8, torch.float64)
    seqs = PackedSeqs.from_cu_seqlens(cu, q.shape[0], max(DOCS))

    def varlen(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, causal=False):
        assert causal and cu_seqlens_q is cu_seqlens_k is seqs.cu_seqlens and max_seqlen_q == max_seqlen_k == max(DOCS)
        out = per_document_reference(q, k, v, cu_seqlens_q)
        return (out, torch.zeros(q.shape[:2])) if returns_lse else out

    fake_flash(attention_backends.FLASH_MODULES[backend], varlen)
    out = attention_backends._flash_attn(q, k, v, seqs, backend)
    torch.testing.assert_close(out, causal_attention(q, k, v, seqs, "sdpa"))


def gpu_backends() -> list[str]:
    flash = [name for name in attention_backends.FLASH_MODULES if flash_attn_available(name)]
    return ["varlen", "flex", *flash]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_gpu_backend_matches_sdpa_bf16(backend: str, kv_heads: int) -> None:
    cu = random_cu_seqlens([300, 1, 1000, 77, 670], device="cuda")
    total = int(cu[-1])
    q, k, v = (x.requires_grad_() for x in random_qkv(total, 8, kv_heads, 64, torch.bfloat16, "cuda"))
    seqs = PackedSeqs.from_cu_seqlens(cu, total, max_seqlen=1000)
    # Reference in fp32 from the same bf16 inputs; bf16 kernels agree to bf16 rounding.
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = causal_attention(q32, k32, v32, seqs, "sdpa")
    out = causal_attention(q, k, v, seqs, backend)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    grad_out = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    grad_ref = torch.autograd.grad(ref.square().sum(), (q32, k32, v32))
    for a, b in zip(grad_out, grad_ref, strict=True):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)
