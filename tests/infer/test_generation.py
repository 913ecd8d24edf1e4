"""Batched incremental decoding reproduces the full eval-mode forward pass of every document; the sampling loop
honours its options."""

from __future__ import annotations

import dataclasses
import random
import warnings

import pytest
import torch

from dlcm.data.tokenizer import train_bpe
from dlcm.infer.generation import (
    fit_to_context,
    generate,
    generate_batch,
    generate_text,
    generate_texts,
    incremental_decoder,
    sample_tokens,
)
from dlcm.model.config import ParserConfig
from dlcm.model.presets import build_model, tiny_baseline, tiny_dlcm

VOCAB = 64
PROMPTS = [1, 23, 7, 40]  # prompt lengths of the batch
STEPS = 12  # tokens decoded one at a time after the prompts


def make_dlcm(
    smoothing: str = "ema", router_grad: str = "aux", perturb: bool = True, dtype: torch.dtype = torch.float64
) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tiny_dlcm(VOCAB)
    cfg = dataclasses.replace(
        cfg,
        attn_backend="sdpa",
        smoothing=smoothing,
        parser=ParserConfig(boundary_mode="threshold", router_grad=router_grad),
    )
    model = build_model(cfg).to(dtype).eval()
    if perturb:
        # Identity-initialised W_q/W_k score raw neighbour similarity; random ones give a trained-like mix of
        # short and long concepts, and an EMA with P_k away from 0/1.
        g = torch.Generator().manual_seed(3)
        for w in (model.parser.wq.weight, model.parser.wk.weight):
            w.data.copy_(torch.randn(w.shape, generator=g, dtype=torch.float64).to(dtype))
    return model


def make_baseline(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(dataclasses.replace(tiny_baseline(VOCAB), attn_backend="sdpa")).to(dtype).eval()


def full_output(model: torch.nn.Module, ids_T: torch.Tensor):
    return model(ids_T, torch.tensor([0, ids_T.shape[0]], dtype=torch.int32, device=ids_T.device))


def full_logits(model: torch.nn.Module, ids_T: torch.Tensor) -> torch.Tensor:
    out = full_output(model, ids_T)
    return out if isinstance(out, torch.Tensor) else out.logits_TV


def documents(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (p + STEPS,), generator=g) for p in PROMPTS]


def padded(chunks: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    width = max(max(len(c) for c in chunks), 1)
    ids = torch.zeros(len(chunks), width, dtype=torch.int64)
    for d, c in enumerate(chunks):
        ids[d, : len(c)] = c
    return ids, [len(c) for c in chunks]


def decode_in_chunks(decoder, docs: list[torch.Tensor], schedule: list[list[int]]) -> list[torch.Tensor]:
    """Feed each document the number of tokens ``schedule[call][doc]`` per call; its logits, concatenated."""
    fed, out = [0] * len(docs), [[] for _ in docs]
    for sizes in schedule:
        chunks = [doc[f : f + k] for doc, f, k in zip(docs, fed, sizes, strict=True)]
        ids, counts = padded(chunks)
        logits = decoder.extend(ids, counts)
        for d, k in enumerate(counts):
            out[d].append(logits[d, :k])
            fed[d] += k
    assert fed == [len(doc) for doc in docs]
    return [torch.cat(o) for o in out]


def prompt_then_tokens() -> list[list[int]]:
    return [PROMPTS] + [[1] * len(PROMPTS)] * STEPS


def irregular_schedule() -> list[list[int]]:
    """Chunks of different sizes per document, with calls where a document receives nothing."""
    rng, left, schedule = random.Random(5), [p + STEPS for p in PROMPTS], []
    while any(left):
        sizes = [min(n, rng.choice([0, 1, 1, 3, 9])) for n in left]
        if any(sizes):
            schedule.append(sizes)
            left = [n - k for n, k in zip(left, sizes, strict=True)]
    return schedule


DLCM_VARIANTS = [("ema", "aux", True), ("identity", "aux", True), ("ema", "ste", True), ("ema", "aux", False)]


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-9), (torch.float32, 2e-5)])
@pytest.mark.parametrize(("smoothing", "router_grad", "perturb"), DLCM_VARIANTS)
@torch.no_grad()
def test_dlcm_batched_decoding_equals_full_forward(
    smoothing: str, router_grad: str, perturb: bool, dtype: torch.dtype, atol: float
) -> None:
    model = make_dlcm(smoothing, router_grad, perturb, dtype)
    docs = documents()
    outs = [full_output(model, doc) for doc in docs]
    concepts = [o.layout.num_concepts for o in outs]
    assert min(concepts[1:]) > 3 and max(int(o.layout.length_C.max()) for o in outs) > 1, concepts
    # Small capacity: the caches must also grow on the way.
    for schedule in (prompt_then_tokens(), irregular_schedule()):
        decoder = incremental_decoder(model, batch=len(docs), capacity=8)
        got = decode_in_chunks(decoder, docs, schedule)
        assert decoder.concept_starts() == [o.layout.start_C.tolist() for o in outs]
        assert decoder.num_concepts == concepts
        for d in range(len(docs)):
            torch.testing.assert_close(got[d], outs[d].logits_TV, atol=atol, rtol=0)
    # The batch changes nothing: each document alone through a one-document decoder gives the same logits.
    for d, doc in enumerate(docs):
        alone = decode_in_chunks(incremental_decoder(model), [doc], [[PROMPTS[d]]] + [[1]] * STEPS)[0]
        torch.testing.assert_close(alone, got[d], atol=atol, rtol=0)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-9), (torch.float32, 2e-5)])
