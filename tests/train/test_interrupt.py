"""CTRL-C in ``dlcm fit``: the first interrupt saves at the next optimizer step and stops with status 130, saying
where; ``--resume=auto`` continues from that save. A second interrupt stops at once and says nothing was saved."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlcm.cli import main
from dlcm.train import preemption
from dlcm.train.step_checkpoint import StepCheckpoint

RECIPE = Path(__file__).parents[2] / "recipes" / "dlcm_tiny_r4_defaultcorpus_cpu.yaml"
# The recipe warms up for 30 steps, so a run interrupted before step 20 may be extended (the rate at the resume
# step does not depend on the run's length during warm-up).
FAST = [
    "--data.tokens_per_batch=256",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--step_checkpoint.every_n_steps=1000",
    "--resume=auto",
]


@pytest.mark.slow  # two real `dlcm fit` processes: about a minute on 2 cores
def test_ctrl_c_saves_and_auto_resume_continues(tmp_path: Path) -> None:
    args = [
        sys.executable,
        "-m",
        "dlcm",
        "fit",
        f"--config={RECIPE}",
        *FAST,
        "--trainer.logger.init_args.save_dir=runs",
    ]
    run = subprocess.Popen(
        [*args, "--trainer.max_steps=20"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    events = tmp_path / "runs" / RECIPE.stem / "version_0"
    deadline = time.monotonic() + 120
    while not any(events.glob("events.out.tfevents.*")):  # training set up: the handlers are in place
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0]
        time.sleep(0.2)
    time.sleep(1.0)
    run.send_signal(signal.SIGINT)
    out = run.communicate(timeout=120)[0]
    assert run.returncode == preemption.INTERRUPT_EXIT_CODE, out
    assert "CTRL-C again stops at once" in out and "Traceback" not in out, out
    saved = sorted((events / "checkpoints").glob("step*.ckpt"))
    assert len(saved) == 1, out
    step = int(saved[0].stem.removeprefix("step"))
    assert 1 <= step < 20 and f"interrupted: saved {saved[0].relative_to(tmp_path)} at step {step}" in out, out

    resumed = subprocess.run(
        [*args, f"--trainer.max_steps={step + 2}", "--extend_run=true"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert f"resuming from {saved[0].relative_to(tmp_path)} (step {step})" in log, log
    assert (events / "checkpoints" / f"step{step + 2:09d}.ckpt").exists()
    assert sorted(p.name for p in (tmp_path / "runs" / RECIPE.stem).iterdir()) == ["version_0"]


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path: Path, monkeypatch, capsys) -> None:
    sent = []

    def interrupt_twice(self, trainer, *args) -> None:  # as a user pressing CTRL-C twice during step 2
        if trainer.global_step == 2 and not sent:
            sent.append(2)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(StepCheckpoint, "on_train_batch_end", interrupt_twice)
    monkeypatch.chdir(tmp_path)
    handler = signal.getsignal(signal.SIGINT)
    try:
        status = main(["fit", f"--config={RECIPE}", *FAST, "--trainer.max_steps=10"])
    finally:
        signal.signal(signal.SIGINT, handler)
        preemption.clear()
    err = capsys.readouterr().err
    assert status == 130
    assert err.rstrip().splitlines()[-1] == (
        "dlcm fit: interrupted; stopped at once at step 2, nothing saved there (no checkpoint was saved)"
    )
    assert not list(tmp_path.rglob("*.ckpt"))


def test_signals_in_dataloader_workers_are_left_to_the_trainer(monkeypatch) -> None:
    monkeypatch.setattr(preemption, "_owner", [os.getpid() + 1])  # as in a forked worker
    preemption._note(signal.SIGINT, None)
    preemption._note(signal.SIGINT, None)
    assert not preemption.requested()
