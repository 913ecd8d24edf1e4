"""Hybrid sharding (HSDP) and gradient-sync skipping on CPU: four real gloo processes on a 2 × 2 mesh.

Every rank trains the tiny DLCM for three AdamW steps of two micro-batches each (fp32), under hybrid sharding (shard
within pairs of ranks, replicate across the pairs) and under full sharding over all four, with every gradient-sync
mode. With the micro-batch ratio scope the parameters and each step's gradients must equal one process that
accumulates the eight micro-batches of the union batch; with the global scope (``F`` over all ranks and micro-batches
of the step) every mode and sharding must give the same gradients, and ``F`` must be the same number on every rank
and, on the step's last micro-batch, the union batch's boundary rate.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from dlcm.model.presets import build_model, tiny_dlcm
from dlcm.train.execution import ExecutionConfig, apply_execution, set_gradient_sync
from tests.model.test_ratio_loss import run_bounded

WORLD = 4
SHARD = 2  # ranks per shard group: a 2 × 2 (replicate, shard) mesh
MICRO = 2  # micro-batches per optimizer step on each rank
STEPS = 3
TOKENS = 48  # per micro-batch
VARIANTS = (  # (sharding, gradient_sync)
    ("hybrid", "micro_batch"),
    ("hybrid", "step"),
    ("hybrid", "replicas_at_step"),
    ("full", "micro_batch"),
    ("full", "step"),
)
# (ratio scope, sharding, gradient_sync) trained in the default suite (four ranks on two cores are slow); the slow
# suite adds the rest of every scope × variant.
QUICK = (
    ("batch", "hybrid", "micro_batch"),
    ("batch", "hybrid", "step"),
    ("batch", "full", "micro_batch"),
    ("global", "hybrid", "micro_batch"),
    ("global", "hybrid", "replicas_at_step"),
)
REST = tuple((scope, *v) for scope in ("batch", "global") for v in VARIANTS if (scope, *v) not in QUICK)


def network_config(scope: str):
    cfg = tiny_dlcm(vocab_size=257)  # 257 rows: the embedding and head shard unevenly
    return dataclasses.replace(cfg, parser=dataclasses.replace(cfg.parser, ratio_scope=scope))


def micro_batch(step: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """Rank ``rank``'s micro-batch ``micro`` of optimizer step ``step``: two documents and a sampling generator."""
    seed = 1000 * step + 10 * rank + micro
    ids = torch.randint(0, 257, (TOKENS,), generator=torch.Generator().manual_seed(seed))
    split = 8 + seed % 31
    return ids, torch.tensor([0, split, TOKENS], dtype=torch.int32), torch.Generator().manual_seed(seed)


def micro_batch_loss(network: torch.nn.Module, step: int, rank: int, micro: int) -> tuple[torch.Tensor, float]:
    ids, cu_seqlens, generator = micro_batch(step, rank, micro)
    out = network(ids, cu_seqlens, generator=generator)
    last = cu_seqlens[1:] - 1  # no target across a document's end
    keep = torch.ones(TOKENS - 1, dtype=torch.bool)
    keep[last[:-1]] = False
    ce = F.cross_entropy(out.logits_TV[:-1][keep].float(), ids[1:][keep])
    return ce + out.aux_loss, out.ratio.boundary_rate.item()


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach().clone()