@torch.no_grad()
def test_baseline_batched_decoding_equals_full_forward(dtype: torch.dtype, atol: float) -> None:
    model = make_baseline(dtype)
    docs = documents()
    for schedule in (prompt_then_tokens(), irregular_schedule()):
        got = decode_in_chunks(incremental_decoder(model, len(docs), capacity=8), docs, schedule)
        for d, doc in enumerate(docs):
            torch.testing.assert_close(got[d], full_logits(model, doc), atol=atol, rtol=0)


def decode_with_steps(decoder, docs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Prompts by ``extend``, then single-token ``step`` calls, one 3-token ``extend`` of every document midway
    (the device-side step state must follow), and steps again; each document's logits, concatenated."""
    ids, counts = padded([doc[:p] for doc, p in zip(docs, PROMPTS, strict=True)])
    logits = decoder.extend(ids.to(docs[0].device), counts)
    out, fed = [[logits[d, :p]] for d, p in enumerate(counts)], list(counts)
    for call in range(STEPS - 2):
        if call == 4:
            chunk = decoder.extend(torch.stack([doc[f : f + 3] for doc, f in zip(docs, fed, strict=True)]))
            rows = [chunk[d] for d in range(len(docs))]
            fed = [f + 3 for f in fed]
        else:
            step = decoder.step(torch.stack([doc[f] for doc, f in zip(docs, fed, strict=True)]))
            rows = [step[d, None] for d in range(len(docs))]
            fed = [f + 1 for f in fed]
        for d, row in enumerate(rows):
            out[d].append(row)
    assert fed == [len(doc) for doc in docs]
    return [torch.cat(o) for o in out]


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-9), (torch.float32, 2e-5)])
@pytest.mark.parametrize("variant", [*DLCM_VARIANTS, "baseline"])
@torch.no_grad()
def test_single_token_steps_equal_full_forward(variant, dtype: torch.dtype, atol: float) -> None:
    model = make_baseline(dtype) if variant == "baseline" else make_dlcm(*variant, dtype)
    docs = documents()
    decoder = incremental_decoder(model, batch=len(docs), capacity=8)  # steps grow the caches too
    got = decode_with_steps(decoder, docs)
    for d, doc in enumerate(docs):
        out = full_output(model, doc)
        torch.testing.assert_close(got[d], full_logits(model, doc), atol=atol, rtol=0)
        if variant != "baseline":
            assert decoder.concept_starts()[d] == out.layout.start_C.tolist()


@pytest.mark.parametrize("family", ["dlcm", "baseline"])
@torch.no_grad()
def test_steps_capture_again_after_the_buffers_grow(family: str) -> None:
    """A CUDA graph keeps the buffers it was captured on: once a step or an extend reallocates them, the next step
    must drop it (graphs run on CUDA only; here the reset is what is observed)."""
    model = make_dlcm() if family == "dlcm" else make_baseline()
    decoder = incremental_decoder(model, batch=2, capacity=8)
    graphs = decoder.phases if family == "dlcm" else [decoder.graph]
    if family == "dlcm":
        decoder.backbone.reserve(16)  # concepts ≤ tokens ≤ 16: only the token buffers decide below
    decoder.extend(torch.randint(0, VOCAB, (2, 3)))
    decoder.step(torch.zeros(2, dtype=torch.int64))  # records the buffers' sizes
    captured = object()
    for graph in graphs:
        graph.graph = captured  # as if captured
    decoder.step(torch.zeros(2, dtype=torch.int64))  # 5 tokens fit in 8: the buffers stay
    assert all(graph.graph is captured for graph in graphs)
    decoder.extend(torch.randint(0, VOCAB, (2, 5)))  # 10 tokens: an extend grows them (to 16)
    decoder.step(torch.zeros(2, dtype=torch.int64))
    assert all(graph.graph is None for graph in graphs)
    for graph in graphs:
        graph.graph = captured
    for _ in range(5):  # tokens 12 … 16 fit in 16; the 17th makes a step grow them
        decoder.step(torch.zeros(2, dtype=torch.int64))
    assert all(graph.graph is captured for graph in graphs)
    decoder.step(torch.zeros(2, dtype=torch.int64))
    assert all(graph.graph is None for graph in graphs)


