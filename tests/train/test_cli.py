"""The `dlcm` entry point end to end on the tiny recipe: fit, validate, resume, and its error messages."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dlcm.cli import main
from dlcm.train.cli import run_cli

RECIPE = str(Path(__file__).parents[2] / "recipes" / "dlcm_tiny_r4_defaultcorpus_cpu.yaml")
# Small enough for CI: short micro-batches, few steps, a little validation.
FAST = [
    "--data.tokens_per_batch=512",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
]


def output_dirs(root: Path) -> list[str]:
    """Checkpoints and TensorBoard logs under ``root``: the recipe's logger writes to ./runs otherwise."""
    return [f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}"]


def fit_args(root: Path, steps: int, *extra: str) -> list[str]:
    return [
        "fit",
        f"--config={RECIPE}",
        *FAST,
        f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=4",
        *output_dirs(root),
        *extra,
    ]


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = outputs["loss"].item()


def run_fit(args: list[str], ckpt_path: str | None = None) -> tuple[LossRecorder, object]:
    cli = run_cli(args[1:], run=False)
    recorder = LossRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    return recorder, cli


def scalars(log_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_fit_writes_tensorboard_and_checkpoints_then_validate_reads_them(tmp_path: Path, capsys) -> None:
    _, cli = run_fit(fit_args(tmp_path, 8))
    log_dir = Path(cli.trainer.logger.log_dir)
    assert list(log_dir.glob("events.out.tfevents.*"))
    logged = scalars(log_dir)
    for tag in ("train/loss", "train/ce", "train/aux", "train/ratio", "val/loss", "val/bpb", "val/ppl", "val/ratio"):
        assert tag in logged, tag
    assert all(math.isfinite(v) for v in logged["val/bpb"])
    last = log_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    cli.after_fit()  # what `dlcm fit` prints at the end
    assert f"last checkpoint:  {last}" in capsys.readouterr().out
    cli.trainer.checkpoint_callback.best_model_score = None  # resumed into a new directory without validating
    cli.after_fit()
    assert "(val/loss" not in capsys.readouterr().out

    validate = run_cli([f"--config={RECIPE}", *FAST, *output_dirs(tmp_path)], run=False)
    metrics = validate.trainer.validate(validate.model, validate.datamodule, ckpt_path=str(last))[0]
    assert math.isfinite(metrics["val/loss"]) and math.isfinite(metrics["val/bpb"])
    assert metrics["val/bpb"] > 0
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-4)


@pytest.mark.parametrize(("limit", "batches"), [("1", 1), ("3", 3), ("0.5", None)])
def test_an_integer_batch_limit_is_a_count(limit: str, batches: int | None, tmp_path: Path) -> None:
    cli = run_cli(
        [f"--config={RECIPE}", *FAST, *output_dirs(tmp_path), f"--trainer.limit_val_batches={limit}"], run=False
    )
    assert type(cli.trainer.limit_val_batches) is (float if batches is None else int)
    cli.trainer.validate(cli.model, cli.datamodule, verbose=False)
    whole = len(cli.datamodule.val_dataloader())
    assert cli.trainer.num_val_batches == [batches or int(0.5 * whole)]


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path: Path) -> None:
    every = ["--checkpoint.every_n_train_steps=5", "--checkpoint.save_top_k=-1", "--checkpoint.monitor=null"]
    full, _ = run_fit(fit_args(tmp_path / "full", 10))
    first, cli = run_fit(fit_args(tmp_path / "split", 5, *every))
    ckpt = Path(cli.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"
    # Another max_steps than the checkpoint's: an explicit extension (in warm-up, so the schedule follows it).
    resumed, _ = run_fit(fit_args(tmp_path / "split", 10, *every, "--extend_run=true"), ckpt_path=str(ckpt))
    assert sorted(first.losses) == list(range(1, 6))
    assert sorted(resumed.losses) == list(range(6, 11))
    for step in range(1, 11):
        got = first.losses.get(step, resumed.losses.get(step))
        assert got == pytest.approx(full.losses[step], rel=1e-6, abs=1e-7), step


def test_print_config_and_unknown_keys(capsys) -> None:
    assert main(["fit", f"--config={RECIPE}", "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "DLCMModule" in printed and "tokens_per_batch" in printed
    assert main(["fit", f"--config={RECIPE}", "--data.tokens_per_bach=8"]) == 2
    assert "tokens_per_bach" in capsys.readouterr().err


def test_missing_data_dir_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        run_cli([f"--config={RECIPE}", f"--data.data_dir={tmp_path / 'nope'}"], run=False)


def test_sequence_budget_below_two_tokens_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"data\.tokens_per_batch=1"):
        run_cli([f"--config={RECIPE}", "--data.tokens_per_batch=1"], run=False)


def test_corrupt_checkpoint_and_vocab_mismatch_are_explained(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    cli = run_cli([f"--config={RECIPE}", *FAST, *output_dirs(tmp_path)], run=False)
    with pytest.raises(ValueError, match=r"bad\.ckpt cannot be read"):
        cli.trainer.validate(cli.model, cli.datamodule, ckpt_path=str(bad))
    state = {k: v.clone() for k, v in cli.model.state_dict().items()}
    state["network.embed.weight"] = torch.zeros(7, state["network.embed.weight"].shape[1])
    with pytest.raises(ValueError, match=r"network\.embed\.weight: checkpoint \(7, 128\).*vocab_size"):
        cli.model.on_load_checkpoint({"state_dict": state})


def test_meta_init_builds_nothing_until_configure_model_and_trains_from_the_eager_init(tmp_path: Path) -> None:
    meta = run_cli(fit_args(tmp_path / "meta", 2, "--model.init_args.execution.meta_init=true")[1:], run=False)
    assert all(p.is_meta for p in meta.model.network.parameters())
    eager, _ = run_fit(fit_args(tmp_path / "eager", 2))
    recorder = LossRecorder()
    meta.trainer.callbacks.append(recorder)
    meta.trainer.fit(meta.model, meta.datamodule)
    # Materialised in the eager build's RNG order: the same weights, so the same first losses.
    assert recorder.losses == pytest.approx(eager.losses, rel=1e-6)
