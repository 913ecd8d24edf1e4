"""Batched log-likelihood scoring of ``(context, continuation)`` pairs on packed streams, and task metrics.

Each request is its own document in ``cu_seqlens``: attention, DLCM's boundaries and concepts all restart at a
document start, so a request's score does not depend on which other requests share its forward pass (the tests
check this against an unpacked forward). The network runs in eval mode (DLCM thresholds boundaries at its saved τ)
under ``torch.no_grad()``.

Tokens: ``context`` and ``context + continuation`` are encoded separately; the continuation's tokens are those of
the joint encoding after the longest common prefix, so a BPE merge across the seam is scored as continuation.
Requests longer than ``context_length + 1`` tokens are left-truncated: the model sees the last
``context_length`` tokens, and a continuation longer than that is scored on its last ``context_length`` tokens.

Worked example (``context_length`` 4, request tokens ``a b c | x y``, continuation ``x y``)::

    packed input   a  b  c  x        (the last token is only a target)
    target         b  c  x  y
    scored               ✓  ✓        loglik = log p(x | a b c) + log p(y | a b c x)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn
from tqdm.auto import tqdm

from dlcm.data.tokenizer import encode_documents
from dlcm.eval.tasks import Example


@dataclass(frozen=True)
class Request:
    """Token ids of one scored pair (already truncated) and how many trailing ids are the continuation."""

    ids: tuple[int, ...]
    n_continuation: int


@dataclass(frozen=True)
class RequestScore:
    """Summed continuation log-likelihood (nats), whether every continuation token was the argmax, token count."""

    loglik: float
    is_greedy: bool
    n_tokens: int


def encode_request(tokenizer: Tokenizer, context: str, continuation: str, context_length: int) -> Request:
    """Tokenise one pair (see the module docstring for the prefix rule and the left truncation)."""
    ctx_ids, whole = encode_documents(tokenizer, [context, context + continuation])
    common = 0
    for a, b in zip(ctx_ids, whole, strict=False):
        if a != b:
            break
        common += 1
    n_cont = len(whole) - common
    if n_cont == 0:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
    if common == 0:
        raise ValueError(f"context {context[:40]!r} shares no token with context+continuation: nothing to condition on")
    ids = whole[-(context_length + 1) :]
    return Request(tuple(ids), min(n_cont, len(ids) - 1))


def _logits(network: nn.Module, ids_T: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    out = network(ids_T, cu_seqlens, max_seqlen)
    return out if isinstance(out, torch.Tensor) else out.logits_TV  # DenseBaseline returns logits, DLCM an output


def _batches(requests: Sequence[Request], batch_tokens: int) -> list[list[int]]:
    """Greedy packing of request indices (longest first) into groups of at most ``batch_tokens`` input tokens."""
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].ids))
    groups: list[list[int]] = []
    used = batch_tokens + 1
    for i in order:
        n = len(requests[i].ids) - 1
        if used + n > batch_tokens:  # a request longer than batch_tokens gets a batch of its own
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


@torch.no_grad()
def score_requests(
    network: nn.Module,
    requests: Sequence[Request],
    batch_tokens: int = 8192,
    progress: bool = False,
    pad_batches: bool | None = None,
) -> list[RequestScore]:
    """Score every request, packing many per forward; the network is put in eval mode and restored afterwards.

    ``pad_batches`` (default: on a GPU) fills each forward up to ``batch_tokens`` with one padding document, which
    no other document attends to: every forward then has the same token count, so compiled kernels (DLCM's
    concept attention) are built once instead of once per packed length."""
    device = next(network.parameters()).device
    pad_batches = device.type == "cuda" if pad_batches is None else pad_batches
    was_training = network.training
    network.eval()
    scores: list[RequestScore | None] = [None] * len(requests)
    try:
        bar = tqdm(total=len(requests), unit="req", disable=not progress, desc="scoring")
        for group in _batches(requests, batch_tokens):
            inputs = [requests[i].ids[:-1] for i in group]
            lengths = torch.tensor([len(x) for x in inputs])
            cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
            ids_T = torch.tensor([t for x in inputs for t in x], dtype=torch.int64)
            padding = batch_tokens - len(ids_T) if pad_batches else 0
            if padding > 0:
                ids_T = F.pad(ids_T, (0, padding))
                cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([len(ids_T)])])
            # Row of the logits that predicts each continuation token: the last n inputs of each document.
            rows, targets = [], []
            for i, end in zip(group, cu_seqlens[1:].tolist(), strict=False):  # the padding document: no request
                n = requests[i].n_continuation
                rows.extend(range(end - n, end))
                targets.extend(requests[i].ids[-n:])
            max_seqlen = max(int(lengths.max()), padding)
            logits_TV = _logits(network, ids_T.to(device), cu_seqlens.to(device), max_seqlen)
            logp_NV = torch.log_softmax(logits_TV[torch.tensor(rows, device=device)].float(), dim=-1)
            target_N = torch.tensor(targets, device=device)
            token_lp_N = logp_NV.gather(1, target_N[:, None])[:, 0].cpu()
            hit_N = (logp_NV.argmax(dim=-1) == target_N).cpu()
            start = 0
            for i in group:
                n = requests[i].n_continuation
                lp, hit = token_lp_N[start : start + n], hit_N[start : start + n]
                scores[i] = RequestScore(float(lp.sum()), bool(hit.all()), n)
                start += n
            bar.update(len(group))
        bar.close()
    finally:
        network.train(was_training)
    return scores  # type: ignore[return-value]  # every index is filled above


def _mean_stderr(correct: torch.Tensor) -> tuple[float, float]:
    """Mean of a 0/1 vector and its binomial standard error sqrt(p(1-p)/n)."""
    p = float(correct.double().mean())
    return p, math.sqrt(p * (1 - p) / correct.numel())


def multiple_choice_metrics(
    logliks: Sequence[Sequence[float]],
    continuation_bytes: Sequence[Sequence[int]],
    ending_chars: Sequence[Sequence[int]],
    labels: Sequence[int],
) -> dict[str, float]:
    """Accuracies of multiple-choice items, each with its standard error; the option chosen is the argmax of

    - ``acc``: the summed log-likelihood of the continuation;
    - ``acc_norm_bytes``: log-likelihood / UTF-8 bytes of the continuation as scored (with its leading space), a
      tokenizer-independent length;
    - ``acc_norm_chars``: log-likelihood / characters of the ending without that space — lm-evaluation-harness's
      ``acc_norm``, for comparison with published tables.

    Ties go to the lowest option index (``argmax`` semantics), identically for every model.
    """
    correct: dict[str, list[bool]] = {"acc": [], "acc_norm_bytes": [], "acc_norm_chars": []}
    for ll, nbytes, nchars, label in zip(logliks, continuation_bytes, ending_chars, labels, strict=True):
        ll_t = torch.tensor(ll, dtype=torch.float64)
        correct["acc"].append(int(ll_t.argmax()) == label)
        for name, length in (("acc_norm_bytes", nbytes), ("acc_norm_chars", nchars)):
            # max(…, 1): an empty ending (possible only after the space) is scored by its log-likelihood alone.
            normed = ll_t / torch.tensor(length, dtype=torch.float64).clamp(min=1)
            correct[name].append(int(normed.argmax()) == label)
    metrics: dict[str, float] = {}
    for name, hits in correct.items():
        metrics[name], metrics[f"{name}_stderr"] = _mean_stderr(torch.tensor(hits))
    metrics["n"] = len(labels)
    return metrics


def ending_length_chars(continuation: str) -> int:
    """Characters of an option's ending as lm-evaluation-harness counts them: without the space joining it on."""
    return len(continuation.removeprefix(" "))