@pytest.mark.parametrize("family", ["dlcm", "baseline"])
@torch.no_grad()
def test_last_only_returns_each_documents_last_new_row(family: str) -> None:
    model = make_dlcm() if family == "dlcm" else make_baseline()
    ids, counts = padded([doc[:p] for doc, p in zip(documents(), PROMPTS, strict=True)])
    every = incremental_decoder(model, len(counts)).extend(ids, counts)
    last = incremental_decoder(model, len(counts)).extend(ids, counts, last_only=True)
    torch.testing.assert_close(last, every[torch.arange(len(counts)), torch.tensor(counts) - 1], atol=0, rtol=0)


@pytest.mark.parametrize("family", ["dlcm", "baseline"])
@torch.no_grad()
def test_greedy_batch_equals_repeated_full_forward_argmax(family: str) -> None:
    model = make_dlcm() if family == "dlcm" else make_baseline()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (17, 3, 30)]
    expected = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(8):
            seq.append(int(full_logits(model, torch.tensor(seq))[-1].argmax()))
        expected.append(seq[len(prompt) :])
    assert generate_batch(model, prompts, max_new_tokens=8) == expected
    assert [generate(model, p, max_new_tokens=8) for p in prompts] == expected


@torch.no_grad()
def test_sampling_options() -> None:
    model = make_dlcm()
    prompts = [list(range(5, 20)), [7, 8]]
    greedy = generate_batch(model, prompts, max_new_tokens=10)
    seeded = torch.Generator().manual_seed
    top1 = generate_batch(model, prompts, 10, temperature=1.3, top_k=1, generator=seeded(0))
    nucleus = generate_batch(model, prompts, 10, temperature=1.3, top_p=1e-6, generator=seeded(0))
    assert top1 == greedy and nucleus == greedy
    # Same generator seed, same draws; a full-vocabulary draw is a valid token sequence of the requested length.
    a = generate_batch(model, prompts, 10, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = generate_batch(model, prompts, 10, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert a == b and all(len(x) == 10 and all(0 <= t < VOCAB for t in x) for x in a)


def test_top_k_top_p_filtering() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]]).repeat(200, 1)
    draws = set(sample_tokens(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(0)).tolist())
    assert draws == {1, 2}
    # Mass of token 1 alone is < 0.9, tokens 1 and 2 together exceed it: only they survive.
    draws = set(sample_tokens(logits, 1.0, top_p=0.9, generator=torch.Generator().manual_seed(0)).tolist())
    assert draws == {1, 2}
    assert set(sample_tokens(logits, 1.0, generator=torch.Generator().manual_seed(0)).tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    ("option", "message"),
    [({"temperature": -1.0}, "temperature=-1.0"), ({"top_k": 0}, "top_k=0"), ({"top_p": 1.5}, "top_p=1.5")],
)
def test_bad_sampling_options_are_named(option: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_batch(make_baseline(), [[1, 2]], 3, **option)


@torch.no_grad()
def test_stops_halt_each_document_on_its_own() -> None:
    model = make_dlcm()
    prompts = [list(range(5, 20)), [3, 4, 5, 6]]
    greedy = generate_batch(model, prompts, max_new_tokens=10)
    stop = greedy[0][3]
    expected = [g[: g.index(stop) + 1] if stop in g else g for g in greedy]
    assert generate_batch(model, prompts, 10, stop_tokens=[stop]) == expected
    assert generate_batch(model, prompts, 10, should_stop=lambda d, new: len(new) == 4 - d) == [
        greedy[0][:4],
        greedy[1][:3],
    ]
    assert generate(model, prompts[0], 10, should_stop=lambda new: len(new) == 4) == greedy[0][:4]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    rng = random.Random(0)
    words = ["the", "cat", "dog", "sat", "on", "a", "mat", "sun", "rain", "water", "fire", "tree", "house", "ran"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "." for _ in range(300)]
    return train_bpe(texts, 300, tmp_path_factory.mktemp("tok") / "tokenizer.json")


@torch.no_grad()
def test_generate_texts_cut_at_stop_strings(tokenizer) -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_baseline(tokenizer.get_vocab_size()), attn_backend="sdpa")
    model = build_model(cfg).double().eval()
    prompts = ["the cat sat", "rain"]
    full = generate_texts(model, tokenizer, prompts, 12)
    stop = full[0][4:6]
    cut = generate_texts(model, tokenizer, prompts, 12, stop_strings=[stop])
    assert cut == [t[: t.find(stop)] if stop in t else t for t in full]
    assert generate_text(model, tokenizer, prompts[0], 12, stop_strings=[stop]) == cut[0]
    with pytest.raises(ValueError, match=r"prompt 0 has \d+ tokens; with max_new_tokens=12 at most 1 fit"):
        generate_texts(model, tokenizer, prompts, 12, context_length=13)


