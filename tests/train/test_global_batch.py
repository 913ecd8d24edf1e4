"""The optimizer step fixed in tokens: accumulation follows the world size a recipe is launched with."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from dlcm.train.cli import run_cli
from dlcm.train.global_batch import GlobalBatch, accumulation_for, apply_global_batch
from tests.model.test_ratio_loss import run_bounded
from tests.train.test_distributed import RECIPE, args

FRAGMENT = Path(RECIPE).parent / "fragments" / "strategy_fsdp2.yaml"

MICRO_BATCH = 256


def launched(devices: int, num_nodes: int = 1) -> L.Trainer:
    """A trainer as a launcher of ``devices`` × ``num_nodes`` processes builds it (no process is started)."""
    strategy = "ddp" if devices * num_nodes > 1 else "auto"
    return L.Trainer(accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy=strategy, logger=False)


@pytest.mark.parametrize(("devices", "num_nodes"), [(1, 1), (2, 1), (4, 1), (2, 2)])
def test_the_same_recipe_keeps_its_tokens_per_optimizer_step_on_any_world_size(devices: int, num_nodes: int) -> None:
    trainer = launched(devices, num_nodes)
    apply_global_batch(trainer, GlobalBatch(tokens=8 * MICRO_BATCH, validate_every_steps=5), MICRO_BATCH)
    world = devices * num_nodes
    assert trainer.accumulate_grad_batches == 8 // world
    assert trainer.accumulate_grad_batches * MICRO_BATCH * world == 8 * MICRO_BATCH
    assert trainer.val_check_interval == 5 * (8 // world)  # micro-batches of five optimizer steps


def test_a_step_that_is_no_whole_number_of_micro_batches_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError) as err:
        apply_global_batch(launched(4), GlobalBatch(tokens=6 * MICRO_BATCH), MICRO_BATCH)
    assert str(err.value) == (
        "global_batch.tokens=1536 is not allowed: a multiple of data.tokens_per_batch × world size = 256 × 4 = 1024"
    )
    with pytest.raises(ValueError, match=r"trainer.accumulate_grad_batches=2 is not allowed: 1 \(or unset\)"):
        trainer = launched(1)
        trainer.accumulate_grad_batches = 2
        apply_global_batch(trainer, GlobalBatch(tokens=MICRO_BATCH), MICRO_BATCH)
    with pytest.raises(ValueError, match=r"global_batch\.tokens=0 is not allowed"):
        GlobalBatch(tokens=0)
    assert accumulation_for(4_194_304, 16_384, 64) == 4  # the paper's step on 8 nodes × 8 GPUs


def test_without_global_tokens_the_recipe_accumulation_stands() -> None:
    trainer = launched(2)
    trainer.accumulate_grad_batches = 3
    apply_global_batch(trainer, GlobalBatch(validate_every_steps=10), MICRO_BATCH)
    assert (trainer.accumulate_grad_batches, trainer.val_check_interval) == (3, 30)


def test_the_cli_derives_accumulation_from_the_recipe_key() -> None:
    cli = run_cli(
        [
            f"--config={RECIPE}",
            "--trainer.logger=false",
            f"--data.tokens_per_batch={MICRO_BATCH}",
            f"--global_batch.tokens={4 * MICRO_BATCH}",
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
        ],
        run=False,
    )
    assert cli.trainer.accumulate_grad_batches == 2


class StepTokens(Callback):
    """Tokens of every optimizer step, summed over the step's micro-batches and all ranks."""

    def __init__(self) -> None:
        self.pending = 0
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.pending += batch["input_ids"].numel()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        total = torch.tensor(self.pending)
        dist.all_reduce(total)
        self.steps.append(int(total))
        self.pending = 0


def _launch(rank: int, tmp: str, world: int) -> None:
    """One rank of a ``world``-process launch of the tiny recipe with the FSDP2 fragment (as torchrun would)."""
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)
    root = Path(tmp)
    dist.init_process_group("gloo", init_method=f"file://{root / 'rendezvous'}", rank=rank, world_size=world)
    try:
        cli = run_cli(
            args(
                root,
                "global",
                f"--config={FRAGMENT}",
                f"--trainer.devices={world}",
                "--model.init_args.execution.fsdp_param_dtype=float32",
                f"--global_batch.tokens={4 * MICRO_BATCH}",
                "--trainer.max_steps=2",
            ),
            run=False,
        )
        record = StepTokens()
        cli.trainer.callbacks.append(record)
        cli.trainer.fit(cli.model, cli.datamodule)
        if rank == 0:
            (root / "steps.json").write_text(json.dumps([cli.trainer.accumulate_grad_batches, record.steps]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_launched_on_one_two_and_four_processes_every_step_holds_the_same_tokens(tmp_path: Path) -> None:
    for world in (1, 2, 4):
        root = tmp_path / str(world)
        root.mkdir()
        run_bounded(_launch, (str(root), world), world, timeout_s=600.0)
        accumulation, steps = json.loads((root / "steps.json").read_text())
        assert accumulation == 4 // world
        assert steps == [4 * MICRO_BATCH] * 2, world
