"""The optimizer step's size in tokens, fixed by the recipe whatever the number of GPUs it is launched on.

A recipe states ``global_batch.tokens`` (tokens per optimizer step over all ranks); at launch, once the trainer
knows its world size (from ``devices`` × ``num_nodes``, which torchrun or SLURM fill in), gradient accumulation
becomes ``tokens / (data.tokens_per_batch × world size)``. The same recipe then trains with the same step on 1 GPU
or 64, only slower or faster. Validation every ``validate_every_steps`` optimizer steps is converted to Lightning's
micro-batch count the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L

from dlcm.model.config import require


@dataclass
class GlobalBatch:
    """Tokens per optimizer step (all ranks, all micro-batches) and the validation interval in optimizer steps.

    ``tokens: null`` leaves ``trainer.accumulate_grad_batches`` as the recipe sets it.
    """

    tokens: int | None = None
    validate_every_steps: int | None = None

    def __post_init__(self) -> None:
        for name, value in (("tokens", self.tokens), ("validate_every_steps", self.validate_every_steps)):
            if value is not None:
                require(value >= 1, f"global_batch.{name}", value, "null or a positive integer")


def accumulation_for(tokens: int, micro_batch_tokens: int, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank; a clear error when the step is no whole number of them."""
    per_micro_step = micro_batch_tokens * world_size
    require(
        tokens % per_micro_step == 0,
        "global_batch.tokens",
        tokens,
        f"a multiple of data.tokens_per_batch × world size = {micro_batch_tokens} × {world_size} = {per_micro_step}",
    )
    return tokens // per_micro_step


def apply_global_batch(trainer: L.Trainer, batch: GlobalBatch, micro_batch_tokens: int) -> None:
    """Set the trainer's accumulation (and validation interval) from ``batch`` for the world it was launched in."""
    accumulation = trainer.accumulate_grad_batches
    if batch.tokens is not None:
        require(
            accumulation == 1,
            "trainer.accumulate_grad_batches",
            accumulation,
            "1 (or unset) when global_batch.tokens is set: accumulation is derived from it",
        )
        accumulation = accumulation_for(batch.tokens, micro_batch_tokens, trainer.num_nodes * trainer.num_devices)
        trainer.accumulate_grad_batches = accumulation
    if batch.validate_every_steps is not None:
        trainer.val_check_interval = batch.validate_every_steps * accumulation
