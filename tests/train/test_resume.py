"""Step checkpoints, preemption and ``--resume=auto`` on CPU in one process; the rules a resumed run obeys.

Multi-process kills and restarts are in ``test_chaos``; the FSDP2 recipe on CUDA in ``test_resume_gpu``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dlcm.train import preemption
from dlcm.train.checkpoint_io import require_sharded_checkpoint
from dlcm.train.cli import run_cli

RECIPES = Path(__file__).parents[2] / "recipes"
TINY = RECIPES / "dlcm_tiny_r4_defaultcorpus_cpu.yaml"
RUN = "dlcm_tiny_r4_defaultcorpus_cpu"  # the run directory is named after the recipe
FAST = [
    "--data.tokens_per_batch=256",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
    "--resume=auto",
]
ASYNC_FSDP2_ONE_DEVICE = [
    f"--config={RECIPES / 'fragments' / 'strategy_fsdp2.yaml'}",
    "--trainer.devices=1",
    "--trainer.strategy.init_args.data_parallel_size=1",
    "--trainer.strategy.init_args.async_save=true",
]
ONE_PROCESS_FSDP2 = [
    *ASYNC_FSDP2_ONE_DEVICE,
    "--trainer.accelerator=cpu",
    "--model.init_args.execution.fsdp_param_dtype=float32",  # fp32 compute: exact against the unsharded run
]


class Losses(Callback):
    """Loss per optimizer step; optionally sends this process ``signum`` after step ``signal_at``."""

    def __init__(self, signal_at: int | None = None, signum: int = signal.SIGUSR1) -> None:
        self.losses: dict[int, float] = {}
        self.signal_at = signal_at
        self.signum = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = outputs["loss"].item()
        if trainer.global_step == self.signal_at:
            os.kill(os.getpid(), self.signum)  # SLURM: SIGUSR1 before the time limit, SIGTERM on preemption


def fit(root: Path, recipe: Path, steps: int, callback: Losses | None = None, *extra: str):
    """``dlcm fit --resume=auto`` as the CLI runs it, with ``callback`` added; the CLI object."""
    cli = run_cli(
        [
            f"--config={recipe}",
            f"--trainer.max_steps={steps}",
            f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}",
            *FAST,
            *extra,
        ],
        run=False,
    )
    if callback is not None:
        cli.trainer.callbacks.insert(0, callback)  # before the checkpoint callbacks, as Lightning orders them
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=cli.resolve_resume())
    return cli


def preempt_and_resume(root: Path, recipe: Path, steps: int, at: int, *extra: str) -> tuple[dict, dict, Path]:
    """Run to ``at``, signal, resume to ``steps``: (losses before, losses after, checkpoint directory)."""
    first = Losses(signal_at=at)
    with pytest.raises(preemption.Preempted) as stopped:
        fit(root, recipe, steps, first, *extra)
    assert stopped.value.code == preemption.REQUEUE_EXIT_CODE
    preemption.clear()
    resumed = Losses()
    cli = fit(root, recipe, steps, resumed, *extra)
    return first.losses, resumed.losses, Path(cli.trainer.logger.log_dir) / "checkpoints"


def test_a_checkpoint_exists_before_the_first_validation(tmp_path: Path) -> None:
    cli = fit(tmp_path, TINY, 3, None, "--step_checkpoint.every_n_steps=2", "--trainer.val_check_interval=100")
    checkpoints = Path(cli.trainer.logger.log_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step000000002.ckpt", "step000000003.ckpt"]
    assert (checkpoints / "last.ckpt").resolve().name == "step000000003.ckpt"  # the end of training saves too


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_saves_at_the_step_boundary_and_auto_resume_continues_exactly(tmp_path: Path, signum: int) -> None:
    full = Losses()
    fit(tmp_path / "full", TINY, 5, full)
    first = Losses(signal_at=2, signum=signum)
    with pytest.raises(preemption.Preempted):
        fit(tmp_path / "split", TINY, 5, first, "--step_checkpoint.every_n_steps=100")
    preemption.clear()
    resumed = Losses()
    cli = fit(tmp_path / "split", TINY, 5, resumed, "--step_checkpoint.every_n_steps=100")
    assert sorted(first.losses) == [1, 2] and sorted(resumed.losses) == [3, 4, 5]
    assert {**first.losses, **resumed.losses} == pytest.approx(full.losses, rel=1e-6, abs=1e-7)
    assert Path(cli.trainer.logger.log_dir) == tmp_path / "split" / RUN / "version_0"


def test_async_sharded_saves_survive_preemption_and_resume_exactly(tmp_path: Path) -> None:
    full = Losses()
    fit(tmp_path / "full", TINY, 5, full, *ONE_PROCESS_FSDP2)
    before, after, checkpoints = preempt_and_resume(
        tmp_path / "split", TINY, 5, 3, *ONE_PROCESS_FSDP2, "--step_checkpoint.every_n_steps=2"
    )
    assert sorted(before) == [1, 2, 3] and sorted(after) == [4, 5]
    assert {**before, **after} == pytest.approx(full.losses, rel=1e-6, abs=1e-7)
    for name in ("step000000004.ckpt", "step000000005.ckpt"):  # keep_last = 2
        require_sharded_checkpoint(checkpoints / name)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step000000004.ckpt", "step000000005.ckpt"]


def test_one_tensorboard_run_across_restarts_with_monotone_steps(tmp_path: Path) -> None:
    before, after, _ = preempt_and_resume(tmp_path, TINY, 5, 3, "--step_checkpoint.every_n_steps=2")
    versions = sorted(p.name for p in (tmp_path / RUN).iterdir())
    assert versions == ["version_0"]
    events = EventAccumulator(str(tmp_path / RUN / "version_0"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and len(steps) == 5  # each step once, in order
    values = [e.value for e in events.Scalars("train/loss")]
    assert values == pytest.approx([{**before, **after}[s] for s in range(1, 6)], rel=1e-6)


def test_overrides_at_resume_are_refused_or_applied_and_max_steps_is_fixed(tmp_path: Path) -> None:
    cosine = ["--model.init_args.schedule.warmup_steps=0"]  # past warm-up from step 1: the length matters
    fit(tmp_path, TINY, 3, None, *cosine)
    refused = {
        "--model.init_args.optimizer.lr=0.002": r"model\.init_args\.optimizer\.lr=0\.002 \(checkpoint: 0\.001\)",
        "--model.init_args.config.parser.aux_weight=0.05": r"model\.init_args\.config\.parser\.aux_weight=0\.05 "
        r"\(checkpoint: 0\.03\)",
        "--model.init_args.seed=1": r"model\.init_args\.seed=1 \(checkpoint: 0\)",
    }
    for override, message in refused.items():
        with pytest.raises(ValueError, match=rf"cannot resume from .*step000000003\.ckpt: {message}.*fixed in a"):
            fit(tmp_path, TINY, 3, None, *cosine, override)
    with pytest.raises(ValueError, match=r"trainer\.max_steps=5 differs from the checkpoint's 3 .*--extend_run=true"):
        fit(tmp_path, TINY, 5, None, *cosine)
    with pytest.raises(ValueError, match=r"change the learning rate at step 3 from 0\.1 to .*total_steps=3"):
        fit(tmp_path, TINY, 5, None, *cosine, "--extend_run=true")
    # The explicit extension: the schedule keeps its 3 steps (the rate stays at its floor); execution and trainer
    # settings are applied.
    extended = Losses()
    cli = fit(
        tmp_path,
        TINY,
        5,
        extended,
        *cosine,
        "--extend_run=true",
        "--model.init_args.schedule.total_steps=3",
        "--model.init_args.execution.activation_checkpointing=full",
    )
    assert sorted(extended.losses) == [4, 5]
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.lr_lambdas[0].total_steps == 3
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1 * 1e-3)
    assert Path(cli.trainer.logger.log_dir).name == "version_0"


def test_extending_during_warm_up_refits_the_schedule(tmp_path: Path) -> None:
    fit(tmp_path, TINY, 2, None)  # the recipe warms up for 30 steps: the length does not matter yet
    cli = fit(tmp_path, TINY, 4, None, "--extend_run=true")
    assert cli.trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0].total_steps == 4