def cloze_metrics(scores: Sequence[RequestScore]) -> dict[str, float]:
    """LAMBADA: ``acc`` = every target token greedily predicted; ``ppl`` = exp(−mean per-example loglik)."""
    a, a_se = _mean_stderr(torch.tensor([s.is_greedy for s in scores]))
    ppl = math.exp(-sum(s.loglik for s in scores) / len(scores))
    return {"acc": a, "acc_stderr": a_se, "ppl": ppl, "n": len(scores)}


def evaluate_examples(
    network: nn.Module,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    context_length: int,
    batch_tokens: int = 8192,
    progress: bool = False,
) -> dict[str, float]:
    """Metrics of one task: multiple-choice (``acc``, ``acc_norm_bytes``, ``acc_norm_chars``) or cloze (``acc``,
    ``ppl``), plus ``n``."""
    if not examples:
        raise ValueError("no examples to evaluate")
    pairs = sorted({pair for ex in examples for pair in ex.requests()})  # options shared across items score once
    index = {pair: k for k, pair in enumerate(pairs)}
    requests = [encode_request(tokenizer, c, x, context_length) for c, x in pairs]
    scores = score_requests(network, requests, batch_tokens, progress)
    per_example = [[scores[index[pair]] for pair in ex.requests()] for ex in examples]
    if all(ex.kind == "cloze" for ex in examples):
        return cloze_metrics([s[0] for s in per_example])
    return multiple_choice_metrics(
        [[s.loglik for s in ss] for ss in per_example],
        [[len(cont.encode("utf-8")) for cont in ex.continuations] for ex in examples],
        [[ending_length_chars(cont) for cont in ex.continuations] for ex in examples],
        [ex.label for ex in examples],
    )