def test_fit_to_context() -> None:
    assert fit_to_context([[1, 2, 3], [4]], 2, 5) == [[1, 2, 3], [4]]
    with pytest.raises(ValueError, match=r"prompt 0 has 4 tokens; with max_new_tokens=2 at most 3 fit .*=5"):
        fit_to_context([[1, 2, 3, 4]], 2, 5)
    assert fit_to_context([[1, 2, 3, 4], [5]], 2, 5, truncate=True) == [[2, 3, 4], [5]]
    with pytest.raises(ValueError, match="max_new_tokens=5 is not allowed"):
        fit_to_context([[1]], 5, 5, truncate=True)


def test_bad_calls_are_rejected() -> None:
    with pytest.raises(ValueError, match="eval"):
        incremental_decoder(make_dlcm().train())
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_batch(make_dlcm(), [[1], []], 3)
    with pytest.raises(ValueError, match="counts="):
        incremental_decoder(make_baseline(), 2).extend(torch.zeros(2, 3, dtype=torch.int64), [4, 1])


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["dlcm", "baseline"])
@torch.no_grad()
def test_cuda_graph_steps_equal_eager_steps(family: str) -> None:
    model = (make_dlcm(dtype=torch.float32) if family == "dlcm" else make_baseline(torch.float32)).cuda()
    docs = [doc.cuda() for doc in documents()]
    decoders = [incremental_decoder(model, len(docs), capacity=8, cuda_graphs=g) for g in (True, False)]
    graphed, eager = (decode_with_steps(decoder, docs) for decoder in decoders)
    assert decoders[0].steps_settled  # the later steps replayed graphs (captured again after the caches grew)
    for d, doc in enumerate(docs):
        torch.testing.assert_close(graphed[d], eager[d], atol=1e-5, rtol=0)
        torch.testing.assert_close(graphed[d], full_logits(model, doc), atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize(("family", "syncs"), [("dlcm", 1), ("baseline", 0)])
@torch.no_grad()
def test_one_decode_step_reads_back_at_most_the_boundaries(family: str, syncs: int) -> None:
    model = (make_dlcm(dtype=torch.float32) if family == "dlcm" else make_baseline(torch.float32)).cuda()
    decoder = incremental_decoder(model, batch=3, capacity=64)
    ids, counts = padded([doc[:p] for doc, p in zip(documents()[:3], PROMPTS[:3], strict=True)])
    token = sample_tokens(decoder.extend(ids.cuda(), counts, last_only=True))
    for _ in range(32):  # warm-up and capture of every phase's CUDA graph
        token = sample_tokens(decoder.step(token))
    assert decoder.steps_settled
    assert host_syncs(lambda: sample_tokens(decoder.step(token))) == syncs


@pytest.mark.gpu
@pytest.mark.parametrize(("family", "syncs"), [("dlcm", 1), ("baseline", 0)])
@torch.no_grad()
def test_a_prefill_reads_back_at_most_the_concept_counts(family: str, syncs: int) -> None:
    """DLCM's chunk path reads back how many concepts each document started (one read, whatever the concept
    count); the baseline's never waits."""
    model = (make_dlcm(dtype=torch.float32) if family == "dlcm" else make_baseline(torch.float32)).cuda()
    decoder = incremental_decoder(model, batch=3, capacity=64)
    ids, counts = padded([doc[:p] for doc, p in zip(documents()[1:], PROMPTS[1:], strict=True)])
    ids = ids.cuda()
    assert host_syncs(lambda: decoder.extend(ids, counts, last_only=True)) == syncs
    if family == "dlcm":
        assert max(decoder.num_concepts) > 3  # several concepts pooled and stepped in one call


def host_syncs(run) -> int:
    """Device→host synchronisations while ``run()`` executes, counted by CUDA's sync debug mode."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return len([w for w in caught if "synchroniz" in str(w.message)])
