"""Real multi-process data parallelism on CPU (Lightning DDP, gloo): equal to one process on the same batch.

Two ranks each train on their own micro-batches; the reference is one process with gradient accumulation 2 that
sees rank 0's and rank 1's micro-batches of every step in turn. With DDP's gradient averaging and Lightning's
accumulation both computing the mean gradient of the same two micro-batches, the parameters after N steps agree
to fp32 rounding. Boundaries are thresholded (sampling seeds differ by rank by design) and the ratio loss uses
the micro-batch scope here: under accumulation the global scope's F is a running value (exact on the step's last
micro-batch only), so the global scope is checked separately for identical statistics on every rank.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed.tensor import DTensor

from dlcm.data.datamodule import PackedStream
from dlcm.train.cli import run_cli

RECIPE = str(Path(__file__).parents[2] / "recipes" / "dlcm_tiny_r4_defaultcorpus_cpu.yaml")
STEPS = 4


def args(root: Path, scope: str, *extra: str) -> list[str]:
    return [
        f"--config={RECIPE}",
        "--data.tokens_per_batch=256",
        f"--trainer.max_steps={STEPS}",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.logger=false",
        "--checkpoint.monitor=null",
        f"--trainer.default_root_dir={root}",
        "--model.init_args.config.parser.boundary_mode=threshold",
        f"--model.init_args.config.parser.ratio_scope={scope}",
        "--model.init_args.schedule.warmup_steps=0",  # full-size Adam steps from the start
        *extra,
    ]


def full_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's state with FSDP2-sharded tensors gathered (a collective: every rank must call it)."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in network.state_dict().items()}


class Record(Callback):
    """Writes every rank's per-micro-batch boundary rate, loss and CE and its final parameters (spawned ranks
    cannot return them). Under accumulation Lightning reports each micro-batch loss divided by the accumulation
    count."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rates: list[float] = []
        self.losses: list[float] = []
        self.ces: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rates.append(outputs["ratio"].boundary_rate.item())
        self.losses.append(outputs["loss"].item())
        self.ces.append(outputs["ce"].item())

    def on_train_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        torch.save(full_state(pl_module.network), self.out / f"params-{rank}.pt")
        (self.out / f"rates-{rank}.json").write_text(json.dumps(self.rates))
        (self.out / f"losses-{rank}.json").write_text(json.dumps(self.losses))
        (self.out / f"ces-{rank}.json").write_text(json.dumps(self.ces))


def run_ddp(root: Path, scope: str) -> None:
    cli = run_cli(args(root, scope, "--trainer.strategy=ddp_spawn", "--trainer.devices=2"), run=False)
    cli.trainer.callbacks.append(Record(root))
    cli.trainer.fit(cli.model, cli.datamodule)


class InterleavedRanks:
    """Rank 0's then rank 1's micro-batch of every step, as one process's accumulation sequence."""

    def __init__(self, datamodule) -> None:
        spec = datamodule.stream_spec("train")
        per_rank = spec.batches // 2
        self.streams = [
            PackedStream(dataclasses.replace(spec, rank=r, world_size=2, batches=per_rank)) for r in range(2)
        ]
        self.length = 2 * per_rank

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for pair in zip(*self.streams, strict=True):
            yield from pair


def run_single_reference(root: Path, record: type[Record] = Record, *extra: str) -> None:
    """One process, accumulation 2, over rank 0's then rank 1's micro-batch of every step."""
    cli = run_cli(args(root, "batch", "--trainer.accumulate_grad_batches=2", *extra), run=False)
    cli.datamodule.train_dataloader = lambda: InterleavedRanks(cli.datamodule)
    cli.trainer.callbacks.append(record(root))
    cli.trainer.fit(cli.model, cli.datamodule)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    roots = {name: tmp_path_factory.mktemp(name) for name in ("ddp_batch", "ddp_global", "single")}
    run_ddp(roots["ddp_batch"], "batch")
    run_ddp(roots["ddp_global"], "global")
    run_single_reference(roots["single"])
    return roots


def test_two_gloo_ranks_equal_one_process_on_the_union_batch(runs: dict[str, Path]) -> None:
    rank0 = torch.load(runs["ddp_batch"] / "params-0.pt")
    rank1 = torch.load(runs["ddp_batch"] / "params-1.pt")
    single = torch.load(runs["single"] / "params-0.pt")
    initial = run_cli([f"--config={RECIPE}", "--trainer.logger=false"], run=False).model.network.state_dict()
    moved = max((single[k] - initial[k]).abs().max().item() for k in single)
    assert moved > 1e-3  # training really changed the weights
    for name, value in single.items():
        assert torch.equal(rank0[name], rank1[name]), name  # DDP keeps replicas identical (τ: averaged over ranks)
        # τ too: one fold per optimizer step of the step's estimates, over ranks here and micro-batches there.
        torch.testing.assert_close(rank0[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_global_ratio_statistics_are_identical_on_every_rank(runs: dict[str, Path]) -> None:
    rates = [json.loads((runs["ddp_global"] / f"rates-{r}.json").read_text()) for r in range(2)]
    assert len(rates[0]) == STEPS
    assert rates[0] == rates[1]  # all-reduced F: the same number on both ranks
