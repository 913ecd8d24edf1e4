"""Batched incremental decoding for DLCM and the dense baseline (docs/design.md), and a sampling loop on top of it.

A decoder holds ``B`` documents of different lengths and runs one forward per call for all of them: a prompt chunk
(``counts[b]`` new tokens for document ``b``, padded to the longest) or one generated token each. Its logits equal
those of a full eval-mode forward pass of each document on its own (boundaries thresholded at the parser's ``τ``).

DLCM decoding state per document, after ``t`` tokens:

- encoder and decoder KV caches over tokens (:class:`~dlcm.infer.kv_cache.StackCache`, RoPE position = token position);
- the parser's last query ``q_{t−1}``, so ``p_t`` needs only the new encoder state;
- the encoder states and ``p`` of its tokens (a concept is pooled once the next boundary shows it is complete, and
  the EMA reads ``p`` at the concept's first token);
- a backbone KV cache over *completed* concepts (RoPE position = concept index): one backbone step per concept,
  which keeps the FLOPs saving at decode time. A call steps it for all documents at once on the concepts they
  complete (padded to the most any completes; padding rows are written past a document's concepts, never read);
- the EMA state ``z̃`` of the last completed concept;
- Ψ's key/value rows of the shifted concept sequence: row 0 the null concept, row ``c + 1`` concept ``c``; and every
  concept's first token and length, which give the replication log-count bias.

A boundary at token ``t`` completes concept ``j − 1``: pool, ``W_up``, backbone step, smooth, append row ``j``.
Token ``t`` (first of concept ``j``) then reads rows ``0 … j``, so the concept that just completed is exactly the
newest row. Replication (Eq. 17) is computed on the unique rows with its log-count bias (as
:func:`dlcm.model.cross_attention.exact_concept_attention`):

    token t            0    1    2       3       4       (boundaries at 0, 2)
    concept j          0    0    1       1       1
    rows read          ∅    ∅    ∅,z̃0   ∅,z̃0   ∅,z̃0
    bias (log n)       0    l2   l2,0    l2,l2   l2,l3   (lk = log k)

Every call reads back once, per document, how many concepts its new tokens start and where the newest starts
(which sizes the backbone step: ``M`` completed concepts per document at most); the concept work itself —
starts, lengths, pooling, backbone, smoothing, Ψ rows — runs on the device from the boundary flags, and nothing
else in a call waits for the device.

Generation is bound by kernel launches, not arithmetic, so single-token steps have their own path:
:meth:`DLCMDecoder.step` keeps the step's state on the device (positions, concept counts, the open concept's first
token), reads every cache at full capacity under masks, pools the completing concept with a masked sum, and runs the
backbone for every document with only the completing ones keeping the result. With no host values inside, its three
phases (token stream and boundary; backbone step, only launched when some document completed a concept; Ψ, decoder
and head) replay as CUDA graphs (:mod:`dlcm.infer.step_graph`), and the boundary decisions stay the one read.
:meth:`extend` and :meth:`step` may alternate; both equal the full forward (tested). The modules' own
step methods do the maths (:meth:`GlobalParser.scan_projections`, :meth:`ConceptSmoothing.resume`,
:meth:`CrossAttentionBlock.keys_values` …), so decoding and the training forward share one definition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from dlcm.infer.kv_cache import StackCache, cached_attention, host_to_device, hosts_to_device
from dlcm.infer.step_graph import StepGraph
from dlcm.model.baseline import DenseBaseline
from dlcm.model.cross_attention import log_count_bias
from dlcm.model.dlcm import DLCM
from dlcm.model.pooling import mean_pool

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def _counts(ids_Bn: torch.Tensor, counts: Sequence[int] | None) -> list[int]:
    b, n = ids_Bn.shape
    counts = [n] * b if counts is None else list(counts)
    if len(counts) != b or any(not 0 <= c <= n for c in counts):
        raise ValueError(f"counts={counts} is not allowed: {b} integers in [0, {n}] (new tokens per document)")
    return counts


def _check_last_only(counts: list[int]) -> None:
    if min(counts) < 1:
        raise ValueError(f"last_only needs at least one new token per document, got counts={counts}")


def _step_inputs(
    counts: list[int], lengths: list[int], n: int, *more: list[int], device: torch.device
) -> tuple[torch.Tensor, ...]:
    """On the device, in one copy: the new rows' positions ``[B, n]`` (cached length + offset), each document's last
    new row, and the further host lists ``more``."""
    before_B, last_B, *rest = hosts_to_device([lengths, [max(c - 1, 0) for c in counts], *more], device)
    return before_B[:, None] + torch.arange(n, device=device)[None, :], last_B, *rest


class BaselineDecoder:
    """KV-cached decoding of a batch of documents through the dense baseline: :meth:`extend` for chunks (prompts),
    :meth:`step` for one token per document (one CUDA graph on a GPU)."""

    def __init__(self, model: DenseBaseline, batch: int, capacity: int, cuda_graphs: bool = True) -> None:
        param = next(model.parameters())
        self.model = model
        self.stack = StackCache(model.stack, batch, capacity, param.device, param.dtype)
        self.token_B = torch.zeros(batch, dtype=torch.int64, device=param.device)
        self.synced = True  # stack.length_B equals the host lengths
        self.graph = StepGraph(self._token_step, cuda_graphs and param.device.type == "cuda")
        self.graph_capacity = capacity  # the buffers' size when the graph was (or will be) captured

    @property
    def lengths(self) -> list[int]:
        """Tokens of each document seen so far."""
        return self.stack.lengths

    @torch.no_grad()
    def extend(
        self, ids_Bn: torch.Tensor, counts: Sequence[int] | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """Logits ``[B, n, V]`` of ``counts[b]`` new tokens per document (padding rows are junk), or ``[B, V]`` of
        each document's last new token with ``last_only``."""
        counts = _counts(ids_Bn, counts)
        if last_only:
            _check_last_only(counts)
        position_Bn, last_B = _step_inputs(counts, self.lengths, ids_Bn.shape[1], device=ids_Bn.device)
        h_BnD = self.stack.extend(self.model.embed(ids_Bn), counts, position_Bn=position_Bn)
        self.synced = False
        return self.model.head(h_BnD[torch.arange(len(counts), device=ids_Bn.device), last_B] if last_only else h_BnD)

    @torch.no_grad()
    def step(self, token_B: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` after one new token per document: ``extend(token_B[:, None], last_only=True)`` with
        nothing read back, replayed as one CUDA graph on a GPU."""
        self.stack.reserve(max(self.lengths) + 1)
        if self.stack.capacity != self.graph_capacity:  # reallocated since capture (by a step or an extend)
            self.graph.reset()
            self.graph_capacity = self.stack.capacity
        if not self.synced:
            self.stack.length_B.copy_(host_to_device(self.lengths, token_B.device))
            self.synced = True
        self.token_B.copy_(token_B)
        logits_BV = self.graph().clone()  # the graph's output buffer is overwritten by the next step
        for d in range(len(self.lengths)):
            self.lengths[d] += 1
        return logits_BV

    @property
    def steps_settled(self) -> bool:
        """Whether :meth:`step` now replays its CUDA graph (or runs eagerly for good): for timing steady state."""
        return self.graph.settled

    def _token_step(self) -> torch.Tensor:
        return self.model.head(self.stack.step(self.model.embed(self.token_B)))


class DLCMDecoder:
    """KV-cached decoding of a batch of documents through DLCM (thresholded boundaries, the eval-mode model)."""

    @torch.no_grad()
    def __init__(self, model: DLCM, batch: int, capacity: int, cuda_graphs: bool = True) -> None:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        acc = torch.promote_types(dtype, torch.float32)
        self.model = model
        self.encoder = StackCache(model.encoder, batch, capacity, device, dtype)
        # Concepts: about capacity / R, grown on demand (a backbone cache at the token capacity held 4× the memory
        # the concepts need, and a single-token step reads the whole capacity).
        concept_capacity = max(1, int(capacity / model.cfg.parser.target_ratio))
        self.backbone = StackCache(model.backbone, batch, concept_capacity, device, dtype)
        self.decoder = StackCache(model.decoder, batch, capacity, device, dtype)
        # Host view of each document's concepts: how many started, and the open (newest) one's first token.
        self.concept_count = [0] * batch
        self.open_start = [0] * batch
        self.capacity = capacity
        self.h_BLD = torch.zeros(batch, capacity, model.cfg.d_token, device=device, dtype=dtype)
        self.prob_BL = torch.zeros(batch, capacity, device=device, dtype=acc)
        self.prev_q_BS = torch.zeros(batch, model.parser.d_scan, device=device, dtype=acc)
        self.smooth_BD = torch.zeros(batch, model.cfg.d_concept, device=device, dtype=acc)
        # Per concept (= Ψ key row, see the module docstring): first token and length, for the log-count bias.
        self.start_BR = torch.zeros(batch, capacity + 1, device=device, dtype=torch.int64)
        self.length_BR = torch.zeros_like(self.start_BR)
        cross = model.cross
        null_k, null_v = cross.keys_values(cross.null_concept.to(dtype))
        self.cross_k_BRKH = null_k.expand(batch, capacity + 1, *null_k.shape).clone()
        self.cross_v_BRKH = null_v.expand(batch, capacity + 1, *null_v.shape).clone()
        # State of single-token steps on the device (refreshed from the host lists after an extend).
        self.token_B = torch.zeros(batch, dtype=torch.int64, device=device)
        self.position_B = torch.zeros_like(self.token_B)  # the new token's position
        self.concepts_B = torch.zeros_like(self.token_B)  # concepts started
        self.open_start_B = torch.zeros_like(self.token_B)  # first token of the open concept
        self.boundary_B = torch.zeros(batch, dtype=torch.bool, device=device)
        self.synced = True
        graphs = cuda_graphs and device.type == "cuda"
        self.phases = [StepGraph(phase, graphs) for phase in (self._token_stream, self._concept_step, self._readout)]
        self.graph_capacity = self._capacities()  # the buffers' sizes when the graphs were (or will be) captured

    @property
    def lengths(self) -> list[int]:
        """Tokens of each document seen so far."""
        return self.encoder.lengths

    @property
    def num_concepts(self) -> list[int]:
        """Concepts started in each document (the open one included), as a full forward would count them."""
        return list(self.concept_count)

    def concept_starts(self) -> list[list[int]]:
        """First token of every started concept of each document (read from the device: for inspection)."""
        return [row[:count] for row, count in zip(self.start_BR.tolist(), self.concept_count, strict=True)]

    def _reserve(self, tokens: int) -> None:
        if tokens <= self.capacity:
            return
        grow = max(tokens, 2 * self.capacity) - self.capacity
        self.h_BLD = F.pad(self.h_BLD, (0, 0, 0, grow))
        self.prob_BL = F.pad(self.prob_BL, (0, grow))
        self.start_BR = F.pad(self.start_BR, (0, grow))
        self.length_BR = F.pad(self.length_BR, (0, grow))
        self.cross_k_BRKH = F.pad(self.cross_k_BRKH, (0, 0, 0, 0, 0, grow))
        self.cross_v_BRKH = F.pad(self.cross_v_BRKH, (0, 0, 0, 0, 0, grow))
        self.capacity += grow

    @torch.no_grad()
    def extend(
        self, ids_Bn: torch.Tensor, counts: Sequence[int] | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """Logits ``[B, n, V]`` of ``counts[b]`` new tokens per document (padding rows are junk), or ``[B, V]`` of
        each document's last new token with ``last_only``."""
        m, (b, n), device = self.model, ids_Bn.shape, ids_Bn.device
        counts = _counts(ids_Bn, counts)
        if last_only:
            _check_last_only(counts)
        before, concepts_before, open_before = list(self.lengths), self.num_concepts, list(self.open_start)
        self._reserve(max(before) + n)
        position_Bn, last_B, counts_B, concepts_B, open_B = _step_inputs(
            counts, before, n, counts, concepts_before, open_before, device=device
        )
        batch_B1 = torch.arange(b, device=device)[:, None]
        counts_B1 = counts_B[:, None]
        valid_Bn = torch.arange(n, device=device)[None, :] < counts_B1
        h_BnD = self.encoder.extend(m.embed(ids_Bn), counts, position_Bn=position_Bn)
        self.h_BLD[batch_B1, position_Bn] = h_BnD

        q_BnS, k_BnS = m.parser.scan_projections(h_BnD)
        prev_BnS = torch.cat([self.prev_q_BS[:, None], q_BnS[:, :-1]], dim=1)
        doc_start_Bn = position_Bn == 0
        prob_Bn = torch.where(doc_start_Bn, 1.0, m.parser.neighbour_prob(prev_BnS, k_BnS))
        boundary_Bn = (m.parser.decide(prob_Bn) | doc_start_Bn) & valid_Bn
        self.prob_BL[batch_B1, position_Bn] = prob_Bn
        self.prev_q_BS.copy_(torch.where(counts_B1 > 0, q_BnS[batch_B1[:, 0], last_B], self.prev_q_BS))

        # The call's one device→host read: per document, the concepts its new tokens start and the newest one's
        # first token, which size the concept work and the next calls (2·B integers, nothing per concept).
        new_B = boundary_Bn.sum(dim=1)
        newest_B = torch.where(boundary_Bn, position_Bn, -1).amax(dim=1) if n else torch.full_like(new_B, -1)
        new, newest = torch.stack([new_B, newest_B]).tolist()
        for d in range(b):
            self.concept_count[d] += new[d]
            if new[d]:
                self.open_start[d] = newest[d]
        if any(new):
            self._add_concepts(boundary_Bn, position_Bn, counts_B, concepts_B, open_B, concepts_before, open_before)
        x_BnD = self._cross(h_BnD, prob_Bn, boundary_Bn, position_Bn, concepts_B)
        out_BnD = self.decoder.extend(x_BnD, counts, position_Bn=position_Bn)
        self.synced = False
        return m.head(out_BnD[batch_B1[:, 0], last_B] if last_only else out_BnD)

    @torch.no_grad()
    def step(self, token_B: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` after one new token per document: ``extend(token_B[:, None], last_only=True)`` on
        device-side state, in three phases that replay as CUDA graphs on a GPU — token stream and boundary, backbone
        step (only when some document completed a concept), Ψ and decoder — with the boundaries as the one read."""
        caches = [self.encoder, self.backbone, self.decoder]
        needed = max(self.lengths) + 1
        self._reserve(needed)
        for cache in (self.encoder, self.decoder):
            cache.reserve(needed)
        self.backbone.reserve(max(self.concept_count) + 1)  # the step may complete one more concept
        if self._capacities() != self.graph_capacity:  # reallocated since capture (by a step or an extend)
            for phase in self.phases:
                phase.reset()
            self.graph_capacity = self._capacities()
        if not self.synced:
            lists = [c.lengths for c in caches] + [self.num_concepts, self.open_start]
            targets = [c.length_B for c in caches] + [self.concepts_B, self.open_start_B]
            for target, values in zip(targets, hosts_to_device(lists, token_B.device), strict=True):
                target.copy_(values)
            self.synced = True
        self.token_B.copy_(token_B)
        token_stream, concept_step, readout = self.phases
        boundary = token_stream().tolist()  # the step's one device→host read
        completed = [flag and count > 0 for flag, count in zip(boundary, self.concept_count, strict=True)]
        for d, flag in enumerate(boundary):
            if flag:
                self.concept_count[d] += 1
                self.open_start[d] = self.lengths[d]
        if any(completed):
            concept_step()
        logits_BV = readout().clone()  # the graph's output buffer is overwritten by the next step
        for d, done in enumerate(completed):
            self.encoder.lengths[d] += 1
            self.decoder.lengths[d] += 1
            self.backbone.lengths[d] += done
        return logits_BV

    def _capacities(self) -> tuple[int, ...]:
        return (self.capacity, self.encoder.capacity, self.backbone.capacity, self.decoder.capacity)

    @property
    def steps_settled(self) -> bool:
        """Whether all three :meth:`step` phases now replay CUDA graphs (or run eagerly for good)."""
        return all(phase.settled for phase in self.phases)

    def _token_stream(self) -> torch.Tensor:
        """Phase 1: encoder step, boundary probability and decision of every document's new token."""
        m, all_B, position_B = self.model, self.encoder.all_docs, self.position_B
        position_B.copy_(self.encoder.length_B)
        h_BD = self.encoder.step(m.embed(self.token_B))
        self.h_BLD[all_B, position_B] = h_BD
        q_BS, k_BS = m.parser.scan_projections(h_BD)
        doc_start_B = position_B == 0
        prob_B = torch.where(doc_start_B, 1.0, m.parser.neighbour_prob(self.prev_q_BS, k_BS))
        self.prob_BL[all_B, position_B] = prob_B
        self.prev_q_BS.copy_(q_BS)
        self.boundary_B.copy_(m.parser.decide(prob_B) | doc_start_B)
        return self.boundary_B

    def _concept_step(self) -> None:
        """Phase 2: where the new token is a boundary after an earlier one, the open concept (its tokens before the
        new one) completes: pool, ``W_up``, backbone step, smooth, Ψ row. Other documents compute the same on their
        open concept and keep none of it."""
        m, dtype, acc = self.model, self.h_BLD.dtype, self.prob_BL.dtype
        all_B, position_B = self.encoder.all_docs, self.position_B
        open_B, concepts_B = self.open_start_B, self.concepts_B
        completed_B = self.boundary_B & (concepts_B > 0)
        cols_L = torch.arange(self.capacity, device=position_B.device)
        member_B1L = ((cols_L >= open_B[:, None]) & (cols_L < position_B[:, None])).to(acc)[:, None]
        length_B = position_B - open_B
        sum_BD = torch.bmm(member_B1L, self.h_BLD.to(acc))[:, 0]
        pooled_BD = (sum_BD / length_B.clamp(min=1)[:, None].to(acc)).to(dtype)  # as mean_pool
        z_BD = self.backbone.step(m.pooling.w_up(pooled_BD), commit_B=completed_B)
        first_B1 = (concepts_B == 1)[:, None]
        start_prob_B1 = self.prob_BL[all_B, open_B][:, None]
        smooth_BD = m.smoothing.resume(self.smooth_BD, z_BD[:, None], start_prob_B1, first_B1)[:, 0]
        self.smooth_BD.copy_(torch.where(completed_B[:, None], smooth_BD, self.smooth_BD))
        k_BKH, v_BKH = m.cross.keys_values(smooth_BD.to(dtype))
        keep_B11 = completed_B[:, None, None]
        self.cross_k_BRKH[all_B, concepts_B] = torch.where(keep_B11, k_BKH, self.cross_k_BRKH[all_B, concepts_B])
        self.cross_v_BRKH[all_B, concepts_B] = torch.where(keep_B11, v_BKH, self.cross_v_BRKH[all_B, concepts_B])
        last_B = (concepts_B - 1).clamp(min=0)
        self.length_BR[all_B, last_B] = torch.where(completed_B, length_B, self.length_BR[all_B, last_B])

    def _readout(self) -> torch.Tensor:
        """Phase 3: register the concepts the new tokens start, Ψ over the unique concept rows, decoder step, head."""
        m, all_B, position_B, boundary_B = self.model, self.encoder.all_docs, self.position_B, self.boundary_B
        new_B = self.concepts_B
        self.start_BR[all_B, new_B] = torch.where(boundary_B, position_B, self.start_BR[all_B, new_B])
        self.open_start_B.copy_(torch.where(boundary_B, position_B, self.open_start_B))
        self.concepts_B.add_(boundary_B.long())
        own_B1 = (self.concepts_B - 1)[:, None]
        cols_R = torch.arange(self.capacity + 1, device=position_B.device)
        readable_BR = cols_R <= own_B1.clamp(min=0)
        bias_BR = log_count_bias(cols_R, own_B1, position_B[:, None], self.start_BR, self.length_BR, readable_BR)
        h_B1D = self.h_BLD[all_B, position_B][:, None]
        q_B1NH = m.cross.queries(h_B1D)
        mask_B11R = bias_BR[:, None, None].to(q_B1NH.dtype)
        out_BN1H = cached_attention(q_B1NH, self.cross_k_BRKH, self.cross_v_BRKH, mask_B11R)
        prob_B1 = self.prob_BL[all_B, position_B][:, None]
        confidence_B1 = m.parser.confidence(prob_B1, boundary_B[:, None]) if m.cfg.parser.router_grad == "ste" else None
        x_B1D = m.cross.finish(h_B1D, out_BN1H.transpose(1, 2), confidence_B1)
        return m.head(self.decoder.step(x_B1D[:, 0]))

    def _add_concepts(
        self,
        boundary_Bn: torch.Tensor,
        position_Bn: torch.Tensor,
        counts_B: torch.Tensor,
        concepts_B: torch.Tensor,
        open_B: torch.Tensor,
        concepts_before: list[int],
        open_before: list[int],
    ) -> None:
        """Record the new concept starts; pool the concepts they complete, step the backbone, smooth, add Ψ rows.

        All on the device, from the boundary flags: the host only knows how many concepts each document completes
        (from the call's one read), which sizes a padded ``[B, M]`` layout of concept slots. Slot ``i`` of document
        ``b`` is its concept ``done_b + i`` (``done_b``: concepts completed before the call), valid while ``i`` is
        below the number it completes now; an invalid slot pools nothing, passes the backbone as a padding row
        (written past the document's concepts, never read) and is not kept."""
        m, dtype, device = self.model, self.h_BLD.dtype, self.h_BLD.device
        b, n = boundary_Bn.shape
        new_B1 = boundary_Bn.sum(dim=1, keepdim=True)
        # Concept starts: the new boundaries' positions, in order, after the concepts already started.
        new_start_Bn = position_Bn.gather(1, torch.argsort((~boundary_Bn).to(torch.int8), dim=1, stable=True))
        cols_R = torch.arange(self.start_BR.shape[1], device=device)
        rank_BR = cols_R - concepts_B[:, None]
        is_new_BR = (rank_BR >= 0) & (rank_BR < new_B1)
        self.start_BR.copy_(torch.where(is_new_BR, new_start_Bn.gather(1, rank_BR.clamp(0, n - 1)), self.start_BR))
        # Every started concept but the open one is complete.
        done = [max(c - 1, 0) for c in concepts_before]
        completing = [max(c - 1, 0) - d for c, d in zip(self.concept_count, done, strict=True)]
        slots = max(completing)
        if slots == 0:
            return
        done_B1 = (concepts_B[:, None] - 1).clamp(min=0)
        completing_B1 = (concepts_B[:, None] + new_B1 - 1).clamp(min=0) - done_B1
        # A completed concept ends where the next one starts.
        is_done_BR = (cols_R >= done_B1) & (cols_R < done_B1 + completing_B1)
        length_BR = F.pad(self.start_BR[:, 1:], (0, 1)) - self.start_BR
        self.length_BR.copy_(torch.where(is_done_BR, length_BR, self.length_BR))

        slot_M, batch_B1 = torch.arange(slots, device=device), torch.arange(b, device=device)[:, None]
        concept_BM = done_B1 + slot_M  # < capacity: a call completes at most n concepts of a document
        valid_BM = slot_M < completing_B1
        # The completing concepts' tokens lie between the open concept's first token and the last new token; the
        # new boundaries up to a token count the concepts it is past (tokens before the call are in the open one).
        span = max(self.lengths[d] - open_before[d] for d in range(b) if completing[d])
        pos_BW = open_B[:, None] + torch.arange(span, device=device)
        first_new_B1 = position_Bn[:, :1]
        passed_BW = boundary_Bn.cumsum(dim=1).gather(1, (pos_BW - first_new_B1).clamp(0, n - 1))
        slot_BW = concepts_B[:, None] - 1 - done_B1 + torch.where(pos_BW >= first_new_B1, passed_BW, 0)
        member_BW = (pos_BW < first_new_B1 + counts_B[:, None]) & (slot_BW < completing_B1)
        # Slot s·M + i, one slot past the end for tokens of no completing concept (dropped).
        slot_T = torch.where(member_BW, slot_BW + slots * batch_B1, b * slots)
        h_BWD = self.h_BLD[batch_B1, pos_BW.clamp(max=self.capacity - 1)]  # other documents' spans may run past it
        length_S = F.pad(torch.where(valid_BM, self.length_BR.gather(1, concept_BM), 1).flatten(), (0, 1), value=1)
        pooled_SD = mean_pool(h_BWD.flatten(0, 1), slot_T.flatten(), length_S)[:-1]
        z_BMD = self.backbone.extend(m.pooling.w_up(pooled_SD).view(b, slots, -1), completing, position_Bn=concept_BM)
        start_prob_BM = self.prob_BL.gather(1, self.start_BR.gather(1, concept_BM))
        smooth_BMD = m.smoothing.resume(self.smooth_BD, z_BMD, start_prob_BM, concept_BM == 0)
        last_BD = smooth_BMD[torch.arange(b, device=device), (completing_B1[:, 0] - 1).clamp(min=0)]
        self.smooth_BD.copy_(torch.where(completing_B1 > 0, last_BD, self.smooth_BD))
        k_SKH, v_SKH = m.cross.keys_values(smooth_BMD.flatten(0, 1).to(dtype))
        rows_BM, keep_BM11 = concept_BM + 1, valid_BM[..., None, None]
        for cache, new_SKH in ((self.cross_k_BRKH, k_SKH), (self.cross_v_BRKH, v_SKH)):
            new_BMKH = new_SKH.unflatten(0, (b, slots))
            cache[batch_B1, rows_BM] = torch.where(keep_BM11, new_BMKH, cache[batch_B1, rows_BM])

    def _cross(
        self,
        h_BnD: torch.Tensor,
        prob_Bn: torch.Tensor,
        boundary_Bn: torch.Tensor,
        position_Bn: torch.Tensor,
        concepts_B: torch.Tensor,
    ) -> torch.Tensor:
        """Ψ for the new tokens over the unique concept rows, with the replication log-count bias."""
        m, device = self.model, h_BnD.device
        rows = max(*self.num_concepts, 1)  # a token of concept j reads rows 0 … j
        own_Bn = concepts_B[:, None] - 1 + boundary_Bn.cumsum(dim=1)  # concepts started before the call
        cols_R = torch.arange(rows, device=device)
        # Padding rows of a document that has not started have own = −1: let them read the null row (no NaN).
        readable_BnR = cols_R <= own_Bn.clamp(min=0)[..., None]
        bias_BnR = log_count_bias(
            cols_R,
            own_Bn[..., None],
            position_Bn[..., None],
            self.start_BR[:, None, :rows],
            self.length_BR[:, None, :rows],
            readable_BnR,
        )
        q_BnNH = m.cross.queries(h_BnD)
        mask_B1nR = bias_BnR[:, None].to(q_BnNH.dtype)
        out_BNnH = cached_attention(q_BnNH, self.cross_k_BRKH[:, :rows], self.cross_v_BRKH[:, :rows], mask_B1nR)
        confidence_Bn = m.parser.confidence(prob_Bn, boundary_Bn) if m.cfg.parser.router_grad == "ste" else None
        return m.cross.finish(h_BnD, out_BNnH.transpose(1, 2), confidence_Bn)


def incremental_decoder(
    model: nn.Module, batch: int = 1, capacity: int = 256, cuda_graphs: bool = True
) -> DLCMDecoder | BaselineDecoder:
    """A fresh decoder for ``batch`` documents of ``model`` (which must be in eval mode: thresholded boundaries).

    ``capacity`` (tokens per document) sizes the caches up front; they grow (by copying) when a document outgrows it
    (single-token steps then capture their CUDA graphs again). ``cuda_graphs=False`` runs steps eagerly on a GPU too.
    """
    if model.training:
        raise ValueError("incremental decoding reproduces the eval-mode model: call model.eval() first")
    if batch < 1 or capacity < 1:
        raise ValueError(f"batch={batch}, capacity={capacity} are not allowed: both must be positive")
    if isinstance(model, DLCM):
        return DLCMDecoder(model, batch, capacity, cuda_graphs)
    if isinstance(model, DenseBaseline):
        return BaselineDecoder(model, batch, capacity, cuda_graphs)
    raise TypeError(f"no incremental decoder for {type(model).__name__}: expected DLCM or DenseBaseline")


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise a ``ValueError`` naming a sampling option outside its range."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is not allowed: 0 (greedy) or a positive number")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} is not allowed: None or a positive integer")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} is not allowed: None or a number in (0, 1]")


