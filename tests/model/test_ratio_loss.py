"""The compression-ratio loss (paper Eq. 10) and its scopes, including a real two-process data-parallel check.

The global scope must reproduce the union-batch gradient once ranks' gradients are averaged (what DDP/FSDP do)
and micro-batch losses are divided by the accumulation count (what Lightning does), with ``F`` running over every
token of the optimizer step seen so far.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dlcm.model.packing import PackedSeqs
from dlcm.model.ratio_loss import RatioLoss, ratio_loss_value
from tests.conftest import random_cu_seqlens

R = 4.0
WORLD = 2
QUARTER = 32  # tokens per rank per micro-batch with two micro-batches; powers of two keep every F exact in fp32
HALF = 2 * QUARTER  # tokens per rank with one micro-batch
UNION = WORLD * HALF
QUARTER_RATES = (0.1, 0.5, 0.3, 0.2)  # distinct boundary rates so the running F differs from each local F
HALF_DOCS = ([20, 44], [50, 14])  # documents of each rank's half (rank r holds union rows [r·HALF, (r+1)·HALF))
QUARTER_DOCS = [12, 20]
SPAWN_TIMEOUT_S = 90.0


def packed(doc_lengths: list[int]) -> PackedSeqs:
    return PackedSeqs.from_cu_seqlens(random_cu_seqlens(doc_lengths), sum(doc_lengths))


def reference_loss(f: float | torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Eq. 10 written independently of the module: (1 − R·F)(1 − R·G)/(R − 1)."""
    return (1.0 - R * f) * (1.0 - R * g) / (R - 1.0)


