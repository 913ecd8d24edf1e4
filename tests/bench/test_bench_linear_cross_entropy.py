"""bench/linear_cross_entropy.py's pieces on the CPU: the fused candidate against the fp32 reference it is scored
by (the timing loop needs CUDA)."""

from __future__ import annotations

import torch

from tests.bench.test_bench_decode import load


def test_chunked_candidate_matches_the_reference_within_rounding() -> None:
    bench = load("linear_cross_entropy")
    torch.manual_seed(0)
    x, w = torch.randn(300, 16), torch.randn(200, 16) * 0.25
    targets = torch.randint(0, 200, (300,))
    want = bench.reference(x, w, targets)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    total = bench.chunked_loss(compiled=False)(xl, wl, targets)
    total.backward()
    got = bench.errors((total.detach(), xl.grad, wl.grad), want)
    assert max(got.values()) < 1e-5, got
    wrong = bench.errors((total.detach() + 1.0, xl.grad, wl.grad * 2), want)
    assert wrong["loss_rel_err"] > 1e-4 and wrong["dw_err"] > 0.5


def test_table_renders_measured_and_skipped_candidates() -> None:
    bench = load("linear_cross_entropy")
    meta = {"command": "python bench/linear_cross_entropy.py", "device": "GPU", "torch": "2.11", "warmup": 3}
    shape = {"tokens": 16384, "width": 1536, "vocab": 128815}
    measured = shape | {"impl": "chunked", "ms": 30.0, "peak_extra_gib": 1.5}
    measured |= {"loss_rel_err": 1e-6, "dx_err": 2e-3, "dw_err": 3e-3}
    data = {"meta": meta | {"iters": 10}, "records": [measured, shape | {"impl": "liger", "skipped": "not importable"}]}
    table = bench.markdown_table(data)
    assert "| chunked | 16384 × 1536 × 128815 | 30.0 | 1.50 | 1.0e-06 | 2.0e-03 | 3.0e-03 |" in table
    assert "| liger | 16384 × 1536 × 128815 | not importable |" in table