def sample_tokens(
    logits_BV: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token of every row (int64 ``[B]``, on the logits' device): argmax at ``temperature = 0``, else a draw
    from the tempered, top-k / top-p filtered softmax (``generator`` must live on the same device)."""
    if temperature <= 0.0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None:
        kth_B1 = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        # Drop a token once the mass before it already reaches top_p; the most likely token always stays.
        drop_BV = probs_BV.cumsum(dim=-1) - probs_BV >= top_p
        logits_BV = logits_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    return torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator)[:, 0]


def fit_to_context(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, context_length: int, truncate: bool = False
) -> list[list[int]]:
    """Prompts that leave room for ``max_new_tokens`` within ``context_length`` (the longest document the model was
    trained on): unchanged, or with ``truncate`` cut to their last tokens; otherwise a ``ValueError`` naming lengths."""
    room = context_length - max_new_tokens
    if room < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} is not allowed: it leaves no room for a prompt within the model's "
            f"context_length={context_length}"
        )
    fitted = []
    for i, prompt in enumerate(prompts):
        if len(prompt) > room and not truncate:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} at most {room} fit in "
                f"the model's context_length={context_length}. Shorten it, lower max_new_tokens, or truncate (keep "
                f"the last {room} prompt tokens)"
            )
        fitted.append(list(prompt)[-room:])
    return fitted


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    should_stop: Callable[[int, list[int]], bool] | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue every prompt (a non-empty document prefix) by up to ``max_new_tokens`` tokens, all in one batch.

    Returns the new tokens of each prompt. A prompt's decoding halts after a token of ``stop_tokens`` (which ends
    its list) or once ``should_stop(index, new_tokens)`` is true; the batch stops when all have halted. A halted
    document keeps its row (its draws are discarded). ``generator`` (on the model's device) makes sampling
    reproducible for a given batch; draws depend on the batch's composition. Without stop criteria the loop reads
    nothing back from the device except DLCM's boundary decisions.
    """
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is not allowed: a non-negative integer")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompt {empty[0]} is empty: a prompt needs at least one token (there is no start token)")
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    lengths = [len(p) for p in prompts]
    decoder = incremental_decoder(model, len(prompts), max(lengths) + max_new_tokens)
    ids_BP = torch.zeros(len(prompts), max(lengths), dtype=torch.int64)
    for d, prompt in enumerate(prompts):
        ids_BP[d, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.int64)
    logits_BV = decoder.extend(ids_BP.to(device), lengths, last_only=True)
    watch = bool(stop_tokens) or should_stop is not None
    stops, new, done, drawn = set(stop_tokens), [[] for _ in prompts], [False] * len(prompts), []
    for step in range(max_new_tokens):
        token_B = sample_tokens(logits_BV, temperature, top_k, top_p, generator)
        if watch:
            for d, token in enumerate(token_B.tolist()):
                if not done[d]:
                    new[d].append(token)
                    done[d] = token in stops or (should_stop is not None and should_stop(d, new[d]))
            if all(done):
                break
        else:
            drawn.append(token_B)
        if step + 1 < max_new_tokens:
            logits_BV = decoder.step(token_B)
    return new if watch else torch.stack(drawn, dim=1).tolist()


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
    """:func:`generate_batch` for one prompt; ``should_stop(new_tokens)``."""
    stop = None if should_stop is None else (lambda _, ids: should_stop(ids))
    (new,) = generate_batch(
        model, [prompt_ids], max_new_tokens, temperature, top_k, top_p, stop_tokens, stop, generator
    )
    return new


def first_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Index of the earliest occurrence of any of ``stop_strings`` in ``text``, or −1."""
    hits = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return min(hits) if hits else -1


def generate_texts(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    generator: torch.Generator | None = None,
    context_length: int | None = None,
    truncate: bool = False,
) -> list[str]:
    """Text continuations of ``prompts`` decoded as one batch, each cut before the first of ``stop_strings``.

    Prompts are tokenised as training documents are (no special tokens). With ``context_length`` a prompt that
    leaves no room for ``max_new_tokens`` is an error, or with ``truncate`` loses its first tokens
    (:func:`fit_to_context`).
    """
    from dlcm.data.tokenizer import encode_documents

    ids = encode_documents(tokenizer, list(prompts))
    if context_length is not None:
        ids = fit_to_context(ids, max_new_tokens, context_length, truncate)
    stop = (lambda _, new: first_stop(tokenizer.decode(new), stop_strings) >= 0) if stop_strings else None
    texts = []
    for new in generate_batch(model, ids, max_new_tokens, temperature, top_k, top_p, stop_tokens, stop, generator):
        text = tokenizer.decode(new)
        cut = first_stop(text, stop_strings)
        texts.append(text if cut < 0 else text[:cut])
    return texts


def generate_text(model: nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, **options: Any) -> str:
    """:func:`generate_texts` for one prompt (``options``: its keyword arguments)."""
    return generate_texts(model, tokenizer, [prompt], max_new_tokens, **options)[0]
