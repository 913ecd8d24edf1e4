"""Peak memory of training steps on the FSDP2 path (``AtomicModelParallelStrategy`` with one process, so
``configure_model`` applies checkpointing → compile → ``fully_shard``), with and without activation checkpointing.

Each setting runs in a fresh process (its own allocator and peak counters) on random tokens in documents of
``--context`` tokens; bf16 autocast with bf16-gathered parameters on CUDA, fp32 on CPU. Prints one JSON object::

    python bench/fsdp_memory.py --preset dlcm_2.3b --tokens-per-batch 16384 --context 2048 --compile

On CUDA the memory is ``torch.cuda.max_memory_allocated`` (and reserved) over the steps; on CPU the process's peak
resident set, which includes the Python and library footprint.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint
from torch.utils.data import DataLoader

from dlcm.model.config import DLCMConfig
from dlcm.model.presets import PRESETS, preset_config
from dlcm.train.checkpoint_io import AtomicModelParallelStrategy
from dlcm.train.execution import ExecutionConfig
from dlcm.train.lightning_modules import BaselineModule, DLCMModule
from dlcm.train.optim import ScheduleConfig

GIB = 2**30


def random_batches(vocab_size: int, tokens: int, context: int, steps: int, seed: int = 0) -> list[dict[str, Any]]:
    """Packed micro-batches as the data module yields them: documents of ``context`` tokens (the last shorter)."""
    g = torch.Generator().manual_seed(seed)
    offsets = [*range(0, tokens, context), tokens]
    return [
        {
            "input_ids": torch.randint(0, vocab_size, (tokens,), generator=g),
            "cu_seqlens": torch.tensor(offsets, dtype=torch.int32),
            "max_seqlen": min(context, tokens),
            "token_bytes": torch.ones(tokens, dtype=torch.int32),
            "domain": torch.zeros(len(offsets) - 1, dtype=torch.int64),
        }
        for _ in range(steps)
    ]


class PeakMemory(Callback):
    """Loss and wall time of every step, and the peak memory from the start of training."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.step_seconds: list[float] = []
        self.peak: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.clock = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())  # .item() waits for the step's kernels
        now = time.perf_counter()
        self.step_seconds.append(now - self.clock)
        self.clock = now

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.cuda.is_available():
            self.peak = {
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            }
        else:  # ru_maxrss is in KiB on Linux
            self.peak = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def fit_one_device(
    preset: str,
    execution: ExecutionConfig,
    tokens: int,
    context: int,
    steps: int,
    callbacks: list[Callback],
    async_save: bool = False,
) -> None:
    """Train ``steps`` steps of ``preset`` on random batches through dlcm's FSDP2 path, one device, in this process."""
    cuda = torch.cuda.is_available()
    config = preset_config(preset)
    module_class = DLCMModule if isinstance(config, DLCMConfig) else BaselineModule
    L.seed_everything(0, verbose=False)  # the same initial weights for every setting
    with torch.device("cuda" if cuda else "cpu"):  # initialise on the GPU: a 2B-parameter CPU init takes minutes
        module = module_class(
            config, schedule=ScheduleConfig(warmup_steps=0), context_length=context, execution=execution
        )
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        strategy=AtomicModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1, async_save=async_save),
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    batches = random_batches(config.vocab_size, tokens, context, steps)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))  # batch_size=None: as they are


def measure(
    preset: str, checkpointing: str, tokens: int, context: int, steps: int, compile_blocks: bool, param_dtype: str
) -> dict[str, Any]:
    """Train ``steps`` steps of ``preset`` through the FSDP2 path in this process; losses, step times, peak memory."""
    execution = ExecutionConfig(
        activation_checkpointing=checkpointing, compile_blocks=compile_blocks, fsdp_param_dtype=param_dtype
    )
    peak = PeakMemory()
    fit_one_device(preset, execution, tokens, context, steps, [peak])
    return {
        "activation_checkpointing": checkpointing,
        "compile_blocks": compile_blocks,
        **peak.peak,
        "losses": peak.losses,
        "step_seconds": peak.step_seconds,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="dlcm_2.3b", choices=sorted(PRESETS))
    parser.add_argument("--tokens-per-batch", type=int, default=16384, help="tokens per micro-batch")
    parser.add_argument("--context", type=int, default=2048, help="tokens per document")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per setting")
    parser.add_argument("--checkpointing", default="none,full", help="comma-separated: none, selective, full")
    parser.add_argument("--compile", action="store_true", help="torch.compile every block")
    parser.add_argument("--param-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--one", action="store_true", help="measure the single --checkpointing setting here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    shape = (args.tokens_per_batch, args.context, args.steps, args.compile, args.param_dtype)
    if args.one:
        print(json.dumps(measure(args.preset, args.checkpointing, *shape)))
        return 0
    runs = []
    for mode in args.checkpointing.split(","):
        command = [sys.executable, __file__, "--one", "--checkpointing", mode, *_forwarded(args)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"preset": args.preset, "tokens_per_batch": args.tokens_per_batch, "context": args.context}
    print(json.dumps({**report, "device": device, "torch": torch.__version__, "runs": runs}, indent=1))
    return 0


def _forwarded(args: argparse.Namespace) -> list[str]:
    flags = ["--preset", args.preset, "--tokens-per-batch", str(args.tokens_per_batch), "--context", str(args.context)]
    flags += ["--steps", str(args.steps), "--param-dtype", args.param_dtype]
    return [*flags, "--compile"] if args.compile else flags


if __name__ == "__main__":
    sys.exit(main())
