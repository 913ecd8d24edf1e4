"""The FSDP2 recipe path on one CUDA device: the small H200 recipe composed with the FSDP2 fragment, one process,
per-block compile, with activation checkpointing full vs none. Prints the peak memory of each."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from dlcm.checkpoint_io import AtomicModelParallelStrategy, require_sharded_checkpoint
from dlcm.cli import run_cli

pytestmark = pytest.mark.gpu

RECIPES = Path(__file__).parents[1] / "recipes"
STEPS = 3


class Peak(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())

    def on_train_end(self, trainer, pl_module) -> None:
        self.peak_gib = torch.cuda.max_memory_allocated() / 2**30


def fit_fsdp2(root: Path, checkpointing: str) -> Peak:
    cli = run_cli(
        [
            f"--config={RECIPES / 'dlcm_small_r4_defaultcorpus_h200.yaml'}",
            f"--config={RECIPES / 'fragments' / 'strategy_fsdp2.yaml'}",
            "--trainer.devices=1",
            "--trainer.strategy.init_args.data_parallel_size=1",
            f"--trainer.max_steps={STEPS}",
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--checkpoint.monitor=null",
            f"--trainer.default_root_dir={root}",
            "--data.num_workers=0",
            f"--model.init_args.execution.activation_checkpointing={checkpointing}",
            "--model.init_args.execution.compile_blocks=true",
        ],
        run=False,
    )
    assert isinstance(cli.trainer.strategy, AtomicModelParallelStrategy)
    peak = Peak()
    cli.trainer.callbacks.append(peak)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert type(cli.model.network.embed.weight).__name__ == "DTensor"  # sharded by configure_model
    require_sharded_checkpoint(root / "checkpoints" / "last.ckpt")  # the sharded checkpoint was written
    del cli
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def test_fsdp2_recipe_with_compile_and_activation_checkpointing(tmp_path: Path) -> None:
    peaks = {mode: fit_fsdp2(tmp_path / mode, mode) for mode in ("none", "full")}
    for mode, peak in peaks.items():
        print(
            f"FSDP2, 1 GPU, compiled blocks, activation_checkpointing={mode}: peak {peak.peak_gib:.2f} GiB, "
            f"losses {[round(x, 4) for x in peak.losses]}"
        )
        assert len(peak.losses) == STEPS and all(torch.isfinite(torch.tensor(peak.losses)))
    assert peaks["full"].peak_gib < peaks["none"].peak_gib  # recomputation trades activations for compute
