"""Incremental decoding for DLCM and the dense baseline (SPEC §7), and a sampling loop on top of it.

DLCM decoding state of one document, after ``t`` tokens (boundaries thresholded at ``p ≥ 0.5``, i.e. eval mode):

- encoder and decoder KV caches over tokens (RoPE position = token position);
- the parser's last query ``q_{t−1}``, so ``p_t`` needs only the new encoder state;
- the open concept's encoder states (it is pooled once the next boundary shows it is complete);
- a backbone KV cache over *completed* concepts (RoPE position = concept index): one backbone step per concept,
  which keeps the FLOPs saving at decode time;
- the EMA state ``z̃`` of the last completed concept;
- Ψ's key/value rows of the shifted concept sequence: row 0 the null concept, row ``j`` concept ``j − 1``.

A boundary at token ``t`` completes concept ``j − 1``: pool, ``W_up``, backbone step, smooth, append row ``j``.
Token ``t`` (first of concept ``j``) then reads rows ``0 … j``, so the concept that just completed is exactly the
newest row. Replication (Eq. 17) is computed on the unique rows with its log-count bias (as
:func:`dlcm.cross_attention.exact_concept_attention`):

    token t            0    1    2       3       4       (boundaries at 0, 2)
    concept j          0    0    1       1       1
    rows read          ∅    ∅    ∅,z̃0   ∅,z̃0   ∅,z̃0
    bias (log n)       0    l2   l2,0    l2,l2   l2,l3   (lk = log k)

Prompts are processed as one chunk (``extend`` accepts any number of new tokens), generation one token at a time;
both give the logits of a full forward pass of the document in eval mode. Prompts of a batch run one after the
other (:func:`generate_batch`); there is no padded batching.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dlcm.baseline import DenseBaseline
from dlcm.kv_cache import StackCache
from dlcm.model import DLCM
from dlcm.smoothing import P_MIN

if TYPE_CHECKING:
    from tokenizers import Tokenizer


class BaselineDecoder:
    """KV-cached decoding of one document through the dense baseline."""

    def __init__(self, model: DenseBaseline) -> None:
        self.model = model
        self.stack = StackCache(model.stack)

    @property
    def position(self) -> int:
        return self.stack.length

    def extend(self, ids_N: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, V]`` of ``n`` new tokens appended to the document."""
        return self.model.head(self.stack.extend(self.model.embed(ids_N)))


