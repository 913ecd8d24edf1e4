"""Chaos: a two-rank FSDP2 run (gloo, CPU, asynchronous sharded saves) killed again and again, relaunched with
``--resume=auto`` until it finishes, ends where the uninterrupted run ends.

A supervisor starts both ranks as separate ``python -m dlcm fit`` processes (as ``srun`` or ``torchrun`` would)
and interrupts them: SIGKILL to one rank or to both (at a random moment, or while a save is being written),
SIGUSR1 or SIGTERM to one rank or to both (the run saves at the next step boundary and exits with the requeue
code). A rank whose peer died is killed after a grace period, as ``srun --kill-on-bad-exit`` does. Then it checks:
the final weights equal the uninterrupted run's, TensorBoard's loss curve is the same step by step in one run
directory, no temporary file is left, and every checkpoint present loads.

The default variant interrupts twice (SIGKILL to both ranks during a save, SIGUSR1 to one rank); ``slow`` interrupts
20 times.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.load import _load_distributed_checkpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dlcm.train.preemption import REQUEUE_EXIT_CODE
from tests.train.test_resume import RECIPES, RUN, TINY

WORLD = 2
EVERY = 2  # optimizer steps between saves
GRACE_S = 10.0  # after a rank ended with an error or the requeue code: how long the others may take to end
ACTIONS = ("kill_one", "kill_all", "kill_all_in_save", "usr1_one", "usr1_all", "term_one", "term_all")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(root: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dlcm",
        "fit",
        f"--config={TINY}",
        f"--config={RECIPES / 'fragments' / 'strategy_fsdp2.yaml'}",
        "--trainer.accelerator=cpu",
        f"--trainer.devices={WORLD}",
        f"--trainer.strategy.init_args.data_parallel_size={WORLD}",
        "--trainer.strategy.init_args.async_save=true",
        "--model.init_args.execution.fsdp_param_dtype=float32",
        "--data.tokens_per_batch=256",
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--step_checkpoint.every_n_steps={EVERY}",
        "--step_checkpoint.every_n_minutes=null",
        "--step_checkpoint.keep_last=3",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        "--resume=auto",
    ]


def launch(root: Path, steps: int, log: Path) -> list[subprocess.Popen]:
    """Both ranks, started externally (LOCAL_RANK set): Lightning joins them through MASTER_ADDR/MASTER_PORT."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    ranks = []
    for rank in range(WORLD):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0"}
        env.update({"LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "OMP_NUM_THREADS": "1"})
        with open(log.with_suffix(f".rank{rank}.log"), "a") as out:  # the child keeps its own descriptor
            ranks.append(subprocess.Popen(command(root, steps), env=env, stdout=out, stderr=subprocess.STDOUT))
    return ranks


def wait(ranks: list[subprocess.Popen], timeout_s: float) -> list[int]:
    """Exit codes. Once a rank has exited with a non-zero code the others get ``GRACE_S`` (as ``srun
    --kill-on-bad-exit`` would not); a rank still running then, or after ``timeout_s``, is killed."""
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in ranks) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in ranks):
            deadline = min(deadline, time.monotonic() + GRACE_S)
        time.sleep(0.05)
    for process in ranks:
        if process.poll() is None:
            process.kill()
    return [p.wait() for p in ranks]


def saves(directory: Path) -> set[str]:
    return {p.name for p in directory.glob("step*.ckpt")} if directory.is_dir() else set()


def partial_save(directory: Path) -> bool:
    return directory.is_dir() and any(p.name.endswith(".partial") for p in directory.iterdir())


