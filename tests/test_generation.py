"""Incremental decoding reproduces the full eval-mode forward pass; the sampling loop honours its options."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from dlcm.config import ParserConfig
from dlcm.generation import generate, generate_batch, generate_text, incremental_decoder, sample_token
from dlcm.presets import build_model, tiny_baseline, tiny_dlcm

VOCAB = 64
LENGTH = 72


def make_dlcm(smoothing: str = "ema", router_grad: str = "aux", perturb: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tiny_dlcm(VOCAB)
    cfg = dataclasses.replace(
        cfg,
        attn_backend="sdpa",
        smoothing=smoothing,
        parser=ParserConfig(boundary_mode="threshold", router_grad=router_grad),
    )
    model = build_model(cfg).double().eval()
    if perturb:
        # Identity-initialised W_q/W_k score raw neighbour similarity; random ones give a trained-like mix of
        # short and long concepts, and an EMA with P_k away from 0/1.
        g = torch.Generator().manual_seed(3)
        for w in (model.parser.wq.weight, model.parser.wk.weight):
            w.data.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype))
    return model


def make_baseline() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(dataclasses.replace(tiny_baseline(VOCAB), attn_backend="sdpa")).double().eval()


def full_logits(model: torch.nn.Module, ids_T: torch.Tensor) -> torch.Tensor:
    out = model(ids_T, torch.tensor([0, ids_T.shape[0]], dtype=torch.int32))
    return out if isinstance(out, torch.Tensor) else out.logits_TV


def incremental_logits(model: torch.nn.Module, ids_T: torch.Tensor, prefill: int) -> torch.Tensor:
    decoder = incremental_decoder(model)
    chunks = [decoder.extend(ids_T[:prefill])] + [decoder.extend(ids_T[t : t + 1]) for t in range(prefill, len(ids_T))]
    return torch.cat(chunks)


@pytest.mark.parametrize("prefill", [1, 23])
@pytest.mark.parametrize(
    ("smoothing", "router_grad", "perturb"),
    [("ema", "aux", True), ("identity", "aux", True), ("ema", "ste", True), ("ema", "aux", False)],
)
@torch.no_grad()
def test_dlcm_incremental_equals_full_forward(smoothing: str, router_grad: str, perturb: bool, prefill: int) -> None:
    model = make_dlcm(smoothing, router_grad, perturb)
    ids_T = torch.randint(0, VOCAB, (LENGTH,), generator=torch.Generator().manual_seed(1))
    out = model(ids_T, torch.tensor([0, LENGTH], dtype=torch.int32))
    lengths = out.layout.length_C
    assert out.layout.num_concepts > 3 and int(lengths.max()) > 1, lengths.tolist()  # several non-trivial concepts
    decoder = incremental_decoder(model)
    logits = [decoder.extend(ids_T[:prefill])]
    logits += [decoder.extend(ids_T[t : t + 1]) for t in range(prefill, LENGTH)]
    assert decoder.num_concepts == out.layout.num_concepts
    assert decoder.starts == out.layout.start_C.tolist()
    torch.testing.assert_close(torch.cat(logits), out.logits_TV, atol=1e-9, rtol=0)


@pytest.mark.parametrize("prefill", [1, 30])
@torch.no_grad()
def test_baseline_incremental_equals_full_forward(prefill: int) -> None:
    model = make_baseline()
    ids_T = torch.randint(0, VOCAB, (LENGTH,), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(incremental_logits(model, ids_T, prefill), full_logits(model, ids_T), atol=1e-9, rtol=0)


@pytest.mark.parametrize("family", ["dlcm", "baseline"])
@torch.no_grad()
def test_greedy_generate_equals_repeated_full_forward_argmax(family: str) -> None:
    model = make_dlcm() if family == "dlcm" else make_baseline()
    ids = torch.randint(0, VOCAB, (17,), generator=torch.Generator().manual_seed(2)).tolist()
    expected, seq = [], list(ids)
    for _ in range(8):
        token = int(full_logits(model, torch.tensor(seq))[-1].argmax())
        expected.append(token)
        seq.append(token)
    assert generate(model, ids, max_new_tokens=8) == expected


@torch.no_grad()
def test_sampling_options() -> None:
    model = make_dlcm()
    prompt = list(range(5, 20))
    greedy = generate(model, prompt, max_new_tokens=10)
    top1 = generate(model, prompt, 10, temperature=1.3, top_k=1, generator=torch.Generator().manual_seed(0))
    nucleus = generate(model, prompt, 10, temperature=1.3, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert top1 == greedy and nucleus == greedy
    # Same generator seed, same draws; a full-vocabulary draw is a valid token sequence of the requested length.
    a = generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert a == b and len(a) == 10 and all(0 <= t < VOCAB for t in a)


def test_top_k_top_p_filtering() -> None:
    logits_V = torch.tensor([0.0, 3.0, 2.9, -1.0])
    draws = {sample_token(logits_V, 1.0, top_k=2, generator=torch.Generator().manual_seed(s)) for s in range(50)}
    assert draws == {1, 2}
    # Mass of token 1 alone is < 0.9, tokens 1 and 2 together exceed it: only they survive.
    draws = {sample_token(logits_V, 1.0, top_p=0.9, generator=torch.Generator().manual_seed(s)) for s in range(50)}
    assert draws == {1, 2}


@torch.no_grad()
def test_stop_token_halts() -> None:
    model = make_dlcm()
    prompt = list(range(5, 20))
    greedy = generate(model, prompt, max_new_tokens=10)
    stop = greedy[3]
    first = greedy.index(stop)
    assert generate(model, prompt, 10, stop_tokens=[stop]) == greedy[: first + 1]
    assert generate(model, prompt, 10, should_stop=lambda new: len(new) == 4) == greedy[:4]


@torch.no_grad()
def test_batch_of_different_lengths_equals_single_prompts() -> None:
    model = make_dlcm()
    prompts = [[3, 4, 5], list(range(10, 40)), [7]]
    assert generate_batch(model, prompts, 5) == [generate(model, p, 5) for p in prompts]


@torch.no_grad()
def test_generate_text_cuts_at_stop_string() -> None:
    model = make_baseline()
    # A character-level stand-in with the two methods generate_text uses from a `tokenizers.Tokenizer`.
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?0123456789"
    tokenizer = SimpleNamespace(
        encode=lambda text: SimpleNamespace(ids=[alphabet.index(c) for c in text]),
        decode=lambda ids: "".join(alphabet[i] for i in ids),
    )
    full = tokenizer.decode(generate(model, tokenizer.encode("hello").ids, 12))
    stop = full[4:6]
    cut = generate_text(model, tokenizer, "hello", 12, stop_strings=[stop])
    assert cut == full[: full.find(stop)]


def test_training_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="eval"):
        incremental_decoder(make_dlcm().train())