class DLCMDecoder:
    """KV-cached decoding of one document through DLCM (thresholded boundaries, the eval-mode model)."""

    def __init__(self, model: DLCM) -> None:
        self.model = model
        self.encoder = StackCache(model.encoder)
        self.backbone = StackCache(model.backbone)
        self.decoder = StackCache(model.decoder)
        self.position = 0  # tokens seen so far
        self.prev_q_1S: torch.Tensor | None = None  # parser query of the last token, (at least) fp32
        self.open_h_LD: torch.Tensor | None = None  # encoder states of the open (last, incomplete) concept
        self.starts: list[int] = []  # first token of every started concept
        self.start_probs: list[torch.Tensor] = []  # p at each concept's first token (the EMA's P_k)
        self.z_smooth_1D: torch.Tensor | None = None  # z̃ of the last completed concept
        cross = model.cross
        null_1D = cross.null_concept[None, :]
        self.cross_k_RKH = cross.k_norm(cross.wk(null_1D).view(1, cross.n_kv_heads, cross.head_dim))
        self.cross_v_RKH = cross.wv(null_1D).view(1, cross.n_kv_heads, cross.head_dim)

    @property
    def num_concepts(self) -> int:
        """Concepts started so far (the open one included), as a full forward would count them."""
        return len(self.starts)

    def extend(self, ids_N: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, V]`` of ``n`` new tokens appended to the document."""
        m, n, pos0 = self.model, ids_N.shape[0], self.position
        h_ND = self.encoder.extend(m.embed(ids_N))
        prob_N = self._boundary_prob(h_ND)
        boundary_N = prob_N >= 0.5
        if pos0 == 0:
            boundary_N[0] = True  # document start (prob is already 1 there; forced as in the parser)
        new = boundary_N.nonzero().flatten().tolist()
        base = self.starts[-1] if self.starts else pos0  # token position of h_LD's first row
        h_LD = h_ND if self.open_h_LD is None else torch.cat([self.open_h_LD, h_ND])
        first_done = max(len(self.starts) - 1, 0)
        self.starts += [pos0 + i for i in new]
        self.start_probs += [prob_N[i] for i in new]
        self._complete(h_LD, base, first_done, len(self.starts) - 1)
        self.open_h_LD = h_LD[self.starts[-1] - base :]
        self.position += n
        x_ND = self._cross(h_ND, prob_N, boundary_N, pos0)
        return m.head(self.decoder.extend(x_ND))

    def _boundary_prob(self, h_ND: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as GlobalParser.boundary_prob, with q_{t−1} carried over from the previous call.
        wq, wk = self.model.parser.wq.weight, self.model.parser.wk.weight
        with torch.autocast(device_type=h_ND.device.type, enabled=False):
            acc = torch.promote_types(h_ND.dtype, torch.float32)
            q_NS = F.linear(h_ND.to(acc), wq.to(acc))
            k_NS = F.linear(h_ND.to(acc), wk.to(acc))
            prev_NS = torch.cat([q_NS[:1] if self.prev_q_1S is None else self.prev_q_1S, q_NS[:-1]])
            cos_N = F.cosine_similarity(prev_NS, k_NS, dim=-1, eps=1e-8)
            prob_N = ((1.0 - cos_N) / 2.0).clamp(0.0, 1.0)
        if self.prev_q_1S is None:
            prob_N[0] = 1.0
        self.prev_q_1S = q_NS[-1:]
        return prob_N

    def _complete(self, h_LD: torch.Tensor, base: int, first: int, stop: int) -> None:
        """Pool concepts ``first … stop−1`` (now complete), run them through the backbone, smooth, add Ψ rows."""
        if stop <= first:
            return
        m = self.model
        acc = torch.promote_types(h_LD.dtype, torch.float32)
        pooled = [
            h_LD[self.starts[k] - base : self.starts[k + 1] - base].to(acc).mean(dim=0) for k in range(first, stop)
        ]
        z_MD = self.backbone.extend(m.pooling.w_up(torch.stack(pooled).to(h_LD.dtype)))
        rows = []
        for i, k in enumerate(range(first, stop)):
            z_1D = z_MD[i : i + 1]
            if m.smoothing.kind != "identity":
                # z̃_k = P_k z_k + (1 − P_k) z̃_{k−1}, restarted (P = 1) on the document's first concept.
                keep = 1.0 if k == 0 else self.start_probs[k].to(acc).clamp(P_MIN, 1.0 - P_MIN)
                prev = 0.0 if self.z_smooth_1D is None else (1.0 - keep) * self.z_smooth_1D
                self.z_smooth_1D = keep * z_1D.to(acc) + prev  # the state stays in acc, like ema_scan
                z_1D = self.z_smooth_1D.to(z_MD.dtype)
            rows.append(z_1D)
        cross, keys_MD = m.cross, torch.cat(rows)
        k_MKH = cross.k_norm(cross.wk(keys_MD).view(-1, cross.n_kv_heads, cross.head_dim))
        v_MKH = cross.wv(keys_MD).view(-1, cross.n_kv_heads, cross.head_dim)
        self.cross_k_RKH = torch.cat([self.cross_k_RKH, k_MKH])
        self.cross_v_RKH = torch.cat([self.cross_v_RKH, v_MKH])

    def _cross(self, h_ND: torch.Tensor, prob_N: torch.Tensor, boundary_N: torch.Tensor, pos0: int) -> torch.Tensor:
        """Ψ for the new tokens over the unique concept rows, with the replication log-count bias."""
        cross, n, dev = self.model.cross, h_ND.shape[0], h_ND.device
        starts_R = torch.tensor(self.starts, device=dev)
        length_R = F.pad(starts_R.diff(), (0, 1), value=1)  # the open concept's length is never read
        t_N = torch.arange(pos0, pos0 + n, device=dev)
        j_N = torch.searchsorted(starts_R, t_N, right=True) - 1
        cols_R = torch.arange(starts_R.shape[0], device=dev)
        count_NR = torch.where(cols_R[None, :] < j_N[:, None], length_R[None, :], t_N[:, None] - starts_R[None, :] + 1)
        bias_NR = torch.where(cols_R[None, :] <= j_N[:, None], count_NR.clamp(min=1).double().log(), float("-inf"))
        q_NnH = cross.q_norm(cross.wq(h_ND).view(n, cross.n_heads, cross.head_dim))
        out_nNH = F.scaled_dot_product_attention(
            q_NnH.transpose(0, 1),
            self.cross_k_RKH.transpose(0, 1),
            self.cross_v_RKH.transpose(0, 1),
            attn_mask=bias_NR.to(q_NnH.dtype),
            enable_gqa=True,
        )
        read_ND = cross.wo(out_nNH.transpose(0, 1).reshape(n, -1))
        if self.model.cfg.parser.router_grad == "ste":
            # The straight-through confidence reads 1 in the forward pass; reproduce its rounding exactly.
            chosen_N = torch.where(boundary_N, prob_N, 1.0 - prob_N)
            read_ND = read_ND * (chosen_N + (1.0 - chosen_N))[:, None].to(read_ND.dtype)
        x_ND = h_ND + read_ND
        return x_ND + cross.ffn(cross.ffn_norm(x_ND))


def incremental_decoder(model: nn.Module) -> DLCMDecoder | BaselineDecoder:
    """A fresh single-document decoder for ``model``; the model must be in eval mode (thresholded boundaries)."""
    if model.training:
        raise ValueError("incremental decoding reproduces the eval-mode model: call model.eval() first")
    if isinstance(model, DLCM):
        return DLCMDecoder(model)
    if isinstance(model, DenseBaseline):
        return BaselineDecoder(model)
    raise TypeError(f"no incremental decoder for {type(model).__name__}: expected DLCM or DenseBaseline")


def sample_token(
    logits_V: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Next token: argmax at ``temperature = 0``, else a draw from the tempered, top-k / top-p filtered softmax."""
    if temperature <= 0.0:
        return int(logits_V.argmax())
    logits_V = logits_V.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits_V, min(top_k, logits_V.shape[0])).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_V, order_V = torch.sort(logits_V, descending=True)
        probs_V = sorted_V.softmax(dim=-1)
        # Drop a token once the mass before it already reaches top_p; the most likely token always stays.
        drop_V = probs_V.cumsum(dim=-1) - probs_V >= top_p
        logits_V = logits_V.scatter(0, order_V, sorted_V.masked_fill(drop_V, float("-inf")))
    probs_V = logits_V.softmax(dim=-1)
    return int(torch.multinomial(probs_V.cpu(), 1, generator=generator))


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    should_stop: Callable[[list[int]], bool] | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continue one prompt (a non-empty document prefix) by up to ``max_new_tokens`` tokens.

    Returns the new tokens only. Decoding halts after a token of ``stop_tokens`` (which ends the returned list) or
    once ``should_stop(new_tokens)`` is true. ``generator`` (CPU) makes sampling reproducible.
    """
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids must hold at least one token (the model has no implicit start token)")
    decoder = incremental_decoder(model)
    device = next(model.parameters()).device
    logits_V = decoder.extend(torch.tensor(list(prompt_ids), dtype=torch.int64, device=device))[-1]
    stops, new = set(stop_tokens), []
    for _ in range(max_new_tokens):
        token = sample_token(logits_V, temperature, top_k, top_p, generator)
        new.append(token)
        if token in stops or (should_stop is not None and should_stop(new)):
            break
        logits_V = decoder.extend(torch.tensor([token], dtype=torch.int64, device=device))[0]
    return new


def generate_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """:func:`generate` for prompts of any lengths, one after the other (no padded batching)."""
    return [
        generate(model, prompt, max_new_tokens, temperature, top_k, top_p, stop_tokens, None, generator)
        for prompt in prompts
    ]


def generate_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> str:
    """Text continuation of ``prompt``, cut before the first of ``stop_strings`` it produces."""

    def first_stop(text: str) -> int:
        hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
        return min(hits) if hits else -1

    new = generate(
        model,
        tokenizer.encode(prompt).ids,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        stop_tokens,
        (lambda ids: first_stop(tokenizer.decode(ids)) >= 0) if stop_strings else None,
        generator,
    )
    text = tokenizer.decode(new)
    cut = first_stop(text)
    return text if cut < 0 else text[:cut]