def union_batch(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic logits and hard boundaries of the union batch (all ranks, all micro-batches)."""
    gen = torch.Generator().manual_seed(1234)
    logits = torch.randn(UNION, generator=gen, dtype=torch.float64).to(dtype)
    boundary = torch.cat([torch.rand(QUARTER, generator=gen) < rate for rate in QUARTER_RATES])
    return logits, boundary


def per_document_reference(prob: torch.Tensor, boundary: torch.Tensor, doc_lengths: list[int]) -> torch.Tensor:
    """The sequence scope by an explicit loop: Eq. 10 per document, then the plain mean over documents."""
    losses, start = [], 0
    for n in doc_lengths:
        f = boundary[start : start + n].double().mean()
        losses.append(reference_loss(f, prob[start : start + n].mean()))
        start += n
    return torch.stack(losses).mean()


# --- Eq. 10 itself ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [2.0, 3.0, 4.0, 8.0])
def test_ratio_loss_value_is_zero_at_target_rate(ratio: float) -> None:
    target = torch.tensor(1.0 / ratio, dtype=torch.float64)
    assert abs(float(ratio_loss_value(target, target, ratio))) < 1e-15


@pytest.mark.parametrize("ratio", [2.0, 3.0, 4.0, 8.0])
def test_ratio_loss_value_equals_unfactored_paper_form(ratio: float) -> None:
    gen = torch.Generator().manual_seed(int(ratio))
    f, g = torch.rand(2, 256, generator=gen, dtype=torch.float64)
    paper = ratio / (ratio - 1.0) * ((ratio - 1.0) * f * g + (1.0 - f) * (1.0 - g)) - 1.0
    torch.testing.assert_close(ratio_loss_value(f, g, ratio), paper, rtol=0.0, atol=1e-13)


@pytest.mark.parametrize("ratio", [2.0, 3.0, 4.0, 8.0])
def test_ratio_loss_value_gradient_in_prob_mean(ratio: float) -> None:
    gen = torch.Generator().manual_seed(10 + int(ratio))
    f = torch.rand(64, generator=gen, dtype=torch.float64)
    g = torch.rand(64, generator=gen, dtype=torch.float64, requires_grad=True)
    ratio_loss_value(f, g, ratio).sum().backward()
    expected = -ratio * (1.0 - ratio * f) / (ratio - 1.0)
    torch.testing.assert_close(g.grad, expected, rtol=0.0, atol=1e-13)
    # Too many boundaries (F > 1/R) must push p down, too few push it up.
    assert bool((g.grad[f > 1.0 / ratio] > 0).all()) and bool((g.grad[f < 1.0 / ratio] < 0).all())


# --- Single-process scopes --------------------------------------------------------------------------------------


def test_global_scope_without_process_group_equals_batch_scope() -> None:
    logits, boundary = union_batch()
    seqs = packed(HALF_DOCS[0] + HALF_DOCS[1])
    results = {}
    for scope in ("batch", "global"):
        leaf = logits.clone().requires_grad_(True)
        stats = RatioLoss(R, scope)(torch.sigmoid(leaf), boundary, seqs)
        stats.loss.backward()
        results[scope] = (stats, leaf.grad)
    (batch, batch_grad), (glob, glob_grad) = results["batch"], results["global"]
    torch.testing.assert_close(glob.loss, batch.loss, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(glob_grad, batch_grad, rtol=1e-14, atol=1e-16)
    assert float(glob.boundary_rate) == float(batch.boundary_rate) == float(boundary.double().mean())
    assert float(glob.local_boundary_rate) == float(batch.local_boundary_rate)


def test_sequence_scope_is_mean_of_per_document_losses_and_differs_from_batch_scope() -> None:
    # Documents of very different lengths and boundary rates, with p tracking each document's own rate: every
    # document is off target (positive loss) while the pooled batch is close to F = G = 1/R.
    doc_lengths, doc_rates = [40, 24, 56, 8], [0.05, 0.6, 0.25, 0.5]
    gen = torch.Generator().manual_seed(7)
    boundary = torch.cat([torch.rand(n, generator=gen) < rate for n, rate in zip(doc_lengths, doc_rates, strict=True)])
    logits = torch.cat([torch.logit(torch.full((n,), rate)) for n, rate in zip(doc_lengths, doc_rates, strict=True)])
    logits = logits + 0.3 * torch.randn(logits.shape, generator=gen)
    seqs = packed(doc_lengths)

    leaf = logits.clone().requires_grad_(True)
    stats = RatioLoss(R, "sequence")(torch.sigmoid(leaf), boundary, seqs)
    stats.loss.backward()
    ref_leaf = logits.clone().requires_grad_(True)
    expected = per_document_reference(torch.sigmoid(ref_leaf), boundary, doc_lengths)
    expected.backward()
    torch.testing.assert_close(stats.loss, expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-7)
    # Its statistics are the micro-batch's pooled ones (the loss alone is per document).
    torch.testing.assert_close(stats.boundary_rate, boundary.float().mean())

    batch = RatioLoss(R, "batch")(torch.sigmoid(logits), boundary, seqs)
    seq_value, batch_value = float(stats.loss.detach()), float(batch.loss.detach())
    assert seq_value - batch_value > 0.1, (seq_value, batch_value)


@pytest.mark.parametrize("scope", ["sequence", "batch", "global"])
def test_every_scope_accepts_float64_and_bfloat16_probabilities(scope: str) -> None:
    logits, boundary = union_batch(torch.float64)
    doc_lengths = HALF_DOCS[0] + HALF_DOCS[1]
    stats = RatioLoss(R, scope)(torch.sigmoid(logits), boundary, packed(doc_lengths))
    assert stats.loss.dtype == torch.float64
    if scope == "sequence":
        torch.testing.assert_close(stats.loss, per_document_reference(torch.sigmoid(logits), boundary, doc_lengths))
    stats_bf16 = RatioLoss(R, scope)(torch.sigmoid(logits).bfloat16(), boundary, packed(doc_lengths))
    assert stats_bf16.loss.dtype == torch.float32  # statistics accumulate in at least fp32


def test_global_scope_running_rate_follows_gradient_accumulation() -> None:
    gen = torch.Generator().manual_seed(3)
    # Unequal micro-batch sizes: the running F is token-weighted, not a mean of micro-batch rates.
    sizes, rates = [32, 48, 40, 24], [0.1, 0.6, 0.3, 0.9]
    micro = [
        (torch.rand(n, generator=gen, dtype=torch.float64), torch.rand(n, generator=gen) < r)
        for n, r in zip(sizes, rates, strict=True)
    ]
    module = RatioLoss(R, "global")
    module.micro_batches_per_step = 2

    def call(k: int) -> tuple[float, float]:
        prob, boundary = micro[k]
        stats = module(prob, boundary, packed([sizes[k]]))
        assert float(stats.local_boundary_rate) == pytest.approx(float(boundary.double().mean()), rel=1e-7)
        return float(stats.boundary_rate), float(stats.loss)

    def rate(*ks: int) -> float:
        return sum(int(micro[k][1].sum()) for k in ks) / sum(sizes[k] for k in ks)

    first, _ = call(0)
    assert first == pytest.approx(rate(0), rel=1e-7)
    second, second_loss = call(1)
    assert second == pytest.approx(rate(0, 1), rel=1e-7)
    # The second micro-batch's loss uses the running F with its own G (one rank: G = its mean p).
    assert second_loss == pytest.approx(float(reference_loss(rate(0, 1), micro[1][0].mean())), rel=1e-6)
    third, _ = call(2)  # micro_batches_per_step reached: a new optimizer step starts on its own
    assert third == pytest.approx(rate(2), rel=1e-7)

    module.start_step()  # explicit restart in the middle of a step
    fourth, _ = call(3)
    assert fourth == pytest.approx(rate(3), rel=1e-7)


def test_global_scope_in_eval_mode_uses_local_rate_and_keeps_running_state() -> None:
    gen = torch.Generator().manual_seed(4)
    (p0, p1, p2), (b0, b1, b2) = torch.rand(3, 32, generator=gen), torch.rand(3, 32, generator=gen) < 0.4
    seqs = packed([32])
    module = RatioLoss(R, "global")
    module.micro_batches_per_step = 2
    module(p0, b0, seqs)

    module.eval()  # e.g. a validation batch between two micro-batches of a training step
    assert float(module(p2, b2, seqs).boundary_rate) == pytest.approx(float(b2.float().mean()))
    module.train()

    second = module(p1, b1, seqs)
    assert float(second.boundary_rate) == pytest.approx(float(torch.cat([b0, b1]).float().mean()))


# --- Two real processes (gloo) ----------------------------------------------------------------------------------


def _two_rank_worker(rank: int, world: int, init_method: str, out_dir: str) -> None:
    """One data-parallel rank: computes each scenario on its share of the union batch and saves the results."""
    torch.set_num_threads(1)  # two ranks on a small CPU box: avoid oversubscription
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    original_all_reduce = dist.all_reduce
    calls = [0]

    def counting_all_reduce(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return original_all_reduce(*args, **kwargs)

    def averaged(grad: torch.Tensor) -> torch.Tensor:
        """Data-parallel gradient averaging, as DDP does it."""
        grad = grad.clone()
        original_all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad / world

    dist.all_reduce = counting_all_reduce  # the module looks it up at call time
    try:
        logits, boundary = union_batch(torch.float64)
        out: dict[str, object] = {}

        # Scenario 1: one micro-batch per step; this rank holds union rows [rank·HALF, (rank+1)·HALF).
        rows = slice(rank * HALF, (rank + 1) * HALF)
        leaf = logits.clone().requires_grad_(True)  # full-size leaf: gradients land where the union's would
        module = RatioLoss(R, "global")
        before = calls[0]
        stats = module(torch.sigmoid(leaf[rows]), boundary[rows], packed(HALF_DOCS[rank]))
        out["one_all_reduces"] = calls[0] - before
        stats.loss.backward()
        out["one_loss"] = stats.loss.detach()
        out["one_rate"] = stats.boundary_rate
        out["one_local_rate"] = stats.local_boundary_rate
        out["one_grad"] = averaged(leaf.grad)

        # Scenario 2: two micro-batches per step; micro-batch k on this rank is union quarter 2·rank + k.
        leaf = logits.clone().requires_grad_(True)
        module = RatioLoss(R, "global")
        module.micro_batches_per_step = 2
        losses, rates = [], []
        for k in range(2):
            rows = slice((2 * rank + k) * QUARTER, (2 * rank + k + 1) * QUARTER)
            stats = module(torch.sigmoid(leaf[rows]), boundary[rows], packed(QUARTER_DOCS))
            (stats.loss / 2).backward()  # Lightning divides each micro-batch loss by the accumulation count
            losses.append(stats.loss.detach())
            rates.append(stats.boundary_rate)
        out["two_losses"] = torch.stack(losses)
        out["two_rates"] = torch.stack(rates)
        out["two_grad"] = averaged(leaf.grad)

        # Scenario 3: the sequence scope is purely local.
        rows = slice(rank * HALF, (rank + 1) * HALF)
        before = calls[0]
        stats = RatioLoss(R, "sequence")(torch.sigmoid(logits.float()[rows]), boundary[rows], packed(HALF_DOCS[rank]))
        out["seq_all_reduces"] = calls[0] - before
        out["seq_loss"] = stats.loss.detach()

        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.all_reduce = original_all_reduce
        dist.destroy_process_group()


def run_bounded(fn: Callable[..., None], args: tuple, nprocs: int, timeout_s: float) -> None:
    """Spawn ``nprocs`` ranks and wait at most ``timeout_s``; a hung rank is killed rather than hanging pytest."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=0.5):  # raises if a rank failed (and terminates the others)
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join(5)
            pytest.fail(f"{nprocs}-rank run did not finish within {timeout_s} s")


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("ratio_loss_ddp")
    init_method = f"file://{tmp / 'rendezvous'}"  # file store: no port to race for
    run_bounded(_two_rank_worker, (WORLD, init_method, str(tmp)), WORLD, SPAWN_TIMEOUT_S)
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def test_two_ranks_one_micro_batch_match_union_batch(two_rank_results: list[dict]) -> None:
    logits, boundary = union_batch(torch.float64)
    leaf = logits.clone().requires_grad_(True)
    union = RatioLoss(R, "global")(torch.sigmoid(leaf), boundary, packed(HALF_DOCS[0] + HALF_DOCS[1]))
    union.loss.backward()
    union_rate = int(boundary.sum()) / UNION

    for rank, res in enumerate(two_rank_results):
        assert res["one_all_reduces"] == 1  # one small all-reduce of the counts per micro-batch
        assert float(res["one_rate"]) == union_rate == float(union.boundary_rate)
        half = boundary[rank * HALF : (rank + 1) * HALF]
        assert float(res["one_local_rate"]) == pytest.approx(float(half.double().mean()), rel=1e-7)
        torch.testing.assert_close(res["one_grad"], leaf.grad, rtol=1e-12, atol=1e-14)
    mean_loss = torch.stack([res["one_loss"] for res in two_rank_results]).mean()
    torch.testing.assert_close(mean_loss, union.loss.detach(), rtol=1e-12, atol=1e-14)

    # And the union result itself is Eq. 10's gradient: −R(1 − R·F)/(R − 1) · p(1 − p)/N.
    p = torch.sigmoid(logits)
    closed_form = -R * (1.0 - R * union_rate) / (R - 1.0) * p * (1.0 - p) / UNION
    torch.testing.assert_close(leaf.grad, closed_form, rtol=1e-12, atol=1e-15)


def test_two_ranks_two_micro_batches_use_running_step_rate(two_rank_results: list[dict]) -> None:
    logits, boundary = union_batch(torch.float64)
    p = torch.sigmoid(logits)
    quarter = [slice(q * QUARTER, (q + 1) * QUARTER) for q in range(4)]
    # Global micro-batch k is union quarters {k, 2 + k} (quarter k of rank 0, quarter 2 + k of rank 1).
    micro_rows = [[quarter[k], quarter[2 + k]] for k in range(2)]
    counts = [sum(int(boundary[rows].sum()) for rows in micro_rows[k]) for k in range(2)]
    tokens = WORLD * QUARTER
    running = [counts[0] / tokens, (counts[0] + counts[1]) / (2 * tokens)]  # F over all ranks, micro-batches ≤ k

    expected_grad = torch.empty_like(p)
    expected_losses = []
    for k in range(2):
        # Rank loss k has gradient coef(F_k)·W/N_k·p(1 − p); Lightning's 1/2 and DDP's 1/W scale it.
        coef = -R * (1.0 - R * running[k]) / (R - 1.0)
        for rows in micro_rows[k]:
            expected_grad[rows] = coef / (2 * tokens) * p[rows] * (1.0 - p[rows])
        expected_losses.append(reference_loss(running[k], torch.cat([p[rows] for rows in micro_rows[k]]).mean()))

    assert running[1] == int(boundary.sum()) / UNION  # the last micro-batch sees the whole step's F
    for res in two_rank_results:
        assert res["two_rates"].tolist() == running  # exact: token counts are powers of two
        torch.testing.assert_close(res["two_grad"], expected_grad, rtol=1e-12, atol=1e-15)
    # The rank-mean of each micro-batch loss is Eq. 10 on the union micro-batch with the running F.
    rank_mean = torch.stack([res["two_losses"] for res in two_rank_results]).mean(0)
    torch.testing.assert_close(rank_mean, torch.stack(expected_losses), rtol=1e-12, atol=1e-14)


def test_two_ranks_sequence_scope_is_local(two_rank_results: list[dict]) -> None:
    logits, boundary = union_batch(torch.float32)
    for rank, res in enumerate(two_rank_results):
        assert res["seq_all_reduces"] == 0
        rows = slice(rank * HALF, (rank + 1) * HALF)
        expected = per_document_reference(torch.sigmoid(logits[rows]), boundary[rows], HALF_DOCS[rank])
        torch.testing.assert_close(res["seq_loss"], expected.float(), rtol=1e-5, atol=1e-6)
