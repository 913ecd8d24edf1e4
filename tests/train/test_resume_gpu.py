"""On CUDA: the small H200 recipe under FSDP2 (one process) with asynchronous sharded saves every 2 steps,
preempted by SIGUSR1 after step 3 and resumed with ``--resume=auto``: the resumed steps' losses equal the
uninterrupted run's, in the same run directory, with no partial save left."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlcm.train.checkpoint_io import require_sharded_checkpoint
from tests.train.test_resume import ASYNC_FSDP2_ONE_DEVICE, RECIPES, Losses, fit, preempt_and_resume

pytestmark = pytest.mark.gpu

SMALL = RECIPES / "dlcm_small_r4_defaultcorpus_h200.yaml"
ON_GPU = [*ASYNC_FSDP2_ONE_DEVICE, "--data.tokens_per_batch=16384", "--data.num_workers=0"]


def test_async_sharded_save_preemption_and_auto_resume_of_the_small_recipe(tmp_path: Path) -> None:
    full = Losses()
    fit(tmp_path / "full", SMALL, 6, full, *ON_GPU)
    before, after, checkpoints = preempt_and_resume(
        tmp_path / "split", SMALL, 6, 3, *ON_GPU, "--step_checkpoint.every_n_steps=2"
    )
    print(f"uninterrupted {full.losses}\npreempted {before}\nresumed {after}")
    assert sorted(before) == [1, 2, 3] and sorted(after) == [4, 5, 6]
    # bf16 on one GPU, the same kernels in the same order: equal up to kernel nondeterminism
    assert {**before, **after} == pytest.approx(full.losses, rel=2e-3)
    assert checkpoints.parent.name == "version_0"  # the same TensorBoard run
    for name in ("step000000004.ckpt", "step000000006.ckpt"):  # keep_last = 2
        require_sharded_checkpoint(checkpoints / name)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step000000004.ckpt", "step000000006.ckpt"]