def interrupt(ranks: list[subprocess.Popen], action: str, directory: Path, rng: random.Random) -> str:
    """Wait for the moment ``action`` needs, then act; a short description of what was done."""
    before = saves(directory)
    deadline = time.monotonic() + 300
    # Every action waits for one new complete save of this launch, so each launch makes progress.
    while saves(directory) <= before and all(p.poll() is None for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.01)
    if action == "kill_all_in_save":
        while not partial_save(directory) and all(p.poll() is None for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.002)
    else:
        time.sleep(rng.uniform(0.0, 2.0))
    if any(p.poll() is not None for p in ranks):
        return f"{action}: the run had already ended"
    kind, _, who = action.partition("_")
    signum = {"kill": signal.SIGKILL, "usr1": signal.SIGUSR1, "term": signal.SIGTERM}[kind]
    targets = [rng.choice(ranks)] if who == "one" else ranks
    for process in targets:
        process.send_signal(signum)
    return f"{action} ({'while a save was written' if partial_save(directory) else 'between saves'})"


def run_until_done(root: Path, steps: int, actions: list[str], seed: int) -> list[str]:
    """Launch, interrupt with each of ``actions`` in turn, relaunch; then let the last launch finish."""
    rng = random.Random(seed)
    directory = root / RUN / "version_0" / "checkpoints"
    history = []
    for launches in range(len(actions) + 20):
        ranks = launch(root, steps, root / "supervisor")
        if launches < len(actions):
            history.append(interrupt(ranks, actions[launches], directory, rng))
        codes = wait(ranks, 600.0)
        history.append(f"exit codes {codes}")
        if codes == [0] * WORLD:
            return history
        if launches < len(actions) and actions[launches].startswith(("usr1", "term")):
            # The run can end between the check and the signal: a rank that had finished exits 0, and the signalled
            # one may die of the signal's default action once its handler is gone; the next launch completes it.
            ended = "already ended" in history[-2] or 0 in codes
            assert codes == [REQUEUE_EXIT_CODE] * WORLD or ended, history
        if launches >= len(actions):
            pytest.fail(f"the uninterrupted launch failed: {history}; see {root}/supervisor.rank*.log")
    pytest.fail(f"the run never finished: {history}")


def losses(run_dir: Path) -> dict[int, float]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == sorted({e.step for e in scalars})  # monotone, each step once
    return {e.step: e.value for e in scalars}


def check_chaos(tmp_path: Path, steps: int, actions: list[str], seed: int) -> None:
    reference, chaos = tmp_path / "reference", tmp_path / "chaos"
    assert run_until_done(reference, steps, [], seed) == ["exit codes [0, 0]"]
    history = run_until_done(chaos, steps, actions, seed)
    print("\n".join(history))
    assert sorted(p.name for p in (chaos / RUN).iterdir()) == ["version_0"]  # one TensorBoard run
    run_dir = chaos / RUN / "version_0"
    expected = losses(reference / RUN / "version_0")
    assert len(expected) == steps
    assert losses(run_dir) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    final = f"step{steps:09d}.ckpt"
    mine = _load_distributed_checkpoint(run_dir / "checkpoints" / final)["state_dict"]
    theirs = _load_distributed_checkpoint(reference / RUN / "version_0" / "checkpoints" / final)["state_dict"]
    assert mine.keys() == theirs.keys()
    for name, value in theirs.items():
        torch.testing.assert_close(mine[name], value, rtol=1e-6, atol=1e-7, msg=name)
    leftovers = [p for p in chaos.rglob("*") if ".tmp-" in p.name or p.name.endswith((".partial", ".old"))]
    assert not leftovers
    for checkpoint in (run_dir / "checkpoints").iterdir():
        assert _load_distributed_checkpoint(checkpoint)["global_step"] > 0, checkpoint


def test_chaos_two_interruptions(tmp_path: Path) -> None:
    check_chaos(tmp_path, 8, ["kill_all_in_save", "usr1_one"], seed=0)


@pytest.mark.slow
def test_chaos_twenty_interruptions(tmp_path: Path) -> None:
    rng = random.Random(1)
    actions = [*ACTIONS, *ACTIONS, *(rng.choice(ACTIONS) for _ in range(6))]
    rng.shuffle(actions)
    check_chaos(tmp_path, 4 * len(actions) + 8, actions, seed=1)
