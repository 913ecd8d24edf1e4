"""The hybrid-sharding (HSDP) recipe path on one CUDA device: a 1 × 1 (replicate, shard) mesh.

The small H200 recipe composed with the FSDP2 fragment, the step fixed in tokens (accumulation 2 on one GPU), run
three optimizer steps with full sharding and every micro-batch reduced, then hybrid sharding with the all-reduce
between replicas once per step, then hybrid with every collective skipped until the step's last micro-batch. On one
device they all compute the same thing, so the losses agree; the hybrid runs' parameters live on a 2-D mesh.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed.tensor import Replicate, Shard

from dlcm.train.checkpoint_io import AtomicModelParallelStrategy
from dlcm.train.cli import run_cli
from tests.train.test_fsdp_gpu import STEPS, small_fsdp2_args

pytestmark = pytest.mark.gpu

MICRO_BATCH = 16_384  # the small recipe's tokens per micro-batch


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


def fit(root: Path, sharding: str, gradient_sync: str) -> tuple[list[float], object, int]:
    cli = run_cli(
        small_fsdp2_args(
            root,
            f"--global_batch.tokens={2 * MICRO_BATCH}",
            f"--model.init_args.execution.sharding={sharding}",
            f"--model.init_args.execution.gradient_sync={gradient_sync}",
        ),
        run=False,
    )
    assert isinstance(cli.trainer.strategy, AtomicModelParallelStrategy)
    assert cli.trainer.accumulate_grad_batches == 2  # 32,768 tokens per step / (16,384 × 1 GPU)
    record = Losses()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, cli.datamodule)
    weight = cli.model.network.embed.weight
    placements, peak = weight.placements, torch.cuda.max_memory_allocated()
    del cli
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return record.losses, placements, peak


def test_hybrid_sharding_on_one_device_trains_as_full_sharding(tmp_path: Path) -> None:
    full, full_placements, full_peak = fit(tmp_path / "full", "full", "micro_batch")
    hybrid, hybrid_placements, hybrid_peak = fit(tmp_path / "hybrid", "hybrid", "replicas_at_step")
    skipped, _, skipped_peak = fit(tmp_path / "skipped", "hybrid", "step")
    for name, losses, peak in (
        ("full", full, full_peak),
        ("hybrid", hybrid, hybrid_peak),
        ("step", skipped, skipped_peak),
    ):
        print(f"{name}: peak {peak / 2**30:.2f} GiB, losses {[round(x, 4) for x in losses]}")
    assert full_placements == (Shard(0),)
    assert hybrid_placements == (Replicate(), Shard(0))  # the 1 × 1 (replicate, shard) mesh
    assert len(full) == 2 * STEPS and all(torch.isfinite(torch.tensor(full)))
    # bf16 compute, same kernels and order on one device: the three runs follow the same curve.
    assert hybrid == pytest.approx(full, rel=2e-3)
    assert skipped == pytest.approx(full, rel=2e-3)
