"""How long a sharded (FSDP2) checkpoint stalls the training loop: synchronous vs asynchronous saves.

Trains ``--preset`` through the FSDP2 path dlcm uses (``AtomicModelParallelStrategy`` in one process, random
tokens) with a :class:`~dlcm.train.step_checkpoint.StepCheckpoint` every ``--every`` steps, in one fresh process
per mode:

- ``sync``: ``torch.distributed.checkpoint.save``; the loop waits for the whole write.
- ``async``: ``torch.distributed.checkpoint.async_save``; the loop waits for the copy of the shards to host memory,
  the write runs in a background thread.

The stall of a save is the wall time of the save call inside the training loop, with ``torch.cuda.synchronize``
before and after (so pending kernels are not counted and the device-to-host copy is). Any wait for the previous
background write to finish is timed separately (``wait_previous_seconds``). Also reported: the time from an
asynchronous save's start to its directory appearing under the final name (``write_seconds``, resolution of a step),
the median step time with no write in flight and with one in flight, and the checkpoint's size. Before each save
the previous checkpoint is deleted, so the disk holds at most one (27.6 GB for DLCM 2.3B with AdamW state).

    python bench/checkpoint_stall.py --preset dlcm_2.3b --dir /tmp/checkpoint_stall \\
        --out bench/results/checkpoint_stall_h200.json
    python bench/checkpoint_stall.py --smoke --out /tmp/checkpoint_stall.json   # CPU, tiny model, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fsdp_memory import fit_one_device
from report import run_meta, write_json

from dlcm.model.presets import PRESETS
from dlcm.train.checkpoint_io import remove_path
from dlcm.train.execution import ExecutionConfig
from dlcm.train.step_checkpoint import StepCheckpoint, step_path

MODES = ("sync", "async")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TimedStepCheckpoint(StepCheckpoint):
    """StepCheckpoint that times each save's stall, the wait for the previous write, and the background write."""

    def __init__(self, every: int, directory: Path) -> None:
        super().__init__(every_n_steps=every, every_n_minutes=None, keep_last=1, dirpath=str(directory))
        self.saves: list[dict[str, Any]] = []
        self.in_flight: tuple[int, float] | None = None  # (step, start time) of the write not yet on disk

    def _save(self, trainer: L.Trainer, step: int) -> None:
        synchronize()
        start = time.perf_counter()
        trainer.strategy.wait_for_pending_save()
        waited = time.perf_counter() - start
        self._note_written()
        for old in self.dirpath.glob("step*.ckpt"):  # keep the disk to one checkpoint
            remove_path(old)
        synchronize()
        start = time.perf_counter()
        super()._save(trainer, step)
        synchronize()
        stall = time.perf_counter() - start
        self.saves.append({"step": step, "stall_seconds": stall, "wait_previous_seconds": waited})
        self.in_flight = (step, start)
        self._note_written()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        trainer.strategy.commit_finished_save()
        self._note_written()

    def _finish(self, trainer: L.Trainer) -> None:
        super()._finish(trainer)
        self._note_written()

    def _note_written(self) -> None:
        if self.in_flight is not None and step_path(self.dirpath, self.in_flight[0]).exists():
            step, start = self.in_flight
            next(s for s in self.saves if s["step"] == step)["write_seconds"] = time.perf_counter() - start
            self.in_flight = None

    def writing(self) -> bool:
        return self.in_flight is not None


class StepTimes(Callback):
    """Wall time of each step, and whether a background write was in flight during it."""

    def __init__(self, saver: TimedStepCheckpoint) -> None:
        self.saver = saver
        self.steps: list[tuple[float, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        synchronize()
        self.writing = self.saver.writing()
        self.clock = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        outputs["loss"].item()  # waits for the step's kernels
        self.steps.append((time.perf_counter() - self.clock, self.writing))


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(mode: str, preset: str, every: int, saves: int, tokens: int, context: int, directory: Path) -> dict:
    """Train ``every * saves`` steps with a save every ``every`` steps; the timings of this mode."""
    saver = TimedStepCheckpoint(every, directory / mode)
    times = StepTimes(saver)
    steps = every * saves
    fit_one_device(preset, ExecutionConfig(), tokens, context, steps, [times, saver], async_save=mode == "async")
    last = step_path(saver.dirpath, steps)
    size = directory_bytes(last)
    remove_path(last)
    remove_path(saver.dirpath / "last.ckpt")
    quiet = [t for t, writing in times.steps[1:] if not writing]  # step 1 includes the first-step setup
    busy = [t for t, writing in times.steps[1:] if writing]
    stalls = [s["stall_seconds"] for s in saver.saves]
    return {
        "mode": mode,
        "saves": saver.saves,
        "median_stall_seconds": statistics.median(stalls),
        "median_step_seconds": statistics.median(quiet) if quiet else None,
        "median_step_seconds_while_writing": statistics.median(busy) if busy else None,
        "checkpoint_bytes": size,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="dlcm_2.3b", choices=sorted(PRESETS))
    parser.add_argument("--every", type=int, default=20, help="optimizer steps between saves")
    parser.add_argument("--saves", type=int, default=3, help="saves per mode (the stall is their median)")
    parser.add_argument("--tokens-per-batch", type=int, default=16384, help="tokens per micro-batch")
    parser.add_argument("--context", type=int, default=2048, help="tokens per document")
    parser.add_argument("--dir", default=None, help="checkpoint directory (default: a temporary one)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: sync, async")
    parser.add_argument("--smoke", action="store_true", help="CPU check: tiny_dlcm, 2 saves 2 steps apart")
    parser.add_argument("--one", action="store_true", help="measure the single --modes entry in this process")
    parser.add_argument("--out", default=None, help="write the JSON here as well as printing it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.smoke:
        args.preset, args.every, args.saves, args.tokens_per_batch, args.context = "tiny_dlcm", 2, 2, 256, 128
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"--modes entry {mode!r} is not allowed: expected {', '.join(MODES)}")
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(args.dir or scratch)
        if args.one:
            result = measure(
                modes[0], args.preset, args.every, args.saves, args.tokens_per_batch, args.context, directory
            )
            print(json.dumps(result))
            return 0
        report: dict[str, Any] = {
            **run_meta(),
            "preset": args.preset,
            "every": args.every,
            "tokens_per_batch": args.tokens_per_batch,
            "context": args.context,
            "results": [],
        }
        for mode in modes:  # a fresh process per mode: its own allocator, page cache warm-up and host buffers
            shape = ["--preset", args.preset, "--every", str(args.every), "--saves", str(args.saves)]
            shape += ["--tokens-per-batch", str(args.tokens_per_batch), "--context", str(args.context)]
            command = [sys.executable, __file__, "--one", "--modes", mode, "--dir", str(directory), *shape]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.stderr.write(done.stderr)
                raise SystemExit(f"measuring mode {mode} failed (exit code {done.returncode})")
            report["results"].append(json.loads(done.stdout.strip().splitlines()[-1]))
            if args.out:
                write_json(args.out, report)
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