def train(network: torch.nn.Module, ranks: list[int], mode: str = "micro_batch") -> dict:
    """Three AdamW steps; each accumulates ``MICRO`` micro-batches of every rank in ``ranks`` (one rank when
    distributed, all four in the single-process reference), losses divided by the micro-batch count."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=0.1)
    micro_batches = [(rank, micro) for micro in range(MICRO) for rank in ranks]
    network.ratio_loss.micro_batches_per_step = len(micro_batches)
    grads, rates = [], []
    for step in range(STEPS):
        for index, (rank, micro) in enumerate(micro_batches):
            set_gradient_sync(network, mode, last_micro_batch=index == len(micro_batches) - 1)
            loss, rate = micro_batch_loss(network, step, rank, micro)
            (loss / len(micro_batches)).backward()
            rates.append(rate)
        grads.append({n: full(p.grad) for n, p in network.named_parameters()})
        optimizer.step()
        optimizer.zero_grad()
    return {"grads": grads, "rates": rates, "params": {n: full(p) for n, p in network.named_parameters()}}


def reshard_through_checkpoint(hybrid: torch.nn.Module, mesh, path: Path) -> dict[str, torch.Tensor]:
    """Save the hybrid-sharded network with torch.distributed.checkpoint (the format of the sharded Lightning
    checkpoints) and load it into a fully sharded one: its gathered parameters."""
    dcp.save(get_model_state_dict(hybrid), checkpoint_id=path)
    fresh = build_model(network_config("batch")).train()
    apply_execution(fresh, ExecutionConfig(fsdp_param_dtype="float32"), mesh)
    state = get_model_state_dict(fresh)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(fresh, state)
    return {n: full(p) for n, p in fresh.named_parameters()}


def _worker(rank: int, tmp: str, variants: tuple[tuple[str, str, str], ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{Path(tmp) / 'rendezvous'}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("data_parallel",))
        results = {}
        for scope, sharding, mode in variants:
            torch.manual_seed(5)
            network = build_model(network_config(scope)).train()
            execution = ExecutionConfig(
                fsdp_param_dtype="float32", sharding=sharding, hsdp_shard_size=SHARD, gradient_sync=mode
            )
            apply_execution(network, execution, mesh)
            results[scope, sharding, mode] = train(network, [rank], mode)
            results[scope, sharding, mode]["mesh"] = tuple(network.embed.weight.device_mesh.shape)
            if (scope, sharding, mode) == QUICK[0]:
                results["resharded"] = reshard_through_checkpoint(network, mesh, Path(tmp) / "hybrid.distcp")
        torch.save(results, Path(tmp) / f"rank-{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(tmp: Path, variants: tuple[tuple[str, str, str], ...]) -> list[dict]:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    run_bounded(_worker, (str(tmp), variants), WORLD, timeout_s=600.0)
    return [torch.load(tmp / f"rank-{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single() -> dict:
    torch.manual_seed(5)
    return train(build_model(network_config("batch")).train(), list(range(WORLD)))


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return spawn(tmp_path_factory.mktemp("hsdp"), QUICK)


@pytest.fixture(scope="module")
def rest(tmp_path_factory: pytest.TempPathFactory, quick: list[dict]) -> list[dict]:
    return [q | r for q, r in zip(quick, spawn(tmp_path_factory.mktemp("hsdp_rest"), REST), strict=True)]


def gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest difference relative to the largest magnitude of ``b``."""
    scale = max(t.abs().max().item() for t in b.values())
    assert scale > 0
    return max((a[n] - t).abs().max().item() for n, t in b.items()) / scale


def check_union_batch(ranks: list[dict], single: dict, variants: tuple[tuple[str, str, str], ...]) -> None:
    """Micro-batch ratio scope: gradients of every step and the final parameters equal the single process's."""
    for variant in (v for v in variants if v[0] == "batch"):
        for rank, result in enumerate(ranks):
            run = result[variant]
            for step in range(STEPS):
                assert gap(run["grads"][step], single["grads"][step]) < 1e-5, (variant, rank, step)
            for name, value in single["params"].items():
                torch.testing.assert_close(run["params"][name], value, rtol=1e-5, atol=1e-6, msg=(variant, name))


def check_global_statistics(ranks: list[dict], single: dict, variants: tuple[tuple[str, str, str], ...]) -> None:
    """Global ratio scope: one all-reduced F per micro-batch on every rank and in every mode, the same gradients,
    and on step 0's last micro-batch F is the union batch's boundary rate (same weights and sampling seeds as the
    single process, whose micro-batches all hold ``TOKENS`` tokens)."""
    reference = ranks[0]["global", "hybrid", "micro_batch"]
    for variant in (v for v in variants if v[0] == "global"):
        for rank, result in enumerate(ranks):
            run = result[variant]
            assert run["rates"] == reference["rates"], (variant, rank)
            for step in range(STEPS):
                assert gap(run["grads"][step], reference["grads"][step]) < 1e-5, (variant, rank, step)
    union = single["rates"][: WORLD * MICRO]
    assert reference["rates"][MICRO - 1] == pytest.approx(sum(union) / len(union), rel=1e-6)


def test_meshes_are_two_by_two_hybrid_and_four_way_full(quick: list[dict]) -> None:
    for result in quick:
        assert result["batch", "hybrid", "micro_batch"]["mesh"] == (WORLD // SHARD, SHARD)
        assert result["batch", "full", "micro_batch"]["mesh"] == (WORLD,)


def test_a_hybrid_checkpoint_loads_into_full_sharding_unchanged(quick: list[dict]) -> None:
    for result in quick:
        trained = result[QUICK[0]]["params"]
        assert set(result["resharded"]) == set(trained)
        for name, value in trained.items():
            assert torch.equal(result["resharded"][name], value), name


def test_hybrid_full_and_skipped_sync_equal_one_process_on_the_union_batch(quick: list[dict], single: dict) -> None:
    check_union_batch(quick, single, QUICK)


def test_global_ratio_statistics_are_exact_and_identical_on_every_rank(quick: list[dict], single: dict) -> None:
    check_global_statistics(quick, single, QUICK)


@pytest.mark.slow
def test_every_scope_sharding_and_sync_mode(rest: list[dict], single: dict) -> None:
    check_union_batch(rest, single, REST)
    check_global_statistics(rest, single, REST)
